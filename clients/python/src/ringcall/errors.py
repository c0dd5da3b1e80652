"""Every error a call can raise. All derive from :class:`RingcallError`."""

import builtins


class RingcallError(Exception):
    """Base class of every error the client raises."""


class ServerError(RingcallError):
    """The server answered with a non-zero code (400 bad request, 404 unknown cmdid, 413 line
    too long, 500 handler failure, 503 too many connections, or a code of the service's own).

    The connection stays usable.
    """

    def __init__(self, code, message, cmdid=None):
        super().__init__(f"server replied {code} to cmdid {cmdid}: {message}")
        self.code = code
        self.message = message
        self.cmdid = cmdid


class ConnectionError(RingcallError, builtins.ConnectionError):
    """The connection could not be made, or was lost before the reply came. Whether the
    server ran the call is unknown unless the call was never sent (``sent`` is False)."""

    def __init__(self, message, sent=True):
        super().__init__(message)
        self.sent = sent


class TimeoutError(RingcallError, builtins.TimeoutError):
    """No reply within the timeout. The call may still run; a late reply is dropped, never
    given to another call."""


class ProtocolError(RingcallError):
    """The server sent something that is not a protocol reply; the connection is closed."""

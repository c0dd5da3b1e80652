"""Python client for ringcall servers (newline-delimited JSON calls over persistent TCP).

    import ringcall
    client = ringcall.Client("127.0.0.1", 8889)       # keep one, e.g. module-global
    client.call(10000, {"content": "hi"})              # -> {'content': 'hi'}

:class:`Client` (blocking, thread-safe, pipelined), :class:`Pool` (several connections, to one
server or several, with failover and retries), :class:`AsyncClient` and :class:`AsyncPool`
(asyncio). Connections ask for notices, so a server's graceful restart fails no call. Errors: :class:`ServerError` (``.code``, ``.message``),
:class:`TimeoutError`, :class:`ConnectionError`, :class:`ProtocolError`, all
:class:`RingcallError`. TLS: ``Client(..., tls=ringcall.tls_context("ca.pem"))``; a server
started with ``--token-file``: ``Client(..., token="…")``.
"""

from .aio import AsyncClient
from .client import DEFAULT_PORT, Call, Client, tls_context
from .errors import ConnectionError, ProtocolError, RingcallError, ServerError, TimeoutError
from .pool import AsyncPool, Pool

__all__ = [
    "AsyncClient",
    "AsyncPool",
    "Call",
    "Client",
    "ConnectionError",
    "DEFAULT_PORT",
    "Pool",
    "ProtocolError",
    "RingcallError",
    "ServerError",
    "TimeoutError",
    "tls_context",
]
__version__ = "0.1.0"

"""The asyncio client: one persistent connection, many calls in flight on it.

A call writes its request and awaits its own reply; one reader task matches replies to calls
in order (checking the echoed ``id``), so any number of tasks can share the client.
"""

import asyncio
import collections
import itertools

from ._protocol import CLOSING_CODES, decode_reply, encode_request
from .client import DEFAULT_PORT, HELLO
from .errors import ConnectionError, ProtocolError, RingcallError, ServerError, TimeoutError

# Longest reply line accepted (the server's own default request limit is 1 MiB; replies can
# be larger).
_MAX_REPLY = 64 << 20


class AsyncClient:
    """A persistent, pipelined asyncio connection to one ringcall server.

    ``client = AsyncClient("127.0.0.1", 8889)`` then ``await client.call(10000, {...})``
    returns the reply's ``data``. It connects on first use and again after the connection was
    lost. Errors are those of the blocking client: :class:`ServerError`, :class:`TimeoutError`,
    :class:`ConnectionError`.
    """

    def __init__(
        self,
        host="127.0.0.1",
        port=DEFAULT_PORT,
        *,
        timeout=10.0,
        connect_timeout=None,
        tls=None,
        server_hostname=None,
        token=None,
    ):
        """``tls``, ``server_hostname`` and ``token`` as for the blocking :class:`Client`."""
        self.host = host
        self.port = port
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self._tls = tls
        self._server_hostname = server_hostname
        self._token = token
        self._ids = itertools.count(1)
        self._writer = None
        self._reader_task = None
        self._in_flight = collections.deque()
        self._broken = None
        self._connecting = None

    async def _connect(self):
        if self._writer is not None and self._broken is None:
            return
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            await asyncio.shield(self._connecting)
        finally:
            if self._connecting is not None and self._connecting.done():
                self._connecting = None

    async def _open(self):
        tls = {}
        if self._tls is not None:
            tls = {"ssl": self._tls, "server_hostname": self._server_hostname or self.host}
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=_MAX_REPLY, **tls), self.connect_timeout
            )
        except (OSError, asyncio.TimeoutError) as e:
            raise ConnectionError(f"cannot connect to {self.host}:{self.port}: {e!r}", sent=False) from None
        self._writer = writer
        self._broken = None
        self._in_flight = collections.deque()
        self._reader_task = asyncio.ensure_future(self._read(reader, self._in_flight))
        if self._token is not None:
            # The first line of the connection, before any call waiting for it.
            call_id = next(self._ids)
            future = asyncio.get_running_loop().create_future()
            self._in_flight.append((call_id, HELLO, future))
            writer.write(encode_request(HELLO, {"token": self._token}, call_id))
            await asyncio.wait_for(future, self.connect_timeout)

    async def _read(self, reader, in_flight):
        reason, kind = "the server closed the connection", ConnectionError
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                if not in_flight:
                    reason, kind = f"a reply nobody asked for: {line[:200]!r}", ProtocolError
                    break
                call_id, cmdid, future = in_flight.popleft()
                try:
                    data = decode_reply(line, cmdid, call_id)
                except ProtocolError as e:
                    if not future.done():
                        future.set_exception(e)
                    reason, kind = str(e), ProtocolError
                    break
                except ServerError as e:
                    if not future.done():
                        future.set_exception(e)
                    if e.code in CLOSING_CODES:
                        reason = f"the server closed the connection after replying {e.code}"
                        break
                    continue
                except RingcallError as e:
                    if not future.done():
                        future.set_exception(e)
                    continue
                if not future.done():
                    future.set_result(data)
        except (OSError, ValueError, asyncio.IncompleteReadError) as e:
            reason = f"connection lost: {e!r}"
        self._fail(in_flight, reason, kind)

    def _fail(self, in_flight, reason, kind=ConnectionError):
        self._broken = reason
        while in_flight:
            _, _, future = in_flight.popleft()
            if not future.done():
                future.set_exception(kind(f"{self.host}:{self.port}: {reason}"))
        if self._writer is not None:
            self._writer.close()

    def submit(self, cmdid, params=None):
        """Sends one call at once if connected, and returns an awaitable of its ``data``."""
        return asyncio.ensure_future(self._call(cmdid, params))

    async def _call(self, cmdid, params):
        call_id = next(self._ids)
        line = encode_request(cmdid, params, call_id)
        await self._connect()
        future = asyncio.get_running_loop().create_future()
        self._in_flight.append((call_id, cmdid, future))
        self._writer.write(line)
        try:
            await self._writer.drain()
        except OSError as e:
            self._fail(self._in_flight, f"connection lost while sending: {e!r}")
        return await future

    async def call(self, cmdid, params=None, *, timeout=None):
        """One call: returns the reply's ``data``."""
        timeout = self.timeout if timeout is None else timeout
        try:
            # shield: a timed-out call stays in the queue, so its late reply is matched to it
            # and dropped, never handed to the next call.
            return await asyncio.wait_for(asyncio.shield(self.submit(cmdid, params)), timeout)
        except asyncio.TimeoutError:
            raise TimeoutError(f"{self.host}:{self.port}: no reply within {timeout} s") from None

    async def call_many(self, calls, *, timeout=None):
        """Pipelines ``calls`` (pairs of cmdid and params); returns their ``data`` in order."""
        return list(await asyncio.gather(*(self.call(c, p, timeout=timeout) for c, p in calls)))

    async def ping(self, *, timeout=None):
        return await self.call(0, timeout=timeout) == "pong"

    async def close(self):
        if self._writer is not None:
            self._fail(self._in_flight, "closed by the client")
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        if self._reader_task is not None:
            await asyncio.gather(self._reader_task, return_exceptions=True)
        self._writer = None

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

"""The asyncio client: one persistent connection, many calls in flight on it.

A call writes its request and awaits its own reply; one reader task matches replies to calls
in order (checking the echoed ``id``), so any number of tasks can share the client.
"""

import asyncio
import collections
import itertools

from ._protocol import CLOSING_CODES, decode_reply, encode_request
from .client import CAPABILITIES, DEFAULT_PORT, HELLO, notice_in
from .errors import ConnectionError, ProtocolError, RingcallError, ServerError, TimeoutError

# Longest reply line accepted (the server's own default request limit is 1 MiB; replies can
# be larger).
_MAX_REPLY = 64 << 20


class AsyncClient:
    """A persistent, pipelined asyncio connection to one ringcall server.

    ``client = AsyncClient("127.0.0.1", 8889)`` then ``await client.call(10000, {...})``
    returns the reply's ``data``. It connects on first use and again after the connection was
    lost, or after the server said it is closing it (``notices``, as for the blocking
    :class:`Client`: the calls in flight finish on the old connection, new ones go on a new
    one). Errors are those of the blocking client: :class:`ServerError`,
    :class:`TimeoutError`, :class:`ConnectionError`.
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
        notices=True,
    ):
        """``tls``, ``server_hostname``, ``token`` and ``notices`` as for the blocking
        :class:`Client`."""
        self.host = host
        self.port = port
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self._tls = tls
        self._server_hostname = server_hostname
        self._token = token
        self._notices = notices
        self._ids = itertools.count(1)
        self._writer = None
        self._reader_task = None
        self._in_flight = collections.deque()
        self._broken = None
        # Per connection: the server said it is closing it.
        self._closing = {"closing": False}
        self._connecting = None

    async def _connect(self):
        if self._writer is not None and self._broken is None and not self._closing["closing"]:
            return
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            await asyncio.shield(self._connecting)
        except (ConnectionError, TimeoutError, asyncio.TimeoutError) as e:
            # The new connection failed before any call went on it (`_open` closed it): none
            # of them ran. A connection it replaces keeps serving its calls in flight.
            raise ConnectionError(f"{self.host}:{self.port}: setting up the connection failed: {e!r}", sent=False) from None
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
        self._closing = {"closing": False}
        self._reader_task = asyncio.ensure_future(self._read(reader, writer, self._in_flight, self._closing))
        try:
            if self._token is not None:
                # The first line of the connection, before any call waiting for it.
                await self._first(HELLO, {"token": self._token})
            if self._notices:
                try:
                    await self._first(CAPABILITIES, {"notices": True})
                except ServerError as e:
                    if e.code != 404:  # 404: a server from before notices
                        raise
        except BaseException as e:
            self._fail(self._in_flight, f"setting up the connection failed: {e!r}", writer=writer)
            raise

    async def _first(self, cmdid, params):
        """A call of the connection's own, before any call waiting for it."""
        call_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._in_flight.append((call_id, cmdid, future))
        self._writer.write(encode_request(cmdid, params, call_id))
        await asyncio.wait_for(future, self.connect_timeout)

    async def _read(self, reader, writer, in_flight, closing):
        reason, kind = "the server closed the connection", ConnectionError

        def let_go_if_done():
            # Closing and nothing in flight: the write side closes, so the server finishes.
            if closing["closing"] and not in_flight and writer.can_write_eof():
                try:
                    writer.write_eof()
                except OSError:
                    pass

        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                notice = notice_in(line)
                if notice is not None:
                    closing["closing"] = True
                if notice == "notice":
                    let_go_if_done()
                    continue
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
                let_go_if_done()
        except (OSError, ValueError, asyncio.IncompleteReadError) as e:
            reason = f"connection lost: {e!r}"
        self._fail(in_flight, reason, kind, writer)

    def _fail(self, in_flight, reason, kind=ConnectionError, writer=None):
        """Fails the calls in flight on a connection (the current one unless ``writer``
        names an older one, which a notice replaced) and closes it."""
        writer = self._writer if writer is None else writer
        if writer is self._writer:
            self._broken = reason
        while in_flight:
            _, _, future = in_flight.popleft()
            if not future.done():
                future.set_exception(kind(f"{self.host}:{self.port}: {reason}"))
        if writer is not None:
            writer.close()

    def submit(self, cmdid, params=None):
        """Sends one call at once if connected, and returns an awaitable of its ``data``."""
        return asyncio.ensure_future(self._call(cmdid, params))

    async def _call(self, cmdid, params):
        call_id = next(self._ids)
        line = encode_request(cmdid, params, call_id)
        # A connection told to close while this call waited for it takes nothing new.
        for _ in range(3):
            await self._connect()
            if not self._closing["closing"] and self._broken is None:
                break
        else:
            raise ConnectionError(f"{self.host}:{self.port}: every new connection was closing", sent=False)
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

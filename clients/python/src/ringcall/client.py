"""The blocking client: one persistent connection, shared safely by every thread of a process.

Calls are pipelined: a thread writes its request and waits only for its own reply; replies
are matched to calls in order (and checked against the echoed ``id``) by whichever waiting
caller is reading. So a web server's threads can share one global client, as tornado-TCP's
callers kept one global connection, and a call never waits behind another's round trip.
"""

import collections
import itertools
import os
import select
import socket
import ssl
import threading
import time
from concurrent.futures import Future

from ._protocol import CLOSING_CODES, decode_reply, encode_request
from .errors import ConnectionError, ProtocolError, RingcallError, ServerError, TimeoutError

DEFAULT_PORT = 8889

#: cmdid of the token hello (servers started with ``--token-file``).
HELLO = 2

#: cmdid of the capabilities request: ``{"notices": true}`` asks the server to say so before
#: it closes the connection (a notice line, and ``"closing":true`` on later replies).
CAPABILITIES = 3


def notice_in(line):
    """Whether ``line`` says the server is closing the connection: a notice line (it answers
    no call), or a reply marked ``"closing":true`` (right after its code)."""
    if line.startswith(b'{"notice"'):
        return "notice"
    if line.find(b'"closing":true', 0, 40) >= 0:
        return "marked"
    return None


def tls_context(cafile, certfile=None, keyfile=None):
    """An ``ssl.SSLContext`` for the ``tls=`` argument of the clients: trusts the CA
    certificates in ``cafile`` (PEM) and, for mutual TLS, presents the client certificate
    ``certfile`` with its key ``keyfile``."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    if certfile is not None:
        context.load_cert_chain(certfile, keyfile)
    return context

#: Request bytes :meth:`Client.call_many` keeps in flight at most.
WINDOW_BYTES = 256 << 10


class Call(Future):
    """A call in flight (a ``concurrent.futures.Future`` of the reply's ``data``).

    :meth:`result` reads replies off the connection while it waits (no thread reads them
    in the background), so wait with it, or with :meth:`Client.call`; ``as_completed`` and
    ``wait`` from ``concurrent.futures`` only see calls another thread is waiting for.
    """

    def __init__(self, connection, default_timeout):
        super().__init__()
        self._connection = connection
        self._default_timeout = default_timeout

    def result(self, timeout=None):
        """The reply's ``data``; raises the call's error, or :class:`TimeoutError` after
        ``timeout`` seconds (default: the client's timeout)."""
        self._drive(timeout)
        return super().result(timeout=0)

    def exception(self, timeout=None):
        self._drive(timeout)
        return super().exception(timeout=0)

    def _drive(self, timeout):
        timeout = self._default_timeout if timeout is None else timeout
        if not self._connection.wait(self, time.monotonic() + timeout):
            raise TimeoutError(f"{self._connection.address}: no reply within {timeout} s")


class _Connection:
    """One socket and its calls in flight, oldest first.

    There is no reader thread: a caller waiting for its reply reads the socket itself, and
    hands every line it reads to the call it answers (replies come in request order). One
    caller reads at a time; the others wait until their reply has been handed to them or the
    reader leaves, and one of them reads next. A lone caller thus costs no thread switch.
    """

    def __init__(self, host, port, connect_timeout, tls=None):
        self.address = f"{host}:{port}"
        try:
            self.sock = socket.create_connection((host, port), timeout=connect_timeout)
        except OSError as e:
            raise ConnectionError(f"cannot connect to {host}:{port}: {e}", sent=False) from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # TLS runs over the plain socket through memory buffers (``ssl.SSLObject``): callers
        # write and read the socket from several threads at once, which an ``SSLSocket``
        # does not allow; here only the (de)ciphering is serialised, under ``tls_lock``.
        self.tls = None
        self.tls_lock = threading.Lock()
        if tls is not None:
            context, server_hostname = tls
            self.tls_in, self.tls_out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = context.wrap_bio(self.tls_in, self.tls_out, server_hostname=server_hostname or host)
            try:
                self._handshake()
            except (OSError, ssl.SSLError) as e:
                self.sock.close()
                raise ConnectionError(f"TLS handshake with {host}:{port} failed: {e}", sent=False) from None
        # Blocking from here on, and never changed: several threads use the socket at once,
        # and its timeout is one setting for all of them. Reads wait with select instead.
        self.sock.settimeout(None)
        self.pid = os.getpid()
        # (id, cmdid, future) per call in flight, in the order they were written.
        self.in_flight = collections.deque()
        self.lock = threading.Lock()
        # Writes are serialised apart from `lock`, so that a write blocked by a server that
        # is not reading never keeps a reader from handing out the replies that unblock it.
        self.send_lock = threading.Lock()
        self.read_lock = threading.Lock()
        self.replied = threading.Condition(self.lock)
        self.buffer = bytearray()
        self.broken = None
        # The server said it is closing this connection: nothing new goes on it; once its
        # calls in flight are answered, its write side is closed (so the server can finish).
        self.closing = False
        if self.tls is not None:
            # Application data that came with the handshake's last flight.
            self.buffer += self._decipher(b"")

    def _handshake(self):
        """Runs the TLS handshake on the socket (still blocking, with the connect timeout)."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            self._send_tls_out()
            data = self.sock.recv(1 << 16)
            if not data:
                raise OSError("the server closed the connection during the handshake")
            self.tls_in.write(data)
        self._send_tls_out()

    def _send_tls_out(self):
        data = self.tls_out.read()
        if data:
            self.sock.sendall(data)

    def _encipher(self, line):
        """The bytes to put on the wire for ``line`` (with ``send_lock`` held, so records
        go out in the order they were made)."""
        if self.tls is None:
            return line
        with self.tls_lock:
            self.tls.write(line)
            return self.tls_out.read()

    def _decipher(self, chunk):
        """The plaintext in ``chunk``, just received (TLS records may span receives)."""
        if self.tls is None:
            return chunk
        plain = bytearray()
        with self.tls_lock:
            if chunk:
                self.tls_in.write(chunk)
            while True:
                try:
                    data = self.tls.read(1 << 16)
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    # Zero return: the server's close_notify; its FIN ends the connection.
                    break
                if not data:
                    break
                plain += data
        return bytes(plain)

    def send(self, line, call_id, cmdid, default_timeout):
        future = Call(self, default_timeout)
        with self.send_lock:
            with self.lock:
                if self.broken is not None:
                    raise ConnectionError(f"{self.address}: {self.broken}", sent=False)
                if self.closing:
                    raise ConnectionError(f"{self.address}: the server is closing the connection", sent=False)
                # Appended in the order of the writes: replies come back in that order.
                self.in_flight.append((call_id, cmdid, future))
            try:
                self._send_all(self._encipher(line))
            except OSError as e:
                with self.lock:
                    # Part of the line may have gone out: fail everything from here on.
                    self._break(f"connection lost while sending: {e}")
        return future

    def _send_all(self, line):
        """Writes ``line``; while the socket is full, reads the replies that arrive (unless
        another caller is reading), so a server that waits for its replies to be read before
        it reads on never waits on us (with ``send_lock`` held)."""
        view = memoryview(line)
        while view:
            try:
                view = view[self.sock.send(view, socket.MSG_DONTWAIT) :]
                continue
            except BlockingIOError:
                pass
            if self.read_lock.acquire(blocking=False):
                try:
                    readable, _, _ = select.select([self.sock], [self.sock], [], None)
                    if readable:
                        self._read_available()
                finally:
                    self.read_lock.release()
                    with self.lock:
                        self.replied.notify_all()
            else:
                select.select([], [self.sock], [], 0.05)
            if self.broken is not None:
                raise OSError(self.broken)

    def _read_available(self):
        """Reads what has arrived, without waiting, and hands out its replies (with
        ``read_lock`` held)."""
        try:
            chunk = self.sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if not chunk:
            with self.lock:
                self._break("the server closed the connection")
            return
        try:
            self.buffer += self._decipher(chunk)
        except ssl.SSLError as e:
            with self.lock:
                self._break(f"TLS failed: {e}")
            return
        while True:
            newline = self.buffer.find(b"\n")
            if newline < 0:
                return
            line = bytes(self.buffer[: newline + 1])
            del self.buffer[: newline + 1]
            self._hand_out(line)

    def wait(self, future, deadline):
        """Until ``future`` has its reply, reading for everyone when no one else is; False if
        ``deadline`` (a ``time.monotonic()`` instant) passed first."""
        while not future.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self.read_lock.acquire(blocking=False):
                try:
                    if not self._read_until(future, deadline):
                        return future.done()
                finally:
                    self.read_lock.release()
                    with self.lock:
                        # Someone else may have to read next.
                        self.replied.notify_all()
            else:
                with self.lock:
                    if not future.done():
                        self.replied.wait(min(remaining, 0.05))
        return True

    def _read_until(self, future, deadline):
        """Reads and hands out replies until ``future`` is done (with ``read_lock`` held)."""
        while not future.done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            newline = self.buffer.find(b"\n")
            if newline < 0:
                try:
                    readable, _, _ = select.select([self.sock], [], [], remaining)
                    if not readable:
                        return False
                    chunk = self.sock.recv(1 << 16)
                    if chunk:
                        self.buffer += self._decipher(chunk)
                except ssl.SSLError as e:
                    with self.lock:
                        self._break(f"TLS failed: {e}")
                    return True
                except (OSError, ValueError) as e:
                    with self.lock:
                        self._break(f"connection lost: {e}")
                    return True
                if not chunk:
                    with self.lock:
                        self._break("the server closed the connection")
                    return True
                continue
            line = bytes(self.buffer[: newline + 1])
            del self.buffer[: newline + 1]
            self._hand_out(line)
        return True

    def _hand_out(self, line):
        with self.lock:
            notice = notice_in(line)
            if notice is not None:
                self.closing = True
            if notice == "notice":
                self._let_go_if_done()
                return
            if not self.in_flight:
                self._break(f"a reply nobody asked for: {line[:200]!r}", ProtocolError)
                return
            call_id, cmdid, future = self.in_flight.popleft()
            try:
                future.set_result(decode_reply(line, cmdid, call_id))
            except ProtocolError as e:
                future.set_exception(e)
                self._break(str(e), ProtocolError)
            except ServerError as e:
                future.set_exception(e)
                if e.code in CLOSING_CODES:
                    self._break(f"the server closed the connection after replying {e.code}")
            except RingcallError as e:
                future.set_exception(e)
            self._let_go_if_done()
            self.replied.notify_all()

    def _let_go_if_done(self):
        """A closing connection with nothing in flight closes its write side: the server
        sees the client is done and closes without waiting out its grace (with the lock)."""
        if self.closing and not self.in_flight and self.broken is None:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _break(self, reason, kind=ConnectionError):
        """Fails every call in flight and closes the socket (with ``self.lock`` held)."""
        if self.broken is None:
            self.broken = reason
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        while self.in_flight:
            _, _, future = self.in_flight.popleft()
            if not future.done():
                future.set_exception(kind(f"{self.address}: {reason}"))
        self.replied.notify_all()

    def close(self):
        with self.lock:
            self._break("closed by the client")
        self.sock.close()

    def pending(self):
        return len(self.in_flight)


class Client:
    """A persistent, pipelined connection to one ringcall server, safe to share across
    threads.

    ``Client("127.0.0.1", 8889).call(10000, {"content": "hi"})`` returns the reply's ``data``.
    The connection is made on first use and made again after it was lost (and in a child
    process after ``fork``, e.g. under a pre-forking web server). A call that fails raises
    :class:`ServerError` (the server's code and message; the connection stays usable),
    :class:`TimeoutError`, or :class:`ConnectionError`.

    ``tls`` (an ``ssl.SSLContext``, e.g. from :func:`tls_context`) speaks TLS, checking the
    server's certificate for ``server_hostname`` (default: ``host``); ``token`` is presented
    as the first line of every connection, for servers started with ``--token-file``.

    With ``notices`` (the default) each connection asks the server to say when it is about to
    close it (a shutdown, a connection's age): new calls then go on a new connection while
    the calls in flight are answered on the old one, so a server's graceful restart fails no
    call. A server from before notices answers the request 404 and is used all the same.
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
        self.host = host
        self.port = port
        self.timeout = timeout
        self.connect_timeout = timeout if connect_timeout is None else connect_timeout
        self._tls = None if tls is None else (tls, server_hostname)
        self._token = token
        self._notices = notices
        self._conn = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    def _connection(self):
        with self._lock:
            conn = self._conn
            if conn is not None and conn.closing and conn.pid == os.getpid():
                # Its calls in flight finish on it; new ones go on a new connection.
                conn = self._conn = None
            if conn is not None and (conn.broken is not None or conn.pid != os.getpid()):
                if conn.pid == os.getpid():
                    conn.close()
                # After fork the parent's reader thread does not exist here: just let it go.
                conn = self._conn = None
            if conn is None:
                conn = _Connection(self.host, self.port, self.connect_timeout, self._tls)
                try:
                    if self._token is not None:
                        self._hello(conn)
                    if self._notices:
                        self._ask_notices(conn)
                except (ConnectionError, TimeoutError) as e:
                    # The connection failed before any call went on it: none of them ran.
                    conn.close()
                    raise ConnectionError(f"{conn.address}: setting up the connection failed: {e}", sent=False) from None
                self._conn = conn
            return conn

    def _hello(self, conn):
        """Presents the token on a new connection, before any call can use it."""
        call_id = next(self._ids)
        line = encode_request(HELLO, {"token": self._token}, call_id)
        try:
            conn.send(line, call_id, HELLO, self.connect_timeout).result()
        except BaseException:
            conn.close()
            raise

    def _ask_notices(self, conn):
        """Asks the server of a new connection for notices; one without them answers 404."""
        call_id = next(self._ids)
        line = encode_request(CAPABILITIES, {"notices": True}, call_id)
        try:
            conn.send(line, call_id, CAPABILITIES, self.connect_timeout).result()
        except ServerError as e:
            if e.code != 404:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise

    def submit(self, cmdid, params=None):
        """Sends one call and returns it in flight, a :class:`Call`: ``.result(timeout)``
        gives its ``data``."""
        call_id = next(self._ids)
        line = encode_request(cmdid, params, call_id)
        conn = self._connection()
        try:
            return conn.send(line, call_id, cmdid, self.timeout)
        except ConnectionError as e:
            # The connection was told it is closing just now: nothing was sent; a new one.
            if e.sent or not conn.closing:
                raise
            return self._connection().send(line, call_id, cmdid, self.timeout)

    def call(self, cmdid, params=None, *, timeout=None):
        """One call: returns the reply's ``data``."""
        return self._wait(self.submit(cmdid, params), timeout)

    def call_many(self, calls, *, timeout=None):
        """Pipelines ``calls`` (pairs of cmdid and params) on the connection and returns their
        ``data`` in order; raises the first error, after every reply is in.

        At most :data:`WINDOW_BYTES` of requests are in flight at once: a client that wrote
        without ever reading would stall against a server that stops reading while it holds
        unread replies (its backpressure), and both would wait forever."""
        futures = collections.deque()
        results = []
        first_error = None
        in_flight_bytes = 0

        def take_one():
            nonlocal first_error, in_flight_bytes
            future, size = futures.popleft()
            in_flight_bytes -= size
            try:
                results.append(self._wait(future, timeout))
            except RingcallError as e:
                results.append(e)
                first_error = first_error or e

        for cmdid, params in calls:
            call_id = next(self._ids)
            line = encode_request(cmdid, params, call_id)
            while futures and in_flight_bytes + len(line) > WINDOW_BYTES:
                take_one()
            future = self._connection().send(line, call_id, cmdid, self.timeout)
            futures.append((future, len(line)))
            in_flight_bytes += len(line)
        while futures:
            take_one()
        if first_error is not None:
            raise first_error
        return results

    def ping(self, *, timeout=None):
        """True if the server answers the built-in ping (cmdid 0)."""
        return self.call(0, timeout=timeout) == "pong"

    def stats(self, *, timeout=None):
        """The server's counters (built-in cmdid 1)."""
        return self.call(1, timeout=timeout)

    def pending(self):
        """Calls sent on the current connection and not answered yet."""
        conn = self._conn
        return 0 if conn is None else conn.pending()

    def _wait(self, future, timeout):
        return future.result(timeout)

    def close(self):
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None and conn.pid == os.getpid():
            conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"ringcall.Client({self.host!r}, {self.port})"

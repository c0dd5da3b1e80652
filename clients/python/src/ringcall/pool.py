"""A small pool of connections to one server, for callers whose load one connection's
ordered replies would hold back (a slow call delays the replies behind it on its connection).
"""

import threading

from .client import DEFAULT_PORT, Client


class Pool:
    """``size`` persistent connections to one server; each call goes to the connection with
    the fewest calls in flight. Thread-safe; the same methods as :class:`Client`."""

    def __init__(self, host="127.0.0.1", port=DEFAULT_PORT, *, size=4, **options):
        """``options`` are those of :class:`Client` (``timeout``, ``tls``, ``token``, …)."""
        if size < 1:
            raise ValueError("a pool needs at least one connection")
        self.clients = [Client(host, port, **options) for _ in range(size)]
        self._next = 0
        self._lock = threading.Lock()

    def _pick(self):
        with self._lock:
            # Least in flight; ties go round robin so idle connections all stay warm.
            start = self._next
            self._next = (self._next + 1) % len(self.clients)
        order = self.clients[start:] + self.clients[:start]
        return min(order, key=lambda c: c.pending())

    def submit(self, cmdid, params=None):
        return self._pick().submit(cmdid, params)

    def call(self, cmdid, params=None, *, timeout=None):
        return self._pick().call(cmdid, params, timeout=timeout)

    def call_many(self, calls, *, timeout=None):
        return self._pick().call_many(calls, timeout=timeout)

    def ping(self, *, timeout=None):
        return all(c.ping(timeout=timeout) for c in self.clients)

    def close(self):
        for client in self.clients:
            client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

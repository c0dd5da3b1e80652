"""Pools: several connections, to one server or to several, with the Rust pool's rules.

- **Balancing**: a call goes to the less busy of two endpoints picked at random (calls in
  flight), and there to its connection with the fewest calls in flight.
- **Failure**: an endpoint whose connection fails is taken out; once its backoff has passed
  (exponential, full jitter) the next call that needs it pings it first, and it is back in
  once it answers.
- **Retries**: a failed call goes to another endpoint only when that is safe — its request
  never reached the server (so it did not run), or the caller marked it ``idempotent`` — and
  re-sending a written call is bounded by a retry budget (``retry_ratio`` of calls, plus
  ``retry_floor`` per second), so a failing cluster is not hit by a retry storm.
- **Deadlines**: a call's ``timeout`` bounds everything: connecting, retries, the reply.
- **Notices**: connections ask for them (see :class:`~ringcall.Client`); a server that is
  stopping or recycling a connection says so first, and new calls move to a new connection
  or another server while the calls in flight are answered. A rolling restart fails no call.

Every call returns its ``data`` or raises: :class:`ServerError` (the server answered),
:class:`TimeoutError`, or :class:`ConnectionError` whose ``sent`` says whether the request
may have run.
"""

import asyncio
import random
import threading
import time

from .aio import AsyncClient
from .client import DEFAULT_PORT, Client
from .errors import ConnectionError, ServerError

#: Codes with which a server refuses a request it did not run (503: its core was full).
_NOT_RUN_CODES = (503,)


def _endpoint(spec, default_port):
    if isinstance(spec, tuple):
        return spec[0], int(spec[1])
    host, _, port = str(spec).rpartition(":")
    if not host:
        return str(spec), default_port
    return host.strip("[]"), int(port)


class _Endpoint:
    """One server: its clients (connections) and its health."""

    def __init__(self, host, port, clients):
        self.host, self.port = host, port
        self.address = f"{host}:{port}"
        self.clients = clients
        self.failures = 0
        # None while up; else when it may be probed.
        self.retry_at = None
        self.in_flight = 0
        self.answered = 0

    def client(self):
        return min(self.clients, key=lambda c: c.pending())

    def is_up(self):
        return self.retry_at is None


class _Rules:
    """What the blocking and the asyncio pools share: picking, health, the retry budget.
    No I/O here."""

    def __init__(self, endpoints, backoff_min, backoff_max, retry_ratio, retry_floor):
        if not endpoints:
            raise ValueError("a pool needs at least one endpoint")
        self.endpoints = endpoints
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.retry_ratio, self.retry_floor = retry_ratio, retry_floor
        self.lock = threading.Lock()
        self.tokens = retry_floor
        self.refilled = time.monotonic()
        self.random = random.Random()

    def pick(self, tried):
        """An endpoint for the next attempt, and whether it must be probed (pinged) first;
        ``None`` when every endpoint was tried or is still backing off. An endpoint taken out
        whose backoff has passed is probed by the next call that comes along (one call: its
        next probe is pushed back meanwhile), so it comes back in while others serve."""
        now = time.monotonic()
        with self.lock:
            due = [e for e in self.endpoints if e.address not in tried and not e.is_up() and e.retry_at <= now]
            if due:
                endpoint = min(due, key=lambda e: e.retry_at)
                endpoint.retry_at = now + self.backoff_max
                return endpoint, True
            up = [e for e in self.endpoints if e.address not in tried and e.is_up()]
            if up:
                two = self.random.sample(up, min(2, len(up)))
                return min(two, key=lambda e: e.in_flight), False
        return None, False

    def next_due(self):
        """When the first endpoint backing off may be probed (``None``: all are up)."""
        with self.lock:
            due = [e.retry_at for e in self.endpoints if e.retry_at is not None]
        return min(due) if due else None

    def take_out(self, endpoint):
        with self.lock:
            endpoint.failures += 1
            ceiling = min(self.backoff_max, self.backoff_min * (2 ** min(endpoint.failures, 16)))
            endpoint.retry_at = time.monotonic() + self.random.uniform(self.backoff_min, ceiling)

    def back_in(self, endpoint):
        with self.lock:
            endpoint.failures = 0
            endpoint.retry_at = None

    def earn(self):
        """Each call earns ``retry_ratio`` of a retry; time earns ``retry_floor`` per second."""
        now = time.monotonic()
        with self.lock:
            cap = max(self.retry_floor, 1.0)
            self.tokens = min(cap, self.tokens + self.retry_ratio + (now - self.refilled) * self.retry_floor)
            self.refilled = now

    def spend(self):
        with self.lock:
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return True
            return False

    def status(self):
        return [
            {"address": e.address, "up": e.is_up(), "in_flight": e.in_flight, "answered": e.answered}
            for e in self.endpoints
        ]


def _steps(rules, timeout, idempotent):
    """One call's way through the endpoints, without I/O (the blocking and the asyncio pool
    drive the same steps). Yields what to do next — ``("probe", endpoint, timeout)``,
    ``("call", endpoint, timeout)``, ``("sleep", None, seconds)`` — and is sent how it went:
    ``None``, or the exception it raised. After a call that succeeded they end; a failure
    that must reach the caller is raised from them."""
    deadline = time.monotonic() + timeout
    rules.earn()
    tried, failures, written = set(), [], False
    while True:
        endpoint, probe = rules.pick(tried)
        remaining = deadline - time.monotonic()
        if endpoint is None:
            # Every endpoint failed this call or is backing off: wait for the next probe if
            # the deadline allows, and try them all again.
            due = rules.next_due()
            if due is None or due >= deadline:
                raise _no_endpoint(failures, rules, written)
            yield "sleep", None, max(due - time.monotonic(), 0)
            tried.clear()
            continue
        tried.add(endpoint.address)
        if remaining <= 0:
            raise _no_endpoint(failures + ["the deadline passed"], rules, written)
        if probe:
            error = yield "probe", endpoint, min(remaining, 1.0)
            if error is not None:
                rules.take_out(endpoint)
                failures.append(f"{endpoint.address}: {error}")
                continue
            rules.back_in(endpoint)
        endpoint.in_flight += 1
        try:
            error = yield "call", endpoint, max(deadline - time.monotonic(), 0.001)
        finally:
            endpoint.in_flight -= 1
        if error is None:
            endpoint.answered += 1
            return
        outcome = _outcome(error)
        if outcome == "final":
            raise error
        rules.take_out(endpoint)
        failures.append(f"{endpoint.address}: {error}")
        if outcome == "may_have_run":
            if not (idempotent and rules.spend()):
                raise error
            written = True


def _finish(steps):
    """Tells the steps their call succeeded (they count it and end)."""
    try:
        steps.send(None)
    except StopIteration:
        pass


def _outcome(error):
    """How a failed attempt ended: ``"not_run"`` (safe anywhere), ``"may_have_run"``, or
    ``"final"`` (the server answered, or the deadline passed: give it to the caller)."""
    if isinstance(error, ConnectionError):
        return "may_have_run" if error.sent else "not_run"
    if isinstance(error, ServerError) and error.code in _NOT_RUN_CODES:
        return "not_run"
    return "final"


class Pool:
    """Connections to one server or to several, thread-safe, with the rules above.

    ``Pool("127.0.0.1", 8889, size=4)``: four connections to one server.
    ``Pool(endpoints=["10.0.0.1:8889", "10.0.0.2:8889"], size=1)``: one connection to each of
    two. ``options`` are those of :class:`Client` (``timeout``, ``tls``, ``token``, …).
    """

    def __init__(
        self,
        host="127.0.0.1",
        port=DEFAULT_PORT,
        *,
        size=4,
        endpoints=None,
        backoff_min=0.05,
        backoff_max=5.0,
        retry_ratio=0.2,
        retry_floor=10.0,
        **options,
    ):
        if size < 1:
            raise ValueError("a pool needs at least one connection per endpoint")
        specs = [(host, port)] if endpoints is None else [_endpoint(e, DEFAULT_PORT) for e in endpoints]
        self.timeout = options.get("timeout", 10.0)
        self._options = options
        self._rules = _Rules(
            [_Endpoint(h, p, [Client(h, p, **options) for _ in range(size)]) for h, p in specs],
            backoff_min,
            backoff_max,
            retry_ratio,
            retry_floor,
        )
        # Every client of every endpoint, for the calls that go to one connection.
        self.clients = [c for e in self._rules.endpoints for c in e.clients]

    def call(self, cmdid, params=None, *, timeout=None, idempotent=False):
        """One call, to the least busy endpoint of two, failed over as the rules say:
        returns the reply's ``data``."""
        steps = _steps(self._rules, self.timeout if timeout is None else timeout, idempotent)
        outcome = None
        while True:
            action, endpoint, seconds = steps.send(outcome)
            outcome = None
            if action == "sleep":
                time.sleep(seconds)
                continue
            try:
                if action == "probe":
                    endpoint.client().ping(timeout=seconds)
                    continue
                data = endpoint.client().call(cmdid, params, timeout=seconds)
            except Exception as e:  # noqa: BLE001 - the steps judge it
                outcome = e
                continue
            _finish(steps)
            return data

    def submit(self, cmdid, params=None):
        """Sends one call on the least busy connection (no failover) and returns it in flight."""
        return self._least_busy().submit(cmdid, params)

    def call_many(self, calls, *, timeout=None):
        """Pipelines ``calls`` on one connection (see :meth:`Client.call_many`)."""
        return self._least_busy().call_many(calls, timeout=timeout)

    def _least_busy(self):
        endpoint, _ = self._rules.pick(set())
        return (endpoint or self._rules.endpoints[0]).client()

    def ping(self, *, timeout=None):
        return all(c.ping(timeout=timeout) for c in self.clients)

    def status(self):
        """Per endpoint: address, up, calls in flight, calls answered."""
        return self._rules.status()

    def close(self):
        for client in self.clients:
            client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncPool:
    """:class:`Pool` for asyncio: the same rules over :class:`AsyncClient` connections.

    ``AsyncPool(endpoints=["10.0.0.1:8889", "10.0.0.2:8889"])``, then
    ``await pool.call(10000, {...}, idempotent=False)``.
    """

    def __init__(
        self,
        host="127.0.0.1",
        port=DEFAULT_PORT,
        *,
        size=1,
        endpoints=None,
        backoff_min=0.05,
        backoff_max=5.0,
        retry_ratio=0.2,
        retry_floor=10.0,
        **options,
    ):
        if size < 1:
            raise ValueError("a pool needs at least one connection per endpoint")
        specs = [(host, port)] if endpoints is None else [_endpoint(e, DEFAULT_PORT) for e in endpoints]
        self.timeout = options.get("timeout", 10.0)
        self._rules = _Rules(
            [_Endpoint(h, p, [_Counted(AsyncClient(h, p, **options)) for _ in range(size)]) for h, p in specs],
            backoff_min,
            backoff_max,
            retry_ratio,
            retry_floor,
        )

    async def call(self, cmdid, params=None, *, timeout=None, idempotent=False):
        """As :meth:`Pool.call`."""
        steps = _steps(self._rules, self.timeout if timeout is None else timeout, idempotent)
        outcome = None
        while True:
            action, endpoint, seconds = steps.send(outcome)
            outcome = None
            if action == "sleep":
                await asyncio.sleep(seconds)
                continue
            try:
                if action == "probe":
                    await endpoint.client().call(0, timeout=seconds)
                    continue
                data = await endpoint.client().call(cmdid, params, timeout=seconds)
            except Exception as e:  # noqa: BLE001 - the steps judge it
                outcome = e
                continue
            _finish(steps)
            return data

    async def ping(self, *, timeout=None):
        results = [await c.call(0, timeout=timeout) for e in self._rules.endpoints for c in e.clients]
        return all(r == "pong" for r in results)

    def status(self):
        return self._rules.status()

    async def close(self):
        for endpoint in self._rules.endpoints:
            for client in endpoint.clients:
                await client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()


class _Counted:
    """An :class:`AsyncClient` that counts its calls in flight (for picking a connection)."""

    def __init__(self, client):
        self.client = client
        self.in_flight = 0

    def pending(self):
        return self.in_flight

    async def call(self, cmdid, params=None, *, timeout=None):
        self.in_flight += 1
        try:
            return await self.client.call(cmdid, params, timeout=timeout)
        finally:
            self.in_flight -= 1

    async def close(self):
        await self.client.close()


def _no_endpoint(failures, rules, written):
    """The error of a call no endpoint took; ``written``: an earlier attempt may have run."""
    states = ", ".join(f"{s['address']} {'up' if s['up'] else 'down'}" for s in rules.status())
    why = "; ".join(failures) if failures else "every endpoint is backing off"
    return ConnectionError(f"no endpoint could take the call ({states}): {why}", sent=written)

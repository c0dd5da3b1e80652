"""Pools over several servers, live: balancing, failover, retries only where safe, deadlines,
and notices — a rolling restart of three servers (each stopped with SIGTERM and started
again on its port) under steady calls fails none, blocking and asyncio."""

import asyncio
import socket
import threading
import time

import pytest

import ringcall
from conftest import Server

DRAIN = ["--drain-grace", "1"]


def eventually(what, done, within=30.0):
    """Waits until ``done()`` (a failsafe, not a timing assertion)."""
    give_up = time.monotonic() + within
    while not done():
        assert time.monotonic() < give_up, f"never happened: {what}"
        time.sleep(0.01)


@pytest.fixture(params=["uring", "tokio-uring", "epoll", "epoll-mt"])
def three(request):
    servers = [Server(backend=request.param, extra=DRAIN) for _ in range(3)]
    yield request.param, servers
    for s in servers:
        s.stop()


def endpoints(servers):
    return [f"{s.host}:{s.port}" for s in servers]


def restart_each(backend, servers, calls, between=300):
    """Stops each server with SIGTERM, starts it again on its port, and waits for
    ``between`` more calls before the next."""
    for i, old in enumerate(servers):
        old.stop()
        assert old.process.returncode == 0, "drained and exited cleanly"
        servers[i] = Server(port=old.port, backend=backend, extra=DRAIN)
        now = calls()
        eventually("calls flowing after a restart", lambda: calls() >= now + between)


def test_notices_are_asked_for_and_a_plain_client_sees_the_same_bytes(server):
    client = ringcall.Client(server.host, server.port)
    assert client.call(10000, {"n": 1}) == {"n": 1}
    plain = socket.create_connection((server.host, server.port))
    plain.sendall(b'{"cmdid":10000,"params": {"who": "tornado"}}\n')
    reply = plain.makefile("rb")
    assert reply.readline() == b'{"code":0,"data":{"who": "tornado"}}\n'
    plain.close()
    client.close()


def test_a_rolling_restart_fails_no_call(three):
    backend, servers = three
    pool = ringcall.Pool(endpoints=endpoints(servers), size=1, timeout=10)
    stop, errors, count = threading.Event(), [], [0]
    lock = threading.Lock()

    def work(t):
        i = 0
        while not stop.is_set():
            token = f"{t}-{i}"
            try:
                # Not idempotent: a call written before a failure may not be sent again.
                assert pool.call(10000, {"token": token}) == {"token": token}
            except ringcall.RingcallError as e:
                errors.append(repr(e))
            with lock:
                count[0] += 1
            i += 1

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    eventually("every server answering", lambda: all(s["answered"] > 0 for s in pool.status()))
    restart_each(backend, servers, lambda: count[0])
    stop.set()
    for t in threads:
        t.join()
    pool.close()
    print(f"{backend}: {count[0]} calls through three rolling restarts, {len(errors)} failed")
    assert errors == [], f"{len(errors)} of {count[0]} failed: {errors[:3]}"


def test_a_rolling_restart_fails_no_call_in_asyncio(three):
    backend, servers = three
    count, errors = [0], []

    async def main():
        pool = ringcall.AsyncPool(endpoints=endpoints(servers), timeout=10)
        stop = asyncio.Event()

        async def work(t):
            i = 0
            while not stop.is_set():
                token = f"{t}-{i}"
                try:
                    assert await pool.call(10000, {"token": token}) == {"token": token}
                except ringcall.RingcallError as e:
                    errors.append(repr(e))
                count[0] += 1
                i += 1

        tasks = [asyncio.ensure_future(work(t)) for t in range(8)]
        # The restarts block: run them on a thread while the loop keeps calling.
        await asyncio.get_running_loop().run_in_executor(None, restart_each, backend, servers, lambda: count[0])
        stop.set()
        await asyncio.gather(*tasks)
        await pool.close()

    asyncio.run(main())
    print(f"{backend}: {count[0]} asyncio calls through three rolling restarts, {len(errors)} failed")
    assert errors == [], f"{len(errors)} of {count[0]} failed: {errors[:3]}"


def test_sigkill_fails_only_calls_that_may_have_run_and_idempotent_ones_are_retried(three):
    backend, servers = three
    pool = ringcall.Pool(endpoints=endpoints(servers), size=1, timeout=10)
    stop, lock = threading.Event(), threading.Lock()
    results = {"ok": 0, "may_have_run": 0, "idempotent_failed": []}

    def work(t):
        i = 0
        while not stop.is_set():
            idempotent = i % 2 == 0
            try:
                pool.call(10000, {"token": f"{t}-{i}"}, idempotent=idempotent)
                with lock:
                    results["ok"] += 1
            except ringcall.ConnectionError as e:
                # Only a call that reached the killed server fails, and it says so.
                assert e.sent, repr(e)
                with lock:
                    results["may_have_run"] += 1
                    if idempotent:
                        results["idempotent_failed"].append(repr(e))
            i += 1

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    eventually("every server answering", lambda: all(s["answered"] > 0 for s in pool.status()))
    servers[1].kill()
    now = results["ok"]
    eventually("calls flowing without it", lambda: results["ok"] >= now + 500)
    assert not next(s for s in pool.status() if s["address"] == endpoints(servers)[1])["up"]
    stop.set()
    for t in threads:
        t.join()
    pool.close()
    assert results["idempotent_failed"] == [], "idempotent calls are retried elsewhere"
    print(f"{backend}: {results}")


def test_a_dead_endpoint_is_taken_out_and_probed_back_in(server):
    # A port nobody listens on, then a server on it.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    dead_port = probe.getsockname()[1]
    probe.close()
    pool = ringcall.Pool(endpoints=[f"127.0.0.1:{dead_port}", f"{server.host}:{server.port}"], size=1,
                         backoff_min=0.01, backoff_max=0.05)
    for i in range(50):
        assert pool.call(10000, {"i": i}) == {"i": i}
    status = {s["address"]: s for s in pool.status()}
    assert not status[f"127.0.0.1:{dead_port}"]["up"]
    revived = Server(port=dead_port, backend="epoll", extra=DRAIN)
    try:
        eventually("the revived endpoint answering",
                   lambda: pool.call(0) == "pong" and pool.status()[0]["answered"] > 0)
    finally:
        pool.close()
        revived.stop()


def test_the_deadline_bounds_a_call_no_endpoint_can_take():
    ports = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        ports.append(s.getsockname()[1])
        s.close()
    pool = ringcall.Pool(endpoints=[f"127.0.0.1:{p}" for p in ports], size=1, timeout=2)
    started = time.monotonic()
    with pytest.raises(ringcall.ConnectionError) as raised:
        pool.call(10000, {})
    assert not raised.value.sent, "nothing was sent: it did not run"
    assert "no endpoint could take the call" in str(raised.value)
    assert time.monotonic() - started < 30  # a failsafe, not a timing assertion
    pool.close()

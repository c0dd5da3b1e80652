"""The blocking client and the pool against the real server (every test on uring and epoll),
and against scripted peers for what a real server never does."""

import json
import os
import threading
import time

import pytest

import ringcall
from conftest import Server


def test_the_smallest_use_returns_data(server):
    client = ringcall.Client(server.host, server.port)
    assert client.call(10000, {"content": "hi"}) == {"content": "hi"}
    assert client.ping()
    assert client.call(10000) == {}
    assert "total" in client.stats()
    client.close()


def test_errors_carry_code_and_message_and_the_connection_survives(server):
    with ringcall.Client(server.host, server.port) as client:
        with pytest.raises(ringcall.ServerError) as info:
            client.call(31337)
        assert info.value.code == 404
        assert info.value.message == "unknown cmdid 31337"
        assert info.value.cmdid == 31337
        assert isinstance(info.value, ringcall.RingcallError)
        assert client.call(10000, {"after": "error"}) == {"after": "error"}
        with pytest.raises(TypeError):
            client.call(10000, ["not", "a", "dict"])
        with pytest.raises(ValueError):
            client.call(-1)
        with pytest.raises(ValueError):
            client.call(1 << 32)
        assert client.ping()


def test_a_request_over_the_servers_line_limit_gets_413_then_a_new_connection(server):
    with ringcall.Client(server.host, server.port) as client:
        with pytest.raises(ringcall.ServerError) as info:
            client.call(10000, {"big": "x" * (2 << 20)})
        assert info.value.code == 413
        # The server closed that connection after the 413; the next call reconnects.
        assert client.ping()


def test_unicode_and_large_params_round_trip(server):
    with ringcall.Client(server.host, server.port) as client:
        text = "héllo, 世界 \u2028 \"quoted\" \\ " * 1000
        assert client.call(10000, {"text": text, "n": [1, 2.5, None, True]}) == {
            "text": text,
            "n": [1, 2.5, None, True],
        }
        big = "x" * (900 << 10)
        assert client.call(10000, {"big": big}) == {"big": big}


def in_threads(n, body):
    """Runs ``body(t)`` on ``n`` threads at once; returns the (thread, error) of each failure."""
    errors = []

    def worker(t):
        try:
            body(t)
        except Exception as e:  # reported by the caller, with the thread's number
            errors.append((t, e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def connections_total(client):
    return client.stats()["total"]["connections_total"]


def test_threads_share_one_connection_and_each_gets_its_own_reply(server):
    client = ringcall.Client(server.host, server.port)
    before = connections_total(client)

    def body(t):
        for i in range(200):
            assert client.call(10000, {"t": t, "i": i}) == {"t": t, "i": i}

    assert in_threads(16, body) == []
    assert connections_total(client) == before, "every call went over the one connection"
    client.close()


def test_call_many_pipelines_and_keeps_order(server):
    with ringcall.Client(server.host, server.port) as client:
        calls = [(10000, {"i": i}) for i in range(2000)]
        assert client.call_many(calls) == [{"i": i} for i in range(2000)]
        futures = [client.submit(0) for _ in range(100)]
        assert [f.result(timeout=10) for f in futures] == ["pong"] * 100
        with pytest.raises(ringcall.ServerError) as info:
            client.call_many([(10000, {"a": 1}), (4242, None), (10000, {"b": 2})])
        assert info.value.code == 404


def test_call_many_of_more_than_the_server_holds_does_not_stall(server):
    # 64 MiB of requests whose replies are as large: far past the server's 1 MiB of held
    # replies and the kernel's socket buffers. Writing all before reading would stall both
    # sides; the window keeps it moving.
    payload = "y" * (64 << 10)
    with ringcall.Client(server.host, server.port, timeout=60) as client:
        results = client.call_many([(10000, {"i": i, "p": payload}) for i in range(1024)])
        assert [r["i"] for r in results] == list(range(1024))
        assert all(r["p"] == payload for r in results)


def test_submitting_far_more_than_the_server_holds_without_waiting_does_not_stall(server):
    # One thread writes 64 MiB of calls before it waits for any reply: while its writes are
    # blocked it reads the replies that arrive, so the server never stops reading for good.
    payload = "w" * (64 << 10)
    with ringcall.Client(server.host, server.port, timeout=60) as client:
        calls = [client.submit(10000, {"i": i, "p": payload}) for i in range(1024)]
        assert [c.result()["i"] for c in calls] == list(range(1024))


def test_threads_with_large_replies_do_not_stall(server):
    payload = "z" * (512 << 10)
    client = ringcall.Client(server.host, server.port, timeout=60)

    def body(t):
        for i in range(20):
            assert client.call(10000, {"t": t, "i": i, "p": payload}) == {"t": t, "i": i, "p": payload}

    assert in_threads(8, body) == []
    client.close()


def test_a_lost_server_is_an_error_and_a_restarted_one_is_reconnected():
    first = Server()
    client = ringcall.Client(first.host, first.port, timeout=10)
    assert client.ping()
    first.kill()
    with pytest.raises(ringcall.ConnectionError):
        client.call(10000, {"x": 1})
    again = Server(port=first.port)
    try:
        assert client.call(10000, {"x": 2}) == {"x": 2}
    finally:
        client.close()
        again.stop()


def test_no_server_is_a_connection_error_that_says_nothing_was_sent():
    with ringcall.Client("127.0.0.1", 1, timeout=2) as client:
        with pytest.raises(ringcall.ConnectionError) as info:
            client.call(0)
        assert info.value.sent is False
        assert "cannot connect to 127.0.0.1:1" in str(info.value)


def test_a_timed_out_call_never_gets_another_calls_reply(fake_server):
    def script(conn):
        reader = conn.makefile("rb")
        lines = [reader.readline(), reader.readline()]
        time.sleep(0.5)  # past the first call's timeout
        for line in lines:
            request = json.loads(line)
            conn.sendall((json.dumps({"code": 0, "id": request["id"], "data": request["params"]}) + "\n").encode())
        reader.read()

    peer = fake_server(script)
    with ringcall.Client("127.0.0.1", peer.port, notices=False) as client:
        first = client.submit(10000, {"n": 1})
        with pytest.raises(ringcall.TimeoutError):
            first.result(timeout=0.1)
        assert client.call(10000, {"n": 2}, timeout=10) == {"n": 2}


def test_a_server_that_answers_garbage_is_a_protocol_error(fake_server):
    def script(conn):
        conn.makefile("rb").readline()
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        time.sleep(1)

    peer = fake_server(script)
    with ringcall.Client("127.0.0.1", peer.port, notices=False) as client:
        with pytest.raises(ringcall.ProtocolError):
            client.call(0)


def test_a_forked_child_gets_its_own_connection(server):
    client = ringcall.Client(server.host, server.port)
    assert client.ping()
    pid = os.fork()
    if pid == 0:
        ok = client.call(10000, {"child": True}) == {"child": True}
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.call(10000, {"parent": True}) == {"parent": True}
    client.close()


def test_the_pool_spreads_calls_over_its_connections(server):
    with ringcall.Pool(server.host, server.port, size=4) as pool:
        before = connections_total(pool.clients[0])

        def body(t):
            for i in range(100):
                assert pool.call(10000, {"t": t, "i": i}) == {"t": t, "i": i}

        assert in_threads(16, body) == []
        assert pool.ping()
        # The first client was connected for the stats call; the other three since.
        assert connections_total(pool.clients[0]) - before == 3

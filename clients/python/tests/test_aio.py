"""The asyncio client against the real server and against a scripted peer."""

import asyncio
import json
import time

import pytest

import ringcall


def run(coroutine):
    return asyncio.run(coroutine)


def test_calls_pipeline_from_many_tasks(server):
    async def main():
        async with ringcall.AsyncClient(server.host, server.port) as client:
            assert await client.call(10000, {"content": "hi"}) == {"content": "hi"}
            results = await asyncio.gather(*(client.call(10000, {"i": i}) for i in range(2000)))
            assert results == [{"i": i} for i in range(2000)]
            assert await client.call_many([(0, None), (10000, {"a": 1})]) == ["pong", {"a": 1}]
            with pytest.raises(ringcall.ServerError) as info:
                await client.call(31337)
            assert info.value.code == 404
            assert await client.ping()

    run(main())


def test_no_server_is_a_connection_error():
    async def main():
        client = ringcall.AsyncClient("127.0.0.1", 1, timeout=2)
        with pytest.raises(ringcall.ConnectionError) as info:
            await client.call(0)
        assert info.value.sent is False

    run(main())


def test_a_timed_out_call_never_gets_another_calls_reply(fake_server):
    def script(conn):
        reader = conn.makefile("rb")
        lines = [reader.readline(), reader.readline()]
        time.sleep(0.5)
        for line in lines:
            request = json.loads(line)
            conn.sendall((json.dumps({"code": 0, "id": request["id"], "data": request["params"]}) + "\n").encode())
        reader.read()

    peer = fake_server(script)

    async def main():
        async with ringcall.AsyncClient("127.0.0.1", peer.port, notices=False) as client:
            first = asyncio.ensure_future(client.call(10000, {"n": 1}, timeout=0.1))
            second = asyncio.ensure_future(client.call(10000, {"n": 2}, timeout=10))
            with pytest.raises(ringcall.TimeoutError):
                await first
            assert await second == {"n": 2}

    run(main())


def test_a_lost_connection_fails_the_calls_in_flight_and_the_next_call_reconnects(fake_server):
    accepted = []

    def script(conn):
        accepted.append(conn)
        reader = conn.makefile("rb")
        if len(accepted) == 1:
            reader.readline()
            conn.close()  # the first connection dies with a call in flight
            return
        for line in reader:
            request = json.loads(line)
            conn.sendall((json.dumps({"code": 0, "id": request["id"], "data": "again"}) + "\n").encode())

    peer = fake_server(script)

    async def main():
        async with ringcall.AsyncClient("127.0.0.1", peer.port, notices=False) as client:
            with pytest.raises(ringcall.ConnectionError):
                await client.call(0)
            assert await client.call(0) == "again"

    run(main())

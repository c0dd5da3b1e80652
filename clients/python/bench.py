#!/usr/bin/env python3
"""Calls per second of the Python client against a running ringcall server, four ways:
blocking one call at a time, blocking pipelined (call_many in batches), threads sharing one
client, and asyncio with many calls in flight. Each runs for --seconds; echo of a small
object (cmdid 10000).

    python3 clients/python/bench.py --addr 127.0.0.1:8889 [--seconds 3]
"""

import argparse
import asyncio
import threading
import time

import ringcall

PARAMS = {"content": "Hello world!"}


def timed(seconds, step):
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        calls += step()
    return calls / (time.perf_counter() - start)


def blocking(host, port, seconds):
    with ringcall.Client(host, port) as client:
        return timed(seconds, lambda: (client.call(10000, PARAMS), 1)[1])


def pipelined(host, port, seconds, batch=100):
    calls = [(10000, PARAMS)] * batch
    with ringcall.Client(host, port) as client:
        return timed(seconds, lambda: len(client.call_many(calls)))


def threads(host, port, seconds, n=8):
    with ringcall.Client(host, port) as client:
        counts = [0] * n
        stop = time.perf_counter() + seconds

        def worker(i):
            while time.perf_counter() < stop:
                client.call(10000, PARAMS)
                counts[i] += 1

        start = time.perf_counter()
        workers = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(counts) / (time.perf_counter() - start)


def asyncio_(host, port, seconds, in_flight=100):
    async def main():
        async with ringcall.AsyncClient(host, port) as client:
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                await asyncio.gather(*(client.call(10000, PARAMS) for _ in range(in_flight)))
                calls += in_flight
            return calls / (time.perf_counter() - start)

    return asyncio.run(main())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--addr", default="127.0.0.1:8889")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    host, port = args.addr.rsplit(":", 1)
    for name, run in [
        ("blocking, one call at a time", blocking),
        ("blocking, call_many batches of 100", pipelined),
        ("8 threads sharing one Client", threads),
        ("asyncio, 100 calls in flight", asyncio_),
    ]:
        print(f"{name:40} {run(host, int(port), args.seconds):>10,.0f} calls/s", flush=True)


if __name__ == "__main__":
    main()

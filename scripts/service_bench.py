#!/usr/bin/env python3
"""Measures the example services the way a user would: each backend in turn, in interleaved
rounds, the service pinned to --server-cpu with one worker, `ringcall bench` pinned to
--client-cpu; medians per backend.

    scripts/service_bench.py log --backends uring,epoll --rounds 3
        64 connections x 4 appends in flight to log_service (a fresh --dir per run, on the
        disk under target/), durable appends/s, p99 of an acknowledgement, appends per sync.

    scripts/service_bench.py sms --backends uring,epoll --rounds 3 --delay-ms 10
        1,000 sends in flight (250 connections x 4) to sms_gateway, whose upstream is
        http_stub answering after --delay-ms; and http_stub alone under the same 1,000 in
        flight (its own rate, with the gateway's HTTP client).

Build first: cargo build --release --examples -p ringcall-examples && cargo build --release
"""

import argparse
import json
import shutil
import statistics
import subprocess
import time

RELEASE = "target/release"


def start(cmd, cpu):
    proc = subprocess.Popen(["taskset", "-c", str(cpu), *cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env={"RUST_LOG": "warn"})
    addr = proc.stdout.readline().decode().strip()
    if not addr:
        proc.kill()
        raise RuntimeError(f"{cmd[0]} did not start")
    return proc, addr


def cpu_seconds(proc):
    """User + system CPU time of `proc` and its threads so far."""
    fields = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0


def bench(args, addr, connections, pipeline, cmdid, params):
    out = subprocess.run(
        [f"{RELEASE}/ringcall", "bench", "--addr", addr, "-c", str(connections), "-P", str(pipeline),
         "-d", str(args.duration), "--warmup", "1", "--cpus", str(args.client_cpu), "--output", "json",
         "--cmdid", str(cmdid), "--params", json.dumps(params)],
        check=True, capture_output=True).stdout
    return json.loads(out)


def log_run(args, backend, round_):
    directory = f"target/service-bench-logs/{backend}-{round_}"
    shutil.rmtree(directory, ignore_errors=True)
    server, addr = start([f"{RELEASE}/examples/log_service", "--addr", "127.0.0.1:0", "--threads", "1",
                          "--backend", backend, "--dir", directory], args.server_cpu)
    try:
        report = bench(args, addr, 64, 4, 2001, {"record": "user 42 logged in from 10.1.2.3 with a valid token"})
        stats = json.loads(subprocess.run(
            [f"{RELEASE}/ringcall", "call", "--addr", addr, "2003"],
            check=True, capture_output=True).stdout)
        return report["requests_per_sec"], report["latency_us"]["p99"], stats["appends_per_sync"]
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(directory, ignore_errors=True)


def sms_run(args, backend, stub_addr):
    server, addr = start([f"{RELEASE}/examples/sms_gateway", "--addr", "127.0.0.1:0", "--threads", "1",
                          "--backend", backend, "--upstream", f"http://{stub_addr}/send"], args.server_cpu)
    try:
        before = cpu_seconds(server)
        report = bench(args, addr, 250, 4, 5001, {"to": "+15551234567", "text": "your code is 1234"})
        busy = (cpu_seconds(server) - before) / (args.duration + 1)
        return report["requests_per_sec"], report["latency_us"]["p99"], f"gateway CPU {busy:.0%}"
    finally:
        server.terminate()
        server.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("service", choices=["log", "sms"])
    parser.add_argument("--backends", default="uring,epoll")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--delay-ms", type=int, default=10)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    args = parser.parse_args()
    backends = args.backends.split(",")
    results = {}
    stub = None
    if args.service == "sms":
        stub, stub_addr = start([f"{RELEASE}/examples/http_stub", "serve", "--addr", "127.0.0.1:0",
                                 "--delay-ms", str(args.delay_ms), "--threads", "1"], args.client_cpu)
    try:
        for round_ in range(args.rounds):
            order = backends[round_ % len(backends):] + backends[:round_ % len(backends)]
            if args.service == "sms":
                order = order + ["upstream alone"]
            for backend in order:
                if backend == "upstream alone":
                    out = subprocess.run(
                        ["taskset", "-c", str(args.server_cpu), f"{RELEASE}/examples/http_stub", "load", "--url",
                         f"http://{stub_addr}/send", "--concurrency", "1000", "--duration", str(args.duration)],
                        check=True, capture_output=True).stdout
                    row = (json.loads(out)["requests_per_sec"], None, None)
                elif args.service == "log":
                    row = log_run(args, backend, round_)
                else:
                    row = sms_run(args, backend, stub_addr)
                results.setdefault(backend, []).append(row)
                print(f"round {round_ + 1} {backend:15} {row}", flush=True)
                time.sleep(0.5)
    finally:
        if stub:
            stub.terminate()
    third = "appends per sync" if args.service == "log" else "gateway CPU (all its threads, of one core)"
    print(f"\n| backend | req/s (median) | runs | p99 µs (median) | {third} |")
    print("|---|---:|---|---:|---|")
    for backend, rows in results.items():
        rps = [r[0] for r in rows]
        p99 = [r[1] for r in rows if r[1] is not None]
        extra = [r[2] for r in rows if r[2] is not None]
        extra_text = (f"{statistics.median(extra):.1f}" if args.service == "log" else str(extra[-1])) if extra else "-"
        p99_text = f"{statistics.median(p99):.0f}" if p99 else "-"
        print(f"| {backend} | {statistics.median(rps):.0f} | {', '.join(f'{x:.0f}' for x in rps)} | {p99_text} | {extra_text} |")


if __name__ == "__main__":
    main()

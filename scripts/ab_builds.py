#!/usr/bin/env python3
"""A/B of two builds of the server: the same backends and workloads against a baseline binary
and a candidate binary, in interleaved rounds, with medians and per-round ratios.

`ringcall compare` compares backends of one build; this compares builds (is a change a
regression?), by requests/s and by the server's CPU time per request answered (schedstat of
every server thread over the run, warm-up included, divided by the requests its stats
command counted over the same span; steadier than requests/s when the load generator is the
bottleneck). Servers run pinned to --server-cpu with one worker; the load is the
candidate's `ringcall bench`, pinned to --client-cpu. The order of the runs rotates every
round, so drift on a noisy host hits both builds alike.

    scripts/ab_builds.py --baseline /path/to/old/ringcall --candidate target/release/ringcall \\
        --backends uring,epoll --workloads 64x1,16x16,1000x1,16x16@64k,16x16@log1k --rounds 5
"""

import argparse
import glob
import json
import socket
import statistics
import subprocess
import threading


def server_cpu_ns(pid):
    """CPU time every thread of the server has run, from schedstat (nanoseconds)."""
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(path) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def server_requests(addr):
    """Requests the server has answered, from its built-in stats command."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b'{"cmdid":1}\n')
        line = conn.makefile("rb").readline()
    return json.loads(line)["data"]["total"]["requests"]


def start_server(binary, backend, cpu):
    server = subprocess.Popen(
        ["taskset", "-c", str(cpu), binary, "serve", "--addr", "127.0.0.1:0", "--threads", "1",
         "--backend", backend, "--shutdown-timeout", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"RUST_LOG": "info"},
    )
    # Builds that print the address on stdout, and older ones that only log `addr=` on stderr.
    found = {}

    def from_stderr():
        for line in server.stderr:
            line = line.decode()
            if " addr=" in line and "addr" not in found:
                found["addr"] = line.split(" addr=")[1].split()[0]
                found["event"].set()

    found["event"] = threading.Event()
    threading.Thread(target=from_stderr, daemon=True).start()

    def from_stdout():
        line = server.stdout.readline().decode().strip()
        if line and "addr" not in found:
            found["addr"] = line
            found["event"].set()

    threading.Thread(target=from_stdout, daemon=True).start()
    if not found["event"].wait(30):
        server.kill()
        raise RuntimeError(f"{binary} --backend {backend} did not start")
    return server, found["addr"]


def run(args, binary, backend, workload):
    server, addr = start_server(binary, backend, args.server_cpu)
    try:
        # CxP, CxP@SIZE for echo requests of SIZE bytes, or CxP@SHAPE for a built-in
        # realistic request (log1k, blob16k, ...), as `ringcall compare` takes them.
        load, _, size = workload.partition("@")
        connections, pipeline = load.split("x")
        if not size:
            payload = []
        elif size[0].isdigit():
            payload = ["--payload-bytes", size]
        else:
            payload = ["--shape", size]
        cpu0, served0 = server_cpu_ns(server.pid), server_requests(addr)
        out = subprocess.run(
            [args.candidate, "bench", "--addr", addr, "-c", connections, "-P", pipeline,
             "-d", str(args.duration), "--warmup", str(args.warmup), "--cpus", str(args.client_cpu),
             "--output", "json", *payload],
            check=True, capture_output=True,
        ).stdout
        cpu1, served1 = server_cpu_ns(server.pid), server_requests(addr)
        # The warm-up's requests count too, on both sides: CPU per request answered.
        cpu_per_request = (cpu1 - cpu0) / max(served1 - served0, 1)
        return json.loads(out)["requests_per_sec"], cpu_per_request
    finally:
        server.terminate()
        server.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--candidate", default="target/release/ringcall")
    parser.add_argument("--backends", default="uring,epoll")
    parser.add_argument("--workloads", default="64x1,16x16,1000x1")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    args = parser.parse_args()
    builds = {"baseline": args.baseline, "candidate": args.candidate}
    slots = [(w, b, build) for w in args.workloads.split(",") for b in args.backends.split(",") for build in builds]
    results = {}
    for round_ in range(args.rounds):
        # Rotate within each workload so neither build always runs first.
        for workload in args.workloads.split(","):
            mine = [s for s in slots if s[0] == workload]
            shift = round_ % len(mine)
            for w, backend, build in mine[shift:] + mine[:shift]:
                rps, cpu = run(args, builds[build], backend, w)
                results.setdefault((w, backend, build), []).append((rps, cpu))
                print(f"round {round_ + 1} {w:>7} {backend:12} {build:9} {rps:12.0f} req/s "
                      f"{cpu:8.0f} ns of server CPU per request", flush=True)
    print("\n| workload | backend | baseline req/s | candidate req/s | candidate / baseline, per round "
          "| server CPU per request, baseline → candidate (ns) | candidate / baseline, per round |")
    print("|---|---|---:|---:|---|---|---|")
    for workload in args.workloads.split(","):
        for backend in args.backends.split(","):
            base = results[(workload, backend, "baseline")]
            cand = results[(workload, backend, "candidate")]
            ratios = [c[0] / b[0] for b, c in zip(base, cand)]
            cpu_ratios = [c[1] / b[1] for b, c in zip(base, cand)]
            print(f"| {workload} | {backend} | {statistics.median(b[0] for b in base):.0f} | "
                  f"{statistics.median(c[0] for c in cand):.0f} | "
                  f"median {statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)}) | "
                  f"{statistics.median(b[1] for b in base):.0f} → {statistics.median(c[1] for c in cand):.0f} | "
                  f"median {statistics.median(cpu_ratios):.2f}x ({', '.join(f'{r:.2f}' for r in cpu_ratios)}) |")


if __name__ == "__main__":
    main()

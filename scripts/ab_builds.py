#!/usr/bin/env python3
"""A/B of two builds of the server: the same backends and workloads against a baseline binary
and a candidate binary, in interleaved rounds, with medians and per-round ratios.

`ringcall compare` compares backends of one build; this compares builds (is a change a
regression?). Servers run pinned to --server-cpu with one worker; the load is the
candidate's `ringcall bench`, pinned to --client-cpu. The order of the runs rotates every
round, so drift on a noisy host hits both builds alike.

    scripts/ab_builds.py --baseline /path/to/old/ringcall --candidate target/release/ringcall \\
        --backends uring,epoll --workloads 64x1,16x16,1000x1,16x16@64k --rounds 5
"""

import argparse
import json
import statistics
import subprocess
import threading


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
        # CxP, or CxP@SIZE for echo requests of SIZE bytes (as `ringcall compare` takes).
        shape, _, size = workload.partition("@")
        connections, pipeline = shape.split("x")
        payload = ["--payload-bytes", size] if size else []
        out = subprocess.run(
            [args.candidate, "bench", "--addr", addr, "-c", connections, "-P", pipeline,
             "-d", str(args.duration), "--warmup", str(args.warmup), "--cpus", str(args.client_cpu),
             "--output", "json", *payload],
            check=True, capture_output=True,
        ).stdout
        return json.loads(out)["requests_per_sec"]
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
                rps = run(args, builds[build], backend, w)
                results.setdefault((w, backend, build), []).append(rps)
                print(f"round {round_ + 1} {w:>7} {backend:12} {build:9} {rps:12.0f} req/s", flush=True)
    print("\n| workload | backend | baseline req/s | candidate req/s | candidate / baseline, per round |")
    print("|---|---|---:|---:|---|")
    for workload in args.workloads.split(","):
        for backend in args.backends.split(","):
            base = results[(workload, backend, "baseline")]
            cand = results[(workload, backend, "candidate")]
            ratios = [c / b for b, c in zip(base, cand)]
            print(f"| {workload} | {backend} | {statistics.median(base):.0f} | {statistics.median(cand):.0f} | "
                  f"median {statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)}) |")


if __name__ == "__main__":
    main()

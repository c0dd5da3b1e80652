#!/usr/bin/env python3
"""Server CPU per request, split into user and system time, for several builds of the server.

Each build serves with one `uring` (or --backend) worker pinned to --server-cpu; the load is
`ringcall bench` (the --load binary) pinned to --client-cpu. Over a window in the middle of
each run, the server's user and system CPU (utime and stime of /proc/PID/stat) are divided
by the requests its stats command counted over the same window. Builds alternate every round
and each gets the same load generator, so drift on a noisy host hits every build alike; the
medians over the rounds are printed at the end. Where `ab_builds.py` says a build costs more
CPU per request, this says whether the server's own code (user) or the kernel (system) pays.

    scripts/cpu_per_request.py --load target/release/ringcall \\
        /path/to/old/ringcall target/release/ringcall --rounds 7
"""

import argparse
import os
import statistics
import subprocess
import time

# The stats command's request count, as the build A/B reads it (same directory).
from ab_builds import server_requests as requests


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def run(args, binary):
    server = subprocess.Popen(
        ["taskset", "-c", str(args.server_cpu), binary, "serve", "--addr", "127.0.0.1:0", "--threads", "1",
         "--backend", args.backend],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    try:
        addr = server.stdout.readline().decode().strip()
        connections, pipeline = args.workload.split("x")
        load = subprocess.Popen(
            [args.load, "bench", "--addr", addr, "-c", connections, "-P", pipeline,
             "-d", str(args.window + 3), "--warmup", "0", "--cpus", str(args.client_cpu)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1.5)
        served0, (user0, sys0) = requests(addr), cpu_ticks(server.pid)
        time.sleep(args.window)
        served1, (user1, sys1) = requests(addr), cpu_ticks(server.pid)
        load.wait()
    finally:
        server.kill()
        server.wait()
    n = max(served1 - served0, 1)
    ns_per_tick = 1e9 / os.sysconf("SC_CLK_TCK")
    return n / args.window, (user1 - user0) * ns_per_tick / n, (sys1 - sys0) * ns_per_tick / n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("binaries", nargs="+")
    parser.add_argument("--load", default="target/release/ringcall")
    parser.add_argument("--backend", default="uring")
    parser.add_argument("--workload", default="16x16")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    args = parser.parse_args()
    results = {}
    for round_ in range(args.rounds):
        for binary in args.binaries:
            rps, user, system = run(args, binary)
            results.setdefault(binary, []).append((rps, user, system))
            print(f"round {round_ + 1} {binary}: {rps:.0f} req/s, user {user:.0f} ns/request, "
                  f"system {system:.0f} ns/request", flush=True)
    print("\n| build | requests/s | user ns/request | system ns/request | total |")
    print("|---|---:|---:|---:|---:|")
    for binary, runs in results.items():
        print(f"| {binary} | {statistics.median(r[0] for r in runs):.0f} | {statistics.median(r[1] for r in runs):.0f} "
              f"| {statistics.median(r[2] for r in runs):.0f} | {statistics.median(r[1] + r[2] for r in runs):.0f} |")


if __name__ == "__main__":
    main()

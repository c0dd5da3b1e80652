#!/usr/bin/env python3
"""How a backend scales with cores, in one command: `ringcall compare` with 1, 2, 4, 8, …
worker threads (one per server CPU, the first N of --server-cpus), the load on --client-cpus,
and a table of requests/s, server CPU per request, and the linearity against one worker
(requests/s at N workers over N times requests/s at one).

    cargo build --release
    scripts/scaling_sweep.py --server-cpus 0-7 --client-cpus 8-15 [--backends uring,epoll] \\
        [--workloads 64x16,64x16@log1k] [--rounds 3] [--duration 5] [--json sweep.json]

Each step is one `ringcall compare` run (interleaved rounds of every backend, medians), so
within a step the backends are compared fairly; across steps the host's state may drift.
The load must not be the bottleneck: give it at least as many CPUs as the largest step's
server (its threads are pinned one per client CPU). On a host with two CPUs only the
one-worker step fits beside its load: there the sweep checks that it runs, nothing more.
"""

import argparse
import json
import subprocess
import sys
import tempfile


def cpu_list(text):
    """`0-3,8` -> [0, 1, 2, 3, 8]."""
    cpus = []
    for part in text.split(","):
        if "-" in part:
            first, last = part.split("-")
            cpus.extend(range(int(first), int(last) + 1))
        elif part:
            cpus.append(int(part))
    return cpus


def steps(n):
    """1, 2, 4, … up to n, and n itself."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    out.append(n)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default="target/release/ringcall")
    parser.add_argument("--server-cpus", type=cpu_list, required=True)
    parser.add_argument("--client-cpus", type=cpu_list, required=True)
    parser.add_argument("--backends", default="uring,epoll")
    parser.add_argument("--workloads", default="64x16,64x16@log1k")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--json", help="write every step's medians here")
    args = parser.parse_args()
    if set(args.server_cpus) & set(args.client_cpus):
        sys.exit("--server-cpus and --client-cpus overlap: the load would compete with the server")

    results = []
    for n in steps(len(args.server_cpus)):
        cpus = ",".join(map(str, args.server_cpus[:n]))
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            command = [
                args.binary, "compare", "--backends", args.backends, "--workloads", args.workloads,
                "--rounds", str(args.rounds), "-d", str(args.duration), "--server-cpus", cpus,
                "--client-cpus", ",".join(map(str, args.client_cpus)), "--json", out.name,
            ]
            print(f"# {n} worker(s): {' '.join(command)}", file=sys.stderr, flush=True)
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            report = json.load(open(out.name))
        for row in report["summary"]:
            results.append({
                "workers": n,
                "backend": row["backend"],
                "workload": row["workload"],
                "requests_per_sec": row["requests_per_sec"],
                "server_cpu_us_per_request": row["server_cpu_us_per_request"],
            })

    one = {(r["backend"], r["workload"]): r["requests_per_sec"] for r in results if r["workers"] == 1}
    print(f"{'backend':12} {'workload':16} {'workers':>7} {'requests/s':>12} {'CPU µs/req':>10} {'linearity':>9}")
    for r in results:
        base = one.get((r["backend"], r["workload"]))
        r["linearity"] = r["requests_per_sec"] / (r["workers"] * base) if base else None
        linearity = f"{r['linearity']:.2f}" if r["linearity"] is not None else "-"
        print(
            f"{r['backend']:12} {r['workload']:16} {r['workers']:>7} {r['requests_per_sec']:>12,.0f} "
            f"{r['server_cpu_us_per_request']:>10.2f} {linearity:>9}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

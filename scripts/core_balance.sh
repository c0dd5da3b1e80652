#!/bin/bash
# How evenly long-lived connections load the cores: a 2-thread uring server, with and without
# connection balancing (--no-balance), under 8, 16 and 64 connections x 16 in flight; five
# runs each (the kernel's SO_REUSEPORT hash sees new source ports every run). Prints each
# run's connections open per core (read mid-run; one of them is the stats call's) and requests
# per core, and the busier core's share of the requests.
# Needs a release build (cargo build --release).
set -e
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$(dirname "$0")/.."
B=target/release/ringcall
start() {
  rm -f "$TMP/addr"
  $B serve --addr 127.0.0.1:0 --threads 2 --backend uring "$@" > "$TMP/addr" 2>/dev/null &
  echo $! > "$TMP/pid"
  for _ in $(seq 100); do [ -s "$TMP/addr" ] && break; sleep 0.05; done
  head -1 "$TMP/addr"
}
for conns in 8 16 64; do
  for mode in balanced no-balance; do
    for run in 1 2 3 4 5; do
      if [ $mode = balanced ]; then A=$(start); else A=$(start --no-balance); fi
      P=$(cat $TMP/pid)
      $B bench --addr $A -c $conns -P 16 -d 2 --warmup 0.5 --output json > $TMP/bench.json &
      BP=$!
      sleep 1.5
      $B call --addr $A 1 > $TMP/mid.json
      wait $BP
      $B call --addr $A 1 | python3 -c '
import json, sys
mid = json.load(open("'$TMP/mid.json'"))["cores"]
cores = json.load(sys.stdin)["cores"]
conns = [c["connections_open"] for c in mid]
reqs = [c["requests"] for c in cores]
share = max(reqs) / max(1, sum(reqs))
print(f"'$conns' connections, '$mode' run '$run': connections per core {conns}, requests per core {reqs}, busier core {share:.0%}")'
      kill $P; wait $P 2>/dev/null || true
    done
  done
done

#!/bin/bash
# What each way to scale costs on one host: one server on one core; one server on two cores;
# three servers with the client spreading its connections over them; three servers behind
# HAProxy (deploy/haproxy.cfg with its addresses rewritten). Needs a
# release build (cargo build --release) and haproxy. Two rounds; prints req/s and p99 (µs).
set -e
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cd "$(dirname "$0")/.."
B=target/release/ringcall
run() { $B bench --addr $1 -c 64 -P 1 -d 5 --warmup 1 --cpus 1 --output json | python3 -c 'import json,sys; r=json.load(sys.stdin); print(round(r["requests_per_sec"]), r["latency_us"]["p99"])'; }
# Starts a server with "$@"; prints its address (its pid is left in $TMP/pid). Runs in a
# subshell ($(start …)): the address file is removed first, so it is never an old one.
start() {
  rm -f "$TMP/addr"
  $B serve --addr 127.0.0.1:0 "$@" > "$TMP/addr" 2>/dev/null &
  echo $! > "$TMP/pid"
  for _ in $(seq 100); do [ -s "$TMP/addr" ] && break; sleep 0.05; done
  head -1 "$TMP/addr"
}
for round in 1 2; do
  A=$(start --threads 1 --backend uring); P=$(cat $TMP/pid); echo "round $round one core (uring, 1 thread): $(run $A)"; kill $P; wait $P 2>/dev/null || true
  A=$(start --threads 2 --backend uring --no-pin); P=$(cat $TMP/pid); echo "round $round two cores (uring, 2 threads, load shares them): $(run $A)"; kill $P; wait $P 2>/dev/null || true
  S=(); PIDS=()
  for i in 1 2 3; do a=$(start --threads 1 --backend uring --no-pin); S+=($a); PIDS+=($(cat $TMP/pid)); done
  echo "round $round three servers, the client spreading its connections (bench --addr a,b,c): $(run "${S[0]},${S[1]},${S[2]}")"
  FP=$(python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
  sed -e "s/^    bind .*/    bind 127.0.0.1:$FP/" -e "s/^    maxconn 100000/    maxconn 9000/" \
      -e "s/ringcall-1 10.0.0.11:8889/ringcall-1 ${S[0]}/" -e "s/ringcall-2 10.0.0.12:8889/ringcall-2 ${S[1]}/" -e "s/ringcall-3 10.0.0.13:8889/ringcall-3 ${S[2]}/" \
      deploy/haproxy.cfg > $TMP/haproxy.cfg
  echo "  servers: ${S[*]}"
  haproxy -db -f $TMP/haproxy.cfg >/dev/null 2>&1 & H=$!; sleep 2.5
  echo "round $round three servers behind HAProxy (all on the same 2 CPUs): $(run 127.0.0.1:$FP)"
  kill $H ${PIDS[@]}; wait 2>/dev/null || true
done

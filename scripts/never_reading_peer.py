#!/usr/bin/env python3
"""What a peer that sends requests and never reads its replies costs a ringcall server.

For each backend: start `ringcall serve` (one worker, on a free port), warm the core up with
a connection that exchanges 32 MiB of 1 KiB echo requests and reads every reply (so the
receive pool and the allocator's working set are already resident), read the server's RSS,
then let --peers more peers (default 1) each write up to 64 MiB of the same requests and
never read. Once the server has stopped reading (each peer's writes block for 3 s), read the
RSS again and the server's own counters, and check that a fresh connection is still answered.

With --small-requests the peers write 12-byte `{"cmdid":1}` lines instead (the stats command:
a reply of a kilobyte or more each), up to 16 MiB: requests whose replies are much larger
than they are.

    cargo build --release
    scripts/never_reading_peer.py [--binary target/release/ringcall] [--peers N] [--small-requests] [BACKEND ...]
"""

import argparse
import json
import socket
import subprocess
import threading
import time

LINE = b'{"cmdid":10000,"params":{"f":"' + b"x" * (1024 - 34) + b'"}}\n'
assert len(LINE) == 1024
CHUNK = LINE * 64


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def warm_up(addr):
    conn = socket.create_connection(addr)
    lines = 512 * 64

    def reader():
        got = 0
        while got < lines:
            data = conn.recv(1 << 20)
            assert data, "server closed the warm-up connection"
            got += data.count(b"\n")

    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(512):
        conn.sendall(CHUNK)
    thread.join()
    return conn


def stats(addr):
    conn = socket.create_connection(addr)
    conn.sendall(b'{"cmdid":1}\n')
    reply = b""
    while not reply.endswith(b"\n"):
        reply += conn.recv(1 << 16)
    conn.close()
    return json.loads(reply)["data"]["total"]


def measure(binary, backend, peers, small):
    chunk, limit = (b'{"cmdid":1}\n' * 5000, 16 << 20) if small else (CHUNK, 64 << 20)
    server = subprocess.Popen(
        [binary, "serve", "--addr", "127.0.0.1:0", "--backend", backend, "--threads", "1", "--no-pin"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        host, port = server.stdout.readline().decode().strip().rsplit(":", 1)
        addr = (host, int(port))
        warm = warm_up(addr)
        time.sleep(0.5)
        warmed = stats(addr)
        before = rss_kib(server.pid)
        hogs = []
        sent = 0
        for _ in range(peers):
            hog = socket.create_connection(addr)
            hog.settimeout(3.0)
            hogs.append(hog)
            written = 0
            try:
                while written < limit:
                    written += hog.send(chunk)
            except socket.timeout:
                pass
            sent += written
        time.sleep(1.0)
        after = rss_kib(server.pid)
        total = stats(addr)
        # Echo replies are all the same size: the warm-up tells it.
        reply_len = warmed["bytes_out"] / (warmed["requests"] - 1)
        requests = total["requests"] - warmed["requests"] - 1
        held = requests * reply_len - (total["bytes_out"] - warmed["bytes_out"])
        if small:
            print(
                f"{backend:12} {peers} peer(s) wrote {sent / 2**20:5.1f} MiB of {{\"cmdid\":1}} before their "
                f"writes blocked; server answered {requests:,} of them; "
                f"RSS {before} -> {after} KiB ({after - before:+} KiB); "
                f"backpressure pauses {total['backpressure_pauses']}; other connections answered"
            )
            for hog in hogs:
                hog.close()
            warm.close()
            return
        print(
            f"{backend:12} {peers} peer(s) wrote {sent / 2**20:5.1f} MiB before their writes blocked; "
            f"server read {(total['bytes_in'] - 32 * 2**20) / 2**20:5.2f} MiB of it; "
            f"RSS {before} -> {after} KiB ({after - before:+} KiB); "
            f"replies held unsent {held / 2**10 / peers:,.0f} KiB per peer; "
            f"backpressure pauses {total['backpressure_pauses']}; other connections answered"
        )
        for hog in hogs:
            hog.close()
        warm.close()
    finally:
        server.terminate()
        server.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--binary", default="target/release/ringcall")
    parser.add_argument("--peers", type=int, default=1, help="peers that never read")
    parser.add_argument("--small-requests", action="store_true", help="12-byte requests with large replies")
    parser.add_argument("backends", nargs="*", default=["uring", "tokio-uring", "epoll", "epoll-mt"])
    args = parser.parse_args()
    for backend in args.backends:
        measure(args.binary, backend, args.peers, args.small_requests)


if __name__ == "__main__":
    main()

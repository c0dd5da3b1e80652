"""Fixtures: the real ringcall server, started on 127.0.0.1:0 for the tests and stopped after.

The binary is $RINGCALL_BINARY if set (the cargo test that runs this suite passes its own
build), else the release build at target/release/ringcall of this repository.
"""

import os
import pathlib
import signal
import socket
import subprocess
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]


def binary():
    path = os.environ.get("RINGCALL_BINARY") or str(ROOT / "target" / "release" / "ringcall")
    if not os.path.exists(path):
        pytest.fail(f"{path} is missing: run `cargo build --release` first, or set RINGCALL_BINARY")
    return path


class Server:
    """A `ringcall serve` child; `port` 0 picks a free one."""

    def __init__(self, port=0, backend="auto", extra=()):
        self.process = subprocess.Popen(
            [binary(), "serve", "--addr", f"127.0.0.1:{port}", "--threads", "2", "--no-pin", "--backend", backend]
            + list(extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        line = self.process.stdout.readline().decode().strip()
        if not line:
            raise RuntimeError(f"ringcall serve exited with {self.process.wait()} before serving")
        host, port = line.rsplit(":", 1)
        self.host, self.port = host, int(port)

    def kill(self):
        self.process.kill()
        self.process.wait()

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=30)


@pytest.fixture(params=["uring", "epoll"])
def server(request):
    s = Server(backend=request.param)
    yield s
    s.stop()


class FakeServer:
    """A scripted peer on 127.0.0.1: `script(conn)` runs once per accepted connection, on its
    own thread. For what a well-behaved server never does (never answer, answer late)."""

    def __init__(self, script):
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.script = script
        self.threads = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self.script, args=(conn,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def close(self):
        self.listener.close()


@pytest.fixture
def fake_server():
    servers = []

    def start(script):
        s = FakeServer(script)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()

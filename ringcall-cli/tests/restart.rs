//! What a supervisor (systemd's `Restart=always`) does: SIGKILL a loaded server and start it
//! again on the same port at once. Every restart must bind and serve, on every backend: the
//! dead server's listener can outlive it while the kernel tears its io_uring ring down, and
//! the new server waits for it (a bounded bind retry) instead of exiting.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Client, spawn_server};
use ringcall::Backend;

const CYCLES: usize = 20;

/// Connections with requests in flight: pipelined pings written without waiting, read by a
/// thread until the server dies, so the ring has receives and sends in flight when it does.
fn load(addr: SocketAddr) -> Vec<std::thread::JoinHandle<()>> {
    (0..4)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).expect("connect");
            let batch = "{\"cmdid\":0}\n".repeat(4096);
            std::thread::spawn(move || {
                let mut reader = stream.try_clone().unwrap();
                let reading = std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
                });
                while stream.write_all(batch.as_bytes()).is_ok() {}
                let _ = reading.join();
            })
        })
        .collect()
}

fn sigkill_and_restart_binds_every_time(backend: Backend) {
    let (mut child, addr) = spawn_server(backend, &[], None);
    let port = addr.to_string();
    let mut slowest = Duration::ZERO;
    for cycle in 0..CYCLES {
        let mut c = Client::connect(addr);
        assert_eq!(c.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
        let load = load(addr);
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
        let restarted = Instant::now();
        // spawn_server fails the test if the server exits instead of printing its address.
        let (next, bound) = spawn_server(backend, &["--addr", &port], None);
        assert_eq!(bound, addr, "cycle {cycle}: restarted on another address");
        let mut c = Client::connect(addr);
        assert_eq!(c.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n", "cycle {cycle}");
        slowest = slowest.max(restarted.elapsed());
        child = next;
        for thread in load {
            thread.join().unwrap();
        }
    }
    eprintln!("{backend}: {CYCLES} SIGKILL-and-restart cycles, slowest restart to first reply {slowest:?}");
    child.kill().unwrap();
    child.wait().unwrap();
}

every_backend!(sigkill_and_restart_binds_every_time);

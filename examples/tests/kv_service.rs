//! A service built on the library (`examples/kv_service.rs`, with nothing but
//! `Server::builder()…start()?.wait()`) drains on SIGTERM exactly as `ringcall serve` does:
//! every request sent before the signal is answered, the connections are closed, the
//! shutdown is logged, and the process exits 0.

#[macro_use]
#[path = "../../tests/common/mod.rs"]
mod common;
mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Client;
use support::example;

/// Kills the service if the test fails half-way, so it does not outlive the test.
struct Service(std::process::Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_library_built_service_drains_on_sigterm_and_exits_0() {
    let mut service = Service(
        Command::new(example("kv_service"))
            .args(["--addr", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the example"),
    );
    let child = &mut service.0;
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr: std::net::SocketAddr = line.trim().parse().expect("the address on stdout");
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut log = String::new();
        let _ = stderr.read_to_string(&mut log);
        log
    });

    let mut idle = Client::connect(addr);
    assert_eq!(
        idle.call("{\"cmdid\":2000,\"params\":{\"name\":\"ops\"}}\n"),
        "{\"code\":0,\"data\":{\"greeting\":\"hello, ops\"}}\n"
    );
    let mut busy = Client::connect(addr);
    let batch: String = (0..300)
        .map(|i| format!("{{\"cmdid\":2000,\"id\":{i},\"params\":{{\"name\":\"n{i}\"}}}}\n"))
        .collect();
    busy.send(batch.as_bytes());
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    for i in 0..300 {
        assert_eq!(
            busy.line(),
            format!("{{\"code\":0,\"id\":{i},\"data\":{{\"greeting\":\"hello, n{i}\"}}}}\n")
        );
    }
    busy.expect_eof();
    idle.expect_eof();
    drop((busy, idle));

    // Failsafe only: the drain is bounded by the server's own shutdown timeout (10 s).
    let give_up = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < give_up, "the service did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit status {status}");
    let log = log.join().unwrap();
    assert!(log.contains("shutdown requested"), "no shutdown line in the log:\n{log}");
    assert!(log.contains("kv_service stopped"), "no stop line in the log:\n{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log that is not a terminal:\n{log}");
}

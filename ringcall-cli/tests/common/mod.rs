//! Helpers for the tests of the `ringcall` binary: the in-process helpers of the library's
//! tests (`every_backend!`, the line client), and starting `ringcall serve` as a child.

#![allow(dead_code, unused_macros, unused_imports)]

#[macro_use]
#[path = "../../../tests/common/mod.rs"]
mod shared;

pub use shared::*;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;

use ringcall::Backend;

/// Starts the `ringcall serve` binary on a free port with `extra` arguments (and, if given,
/// an open-file limit it cannot raise); returns the child and its address.
pub fn spawn_server(
    backend: Backend,
    extra: &[&str],
    nofile: Option<u64>,
) -> (std::process::Child, SocketAddr) {
    spawn_server_with_log(backend, extra, nofile, true)
}

/// [`spawn_server`], but the server's stderr is closed once it is serving: every later log
/// line it writes fails with EPIPE.
pub fn spawn_server_closing_log(backend: Backend) -> (std::process::Child, SocketAddr) {
    spawn_server_with_log(backend, &[], None, false)
}

fn spawn_server_with_log(
    backend: Backend,
    extra: &[&str],
    nofile: Option<u64>,
    keep_reading_log: bool,
) -> (std::process::Child, SocketAddr) {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ringcall"));
    command
        .args(["serve", "--no-pin", "--backend", backend.name()])
        .args(if extra.contains(&"--addr") { &[][..] } else { &["--addr", "127.0.0.1:0"][..] })
        .args(if extra.contains(&"--threads") { &[][..] } else { &["--threads", "2"][..] })
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(limit) = nofile {
        // SAFETY: setrlimit is async-signal-safe.
        unsafe {
            command.pre_exec(move || {
                let lim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                Ok(())
            });
        }
    }
    let mut child = command.spawn().expect("spawn ringcall");
    let stderr = child.stderr.take().unwrap();
    // `serve` prints the address it listens on, alone on the first line of stdout.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    assert!(stdout.read_line(&mut line).unwrap() > 0, "server exited before serving");
    let addr = line.trim().parse().expect("an address on the first line of stdout");
    if keep_reading_log {
        let mut stderr = stderr;
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    }
    (child, addr)
}

/// Steady load through a [`Pool`](ringcall::pool::Pool): `threads` threads calling echo one
/// call after another, each call carrying a token its reply must echo (a reply to another
/// call fails the test).
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    calls: std::sync::Arc<std::sync::atomic::AtomicU64>,
    answered: std::sync::Arc<std::sync::atomic::AtomicU64>,
    workers: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Load {
    pub fn start(
        pool: &std::sync::Arc<ringcall::pool::Pool>,
        threads: usize,
        options: ringcall::pool::CallOptions,
    ) -> Self {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let answered = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let workers = (0..threads)
            .map(|t| {
                let (pool, stop, calls, answered) =
                    (pool.clone(), stop.clone(), calls.clone(), answered.clone());
                std::thread::spawn(move || {
                    let mut errors = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let token = format!("{t}-{i}");
                        let call = ringcall::client::Call::with_params(
                            10000,
                            &serde_json::json!({ "token": token }),
                        )
                        .unwrap();
                        match pool.call(&call, options) {
                            Ok(reply) => {
                                assert_eq!(reply.code, 0, "{reply:?}");
                                let got = ringcall::simd_json::prelude::ValueObjectAccessAsScalar::get_str(
                                    &reply.data,
                                    "token",
                                );
                                assert_eq!(got, Some(token.as_str()), "a reply to another call");
                                answered.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => errors.push(e.to_string()),
                        }
                        calls.fetch_add(1, Ordering::Relaxed);
                        i += 1;
                    }
                    errors
                })
            })
            .collect();
        Self { stop, calls, answered, workers }
    }

    /// Calls returned so far, answered or failed.
    pub fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the threads; returns every call's count and the errors of those that failed,
    /// having checked each call returned exactly once.
    pub fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let errors: Vec<String> = self.workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
        let total = self.calls.load(std::sync::atomic::Ordering::Relaxed);
        let answered = self.answered.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(answered + errors.len() as u64, total, "every call returned once");
        (total, errors)
    }
}

/// Waits until `done` holds (a failsafe, not a timing assertion).
pub fn eventually(what: &str, done: impl Fn() -> bool) {
    let give_up = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < give_up, "never happened: {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Stops `load` and checks none of its calls failed (`what` says where, in the output).
pub fn none_failed(load: Load, what: &str) {
    let (total, errors) = load.finish();
    eprintln!("{what}: {total} calls, {} failed", errors.len());
    assert!(
        errors.is_empty(),
        "{} of {total} calls failed: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
}

/// Sends SIGTERM to `child` (the graceful stop).
pub fn sigterm(child: &std::process::Child) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
}

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

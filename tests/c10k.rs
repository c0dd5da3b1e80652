//! C10K and file-descriptor exhaustion, on every backend, against the real binary (so the
//! server's descriptors and the test's are counted apart).

#[macro_use]
mod common;

use common::{Client, raise_nofile, spawn_server};
use ringline::Backend;

const PONG: &str = "{\"code\":0,\"data\":\"pong\"}\n";

/// 10,000 concurrent connections (fewer only if the hard open-file limit is lower; the test
/// says so), a subset active while all are open; every request answered, none dropped.
fn ten_thousand_connections(backend: Backend) {
    let limit = raise_nofile();
    let wanted = 10_000usize;
    let n = wanted.min(limit.saturating_sub(200) as usize);
    if n < wanted {
        eprintln!("NOTE: the hard open-file limit is {limit}: testing {n} connections instead of {wanted}");
    }
    let (mut child, addr) = spawn_server(backend, &[], None);
    let mut clients: Vec<Client> = (0..n).map(|_| Client::connect(addr)).collect();
    // A subset is active while every connection is open.
    for (i, c) in clients.iter_mut().enumerate().step_by(97) {
        assert_eq!(
            c.call(&format!("{{\"cmdid\":10000,\"params\":{{\"i\":{i}}}}}\n")),
            format!("{{\"code\":0,\"data\":{{\"i\":{i}}}}}\n")
        );
    }
    // Then every connection sends one request before any reply is read.
    for c in clients.iter_mut() {
        c.send(b"{\"cmdid\":0}\n");
    }
    for c in clients.iter_mut() {
        assert_eq!(c.line(), PONG);
    }
    let open = common::total_stat(&mut clients[0], "connections_open");
    assert_eq!(open, n as u64);
    drop(clients);
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

/// With the open-file limit exhausted, accept fails (EMFILE); the server backs off instead of
/// spinning or dying, and serves the waiting connections once descriptors are free again.
fn accept_recovers_from_emfile(backend: Backend) {
    raise_nofile();
    let (mut child, addr) = spawn_server(backend, &["--threads", "1"], Some(64));
    let mut clients: Vec<Client> = (0..120).map(|_| Client::connect(addr)).collect();
    // Free most descriptors: the rest, still waiting in the backlog, must then be served.
    clients.drain(..100);
    for c in clients.iter_mut() {
        assert_eq!(c.call("{\"cmdid\":0}\n"), PONG);
    }
    assert!(child.try_wait().unwrap().is_none(), "the server survived");
    let mut fresh = Client::connect(addr);
    assert_eq!(fresh.call("{\"cmdid\":0}\n"), PONG);
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    drop((clients, fresh));
    assert!(child.wait().unwrap().success());
}

every_backend!(ten_thousand_connections, accept_recovers_from_emfile);

//! Deploys that fail no call, against the real binary on every backend: a server stopped
//! with SIGTERM tells the clients that asked for notices (a notice line, `"closing":true` on
//! its replies), keeps answering through `--drain-grace`, and only then sends FIN — so a
//! pool under steady load moves its calls to the other servers and none fails; a plain
//! client in the tornado-TCP style sees the bytes it always saw and no line it did not ask
//! for.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Client, Load, eventually, none_failed, sigterm, spawn_server};
use ringcall::Backend;
use ringcall::pool::{CallOptions, Pool, PoolConfig};

const ECHO: &str = "{\"cmdid\":10000,\"params\": {\"who\": \"tornado\", \"n\": 1}}\n";
const ECHO_REPLY: &str = "{\"code\":0,\"data\":{\"who\": \"tornado\", \"n\": 1}}\n";

fn plain_and_notice_clients_through_a_drain(backend: Backend) {
    let (mut server, addr) = spawn_server(backend, &["--drain-grace", "30"], None);
    let mut plain = Client::connect(addr);
    let mut told = Client::connect(addr);
    assert_eq!(plain.call(ECHO), ECHO_REPLY);
    assert_eq!(
        told.call("{\"cmdid\":3,\"id\":7,\"params\":{\"notices\":true}}\n"),
        "{\"code\":0,\"id\":7,\"data\":{\"notices\":true}}\n"
    );
    sigterm(&server);
    // The client that asked is told at once, on a line of its own, and still served.
    assert_eq!(told.line(), "{\"notice\":\"closing\",\"grace_ms\":30000}\n");
    assert_eq!(told.call(ECHO), "{\"code\":0,\"closing\":true,\"data\":{\"who\": \"tornado\", \"n\": 1}}\n");
    // The plain client, draining too: byte for byte what it got before, nothing else.
    assert_eq!(plain.call(ECHO), ECHO_REPLY);
    assert_eq!(plain.call("{\"cmdid\":0,\"id\":\"x\"}\n"), "{\"code\":0,\"id\":\"x\",\"data\":\"pong\"}\n");
    // Both close: the grace ends with them, long before its 30 s, and the server exits.
    for mut c in [plain, told] {
        c.shutdown_write();
        c.expect_eof();
    }
    assert!(server.wait().unwrap().success());
}

const THREADS: usize = 8;

/// Three servers under steady load through one pool (eight threads, calls not marked
/// idempotent, so none may be retried once written); each server in turn stopped with
/// SIGTERM and started again on its port. Every call gets its own reply; none fails.
fn a_rolling_restart_fails_no_call(backend: Backend) {
    let grace = std::env::var("DEPLOY_GRACE").unwrap_or("1".into());
    let args = ["--threads", "1", "--drain-grace", &grace];
    let mut servers: Vec<_> = (0..3).map(|_| spawn_server(backend, &args, None)).collect();
    let addrs: Vec<String> = servers.iter().map(|(_, a)| a.to_string()).collect();
    let config = PoolConfig {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        ..PoolConfig::default()
    };
    let pool = Arc::new(
        Pool::with_endpoints(&addrs.iter().map(String::as_str).collect::<Vec<_>>(), config).unwrap(),
    );
    let load = Load::start(&pool, THREADS, CallOptions::default());
    let status = |addr: &str| pool.status().into_iter().find(|s| s.addr == addr).unwrap();
    eventually("every server answering", || addrs.iter().all(|a| status(a).answered > 0));
    for (i, addr) in addrs.iter().enumerate() {
        let (mut old, _) = servers.remove(i);
        sigterm(&old);
        assert!(old.wait().unwrap().success(), "{addr} drained and exited cleanly");
        let answered = status(addr).answered;
        let restarted = spawn_server(backend, &[&args[..], &["--addr", addr]].concat(), None);
        servers.insert(i, restarted);
        eventually("the restarted server answering calls", || status(addr).answered >= answered + 100);
        let now = load.calls();
        eventually("calls flowing to all three", || load.calls() >= now + 3_000);
    }
    none_failed(load, &format!("{backend}: through three rolling restarts"));
    kill_all(servers);
}

fn kill_all(servers: Vec<(std::process::Child, std::net::SocketAddr)>) {
    for (mut child, _) in servers {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// SIGKILL gives no notice: calls on the killed server fail, each saying whether it may
/// have run — none is lost silently, none is answered twice — and the others go on.
fn a_sigkill_fails_calls_only_as_may_have_run(backend: Backend) {
    let args = ["--threads", "1", "--drain-grace", "1"];
    let mut servers: Vec<_> = (0..3).map(|_| spawn_server(backend, &args, None)).collect();
    let addrs: Vec<String> = servers.iter().map(|(_, a)| a.to_string()).collect();
    let pool = Arc::new(
        Pool::with_endpoints(&addrs.iter().map(String::as_str).collect::<Vec<_>>(), PoolConfig::default())
            .unwrap(),
    );
    let load = Load::start(&pool, THREADS, CallOptions::default());
    let status = |addr: &str| pool.status().into_iter().find(|s| s.addr == addr).unwrap();
    eventually("every server answering", || addrs.iter().all(|a| status(a).answered > 0));
    let (mut victim, _) = servers.remove(1);
    victim.kill().unwrap();
    victim.wait().unwrap();
    let now = load.calls();
    eventually("calls flowing without it", || load.calls() >= now + 3_000);
    let (total, errors) = load.finish();
    eprintln!("{backend}: {total} calls across a SIGKILL, {} failed", errors.len());
    for e in &errors {
        assert!(e.contains("may have run") || e.contains("did not run"), "an error that does not say: {e}");
    }
    kill_all(servers);
}

/// Sockets the process `pid` holds (its listeners and its connections).
fn sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|fds| {
            fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
                .filter(|target| target.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// Three servers share a port (the kernel spreads new connections over them), each closing
/// connections at `--max-connection-age` through the notice and the grace; a pool holds 40
/// connections there under steady calls. A fourth server joins: as the connections age out
/// and the pool reconnects, it gets its share — and no call fails.
fn a_new_server_gets_its_share_as_connections_age(backend: Backend) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let args = [
        "--threads",
        "1",
        "--addr",
        &addr,
        "--share-port",
        "--max-connection-age",
        "2",
        "--drain-grace",
        "0.5",
    ];
    let mut servers: Vec<_> = (0..3).map(|_| spawn_server(backend, &args, None)).collect();
    let config = PoolConfig { connections_per_endpoint: 40, ..PoolConfig::default() };
    let pool = Arc::new(Pool::with_endpoints(&[addr.as_str()], config).unwrap());
    let load = Load::start(&pool, THREADS, CallOptions::default());
    let connections = |servers: &[(std::process::Child, std::net::SocketAddr)]| {
        servers.iter().map(|(child, _)| sockets(child.id()).saturating_sub(1)).collect::<Vec<_>>()
    };
    eventually("the pool's 40 connections open", || connections(&servers).iter().sum::<usize>() >= 40);
    servers.push(spawn_server(backend, &args, None));
    // About a quarter (10) once every connection has aged out once: a few is enough to tell.
    eventually("the new server holding its share", || connections(&servers)[3] >= 5);
    // One more age and grace, so every connection has moved once since it joined (load, not
    // a timing assertion): what each server holds then is printed.
    std::thread::sleep(Duration::from_millis(2_500));
    let shares = connections(&servers);
    none_failed(load, &format!("{backend}: connections per server after the fourth joined {shares:?}"));
    kill_all(servers);
}

every_backend!(
    a_new_server_gets_its_share_as_connections_age,
    plain_and_notice_clients_through_a_drain,
    a_rolling_restart_fails_no_call,
    a_sigkill_fails_calls_only_as_may_have_run,
);

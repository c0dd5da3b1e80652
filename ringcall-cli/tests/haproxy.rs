//! `deploy/haproxy.cfg`, live: HAProxy (the Debian package) in front of three `ringcall serve`
//! processes on 127.0.0.1, with the committed configuration (only its addresses rewritten).
//! Connections are spread over the three; one server is killed (SIGKILL) mid-run; every new
//! connection through HAProxy is then answered by the other two, and the dead server is
//! marked down by the ping health check. And a rolling restart behind it (each server in turn
//! stopped with SIGTERM and started again) under a pool's calls through HAProxy fails no
//! call: the servers' notices reach the pool through the proxy.

#[macro_use]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Load, eventually, none_failed, spawn_server};
use ringcall::Backend;

/// Kills what the test started, however it ends.
struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn haproxy() -> Option<PathBuf> {
    ["/usr/sbin/haproxy", "/usr/bin/haproxy", "/usr/local/sbin/haproxy"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The committed configuration with its bind and server addresses replaced, an admin socket
/// added (for the test to read the servers' states), and `maxconn` lowered to what this
/// host's open-file limit allows (HAProxy needs two descriptors per connection).
fn config(frontend: u16, servers: &[SocketAddr], admin: &Path) -> String {
    let committed =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/haproxy.cfg")).unwrap();
    let mut out = String::new();
    let mut next = servers.iter();
    for line in committed.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("bind ") {
            out.push_str(&format!("    bind 127.0.0.1:{frontend}\n"));
        } else if trimmed.starts_with("server ") {
            let name = trimmed.split_whitespace().nth(1).unwrap();
            out.push_str(&format!("    server {name} {} check\n", next.next().expect("three servers")));
        } else if trimmed.starts_with("maxconn ") {
            let limit = ringcall_sys::raise_nofile_limit().expect("the open-file limit");
            let maxconn = (limit.saturating_sub(100) / 2).min(100_000);
            out.push_str(&format!("    maxconn {maxconn}\n"));
            out.push_str(&format!("    stats socket {} mode 600 level admin\n", admin.display()));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    assert!(next.next().is_none(), "the committed config has three servers");
    out
}

/// `name -> status` (UP, DOWN, …) of the backend's servers, from the admin socket.
fn states(admin: &Path) -> Vec<(String, String)> {
    let Ok(mut socket) = UnixStream::connect(admin) else { return Vec::new() };
    socket.write_all(b"show stat\n").unwrap();
    let mut csv = String::new();
    socket.read_to_string(&mut csv).unwrap();
    csv.lines()
        .filter(|l| l.starts_with("ringcall_servers,ringcall-"))
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[1].to_owned(), f[17].to_owned())
        })
        .collect()
}

fn wait_for(what: &str, admin: &Path, want: impl Fn(&[(String, String)]) -> bool) {
    // Failsafe only: the checks run every second.
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let now = states(admin);
        if want(&now) {
            return;
        }
        assert!(Instant::now() < give_up, "HAProxy never saw {what}: {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn connections_accepted(addr: SocketAddr) -> u64 {
    let mut client = Client::connect(addr);
    let reply = client.call("{\"cmdid\":1}\n");
    let total = reply.split("\"total\":").nth(1).unwrap();
    let start = total.find("\"connections_total\":").unwrap() + "\"connections_total\":".len();
    total[start..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap()
}

/// Three `ringcall serve` (with `args`) behind HAProxy: the children (servers first, HAProxy
/// last), the servers' addresses, HAProxy's address and its admin socket, once it sees all
/// three up. `None` where HAProxy is not installed (the test is skipped, or fails in CI).
fn behind_haproxy(
    name: &str,
    args: &[&str],
) -> Option<(Killed, Vec<SocketAddr>, SocketAddr, PathBuf, PathBuf)> {
    let Some(haproxy) = haproxy() else {
        common::skip(
            "RINGCALL_REQUIRE_HAPROXY",
            "haproxy is not installed (apt-get install haproxy; .ci/run installs it)",
        );
        return None;
    };
    let mut children = Killed(Vec::new());
    let mut servers = Vec::new();
    for _ in 0..3 {
        let (child, addr) = spawn_server(Backend::Epoll, args, None);
        children.0.push(child);
        servers.push(addr);
    }
    let dir = std::env::temp_dir().join(format!("ringcall-haproxy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let admin = dir.join("admin.sock");
    let frontend = free_port();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(&cfg, config(frontend, &servers, &admin)).unwrap();
    let check = Command::new(&haproxy).args(["-c", "-f"]).arg(&cfg).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let proxy = Command::new(&haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    children.0.push(proxy);
    wait_for("three servers up", &admin, |s| s.len() == 3 && s.iter().all(|(_, st)| st == "UP"));
    let through: SocketAddr = format!("127.0.0.1:{frontend}").parse().unwrap();
    Some((children, servers, through, admin, dir))
}

#[test]
fn haproxy_spreads_connections_and_routes_new_ones_around_a_killed_server() {
    let Some((mut children, servers, through, admin, dir)) = behind_haproxy("kill", &["--threads", "1"])
    else {
        return;
    };

    // Persistent connections are spread: leastconn gives each server a third.
    let before: Vec<u64> = servers.iter().map(|&s| connections_accepted(s)).collect();
    let mut clients: Vec<Client> = (0..30).map(|_| Client::connect(through)).collect();
    for client in &mut clients {
        assert_eq!(client.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    }
    for (server, before) in servers.iter().zip(&before) {
        // Each count also holds the health checks made meanwhile and the stats connection.
        let got = connections_accepted(*server) - before;
        assert!(got >= 10, "server {server} got {got} of 30 connections");
    }

    // One server dies.
    let killed = servers[1];
    let mut victim = children.0.remove(1);
    victim.kill().unwrap();
    victim.wait().unwrap();
    // Connections that were on it end; the others go on.
    let (mut alive, mut ended) = (0, 0);
    for client in &mut clients {
        client.send(b"{\"cmdid\":0}\n");
        let mut line = String::new();
        match BufReader::new(client.stream()).read_line(&mut line) {
            Ok(n) if n > 0 => {
                assert_eq!(line, "{\"code\":0,\"data\":\"pong\"}\n");
                alive += 1;
            }
            _ => ended += 1,
        }
    }
    assert_eq!((alive, ended), (20, 10), "the killed server's third of the connections end");
    // New connections, before and after the check marks it down, all reach a live server.
    for _ in 0..30 {
        let mut client = Client::connect(through);
        assert_eq!(client.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    }
    wait_for("the killed server down", &admin, |s| {
        s.iter().any(|(name, st)| name == "ringcall-2" && st.starts_with("DOWN"))
    });
    for _ in 0..30 {
        let mut client = Client::connect(through);
        assert_eq!(client.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    }
    assert!(TcpStream::connect(killed).is_err(), "the killed server is gone");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_rolling_restart_behind_haproxy_fails_no_call() {
    let args = ["--threads", "1", "--drain-grace", "1"];
    let Some((mut children, servers, through, admin, dir)) = behind_haproxy("rolling", &args) else {
        return;
    };
    let config = ringcall::pool::PoolConfig { connections_per_endpoint: 6, ..Default::default() };
    let pool =
        std::sync::Arc::new(ringcall::pool::Pool::with_endpoints(&[&through.to_string()], config).unwrap());
    // Not idempotent: a call written before a failure may not be sent again.
    let load = Load::start(&pool, 8, ringcall::pool::CallOptions::default());
    eventually("calls flowing", || load.calls() >= 1_000);
    for (i, addr) in servers.iter().enumerate() {
        common::sigterm(&children.0[i]);
        assert!(children.0[i].wait().unwrap().success(), "{addr} drained and exited cleanly");
        let (restarted, _) =
            spawn_server(Backend::Epoll, &[&args[..], &["--addr", &addr.to_string()]].concat(), None);
        children.0[i] = restarted;
        let name = format!("ringcall-{}", i + 1);
        wait_for("the restarted server up", &admin, |s| s.iter().any(|(n, st)| *n == name && st == "UP"));
        let now = load.calls();
        eventually("calls flowing after the restart", || load.calls() >= now + 1_000);
    }
    none_failed(load, "through HAProxy across three rolling restarts");
    let _ = std::fs::remove_dir_all(&dir);
}

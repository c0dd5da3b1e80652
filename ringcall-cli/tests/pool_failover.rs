//! The client pool across a server's death and return: three `ringcall serve` processes,
//! steady load through one `Pool` from four threads, one server killed with SIGKILL and later
//! restarted on its port. Every call returns its own reply (checked by a token it carries)
//! or an error that says what happened; the pool takes the dead server out, and puts it back
//! and sends it calls once it answers again.

#[macro_use]
mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Load, eventually, spawn_server};
use ringcall::Backend;
use ringcall::client::Call;
use ringcall::pool::{CallOptions, Pool, PoolConfig, PoolError};

fn config() -> PoolConfig {
    PoolConfig {
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        timeout: Duration::from_secs(5),
        ..PoolConfig::default()
    }
}

#[test]
fn every_call_gets_its_own_reply_across_a_kill_and_a_restart() {
    let mut servers: Vec<_> =
        (0..3).map(|_| spawn_server(Backend::Epoll, &["--threads", "1"], None)).collect();
    let addrs: Vec<String> = servers.iter().map(|(_, a)| a.to_string()).collect();
    let pool = Arc::new(
        Pool::with_endpoints(&addrs.iter().map(String::as_str).collect::<Vec<_>>(), config()).unwrap(),
    );
    let load = Load::start(&pool, 4, CallOptions::idempotent());
    eventually("calls flowing", || load.calls() >= 2_000);
    eventually("every server answering", || pool.status().iter().all(|s| s.answered > 0));

    // SIGKILL one server under load.
    let (mut victim, victim_addr) = servers.remove(1);
    victim.kill().unwrap();
    victim.wait().unwrap();
    let status = || pool.status().into_iter().find(|s| s.addr == victim_addr.to_string()).unwrap();
    eventually("the dead server taken out", || !status().up);
    let at_death = load.calls();
    eventually("calls flowing without it", || load.calls() >= at_death + 2_000);

    // It comes back on its port: the pool probes it back in and sends it calls again.
    let answered_before = status().answered;
    let (restarted, _) =
        spawn_server(Backend::Epoll, &["--threads", "1", "--addr", &victim_addr.to_string()], None);
    servers.push((restarted, victim_addr));
    eventually("the restarted server back in", || status().up);
    eventually("the restarted server answering calls", || status().answered >= answered_before + 200);

    let (_, errors) = load.finish();
    // Idempotent calls that met the dead server were retried elsewhere within the budget.
    assert!(errors.is_empty(), "{} calls failed: {:?}", errors.len(), &errors[..errors.len().min(5)]);
    for (mut child, _) in servers {
        let _ = child.kill();
        let _ = child.wait();
    }
}

#[test]
fn errors_say_whether_the_request_ran() {
    // A port nothing listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let pool = Pool::with_endpoints(&[&dead], config()).unwrap();
    match pool.call(&Call::new(0), CallOptions::default()) {
        Err(PoolError::NotRun(why)) => {
            assert!(why.contains(&dead) && why.contains("cannot connect"), "{why}")
        }
        other => panic!("expected NotRun, got {other:?}"),
    }
    // Taken out: until a probe succeeds, calls are refused at once, naming the endpoint.
    match pool.call(&Call::new(0), CallOptions::default()) {
        Err(PoolError::NoEndpoint(why)) => assert_eq!(why, format!("{dead} down")),
        other => panic!("expected NoEndpoint, got {other:?}"),
    }
    // A server at its connection limit refuses the pool's connection with a 503 before
    // reading anything: the call did not run.
    let (mut full, full_addr) =
        spawn_server(Backend::Epoll, &["--threads", "1", "--max-connections-per-core", "1"], None);
    let mut holder = common::Client::connect(full_addr);
    assert_eq!(holder.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    let pool = Pool::with_endpoints(&[&full_addr.to_string()], config()).unwrap();
    match pool.call(&Call::new(0), CallOptions::default()) {
        // Whether the refusal, a reset or the closed connection was seen first, it did not run.
        Err(PoolError::NotRun(why)) => assert!(why.contains(&full_addr.to_string()), "{why}"),
        other => panic!("expected NotRun, got {other:?}"),
    }
    let _ = full.kill();
    let _ = full.wait();
    // A live server whose request outlives the deadline: a timeout, after which the pool
    // goes on.
    let (mut server, addr) = spawn_server(Backend::Epoll, &["--threads", "1"], None);
    let pool = Pool::with_endpoints(&[&addr.to_string()], config()).unwrap();
    assert_eq!(pool.call(&Call::new(0), CallOptions::default()).unwrap().code, 0);
    server.kill().unwrap();
    server.wait().unwrap();
    match pool.call(&Call::new(0), CallOptions::default()) {
        Err(PoolError::NotRun(_) | PoolError::MayHaveRun { .. } | PoolError::NoEndpoint(_)) => {}
        other => panic!("expected an error naming what happened, got {other:?}"),
    }
}

#[test]
fn endpoints_follow_a_file_and_dns_names() {
    use ringcall::pool::{DnsNames, EndpointFile};
    let (mut a, addr_a) = spawn_server(Backend::Epoll, &["--threads", "1"], None);
    let (mut b, addr_b) = spawn_server(Backend::Epoll, &["--threads", "1"], None);
    let dir = std::env::temp_dir().join(format!("ringcall-pool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("endpoints");
    std::fs::write(&file, format!("# the log service\n{addr_a}\n")).unwrap();
    let config = PoolConfig { rediscover_every: Duration::from_millis(50), ..config() };
    let pool = Pool::new(EndpointFile::new(&file), config.clone()).unwrap();
    let addrs = |pool: &Pool| pool.status().into_iter().map(|s| s.addr).collect::<Vec<_>>();
    assert_eq!(addrs(&pool), [addr_a.to_string()]);
    // A deploy tool replaces the file: B joins, A leaves.
    let next = dir.join("endpoints.new");
    std::fs::write(&next, format!("{addr_b}\n")).unwrap();
    // A later modification time than the first write, whatever the file system's resolution.
    let later = std::time::SystemTime::now() + Duration::from_secs(2);
    std::fs::File::options().write(true).open(&next).unwrap().set_modified(later).unwrap();
    std::fs::rename(&next, &file).unwrap();
    eventually("the pool following the file", || addrs(&pool) == [addr_b.to_string()]);
    assert_eq!(pool.call(&Call::new(0), CallOptions::default()).unwrap().code, 0);
    assert_eq!(pool.status()[0].answered, 1);

    // `localhost:PORT` resolves to the server's address.
    let pool = Pool::new(DnsNames::new(vec![format!("localhost:{}", addr_a.port())]), config).unwrap();
    assert!(addrs(&pool).contains(&addr_a.to_string()), "{:?}", addrs(&pool));
    let _ = std::fs::remove_dir_all(&dir);
    for child in [&mut a, &mut b] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A DNS server for one zone, over UDP on 127.0.0.1: SRV records for `_ringcall._tcp.test.`
/// (the ports given, each on target `sN.test.`), and an A record 127.0.0.1 for every target.
/// The ports can be changed while it runs.
struct SrvZone {
    addr: std::net::SocketAddr,
    ports: Arc<std::sync::Mutex<Vec<u16>>>,
}

impl SrvZone {
    fn start(ports: Vec<u16>) -> Self {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = socket.local_addr().unwrap();
        let ports = Arc::new(std::sync::Mutex::new(ports));
        let zone = ports.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                if let Some(reply) = answer(&buf[..n], &zone.lock().unwrap()) {
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        Self { addr, ports }
    }
}

/// The labels of a name, written as DNS wants them.
fn labels(name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for label in name.trim_end_matches('.').split('.') {
        out.push(label.len() as u8);
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out
}

fn answer(query: &[u8], ports: &[u16]) -> Option<Vec<u8>> {
    // The question: its name ends at a zero label, then type and class.
    let mut end = 12;
    while query.get(end).copied()? != 0 {
        end += 1 + usize::from(query[end]);
    }
    let qtype = u16::from_be_bytes([query[end + 1], query[end + 2]]);
    let question = &query[12..end + 5];
    let mut name = String::new();
    let mut at = 12;
    while query[at] != 0 {
        let len = usize::from(query[at]);
        name.push_str(&String::from_utf8_lossy(&query[at + 1..at + 1 + len]));
        name.push('.');
        at += 1 + len;
    }
    let mut records: Vec<Vec<u8>> = Vec::new();
    match (qtype, name.as_str()) {
        (33, "_ringcall._tcp.test.") => {
            for (i, port) in ports.iter().enumerate() {
                let mut rdata = vec![0, 10, 0, 5];
                rdata.extend_from_slice(&port.to_be_bytes());
                rdata.extend_from_slice(&labels(&format!("s{i}.test.")));
                records.push(
                    [&[0xc0, 12, 0, 33, 0, 1, 0, 0, 0, 0][..], &(rdata.len() as u16).to_be_bytes(), &rdata]
                        .concat(),
                );
            }
        }
        (1, target) if target.ends_with(".test.") => {
            records.push(vec![0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4, 127, 0, 0, 1]);
        }
        _ => {}
    }
    let mut reply = vec![query[0], query[1], 0x81, 0x80, 0, 1];
    reply.extend_from_slice(&(records.len() as u16).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    for record in records {
        reply.extend_from_slice(&record);
    }
    Some(reply)
}

#[test]
fn endpoints_follow_dns_srv_records() {
    use ringcall::pool::DnsSrv;
    let (mut a, addr_a) = spawn_server(Backend::Epoll, &["--threads", "1"], None);
    let (mut b, addr_b) = spawn_server(Backend::Epoll, &["--threads", "1"], None);
    let zone = SrvZone::start(vec![addr_a.port(), addr_b.port()]);
    let discover = DnsSrv::with_nameserver(vec!["_ringcall._tcp.test.".into()], zone.addr);
    let config = PoolConfig { rediscover_every: Duration::from_millis(50), ..config() };
    let pool = Pool::new(discover, config).unwrap();
    let mut addrs: Vec<String> = pool.status().into_iter().map(|s| s.addr).collect();
    addrs.sort();
    let mut expected = vec![addr_a.to_string(), addr_b.to_string()];
    expected.sort();
    assert_eq!(addrs, expected);
    for _ in 0..20 {
        assert_eq!(pool.call(&Call::new(0), CallOptions::default()).unwrap().code, 0);
    }
    // The registry drops A: the pool follows (the records have a TTL of 0).
    *zone.ports.lock().unwrap() = vec![addr_b.port()];
    eventually("the pool following the SRV records", || {
        pool.status().into_iter().map(|s| s.addr).collect::<Vec<_>>() == [addr_b.to_string()]
    });
    for child in [&mut a, &mut b] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

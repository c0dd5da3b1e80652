//! Bad input, overload and limits, on every backend: each abuse case runs on its own
//! connection, and afterwards a fresh connection must still get a correct reply.

#[macro_use]
mod common;

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Client, start, start_with};
use ringcall::Backend;

const PONG: &str = "{\"code\":0,\"data\":\"pong\"}\n";

fn still_serving(addr: std::net::SocketAddr) {
    assert_eq!(Client::connect(addr).call("{\"cmdid\":0}\n"), PONG, "a fresh connection is answered");
}

fn abuse_battery(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let addr = server.local_addr();
    // (bytes sent, expected start of the reply); the connection must stay usable.
    let deep =
        format!("{{\"cmdid\":10000,\"params\":{{\"a\":{}{}}}}}\n", "[".repeat(100_000), "]".repeat(100_000));
    let survivable: Vec<(Vec<u8>, &str)> = vec![
        (b"{\"cmdid\":\n".to_vec(), "{\"code\":400,\"error\":\"invalid JSON at byte "),
        (b"GET / HTTP/1.1\r\n".to_vec(), "{\"code\":400,\"error\":\"invalid JSON at byte "),
        (b"\x00\x01\x02\x00\xff\xfe\n".to_vec(), "{\"code\":400,\"error\":\"invalid JSON at byte "),
        (b"[{\"cmdid\":0}]\n".to_vec(), "{\"code\":400,\"error\":\"request must be a JSON object\"}"),
        (b"{\"params\":{}}\n".to_vec(), "{\"code\":400,\"error\":\"missing cmdid\"}"),
        (b"{\"cmdid\":\"0\"}\n".to_vec(), "{\"code\":400,\"error\":\"cmdid must be an integer"),
        (b"{\"cmdid\":99999999999999999999}\n".to_vec(), "{\"code\":400,\"error\":\""),
        (b"{\"cmdid\":4294967296}\n".to_vec(), "{\"code\":400,\"error\":\"cmdid must be an integer"),
        (deep.into_bytes(), "{\"code\":400,\"error\":\"invalid JSON at byte "),
        (
            b"{\"cmdid\":10000,\"params\":{\"s\":\"\xc3\x28\"}}\n".to_vec(),
            "{\"code\":400,\"error\":\"invalid JSON at byte ",
        ),
        (b"{\"cmdid\":0}\r\n".to_vec(), PONG),
    ];
    for (request, expected) in &survivable {
        let mut c = Client::connect(addr);
        c.send(request);
        let reply = c.line();
        assert!(
            reply.starts_with(expected),
            "reply to {:?}: {reply}",
            String::from_utf8_lossy(&request[..request.len().min(40)])
        );
        assert_eq!(
            c.call("{\"cmdid\":0}\n"),
            PONG,
            "same connection after {:?}",
            String::from_utf8_lossy(&request[..request.len().min(40)])
        );
        still_serving(addr);
    }

    // An empty line is no request: the next reply answers the ping after it.
    let mut c = Client::connect(addr);
    c.send(b"\n\r\n{\"cmdid\":0}\n");
    assert_eq!(c.line(), PONG);

    // A 10 MiB line with no newline: 413, then the server closes.
    let mut c = Client::connect(addr);
    let writer = {
        let mut stream = c.stream().try_clone().unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b'a'; 1 << 20];
            for _ in 0..10 {
                if stream.write_all(&chunk).is_err() {
                    break;
                }
            }
            let _ = stream.shutdown(std::net::Shutdown::Write);
        })
    };
    assert_eq!(c.line(), "{\"code\":413,\"error\":\"request line longer than 1048576 bytes\"}\n");
    writer.join().unwrap();
    c.expect_eof();
    still_serving(addr);

    // Half a line, then close.
    let mut c = Client::connect(addr);
    c.send(b"{\"cmdid\":0,\"par");
    c.shutdown_write();
    c.expect_eof();
    still_serving(addr);

    // 1000 pipelined requests, then a half-close: every reply arrives before the close.
    let mut c = Client::connect(addr);
    let batch: String =
        (0..1000).map(|i| format!("{{\"cmdid\":10000,\"id\":{i},\"params\":{{\"i\":{i}}}}}\n")).collect();
    c.send(batch.as_bytes());
    c.shutdown_write();
    for i in 0..1000 {
        assert_eq!(c.line(), format!("{{\"code\":0,\"id\":{i},\"data\":{{\"i\":{i}}}}}\n"));
    }
    c.expect_eof();
    still_serving(addr);
}

/// A peer that writes requests and never reads: the server stops reading from it (its memory
/// stays bounded), other connections keep being served, and once the peer reads, every
/// reply arrives, in order.
fn peer_that_never_reads(backend: Backend) {
    let Some(server) = start_with(backend, |b| b.max_pending_output(64 * 1024)) else { return };
    let addr = server.local_addr();
    let mut hog = Client::connect(addr);
    const REQUESTS: u64 = 60_000;
    let filler = "x".repeat(480);
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let mut stream = hog.stream().try_clone().unwrap();
        let written = written.clone();
        std::thread::spawn(move || {
            let mut batch = String::new();
            for i in 0..REQUESTS {
                batch
                    .push_str(&format!("{{\"cmdid\":10000,\"id\":{i},\"params\":{{\"f\":\"{filler}\"}}}}\n"));
                if batch.len() > 64 * 1024 {
                    stream.write_all(batch.as_bytes()).unwrap();
                    written.fetch_add(batch.len() as u64, Ordering::Relaxed);
                    batch.clear();
                }
            }
            stream.write_all(batch.as_bytes()).unwrap();
            written.fetch_add(batch.len() as u64, Ordering::Relaxed);
        })
    };
    let total_bytes = REQUESTS * 530;
    // Wait (no time limit but the failsafe) until the server has paused reading from the hog.
    let mut other = Client::connect(addr);
    loop {
        assert_eq!(other.call("{\"cmdid\":0}\n"), PONG, "other connections are served meanwhile");
        let t = server.stats().total();
        if t.backpressure_pauses > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // What the server has taken in stays within its output limit plus the kernel's socket
    // buffers, far below what the hog is trying to send.
    let bytes_in = server.stats().total().bytes_in;
    assert!(
        bytes_in < total_bytes / 2,
        "server read {bytes_in} of {total_bytes} bytes from a peer that never reads"
    );
    still_serving(addr);
    for i in 0..REQUESTS {
        let line = hog.line();
        assert!(
            line.starts_with(&format!("{{\"code\":0,\"id\":{i},")),
            "reply {i}: {}",
            &line[..line.len().min(60)]
        );
    }
    writer.join().unwrap();
    assert!(written.load(Ordering::Relaxed) > total_bytes / 2);
}

fn connections_beyond_the_limit_get_503(backend: Backend) {
    let Some(server) = start_with(backend, |b| b.threads(1).max_connections_per_core(2)) else { return };
    let addr = server.local_addr();
    let mut kept: Vec<Client> = (0..2).map(|_| Client::connect(addr)).collect();
    for c in &mut kept {
        assert_eq!(c.call("{\"cmdid\":0}\n"), PONG);
    }
    let mut refused = Client::connect(addr);
    assert_eq!(
        refused.line(),
        "{\"code\":503,\"error\":\"too many connections on this core; retry later\"}\n"
    );
    refused.expect_eof();
    assert_eq!(server.stats().total().rejected_connections, 1);
    assert_eq!(server.stats().total().replies_with(503), 1);
    drop(kept);
    // Once the others are gone there is room again (the server notices the closes first).
    loop {
        let mut c = Client::connect(addr);
        c.send(b"{\"cmdid\":0}\n");
        if c.line() == PONG {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn idle_and_stalled_connections_are_closed(backend: Backend) {
    let Some(server) = start_with(backend, |b| {
        // Long enough that a stalled test thread (a noisy host) cannot make the idle timeout
        // close a connection before it has sent what the test needs it to send.
        b.idle_timeout(Some(Duration::from_secs(1))).line_timeout(Duration::from_secs(1))
    }) else {
        return;
    };
    let addr = server.local_addr();
    let mut idle = Client::connect(addr);
    assert_eq!(idle.call("{\"cmdid\":0}\n"), PONG);
    let mut slowloris = Client::connect(addr);
    slowloris.send(b"{\"cmdid\":0,\"params\":{\"slow");
    // Both are closed by the server (the read fails over to EOF once the deadline passes).
    idle.expect_eof();
    slowloris.expect_eof();
    let stats = server.stats().total();
    assert!(stats.idle_timeouts >= 1, "{stats:?}");
    assert!(stats.line_timeouts >= 1, "{stats:?}");
    still_serving(addr);
}

every_backend!(
    abuse_battery,
    peer_that_never_reads,
    connections_beyond_the_limit_get_503,
    idle_and_stalled_connections_are_closed,
);

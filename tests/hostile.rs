//! What a hostile or careless peer must not be able to do, on every backend, against the real
//! server: make the server hold more than its output limit with small requests that get large
//! replies; pile up more deferred replies than the per-connection and per-core limits allow;
//! keep work running for a connection that has gone; hold a connection slot without ever
//! saying its hello; and have a connection closed as idle while it waits for its own reply.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{Client, start_service};
use ringcall::{Backend, Ctx, Deferred, HandlerResult, HelloToken, Request, Service};

const PONG: &str = "{\"code\":0,\"data\":\"pong\"}\n";

/// Counts the async work that is running: started, and not finished or dropped.
#[derive(Default)]
struct Counters {
    running: AtomicU64,
    started: AtomicU64,
}

/// The service, sharing its counters with the test.
#[derive(Default)]
struct Upstream(Arc<Counters>);

impl Service for Upstream {
    type Routes = UpstreamRoutes;
    type Local = ();

    fn local(&self, _core: usize) {}
}

/// Decrements the running count however the work ends (finished, cancelled).
struct Running(Arc<Counters>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

/// 5000: an upstream call that never answers (a dead upstream without a timeout).
fn hang(ctx: &Ctx<'_, Upstream>, _: &Request<'_, '_>, deferred: Deferred) -> HandlerResult {
    let counters = ctx.service().0.clone();
    ctx.spawn(deferred, async move {
        counters.running.fetch_add(1, Ordering::SeqCst);
        counters.started.fetch_add(1, Ordering::SeqCst);
        let _running = Running(counters);
        std::future::pending::<()>().await;
        Ok(())
    });
    Ok(())
}

#[derive(serde::Deserialize)]
struct After {
    ms: u64,
}

/// 5001: answers `"late"` after `ms` milliseconds.
fn after(ctx: &Ctx<'_, Upstream>, request: &Request<'_, '_>, deferred: Deferred) -> HandlerResult {
    let After { ms } = request.params()?;
    ctx.spawn(deferred, async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok("late")
    });
    Ok(())
}

ringcall::routes! {
    UpstreamRoutes for Upstream {
        5000 => hang,
        5001 => after,
    }
}

/// Polls `done` until it holds (the failsafe fails the test instead of hanging it).
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("never happened: {what}");
}

/// A peer that pipelines small requests with large replies (the stats command: 12 bytes in,
/// a kilobyte or more out) and never reads: the server stops taking its requests once the
/// replies held reach the output limit, whatever one read brought in, and answers every one
/// of them, in order, once the peer reads.
fn small_requests_with_large_replies_stay_within_the_output_limit(backend: Backend) {
    let Some(server) = start_service(backend, Upstream::default(), |b| b.threads(1)) else { return };
    let addr = server.local_addr();
    let mut probe = Client::connect(addr);
    let reply_len = probe.call("{\"cmdid\":1}\n").len() as u64;
    const REQUESTS: u64 = 100_000;
    let before = server.stats().total().requests;
    let mut hog = Client::connect(addr);
    let writer = {
        let mut stream = hog.stream().try_clone().unwrap();
        std::thread::spawn(move || {
            stream.set_write_timeout(None).unwrap();
            let bytes = b"{\"cmdid\":1}\n".repeat(REQUESTS as usize);
            stream.write_all(&bytes).unwrap();
        })
    };
    eventually("the server pauses reading from the hog", || server.stats().total().backpressure_pauses > 0);
    // Paused: what was answered is bounded by the output limit plus what the kernel's socket
    // buffers took, not by what the reads brought in (one multishot read may bring a
    // megabyte of these requests: over a hundred megabytes of replies).
    let answered = server.stats().total().requests - before;
    let held = answered * reply_len;
    assert!(
        held < 32 << 20,
        "{answered} requests answered ({held} bytes of replies) for a peer that reads nothing"
    );
    assert_eq!(probe.call("{\"cmdid\":0}\n"), PONG, "others are served meanwhile");
    let mut seen = 0;
    let mut reader = std::io::BufReader::new(hog.stream().try_clone().unwrap());
    let mut line = String::new();
    while seen < REQUESTS {
        line.clear();
        std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
        assert!(line.starts_with("{\"code\":0,\"data\":{\"cores\":"), "reply {seen}: {line:.60}");
        seen += 1;
    }
    writer.join().unwrap();
}

/// Deferred replies whose upstream never answers: one connection holds at most
/// `max_deferred` of them however many it pipelines, the core at most
/// `max_deferred_per_core` (beyond, a 503 at once, and no work starts), and when a
/// connection is gone its work is cancelled rather than left running: at once for one that
/// is being read from, at the deferred replies' deadline for one whose reading is paused
/// (its reset is seen when the 504s are written).
fn deferred_work_is_bounded_and_cancelled_with_its_connection(backend: Backend) {
    let upstream = Arc::new(Counters::default());
    let Some(server) = start_service(backend, Upstream(upstream.clone()), |b| {
        b.threads(1)
            .max_deferred(64)
            .max_deferred_per_core(100)
            .deferred_timeout(Some(Duration::from_secs(5)))
    }) else {
        return;
    };
    let addr = server.local_addr();
    let line = b"{\"cmdid\":5000}\n".repeat(2000);
    let mut first = Client::connect(addr);
    first.send(&line);
    eventually("64 deferred on the first connection", || server.stats().total().deferred >= 64);
    // Reading from it paused at exactly the limit: the rest wait unread.
    let mut probe = Client::connect(addr);
    assert_eq!(probe.call("{\"cmdid\":0}\n"), PONG);
    assert_eq!(server.stats().total().deferred, 64);
    // Two more connections: the core stops at 100 pending; the rest are answered 503 at
    // once, so those connections go on reading until every request is answered or pending.
    let mut others: Vec<Client> = (0..2).map(|_| Client::connect(addr)).collect();
    for c in &mut others {
        c.send(&line);
    }
    eventually("the core sheds past 100 pending", || server.stats().total().deferred_shed == 2 * 2000 - 36);
    assert_eq!(server.stats().total().deferred, 64 + 2 * 2000);
    eventually("100 upstream calls started", || upstream.started.load(Ordering::SeqCst) == 100);
    // Gone (a reset: a FIN alone is a half-close, still owed its replies).
    for c in others {
        c.reset();
    }
    eventually("the work of the connections being read is cancelled", || {
        upstream.running.load(Ordering::SeqCst) == 64
    });
    assert_eq!(upstream.started.load(Ordering::SeqCst), 100, "shed requests started no work");
    first.reset();
    eventually("the paused connection's work ends at its deadline", || {
        upstream.running.load(Ordering::SeqCst) == 0
    });
    eventually("nothing pending", || server.stats().total().deferred_pending == 0);
    assert_eq!(probe.call("{\"cmdid\":0}\n"), PONG);
}

/// With an idle timeout shorter than a deferred reply takes, the connection waits for its
/// reply: it is not idle while the server owes it one.
fn a_connection_owed_a_reply_is_not_idle(backend: Backend) {
    let Some(server) =
        start_service(backend, Upstream::default(), |b| b.idle_timeout(Some(Duration::from_secs(1))))
    else {
        return;
    };
    let mut c = Client::connect(server.local_addr());
    assert_eq!(
        c.call("{\"cmdid\":5001,\"id\":1,\"params\":{\"ms\":2500}}\n"),
        "{\"code\":0,\"id\":1,\"data\":\"late\"}\n"
    );
    // Idle afterwards: closed by the timeout.
    c.expect_eof();
    assert!(server.stats().total().idle_timeouts >= 1);
}

/// A connection to a server with a token that never sends its hello is closed at the hello
/// timeout, so such peers cannot hold the core's connection slots; one that said its hello
/// is not.
fn a_peer_that_never_says_hello_is_closed(backend: Backend) {
    let token = HelloToken::new("fedcba9876543210fedcba9876543210").unwrap();
    let Some(server) = start_service(backend, Upstream::default(), |b| {
        b.threads(1)
            .max_connections_per_core(3)
            .token(token.clone())
            .hello_timeout(Duration::from_millis(500))
    }) else {
        return;
    };
    let addr = server.local_addr();
    let mut greeted = Client::connect(addr);
    greeted.send(&token.hello_line(1));
    assert_eq!(greeted.line(), "{\"code\":0,\"id\":1,\"data\":\"hello\"}\n");
    let mut silent = Client::connect(addr);
    let mut partial = Client::connect(addr);
    partial.send(b"{\"cmdid\":2,\"params\":{\"tok");
    silent.expect_eof();
    partial.expect_eof();
    assert_eq!(server.stats().total().hello_timeouts, 2);
    // Their slots are free again: a new client gets in; the greeted one still serves.
    let mut next = Client::connect(addr);
    next.send(&token.hello_line(2));
    assert_eq!(next.line(), "{\"code\":0,\"id\":2,\"data\":\"hello\"}\n");
    assert_eq!(greeted.call("{\"cmdid\":0}\n"), PONG);
    let mut rest = Vec::new();
    let _ = silent.stream().read_to_end(&mut rest);
}

every_backend!(
    small_requests_with_large_replies_stay_within_the_output_limit,
    deferred_work_is_bounded_and_cancelled_with_its_connection,
    a_connection_owed_a_reply_is_not_idle,
    a_peer_that_never_says_hello_is_closed,
);

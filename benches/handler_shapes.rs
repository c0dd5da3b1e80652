//! What each handler shape costs per request, through the whole connection core (frame,
//! parse, dispatch, reply in order, send accounting), 16 requests pipelined per receive:
//!
//! - `sync`: a synchronous handler writes its reply into the output (the echo);
//! - `deferred`: the handler takes a `Deferred` and completes it at once on the same thread
//!   (a reply slot, the reply encoded into its own buffer, the mailbox, the slot filled and
//!   moved to the output): the floor of every deferred shape;
//! - `async`: the handler hands the reply to a tokio task (`Ctx::spawn`) on a current-thread
//!   runtime, and the core takes the answers when its mailbox wakes it.
//!
//! The blocking pool's hand-off (a channel and a thread wake-up) is measured end to end, not
//! here.

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ringcall::Dispatcher;
use ringcall::stats::StatsRegistry;
use ringcall::{Ctx, Deferred, HandlerResult, Request};
use ringcall_core::{Connection, Limits, PADDING, Processor};

struct Shapes;

impl ringcall::Service for Shapes {
    type Routes = ShapeRoutes;
    type Local = ();

    fn local(&self, _core: usize) {}
}

fn deferred(_: &Ctx<'_, Shapes>, request: &Request<'_, '_>, deferred: Deferred) -> HandlerResult {
    let params = request.params_value();
    deferred.reply(|reply| {
        reply.value(params);
        Ok(())
    });
    Ok(())
}

fn spawned(ctx: &Ctx<'_, Shapes>, request: &Request<'_, '_>, deferred: Deferred) -> HandlerResult {
    let content = request.param_str("content").unwrap_or_default().to_owned();
    ctx.spawn(deferred, async move { Ok(content) });
    Ok(())
}

ringcall::routes! {
    ShapeRoutes for Shapes {
        10000 => ringcall::handlers::echo,
        10001 => deferred,
        10002 => spawned,
    }
}

const PIPELINED: usize = 16;

fn line(cmdid: u32) -> Vec<u8> {
    format!(
        "{{\"cmdid\": {cmdid}, \"timestamp\": 1437300000, \"params\": {{\"content\": \"Hello world!\"}}}}\n"
    )
    .into_bytes()
}

/// Feeds one receive of `PIPELINED` requests, waits (on `runtime`) until every reply is
/// answered, and sends them all.
fn round(
    conn: &mut Connection,
    processor: &mut Processor<Dispatcher<Shapes>>,
    runtime: &tokio::runtime::Runtime,
    buf: &mut [u8],
    received: &[u8],
    stats: &StatsRegistry,
) -> usize {
    let len = received.len();
    buf[..len].copy_from_slice(received);
    let now = Instant::now();
    conn.on_recv(processor, buf, len, now);
    while conn.deferred_pending() > 0 {
        let mailbox = conn.mailbox().expect("a mailbox").clone();
        runtime.block_on(std::future::poll_fn(|cx| mailbox.poll_ready(cx)));
        conn.on_deferred(now, stats.core(0));
    }
    let mut sent = 0;
    while let Some(bytes) = conn.start_send() {
        let n = bytes.len();
        sent += n;
        conn.on_sent(n, now, stats.core(0));
    }
    sent
}

fn handler_shapes(c: &mut Criterion) {
    let mut group = c.benchmark_group("handler_shapes");
    group.throughput(Throughput::Elements(PIPELINED as u64));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // The async shape spawns on the runtime of the thread it runs on, as on a tokio backend.
    let _entered = runtime.enter();
    for (name, cmdid) in [("sync", 10000), ("deferred", 10001), ("async", 10002)] {
        let received = line(cmdid).repeat(PIPELINED);
        let mut buf = vec![0; received.len() + PADDING];
        let stats = StatsRegistry::new(1);
        let limits = Limits::default();
        let mut processor = Processor::new(0, Dispatcher::new(0, 1, Arc::new(Shapes)), stats.clone(), limits);
        let mut conn = Connection::new(Arc::new(limits), Instant::now(), stats.core(0));
        group.bench_function(name, |b| {
            b.iter(|| black_box(round(&mut conn, &mut processor, &runtime, &mut buf, &received, &stats)))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = handler_shapes
}
criterion_main!(benches);

//! An analytics service: callers record events, each core counts its own (no lock, no
//! shared cache line), and a read merges every core's counts. Which events exist is
//! configuration, held by the service value (`--events`).
//!
//! ```sh
//! cargo run --release --example analytics -- --addr 127.0.0.1:8892 --events signup,login,purchase
//! printf '{"cmdid":3001,"params":{"event":"purchase","amount":25}}\n{"cmdid":3002}\n' | nc -q1 127.0.0.1 8892
//! ```
//!
//! - 3001 record `{"event": "<name>", "amount": <u64, default 0>}` → `{"count": <this core's
//!   count of the event>}`; an unknown event is a 400 that lists the known ones.
//! - 3002 read → `{"<event>": {"count": …, "amount": …}, …}`, summed over every core.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

use clap::Parser;
use ringcall::{Backend, Ctx, HandlerError, HandlerResult, Reply, Request, Server, Service};
use serde::Deserialize;

#[derive(Parser)]
#[command(about = "Per-core event counters on ringcall")]
struct Args {
    /// Address to listen on (port 0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8892")]
    addr: String,
    /// The events to count, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "signup,login,purchase")]
    events: Vec<String>,
    /// I/O backend: auto, uring, tokio-uring, epoll or epoll-mt.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Worker threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// 128 bytes of counters, aligned so that no two cores' counters share a cache line (nor the
/// pair of lines the prefetcher fetches together).
#[repr(align(128))]
struct Line([AtomicU64; 16]);

/// One core's counters: written only by that core (a plain load and store, no locked
/// instruction), read by any core on a merged read. Event `i` has its count in slot `2i`
/// and its amount in slot `2i + 1`.
struct Row(Box<[Line]>);

impl Row {
    fn new(events: usize) -> Self {
        Self(
            (0..(2 * events).div_ceil(16))
                .map(|_| Line(std::array::from_fn(|_| AtomicU64::new(0))))
                .collect(),
        )
    }

    fn slot(&self, i: usize) -> &AtomicU64 {
        &self.0[i / 16].0[i % 16]
    }
}

struct Analytics {
    events: Vec<String>,
    rows: Vec<Row>,
    /// Hands each worker its own row.
    next_row: AtomicUsize,
}

impl Analytics {
    fn new(events: Vec<String>, workers: usize) -> Self {
        let rows = (0..workers.max(1)).map(|_| Row::new(events.len())).collect();
        Self { events, rows, next_row: AtomicUsize::new(0) }
    }
}

impl Service for Analytics {
    type Routes = AnalyticsRoutes;
    /// The index of this core's row.
    type Local = usize;

    fn local(&self, _core: usize) -> usize {
        self.next_row.fetch_add(1, Relaxed) % self.rows.len()
    }
}

#[derive(Deserialize)]
struct Event<'a> {
    event: &'a str,
    #[serde(default)]
    amount: u64,
}

fn bump(counter: &AtomicU64, by: u64) -> u64 {
    // Single writer: this core owns the row.
    let value = counter.load(Relaxed).wrapping_add(by);
    counter.store(value, Relaxed);
    value
}

/// 3001: counts one event on this core.
fn record(ctx: &Ctx<'_, Analytics>, request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    let Event { event, amount } = request.params()?;
    let analytics = ctx.service();
    let index = analytics.events.iter().position(|e| e == event).ok_or_else(|| {
        HandlerError::bad_request(format!(
            "params.event: unknown event {event:?} (known: {})",
            analytics.events.join(", ")
        ))
    })?;
    let row = &analytics.rows[*ctx.local()];
    bump(row.slot(2 * index + 1), amount);
    reply.object().u64("count", bump(row.slot(2 * index), 1));
    Ok(())
}

/// 3002: every event's count and amount, summed over the cores.
fn read(ctx: &Ctx<'_, Analytics>, _: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    let analytics = ctx.service();
    let mut object = reply.object();
    for (i, event) in analytics.events.iter().enumerate() {
        let sum = |slot: usize| analytics.rows.iter().map(|row| row.slot(slot).load(Relaxed)).sum();
        object.object(event).u64("count", sum(2 * i)).u64("amount", sum(2 * i + 1));
    }
    Ok(())
}

ringcall::routes! {
    AnalyticsRoutes for Analytics {
        3001 => record,
        3002 => read,
    }
}

fn main() -> anyhow::Result<()> {
    ringcall_examples::init_logs();
    let args = Args::parse();
    let events: Vec<String> =
        args.events.iter().map(|e| e.trim().to_owned()).filter(|e| !e.is_empty()).collect();
    anyhow::ensure!(!events.is_empty(), "--events names no event");
    let builder = Server::builder().addr(args.addr).backend(args.backend).threads(args.threads);
    // One row per worker thread the server will run.
    let workers = builder.resolved_threads();
    ringcall_examples::serve(builder, Analytics::new(events, workers), "analytics")
}

//! What the targets share: a routes table with typed params over the real dispatcher, a
//! driver that plays a peer against one connection machine, and the checks on what comes
//! back.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ringcall::{HandlerResult, Reply, Request};
use ringcall_core::{Connection, Dispatch, Limits, PADDING, Processor, State, Step};

/// Typed params of every kind a handler takes off the tape.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub struct Order<'a> {
    #[serde(borrow)]
    pub customer: std::borrow::Cow<'a, str>,
    pub quantity: u32,
    pub price: f64,
    pub express: Option<bool>,
    #[serde(default)]
    pub tags: Vec<String>,
    pub address: Option<Address>,
    pub kind: Option<Kind>,
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
pub struct Address {
    pub street: String,
    pub zip: i64,
}

#[derive(Debug, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Retail,
    Wholesale,
}

fn order(request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    let order: Order<'_> = request.params()?;
    reply.serialize(&order)
}

ringcall::routes! {
    pub Table {
        10000 => ringcall::handlers::echo,
        10001 => order,
    }
}

/// A processor of core 0 over the real dispatcher (built-ins, echo, typed params).
pub fn processor(limits: Limits) -> Processor<ringcall::Dispatcher<Table>> {
    let stats = ringcall::stats::StatsRegistry::new(1);
    Processor::new(0, ringcall::Dispatcher::new(0, 1, Arc::new(Table)), stats, limits)
}

/// Limits small enough for inputs of a few KiB to reach every rule.
pub fn small_limits(max_pending_output: usize) -> Limits {
    Limits {
        max_line: 512,
        max_pending_output,
        max_deferred: 4,
        max_deferred_per_core: 6,
        idle_timeout: Some(Duration::from_secs(60)),
        line_timeout: Duration::from_secs(5),
        deferred_timeout: Some(Duration::from_secs(10)),
        drain_grace: Duration::from_millis(200),
        max_connection_age: Some(Duration::from_secs(20)),
        ..Limits::default()
    }
}

/// The peer's side of one connection: what it received, and the server's FIN.
#[derive(Debug, Default)]
pub struct Peer {
    pub wire: Vec<u8>,
    pub fin: bool,
    pub closed: bool,
}

/// Feeds `bytes` to `conn` as one receive.
pub fn receive<D: Dispatch>(conn: &mut Connection, processor: &mut Processor<D>, bytes: &[u8], now: Instant) {
    let mut buf = Vec::with_capacity(bytes.len() + PADDING);
    buf.extend_from_slice(bytes);
    buf.resize(bytes.len() + PADDING, 0);
    conn.on_recv(processor, &mut buf, bytes.len(), now);
}

/// Sends at most `limit` bytes of what is owed (the peer reads that much).
pub fn send(
    conn: &mut Connection,
    peer: &mut Peer,
    limit: usize,
    now: Instant,
    stats: &ringcall::stats::CoreStats,
) {
    if let Some(bytes) = conn.start_send() {
        let n = bytes.len().min(limit);
        peer.wire.extend_from_slice(&bytes[..n]);
        conn.on_sent(n, now, stats);
    }
}

/// Lets everything move: sends all, reads the backlog, until the machine waits or closes.
pub fn pump<D: Dispatch>(conn: &mut Connection, processor: &mut Processor<D>, peer: &mut Peer, now: Instant) {
    loop {
        let before = (peer.wire.len(), conn.unsent(), conn.wants_replay());
        send(conn, peer, usize::MAX, now, processor.stats());
        if conn.wants_replay() {
            conn.replay(processor, now);
        }
        match conn.poll(now, || 0) {
            Step::Wait => {}
            Step::ShutdownWrite => peer.fin = true,
            Step::Close(_) => {
                peer.closed = true;
                return;
            }
        }
        if (peer.wire.len(), conn.unsent(), conn.wants_replay()) == before {
            return;
        }
    }
}

/// Checks every reply line: a JSON object with an integer `code`; returns them parsed.
pub fn replies(wire: &[u8]) -> Vec<serde_json::Value> {
    assert!(
        wire.is_empty() || wire.ends_with(b"\n"),
        "a reply cut short: {:?}",
        String::from_utf8_lossy(wire)
    );
    wire.split(|&b| b == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| {
            let value: serde_json::Value = serde_json::from_slice(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(line)));
            value
        })
        // A peer that asked for notices may get the closing notice: no reply, no code.
        .filter(|value| {
            if value.get("notice").is_some() {
                assert_eq!(value["notice"], "closing", "{value}");
                assert!(value.get("code").is_none() && value["grace_ms"].is_u64(), "{value}");
                return false;
            }
            assert!(value.get("code").and_then(serde_json::Value::as_u64).is_some(), "no code: {value}");
            true
        })
        .collect()
}

/// The replies a peer is owed for `input` ending with the peer's FIN: one per non-blank
/// complete line, up to and with the 413 of the first line over `max_line` (an unfinished
/// last line over it gets one too).
pub fn owed(input: &[u8], max_line: usize) -> usize {
    let mut count = 0;
    let mut rest = input;
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..nl];
        if line.len() > max_line {
            return count + 1;
        }
        let content = line.strip_suffix(b"\r").unwrap_or(line);
        if !content.iter().all(u8::is_ascii_whitespace) {
            count += 1;
        }
        rest = &rest[nl + 1..];
    }
    count + usize::from(rest.len() > max_line)
}

/// A reply with what depends on when it was asked (the stats command's counters) taken out.
pub fn normalized(mut reply: serde_json::Value) -> serde_json::Value {
    if reply.get("data").and_then(|d| d.get("cores")).is_some() {
        reply["data"] = serde_json::Value::Null;
    }
    reply
}

/// Whether the machine has closed.
pub fn closed(conn: &Connection) -> bool {
    matches!(conn.state(), State::Closed(_))
}

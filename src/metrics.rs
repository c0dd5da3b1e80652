//! Prometheus metrics: the per-core counters and the per-command counters of a running
//! server, encoded at scrape time (OpenMetrics text, with prometheus-client), and a small
//! HTTP endpoint that serves them at `/metrics` on a thread of its own.
//!
//! Nothing here runs on the request path: the cores write their own counters as always
//! (single-writer atomics, see [`crate::stats`]); a scrape reads and sums them.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::stats::{COUNTED_CODES, LATENCY_BUCKETS_US, StatsRegistry, StatsSnapshot};

/// The content type of what [`render`] returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The metrics of `stats`, in the OpenMetrics text format (which Prometheus scrapes).
pub fn render(stats: &Arc<StatsRegistry>) -> String {
    let mut registry = Registry::with_prefix("ringcall");
    registry.register_collector(Box::new(Scrape(stats.clone())));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}

/// Reads the counters at each scrape.
#[derive(Debug)]
struct Scrape(Arc<StatsRegistry>);

/// The label a reply code gets: the code, or `other` for codes not counted one by one.
fn code_label(slot: usize) -> String {
    COUNTED_CODES.get(slot).map_or_else(|| "other".to_owned(), |code| code.to_string())
}

type PerCore = fn(&StatsSnapshot) -> u64;

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let cores: Vec<StatsSnapshot> = self.0.per_core().collect();
        let counters: [(&str, &str, PerCore); 14] = [
            ("connections_accepted", "Connections accepted.", |s| s.connections_total),
            ("connections_closed", "Connections closed.", |s| s.connections_closed),
            ("connections_refused", "Connections refused with a 503 because their core was full.", |s| {
                s.rejected_connections
            }),
            ("requests", "Request lines framed.", |s| s.requests),
            ("received_bytes", "Bytes received from peers.", |s| s.bytes_in),
            ("sent_bytes", "Bytes sent to peers.", |s| s.bytes_out),
            (
                "backpressure_pauses",
                "Times reading from a peer paused because it did not read its replies.",
                |s| s.backpressure_pauses,
            ),
            ("idle_timeouts", "Connections closed by the idle timeout.", |s| s.idle_timeouts),
            ("line_timeouts", "Connections closed by the line timeout.", |s| s.line_timeouts),
            (
                "hello_timeouts",
                "Connections closed for not finishing their TLS handshake or token hello in time.",
                |s| s.hello_timeouts,
            ),
            ("deferred_replies", "Replies deferred by their handlers.", |s| s.deferred),
            (
                "deferred_abandoned",
                "Deferred replies whose connection closed before they were answered.",
                |s| s.deferred_abandoned,
            ),
            (
                "deadline_expired",
                "Requests answered 504 because their deadline (timeout_ms, or the deferred default) passed first.",
                |s| s.deadline_expired,
            ),
            ("late_replies", "Deferred answers dropped because a 504 was sent first.", |s| s.late_replies),
        ];
        for (name, help, read) in counters {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (core, snapshot) in cores.iter().enumerate() {
                let labels = [("core", core.to_string())];
                ConstCounter::new(read(snapshot)).encode(metric.encode_family(&labels)?)?;
            }
        }
        let mut open = encoder.encode_descriptor(
            "connections_open",
            "Connections open now.",
            None,
            MetricType::Gauge,
        )?;
        for (core, snapshot) in cores.iter().enumerate() {
            let labels = [("core", core.to_string())];
            ConstGauge::new(snapshot.connections_open as i64).encode(open.encode_family(&labels)?)?;
        }
        let mut pending = encoder.encode_descriptor(
            "deferred_pending",
            "Deferred replies not answered yet.",
            None,
            MetricType::Gauge,
        )?;
        for (core, snapshot) in cores.iter().enumerate() {
            let labels = [("core", core.to_string())];
            ConstGauge::new(snapshot.deferred_pending as i64).encode(pending.encode_family(&labels)?)?;
        }
        let mut replies =
            encoder.encode_descriptor("replies", "Replies sent, by code.", None, MetricType::Counter)?;
        for (core, snapshot) in cores.iter().enumerate() {
            for (slot, &count) in snapshot.replies.iter().enumerate() {
                let labels = [("core", core.to_string()), ("code", code_label(slot))];
                ConstCounter::new(count).encode(replies.encode_family(&labels)?)?;
            }
        }

        let mut batches = encoder.encode_descriptor(
            "reply_batch_seconds",
            "Time in the server per batch of replies: from the arrival of the oldest request it \
             answers to the end of its send (reading, handling, waiting behind earlier replies, \
             sending).",
            None,
            MetricType::Histogram,
        )?;
        for core in 0..self.0.cores() {
            let (seconds, counts) = self.0.core(core).batch_times();
            let labels = [("core", core.to_string())];
            batches.encode_family(&labels)?.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                seconds,
                counts.iter().sum(),
                &latency_buckets(&counts),
                None,
            )?;
        }

        let commands = self.0.commands();
        let mut by_command = encoder.encode_descriptor(
            "command_replies",
            "Replies to each command of the routing table and the built-ins, by code (all cores).",
            None,
            MetricType::Counter,
        )?;
        for command in &commands {
            for (slot, &count) in command.replies.iter().enumerate() {
                let labels = [("cmdid", command.cmdid.to_string()), ("code", code_label(slot))];
                ConstCounter::new(count).encode(by_command.encode_family(&labels)?)?;
            }
        }
        command_histogram(
            &mut encoder,
            "command_handler_seconds",
            "How long each command's handler ran (all cores).",
            &commands,
            |c| (c.handler_seconds, &c.handler_buckets),
        )?;
        command_histogram(
            &mut encoder,
            "command_in_server_seconds",
            "Time in the server of each command's replies, from reading the request to the end \
             of the send that carried the reply (all cores).",
            &commands,
            |c| (c.in_server_seconds, &c.in_server_buckets),
        )?;
        Ok(())
    }
}

/// A histogram per cmdid, of the seconds and buckets `pick` reads off each command.
fn command_histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    commands: &[crate::stats::CommandSnapshot],
    pick: fn(&crate::stats::CommandSnapshot) -> (f64, &[u64; LATENCY_BUCKETS_US.len() + 1]),
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for command in commands {
        let (seconds, buckets) = pick(command);
        let labels = [("cmdid", command.cmdid.to_string())];
        family.encode_family(&labels)?.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            seconds,
            buckets.iter().sum(),
            &latency_buckets(buckets),
            None,
        )?;
    }
    Ok(())
}

/// Histogram buckets for the encoder: each bound of [`LATENCY_BUCKETS_US`] in seconds, then
/// +Inf, with the (not cumulative) counts.
fn latency_buckets(counts: &[u64; LATENCY_BUCKETS_US.len() + 1]) -> Vec<(f64, u64)> {
    LATENCY_BUCKETS_US
        .iter()
        .map(|&us| us as f64 / 1e6)
        .chain([f64::INFINITY])
        .zip(counts.iter().copied())
        .collect()
}

/// The metrics endpoint: serves `GET /metrics` from its own thread until the process ends.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
}

impl MetricsServer {
    /// The address it listens on (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

/// Serves the metrics of `stats` over HTTP at `addr` (`GET /metrics`; anything else gets a
/// 404), one request per connection, on a thread of its own; from now on handlers are timed
/// ([`StatsRegistry::time_handlers`]).
///
/// A hand-written responder rather than an HTTP server crate: it answers one fixed route
/// for a scraper, off the request path, and an HTTP stack would be most of the dependency
/// tree of this crate.
///
/// # Errors
/// The address cannot be bound, or the thread cannot be started.
pub fn serve(addr: SocketAddr, stats: Arc<StatsRegistry>) -> io::Result<MetricsServer> {
    let listener = TcpListener::bind(addr)?;
    let local_addr = listener.local_addr()?;
    stats.time_handlers();
    std::thread::Builder::new().name("ringcall-metrics".into()).spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(stream) => {
                    if let Err(e) = answer(stream, &stats) {
                        tracing::debug!("metrics request failed: {e}");
                    }
                }
                Err(e) => {
                    tracing::warn!("metrics endpoint: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    })?;
    Ok(MetricsServer { local_addr })
}

fn answer(stream: TcpStream, stats: &Arc<StatsRegistry>) -> io::Result<()> {
    // A scraper that stalls must not hold the endpoint.
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.by_ref().take(8192).read_line(&mut request_line)?;
    // Headers up to the blank line (bounded); none of them matters here.
    let mut header = String::new();
    for _ in 0..100 {
        header.clear();
        if reader.by_ref().take(8192).read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (status, content_type, body) = match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) if path == "/metrics" || path.starts_with("/metrics?") => {
            ("200 OK", CONTENT_TYPE, render(stats))
        }
        (Some("GET"), Some(_)) => ("404 Not Found", "text/plain", "try /metrics\n".to_owned()),
        _ => ("405 Method Not Allowed", "text/plain", "GET /metrics\n".to_owned()),
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

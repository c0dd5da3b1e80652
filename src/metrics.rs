//! Prometheus metrics: the per-core counters and the per-command counters of a running
//! server, encoded at scrape time (OpenMetrics text, with prometheus-client), and an HTTP
//! endpoint (hyper) that serves them at `/metrics` on a thread of its own.
//!
//! Nothing here runs on the request path: the cores write their own counters as always
//! (single-writer atomics, see [`crate::stats`]); a scrape reads and sums them.

use std::io;
use std::net::SocketAddr;
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
        let counters: [(&str, &str, PerCore); 16] = [
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
            ("connections_retired", "Connections drained and closed for reaching their maximum age.", |s| {
                s.connections_retired
            }),
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
            (
                "deferred_shed",
                "Requests answered 503 because the core had max_deferred_per_core deferred replies pending.",
                |s| s.deferred_shed,
            ),
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

/// Connections the endpoint serves at once; beyond, new ones are closed at once.
pub const MAX_CONNECTIONS: usize = 4096;

/// Time a client has to send a request's headers (slowloris, or an idle keep-alive
/// connection waiting for its next request).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a connection stays open, however busy (a scraper reconnects).
pub const CONNECTION_AGE: Duration = Duration::from_secs(300);

/// Largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 16 * 1024;

/// Serves the metrics of `stats` over HTTP/1.1 at `addr` (`GET /metrics`; other paths get a
/// 404, other methods a 405) on a thread of its own; from now on handlers are timed
/// ([`StatsRegistry::time_handlers`]).
///
/// hyper on a current-thread tokio runtime: every connection is served concurrently, with
/// keep-alive; a request head must arrive within [`HEADER_TIMEOUT`] and fit in [`MAX_HEAD`]
/// bytes, and a connection lives at most [`CONNECTION_AGE`]; at most [`MAX_CONNECTIONS`] are
/// open at once. So neither a client that trickles its headers nor thousands of idle
/// connections delay a scrape.
///
/// # Errors
/// The address cannot be bound, or the thread or its runtime cannot be started.
pub fn serve(addr: SocketAddr, stats: Arc<StatsRegistry>) -> io::Result<MetricsServer> {
    let listener = std::net::TcpListener::bind(addr)?;
    let local_addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    stats.time_handlers();
    std::thread::Builder::new().name("ringcall-metrics".into()).spawn(move || {
        runtime.block_on(async move {
            match tokio::net::TcpListener::from_std(listener) {
                Ok(listener) => accept(listener, stats).await,
                Err(e) => tracing::error!("metrics endpoint: cannot register the listener: {e}"),
            }
        });
    })?;
    Ok(MetricsServer { local_addr })
}

async fn accept(listener: tokio::net::TcpListener, stats: Arc<StatsRegistry>) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(MAX_HEAD);
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, say: back off rather than spin.
                tracing::warn!("metrics endpoint: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if open.load(std::sync::atomic::Ordering::Relaxed) >= MAX_CONNECTIONS {
            tracing::debug!("metrics endpoint: {MAX_CONNECTIONS} connections open, closing a new one");
            continue;
        }
        open.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let open = Open(open.clone());
        let stats = stats.clone();
        let connection = http.serve_connection(
            hyper_util::rt::TokioIo::new(stream),
            hyper::service::service_fn(move |request| {
                let response = respond(&request, &stats);
                async move { Ok::<_, std::convert::Infallible>(response) }
            }),
        );
        tokio::spawn(async move {
            let _open = open;
            // Past its age the connection is dropped (closed).
            if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_AGE, connection).await {
                tracing::debug!("metrics connection ended: {e}");
            }
        });
    }
}

/// Counts an open connection until dropped.
struct Open(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

type Body = http_body_util::Full<bytes::Bytes>;

fn respond(
    request: &hyper::Request<hyper::body::Incoming>,
    stats: &Arc<StatsRegistry>,
) -> hyper::Response<Body> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (hyper::StatusCode::OK, CONTENT_TYPE, render(stats)),
        (&hyper::Method::GET, _) => (hyper::StatusCode::NOT_FOUND, "text/plain", "try /metrics\n".to_owned()),
        _ => (hyper::StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET /metrics\n".to_owned()),
    };
    let mut response = hyper::Response::new(Body::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
    response
}

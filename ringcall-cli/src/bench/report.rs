//! What `ringcall bench` reports: totals, replies by code, HdrHistogram percentiles, in text,
//! JSON or CSV; and the one-line live progress display.

use std::fmt::Write as _;
use std::io::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{BenchConfig, Shared, ThreadResult, Unanswered};

/// How to print a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// For people.
    #[default]
    Text,
    /// One JSON object.
    Json,
    /// A header line and one row.
    Csv,
}

impl FromStr for OutputFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            "csv" => Ok(Self::Csv),
            _ => Err(format!("unknown output format {s:?} (expected text, json or csv)")),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    #[serde(rename = "p99_9")]
    pub p999: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// One server's share of a run over several.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EndpointReport {
    /// `HOST:PORT`.
    pub addr: String,
    /// Measured replies it gave.
    pub requests: u64,
    /// Of those, per second measured.
    pub requests_per_sec: f64,
}

/// The result of one run (its JSON form is this struct, serialized).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchReport {
    /// The server (several: their addresses, space-separated).
    pub addr: String,
    /// With several servers: the replies each gave.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<EndpointReport>,
    /// Connections.
    pub connections: usize,
    /// Requests in flight per connection (closed loop).
    pub pipeline: usize,
    /// Target rate, in open-loop mode.
    pub rate: Option<f64>,
    /// Seconds measured.
    pub duration_secs: f64,
    /// Replies to measured requests.
    pub requests: u64,
    /// `requests / duration`.
    pub requests_per_sec: f64,
    /// Replies by code, codes that occurred only.
    pub codes: std::collections::BTreeMap<u16, u64>,
    /// Replies with a code of 1000 or more.
    pub other_codes: u64,
    /// Reply lines that were not replies (no `{"code":N` prefix, or nothing was in flight).
    pub invalid_replies: u64,
    /// Connections that failed (could not connect, reset, closed by the server).
    pub errors: u64,
    /// Requests sent and never answered, by how their connection ended.
    pub unanswered: Unanswered,
    /// Bytes written while measuring (the warm-up's are not counted, as its requests are not).
    pub bytes_sent: u64,
    /// Bytes read while measuring.
    pub bytes_received: u64,
    /// `bytes_sent / duration`.
    pub bytes_sent_per_sec: f64,
    /// `bytes_received / duration`: the transfer rate wrk and oha report.
    pub bytes_received_per_sec: f64,
    /// Latency of measured requests.
    #[serde(rename = "latency_us")]
    pub latency: Latency,
    /// Open loop: latency counts from each request's intended send time.
    pub coordinated_omission_corrected: bool,
    /// Whether the connections speak TLS.
    pub tls: bool,
    /// New connections opened while measuring (reconnecting after a number of requests).
    pub connections_opened: u64,
    /// `connections_opened / duration`: with TLS, full handshakes per second.
    pub connections_per_sec: f64,
}

impl BenchReport {
    pub(super) fn new(config: &BenchConfig, result: ThreadResult, elapsed: Duration) -> Self {
        let h = &result.latency;
        let us = |ns: u64| ns as f64 / 1000.0;
        let latency = if h.is_empty() {
            Latency::default()
        } else {
            Latency {
                p50: us(h.value_at_quantile(0.50)),
                p90: us(h.value_at_quantile(0.90)),
                p99: us(h.value_at_quantile(0.99)),
                p999: us(h.value_at_quantile(0.999)),
                max: us(h.max()),
                mean: h.mean() / 1000.0,
            }
        };
        let codes: std::collections::BTreeMap<u16, u64> =
            result.codes.iter().enumerate().filter(|(_, n)| **n > 0).map(|(c, n)| (c as u16, *n)).collect();
        let requests = codes.values().sum::<u64>() + result.other_codes + result.invalid_replies;
        let secs = elapsed.as_secs_f64();
        Self {
            addr: config.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" "),
            endpoints: if config.addrs.len() > 1 {
                config
                    .addrs
                    .iter()
                    .enumerate()
                    .map(|(i, a)| {
                        let requests = result.per_endpoint.get(i).copied().unwrap_or(0);
                        EndpointReport {
                            addr: a.to_string(),
                            requests,
                            requests_per_sec: if secs > 0.0 { requests as f64 / secs } else { 0.0 },
                        }
                    })
                    .collect()
            } else {
                Vec::new()
            },
            connections: config.connections,
            pipeline: config.pipeline,
            rate: config.rate,
            duration_secs: secs,
            requests,
            requests_per_sec: if secs > 0.0 { requests as f64 / secs } else { 0.0 },
            codes,
            other_codes: result.other_codes,
            invalid_replies: result.invalid_replies,
            errors: result.errors,
            unanswered: result.unanswered,
            bytes_sent: result.bytes_sent,
            bytes_received: result.bytes_received,
            bytes_sent_per_sec: if secs > 0.0 { result.bytes_sent as f64 / secs } else { 0.0 },
            bytes_received_per_sec: if secs > 0.0 { result.bytes_received as f64 / secs } else { 0.0 },
            latency,
            coordinated_omission_corrected: config.rate.is_some(),
            tls: config.connect.tls.is_some(),
            connections_opened: result.connects,
            connections_per_sec: if secs > 0.0 { result.connects as f64 / secs } else { 0.0 },
        }
    }

    /// Replies with `code`.
    pub fn replies_with(&self, code: u16) -> u64 {
        self.codes.get(&code).copied().unwrap_or(0)
    }

    fn latency_note(&self) -> &'static str {
        if self.rate.is_some() {
            "open loop: latency from each request's intended send time (corrected for coordinated omission)"
        } else {
            "closed loop: latency from each request's actual send time"
        }
    }

    /// The report in `format`.
    pub fn render(&self, format: OutputFormat) -> String {
        match format {
            OutputFormat::Text => self.text(),
            OutputFormat::Json => self.json(),
            OutputFormat::Csv => format!("{}\n{}\n", Self::CSV_HEADER, self.csv_row()),
        }
    }

    fn text(&self) -> String {
        let mut s = String::new();
        let load = match self.rate {
            Some(rate) => format!("{} connections at {rate:.0} requests/s", self.connections),
            None => format!("{} connections x {} in flight", self.connections, self.pipeline),
        };
        let tls = if self.tls { ", TLS" } else { "" };
        let _ =
            writeln!(s, "ringcall bench {}: {load}{tls}, {:.2} s measured", self.addr, self.duration_secs);
        let _ = writeln!(s, "  requests/s  {:.1}", self.requests_per_sec);
        if self.connections_opened > 0 {
            let what = if self.tls { "new TLS connections (full handshakes)" } else { "new connections" };
            let _ = writeln!(
                s,
                "  connects/s  {:.1} ({} {what})",
                self.connections_per_sec, self.connections_opened
            );
        }
        let codes: Vec<String> = self.codes.iter().map(|(c, n)| format!("{c}: {n}")).collect();
        let _ = writeln!(s, "  requests    {} (by code: {})", self.requests, codes.join(", "));
        if self.other_codes > 0 || self.invalid_replies > 0 {
            let _ = writeln!(
                s,
                "  odd replies {} other codes, {} invalid",
                self.other_codes, self.invalid_replies
            );
        }
        for e in &self.endpoints {
            let _ =
                writeln!(s, "  endpoint    {}: {} requests, {:.1}/s", e.addr, e.requests, e.requests_per_sec);
        }
        let _ = writeln!(s, "  errors      {} connections failed", self.errors);
        let u = &self.unanswered;
        let _ = writeln!(
            s,
            "  unanswered  {} requests sent and never answered (connection closed {}, reset {}, \
             timed out {}, other {})",
            u.total(),
            u.closed,
            u.reset,
            u.timed_out,
            u.other
        );
        let _ = writeln!(s, "  bytes       {} sent, {} received", self.bytes_sent, self.bytes_received);
        let mib = |bytes: f64| bytes / f64::from(1 << 20);
        let _ = writeln!(
            s,
            "  transfer    {:.2} MiB/s sent, {:.2} MiB/s received",
            mib(self.bytes_sent_per_sec),
            mib(self.bytes_received_per_sec)
        );
        let l = &self.latency;
        let _ = writeln!(
            s,
            "  latency µs  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        let _ = writeln!(s, "  ({})", self.latency_note());
        s
    }

    fn json(&self) -> String {
        let mut json = serde_json::to_string(self).expect("a report serializes");
        json.push('\n');
        json
    }

    /// The CSV header matching [`csv_row`](Self::csv_row).
    pub const CSV_HEADER: &'static str = "addr,connections,pipeline,rate,duration_secs,requests,requests_per_sec,\
        ok,errors,unanswered,bytes_sent,bytes_received,p50_us,p90_us,p99_us,p99_9_us,max_us,mean_us";

    /// One CSV row.
    pub fn csv_row(&self) -> String {
        let l = &self.latency;
        format!(
            "{},{},{},{},{:.3},{},{:.1},{},{},{},{},{},{:.1},{:.1},{:.1},{:.1},{:.1},{:.1}",
            self.addr,
            self.connections,
            self.pipeline,
            self.rate.map_or(String::new(), |r| format!("{r}")),
            self.duration_secs,
            self.requests,
            self.requests_per_sec,
            self.replies_with(0),
            self.errors,
            self.unanswered.total(),
            self.bytes_sent,
            self.bytes_received,
            l.p50,
            l.p90,
            l.p99,
            l.p999,
            l.max,
            l.mean
        )
    }
}

/// The live one-line display: requests/s over the last second, on stderr.
pub(super) struct Progress {
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    pub(super) fn start(shared: Arc<Shared>) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut last = (started, shared.completed.load(Ordering::Relaxed));
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(250));
                let now = Instant::now();
                if now.duration_since(last.0) < Duration::from_secs(1) {
                    continue;
                }
                let completed = shared.completed.load(Ordering::Relaxed);
                let rate = (completed - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
                eprint!(
                    "\r\x1b[2K{:>5.1} s  {:>12.0} requests/s  {:>12} replies",
                    started.elapsed().as_secs_f64(),
                    rate,
                    completed
                );
                let _ = std::io::stderr().flush();
                last = (now, completed);
            }
            eprint!("\r\x1b[2K");
        });
        Self { done, thread: Some(thread) }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

//! `ringcall compare`: the same workloads against every backend of the same server, in
//! interleaved rounds (so drift on a noisy host hits every backend alike), summarised by
//! medians, with each backend's ratio to `epoll` (the median over rounds of the ratio within
//! a round), as a table, JSON and an SVG chart.
//!
//! Each backend runs as its own `ringcall serve` child process pinned to the server CPUs; the
//! load runs in this process pinned to the client CPUs. Server CPU time per request comes
//! from the kernel's per-thread accounting (`/proc/PID/task/*/schedstat`).
//!
//! On a virtual machine the hypervisor can take the pinned CPUs away for a while (steal time,
//! `/proc/stat`): a run that loses more than `max_steal_percent` of its CPUs' time measures
//! the neighbours, not the backend. Such a run is repeated (up to `retries` times, keeping the
//! least disturbed attempt), and the per-round ratios to `epoll` use only rounds in which both
//! runs were undisturbed, when there are any.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::time::Duration;

use super::{BenchConfig, BenchError, StopAfter};
use ringcall::Backend;
pub use ringcall::bench_support::Shape;

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// What each request of a workload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// An echo request of the seed's shape padded to this many bytes (one repeated letter).
    Bytes(usize),
    /// A request shaped as callers send them (`log1k`, `blob16k`, `blob64k`, `seed`; see
    /// [`Shape`]).
    Shape(Shape),
}

impl Payload {
    /// The request line.
    pub fn request(self) -> Vec<u8> {
        match self {
            Payload::Bytes(bytes) => BenchConfig::echo_request_of(bytes),
            Payload::Shape(shape) => shape.request(),
        }
    }
}

impl std::fmt::Display for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Payload::Bytes(bytes) if bytes % (1 << 20) == 0 => write!(f, "{}m", bytes >> 20),
            Payload::Bytes(bytes) if bytes % (1 << 10) == 0 => write!(f, "{}k", bytes >> 10),
            Payload::Bytes(bytes) => write!(f, "{bytes}"),
            Payload::Shape(shape) => f.write_str(shape.name()),
        }
    }
}

/// A load shape: connections x requests in flight per connection, each request (`None`:
/// the seed's echo request, compact), whether it speaks TLS, and whether each connection is
/// replaced after a number of requests. Written `CONNSxINFLIGHT[@BYTES|@SHAPE][+tls][/rN]`,
/// e.g. `16x16@1k+tls`, `16x16@log1k` or `16x1+tls/r1` (a new TLS connection per request:
/// handshakes per second).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Workload {
    /// Connections.
    pub connections: usize,
    /// In flight per connection.
    pub pipeline: usize,
    /// Each request (its reply is about as long).
    pub payload: Option<Payload>,
    /// Over TLS (to a second server of each backend, serving a throwaway certificate).
    pub tls: bool,
    /// Requests per connection before it is replaced by a new one.
    pub reconnect_after: Option<u64>,
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.connections, self.pipeline)?;
        if let Some(payload) = self.payload {
            write!(f, "@{payload}")?;
        }
        if self.tls {
            f.write_str("+tls")?;
        }
        match self.reconnect_after {
            Some(n) => write!(f, "/r{n}"),
            None => Ok(()),
        }
    }
}

/// A size in bytes: `80`, `16k` (KiB), `1m` (MiB).
pub fn parse_bytes(text: &str) -> Option<usize> {
    let text = text.trim().to_ascii_lowercase();
    let (digits, unit) = match text.strip_suffix('k') {
        Some(d) => (d, 1 << 10),
        None => match text.strip_suffix('m') {
            Some(d) => (d, 1 << 20),
            None => (text.as_str(), 1),
        },
    };
    digits.parse::<usize>().ok().and_then(|n| n.checked_mul(unit)).filter(|n| *n > 0)
}

impl FromStr for Workload {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (rest, reconnect_after) = match s.split_once("/r") {
            Some((rest, n)) => match n.parse::<u64>() {
                Ok(n) if n > 0 => (rest, Some(n)),
                _ => return Err(format!("workload {s:?}: /r takes a number of requests, e.g. /r1")),
            },
            None => (s, None),
        };
        let (rest, tls) = match rest.strip_suffix("+tls") {
            Some(rest) => (rest, true),
            None => (rest, false),
        };
        let (shape, payload) = match rest.split_once('@') {
            Some((shape, named)) if Shape::from_name(named).is_some() => {
                (shape, Shape::from_name(named).map(Payload::Shape))
            }
            Some((shape, size)) => {
                let bytes = parse_bytes(size).ok_or_else(|| {
                    format!(
                        "workload {s:?}: {size:?} is not a size such as 80, 16k or 1m, nor a shape ({})",
                        shape_names()
                    )
                })?;
                if bytes < BenchConfig::MIN_ECHO_BYTES {
                    return Err(format!(
                        "workload {s:?}: an echo request takes at least {} bytes",
                        BenchConfig::MIN_ECHO_BYTES
                    ));
                }
                (shape, Some(Payload::Bytes(bytes)))
            }
            None => (rest, None),
        };
        let (c, p) = shape
            .split_once('x')
            .ok_or_else(|| format!("workload {s:?} is not CONNECTIONSxINFLIGHT[@BYTES][+tls][/rN]"))?;
        let parse = |v: &str| v.trim().parse::<usize>().ok().filter(|n| *n > 0);
        match (parse(c), parse(p)) {
            (Some(connections), Some(pipeline)) => {
                Ok(Self { connections, pipeline, payload, tls, reconnect_after })
            }
            _ => Err(format!("workload {s:?} needs two positive numbers, e.g. 16x16 or 16x16@64k")),
        }
    }
}

/// The shapes' names, for messages.
fn shape_names() -> String {
    Shape::ALL.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
}

/// The default workloads: 1 conn x 1 in flight, 64 x 1, 16 x 16, 1000 x 1.
pub const DEFAULT_WORKLOADS: &str = "1x1,64x1,16x16,1000x1";

/// What to compare.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompareConfig {
    /// The `ringcall` executable to start servers from.
    #[serde(skip)]
    pub server_binary: PathBuf,
    /// Backends to compare.
    #[serde(skip)]
    pub backends: Vec<Backend>,
    /// Also measure the bare io_uring echo loop ([`echo_baseline`](super::echo_baseline)),
    /// the transport's ceiling, on the plain workloads.
    pub baseline: bool,
    /// Workloads.
    #[serde(skip)]
    pub workloads: Vec<Workload>,
    /// Interleaved rounds (medians are taken over them).
    pub rounds: usize,
    /// Measured time per run.
    #[serde(rename = "duration_secs", serialize_with = "secs")]
    pub duration: Duration,
    /// Warm-up per run.
    #[serde(rename = "warmup_secs", serialize_with = "secs")]
    pub warmup: Duration,
    /// CPUs the servers run on (one worker per CPU).
    pub server_cpus: Vec<usize>,
    /// CPUs the load runs on (one load thread per CPU).
    pub client_cpus: Vec<usize>,
    /// A run whose CPUs lose more than this share of their time to steal is disturbed.
    pub max_steal_percent: f64,
    /// How many times a disturbed run is repeated.
    pub retries: usize,
}

/// What is measured: a backend of `ringcall serve`, or the bare io_uring echo loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contender {
    /// `ringcall serve --backend B`.
    Backend(Backend),
    /// `ringcall echo-baseline`: io_uring, no framing, no JSON.
    EchoBaseline,
}

impl std::fmt::Display for Contender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Contender::Backend(backend) => f.write_str(backend.name()),
            Contender::EchoBaseline => f.write_str("io_uring-echo"),
        }
    }
}

const EPOLL: Contender = Contender::Backend(Backend::Epoll);

/// Serializes a value by its `Display` form (backends and workloads as on the command line).
fn display<T: std::fmt::Display, S: serde::Serializer>(value: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(value)
}

/// Serializes a 0-based round as the 1-based number the table and the log show.
fn one_based<S: serde::Serializer>(round: &usize, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(*round as u64 + 1)
}

/// One run of one workload against one backend.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Measurement {
    /// Backend.
    #[serde(serialize_with = "display")]
    pub backend: Contender,
    /// Workload.
    #[serde(serialize_with = "display")]
    pub workload: Workload,
    /// Round (0-based; 1-based in JSON).
    #[serde(serialize_with = "one_based")]
    pub round: usize,
    /// Requests/s.
    pub requests_per_sec: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// Server CPU time per request, µs.
    pub server_cpu_us_per_request: f64,
    /// Server CPU time as a share of its CPUs' time over the run, %: well under 100, the
    /// load, not the server, set the pace.
    pub server_busy_percent: f64,
    /// Failed connections.
    pub errors: u64,
    /// Share of the server's and the load's CPU time the hypervisor took during the run, %.
    pub steal_percent: f64,
    /// Runs made for this slot (more than 1 when attempts were disturbed); the one kept is
    /// the least disturbed.
    pub attempts: usize,
}

/// Medians of one backend on one workload.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Backend.
    #[serde(serialize_with = "display")]
    pub backend: Contender,
    /// Workload.
    #[serde(serialize_with = "display")]
    pub workload: Workload,
    /// Median requests/s.
    pub requests_per_sec: f64,
    /// Median p99, µs.
    pub p99_us: f64,
    /// Median server CPU per request, µs.
    pub server_cpu_us_per_request: f64,
    /// Median share of its CPUs' time the server used, %.
    pub server_busy_percent: f64,
    /// Median steal over the runs, %.
    pub steal_percent: f64,
    /// Median over rounds of this backend's requests/s over epoll's in the same round, if
    /// epoll was measured; only rounds where neither run was disturbed count, if any.
    pub vs_epoll: Option<f64>,
    /// Rounds the ratio to epoll was taken over.
    pub vs_epoll_rounds: usize,
    /// Likewise over the bare io_uring echo loop, when it was measured.
    pub vs_baseline: Option<f64>,
}

/// Everything a comparison produced.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Comparison {
    /// The host, as the kernel describes it.
    pub machine: String,
    /// Every run.
    pub measurements: Vec<Measurement>,
    /// Medians per backend and workload.
    pub summary: Vec<Summary>,
}

/// Why a comparison failed.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// A server could not be started.
    #[error("cannot start the {backend} server: {reason}")]
    Server {
        /// Backend.
        backend: Contender,
        /// What happened.
        reason: String,
    },
    /// The throwaway certificate for TLS workloads could not be made.
    #[error("cannot make a certificate for the TLS workloads: {0}")]
    Certificate(String),
    /// A run failed.
    #[error(transparent)]
    Bench(#[from] BenchError),
}

/// A self-signed certificate for `localhost`, in a directory of its own removed on drop.
struct ThrowawayCertificate {
    dir: PathBuf,
}

impl ThrowawayCertificate {
    fn new() -> Result<Self, CompareError> {
        let dir = std::env::temp_dir().join(format!("ringcall-compare-tls-{}", std::process::id()));
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()])
            .map_err(|e| CompareError::Certificate(e.to_string()))?;
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(dir.join("cert.pem"), made.cert.pem()))
            .and_then(|()| std::fs::write(dir.join("key.pem"), made.key_pair.serialize_pem()))
            .map_err(|e| {
                CompareError::Certificate(format!("cannot write it under {}: {e}", dir.display()))
            })?;
        Ok(Self { dir })
    }

    fn cert(&self) -> String {
        self.dir.join("cert.pem").to_string_lossy().into_owned()
    }

    fn serve_args(&self) -> [String; 4] {
        let key = self.dir.join("key.pem").to_string_lossy().into_owned();
        ["--tls-cert".into(), self.cert(), "--tls-key".into(), key]
    }

    fn client(&self) -> Result<ringcall::ClientTls, CompareError> {
        ringcall::ClientTls::from_pem_files(self.cert().as_ref(), "localhost", None)
            .map_err(|e| CompareError::Certificate(e.to_string()))
    }
}

impl Drop for ThrowawayCertificate {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct ServerProcess {
    backend: Contender,
    child: Child,
    addr: SocketAddr,
}

impl ServerProcess {
    fn start(
        binary: &PathBuf,
        backend: Contender,
        cpus: &[usize],
        extra: &[&str],
    ) -> Result<Self, CompareError> {
        let fail = |reason: String| CompareError::Server { backend, reason };
        let mut command = Command::new(binary);
        match backend {
            Contender::Backend(backend) => command
                .args(["serve", "--addr", "127.0.0.1:0", "--backend", backend.name()])
                .args(["--threads", &cpus.len().to_string(), "--shutdown-timeout", "2"]),
            Contender::EchoBaseline => command
                .args(["echo-baseline", "--addr", "127.0.0.1:0"])
                .args(["--threads", &cpus.len().to_string()]),
        };
        command
            .args(extra)
            // Warnings and errors reach the terminal; the address comes on stdout.
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let cpus = cpus.to_vec();
        // SAFETY: only async-signal-safe calls (sched_setaffinity) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                for &cpu in &cpus {
                    libc::CPU_SET(cpu, &mut set);
                }
                libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| fail(format!("cannot run {}: {e}", binary.display())))?;
        // `serve` prints the address it listens on, alone on the first line of stdout.
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap_or(0) == 0 {
            let _ = child.wait();
            return Err(fail("it exited before serving (see its log above)".into()));
        }
        let addr = line.trim().parse().map_err(|_| fail(format!("unreadable address line: {line:?}")))?;
        Ok(Self { backend, child, addr })
    }

    /// CPU time used by every thread of the server so far.
    fn cpu_time(&self) -> Duration {
        let mut total = 0u64;
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", self.child.id())) {
            for task in tasks.flatten() {
                if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
                    total +=
                        stat.split_whitespace().next().and_then(|ns| ns.parse::<u64>().ok()).unwrap_or(0);
                }
            }
        }
        Duration::from_nanos(total)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Measurement {
    /// Whether the hypervisor took more than `max_steal_percent` of the CPUs' time.
    fn disturbed(&self, max_steal_percent: f64) -> bool {
        self.steal_percent > max_steal_percent
    }
}

/// One run of `bench` against `server`, with the server's CPU time and the steal on the
/// `pinned` CPUs over it; printed as it ends.
fn measure(
    config: &CompareConfig,
    server: &ServerProcess,
    bench: &BenchConfig,
    workload: Workload,
    round: usize,
    pinned: &[usize],
) -> Result<Measurement, CompareError> {
    let ticks_before = CpuTicks::now(pinned);
    let cpu_before = server.cpu_time();
    let report = super::run(bench)?;
    let cpu = server.cpu_time().saturating_sub(cpu_before);
    let steal_percent = ticks_before.steal_percent_until(CpuTicks::now(pinned));
    // The CPU window includes the warm-up, so divide by everything served in it.
    let window = (config.duration + config.warmup).as_secs_f64();
    let served = (report.requests_per_sec * window).max(1.0);
    let server_cpus = config.server_cpus.len().max(1) as f64;
    let m = Measurement {
        backend: server.backend,
        workload,
        round,
        requests_per_sec: report.requests_per_sec,
        p99_us: report.latency.p99,
        server_cpu_us_per_request: cpu.as_secs_f64() * 1e6 / served,
        server_busy_percent: cpu.as_secs_f64() * 100.0 / (window * server_cpus),
        errors: report.errors,
        steal_percent,
        attempts: 1,
    };
    eprintln!(
        "round {} {:>7} {:<11} {:>12.0} req/s  p99 {:>9.1} µs  server CPU {:.2} µs/req, busy {:>5.1}%  steal {:>4.1}%",
        round + 1,
        workload.to_string(),
        server.backend.to_string(),
        m.requests_per_sec,
        m.p99_us,
        m.server_cpu_us_per_request,
        m.server_busy_percent,
        m.steal_percent
    );
    Ok(m)
}

/// Stolen and total time of a set of CPUs, in clock ticks, from `/proc/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct CpuTicks {
    steal: u64,
    total: u64,
}

impl CpuTicks {
    fn now(cpus: &[usize]) -> Self {
        std::fs::read_to_string("/proc/stat").map(|stat| Self::parse(&stat, cpus)).unwrap_or_default()
    }

    /// Sums the `cpuN` lines of `cpus`: user nice system idle iowait irq softirq steal (guest
    /// time is already inside user and nice).
    fn parse(stat: &str, cpus: &[usize]) -> Self {
        let mut ticks = Self::default();
        for line in stat.lines() {
            let mut fields = line.split_whitespace();
            let Some(cpu) = fields.next().and_then(|name| name.strip_prefix("cpu")) else { continue };
            if !cpu.parse().is_ok_and(|n: usize| cpus.contains(&n)) {
                continue;
            }
            for (column, value) in fields.take(8).enumerate() {
                let value: u64 = value.parse().unwrap_or(0);
                ticks.total += value;
                if column == 7 {
                    ticks.steal += value;
                }
            }
        }
        ticks
    }

    /// Steal as a share of all time between `self` and `later`, %.
    fn steal_percent_until(self, later: Self) -> f64 {
        let total = later.total.saturating_sub(self.total);
        if total == 0 { 0.0 } else { later.steal.saturating_sub(self.steal) as f64 * 100.0 / total as f64 }
    }
}

/// The median of per-round ratios given as (ratio, neither run disturbed), over the
/// undisturbed rounds if there are any, else over all; with the number of rounds used.
fn median_ratio(rounds: &[(f64, bool)]) -> (Option<f64>, usize) {
    let undisturbed: Vec<f64> = rounds.iter().filter(|(_, clean)| *clean).map(|(r, _)| *r).collect();
    let ratios = if undisturbed.is_empty() { rounds.iter().map(|(r, _)| *r).collect() } else { undisturbed };
    let used = ratios.len();
    ((used > 0).then(|| median(ratios)), used)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The host: CPU model, CPU count and kernel.
pub fn describe_machine() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{model}, {cpus} CPUs, Linux {}", kernel.trim())
}

/// Runs the comparison, printing a line per run to stderr as it goes.
///
/// # Errors
/// A server cannot start, or a run fails.
pub fn run(config: &CompareConfig) -> Result<Comparison, CompareError> {
    let start = |contenders: &mut dyn Iterator<Item = Contender>, extra: &[&str]| {
        contenders
            .map(|contender| {
                ServerProcess::start(&config.server_binary, contender, &config.server_cpus, extra)
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let backends = || config.backends.iter().map(|&b| Contender::Backend(b));
    let baseline = config.baseline.then_some(Contender::EchoBaseline);
    let servers = start(&mut backends().chain(baseline), &[])?;
    // TLS workloads go to a second server of each backend, serving a throwaway certificate.
    let certificate = config.workloads.iter().any(|w| w.tls).then(ThrowawayCertificate::new).transpose()?;
    let (tls_servers, client_tls) = match &certificate {
        Some(c) => {
            let args = c.serve_args();
            (start(&mut backends(), &args.each_ref().map(String::as_str))?, Some(c.client()?))
        }
        None => (Vec::new(), None),
    };
    let pinned: Vec<usize> = config.server_cpus.iter().chain(&config.client_cpus).copied().collect();
    let mut measurements = Vec::new();
    for round in 0..config.rounds {
        for &workload in &config.workloads {
            // Rotate the order each round so no backend always runs first.
            let servers = if workload.tls { &tls_servers } else { &servers };
            for i in 0..servers.len() {
                let server = &servers[(i + round) % servers.len()];
                let bench = BenchConfig {
                    addrs: vec![server.addr],
                    connections: workload.connections,
                    pipeline: workload.pipeline,
                    stop: StopAfter::Duration(config.duration),
                    warmup: config.warmup,
                    rate: None,
                    requests: vec![match workload.payload {
                        Some(payload) => payload.request(),
                        None => BenchConfig::echo_request(),
                    }],
                    threads: config.client_cpus.len().max(1),
                    cpus: config.client_cpus.clone(),
                    progress: false,
                    connect: super::ConnectOptions {
                        tls: client_tls.clone().filter(|_| workload.tls),
                        token: None,
                        requests_per_connection: workload.reconnect_after,
                        notices: false,
                    },
                };
                let mut kept = measure(config, server, &bench, workload, round, &pinned)?;
                while kept.disturbed(config.max_steal_percent) && kept.attempts <= config.retries {
                    eprintln!(
                        "  disturbed: the hypervisor took more than {}% of the CPUs' time; repeating the run",
                        config.max_steal_percent
                    );
                    let again = measure(config, server, &bench, workload, round, &pinned)?;
                    let attempts = kept.attempts + 1;
                    if again.steal_percent < kept.steal_percent {
                        kept = again;
                    }
                    kept.attempts = attempts;
                }
                measurements.push(kept);
            }
        }
    }
    drop(servers);
    drop(tls_servers);
    let mut summary = Vec::new();
    for &workload in &config.workloads {
        let of = |backend: Contender, field: fn(&Measurement) -> f64| {
            median(
                measurements
                    .iter()
                    .filter(|m| m.backend == backend && m.workload == workload)
                    .map(field)
                    .collect(),
            )
        };
        // Each round's ratio compares runs made moments apart, so drift of the machine
        // cancels out; the median is over rounds.
        let run_in = |backend: Contender, round: usize| {
            measurements.iter().find(|m| m.backend == backend && m.workload == workload && m.round == round)
        };
        // The median over rounds of `backend`'s requests/s over `reference`'s in the same round.
        let ratio_to = |backend: Contender, reference: Contender| {
            let pairs: Vec<(f64, bool)> = (0..config.rounds)
                .filter_map(|round| match (run_in(backend, round), run_in(reference, round)) {
                    (Some(run), Some(base)) if base.requests_per_sec > 0.0 => Some((
                        run.requests_per_sec / base.requests_per_sec,
                        !run.disturbed(config.max_steal_percent) && !base.disturbed(config.max_steal_percent),
                    )),
                    _ => None,
                })
                .collect();
            median_ratio(&pairs)
        };
        for backend in backends().chain(baseline.filter(|_| !workload.tls)) {
            let (vs_epoll, vs_epoll_rounds) = ratio_to(backend, EPOLL);
            let vs_baseline = baseline.filter(|_| !workload.tls).and_then(|b| ratio_to(backend, b).0);
            summary.push(Summary {
                backend,
                workload,
                requests_per_sec: of(backend, |m| m.requests_per_sec),
                p99_us: of(backend, |m| m.p99_us),
                server_cpu_us_per_request: of(backend, |m| m.server_cpu_us_per_request),
                server_busy_percent: of(backend, |m| m.server_busy_percent),
                steal_percent: of(backend, |m| m.steal_percent),
                vs_epoll,
                vs_epoll_rounds,
                vs_baseline,
            });
        }
    }
    Ok(Comparison { machine: describe_machine(), measurements, summary })
}

impl Comparison {
    /// The side-by-side table (markdown, so it pastes into docs as is).
    pub fn table(&self) -> String {
        let mut s = String::new();
        let baseline = self.summary.iter().any(|r| r.vs_baseline.is_some());
        let _ = writeln!(
            s,
            "| workload | backend | requests/s | p99 µs | server CPU µs/request | server busy % | steal % | vs epoll, per round (rounds) |{}",
            if baseline { " vs io_uring-echo |" } else { "" }
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|{}", if baseline { "---:|" } else { "" });
        for row in &self.summary {
            let _ = write!(
                s,
                "| {} | {} | {:.0} | {:.1} | {:.2} | {:.0} | {:.1} | {} |",
                row.workload,
                row.backend,
                row.requests_per_sec,
                row.p99_us,
                row.server_cpu_us_per_request,
                row.server_busy_percent,
                row.steal_percent,
                row.vs_epoll.map_or("–".into(), |r| format!("{r:.2}x ({})", row.vs_epoll_rounds))
            );
            if baseline {
                let _ = write!(s, " {} |", row.vs_baseline.map_or("–".into(), |r| format!("{r:.2}x")));
            }
            s.push('\n');
        }
        s
    }

    /// Every run and the medians as one JSON document, with the configuration they ran with.
    pub fn json(&self, config: &CompareConfig) -> String {
        #[derive(serde::Serialize)]
        struct Document<'a> {
            machine: &'a str,
            config: &'a CompareConfig,
            summary: &'a [Summary],
            measurements: &'a [Measurement],
        }
        let document = Document {
            machine: &self.machine,
            config,
            summary: &self.summary,
            measurements: &self.measurements,
        };
        let mut json = serde_json::to_string_pretty(&document).expect("a comparison serializes");
        json.push('\n');
        json
    }

    /// A bar chart of median requests/s: one panel per workload (each with its own scale),
    /// one bar per backend, drawn with plotters.
    pub fn svg(&self) -> String {
        use plotters::prelude::*;
        const PANEL_WIDTH: u32 = 240;
        const LEGEND_ENTRY_WIDTH: u32 = 130;
        const COLORS: [RGBColor; 5] = [
            RGBColor(0xd6, 0x27, 0x28),
            RGBColor(0xff, 0x7f, 0x0e),
            RGBColor(0x1f, 0x77, 0xb4),
            RGBColor(0x2c, 0xa0, 0x2c),
            RGBColor(0x94, 0x67, 0xbd),
        ];
        let mut workloads: Vec<Workload> = Vec::new();
        let mut backends: Vec<Contender> = Vec::new();
        for row in &self.summary {
            if !workloads.contains(&row.workload) {
                workloads.push(row.workload);
            }
            if !backends.contains(&row.backend) {
                backends.push(row.backend);
            }
        }
        let color = |backend: Contender| {
            COLORS[backends.iter().position(|b| *b == backend).unwrap_or(0) % COLORS.len()]
        };
        let title = format!("ringcall compare: median requests/s (higher is better) — {}", self.machine);
        // Wide enough for every panel, for the legend's row of backends, and for the title
        // (at 14 px, a character of sans-serif takes at most about 8 px).
        let width = [
            PANEL_WIDTH * workloads.len().max(1) as u32 + 20,
            LEGEND_ENTRY_WIDTH * backends.len() as u32 + 20,
            8 * title.chars().count() as u32 + 20,
        ]
        .into_iter()
        .max()
        .unwrap_or(PANEL_WIDTH);
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (width, 400)).into_drawing_area();
            let drawn = (|| -> Result<(), Box<dyn std::error::Error + '_>> {
                root.fill(&WHITE)?;
                let root = root.titled(&title, ("sans-serif", 14))?;
                let (panels, legend) = root.split_vertically(340);
                for (panel, workload) in
                    panels.split_evenly((1, workloads.len().max(1))).iter().zip(&workloads)
                {
                    let rows: Vec<&Summary> =
                        self.summary.iter().filter(|r| r.workload == *workload).collect();
                    let max = rows.iter().map(|r| r.requests_per_sec).fold(1.0, f64::max) * 1.15;
                    let mut chart = ChartBuilder::on(panel)
                        .caption(
                            match workload.payload {
                                Some(Payload::Bytes(bytes)) => format!(
                                    "{} conns x {} in flight, {bytes} B requests",
                                    workload.connections, workload.pipeline
                                ),
                                Some(Payload::Shape(shape)) => format!(
                                    "{} conns x {} in flight, {} requests",
                                    workload.connections,
                                    workload.pipeline,
                                    shape.name()
                                ),
                                None => format!(
                                    "{} conns x {} in flight",
                                    workload.connections, workload.pipeline
                                ),
                            },
                            ("sans-serif", 12),
                        )
                        .margin(8)
                        .x_label_area_size(10)
                        .y_label_area_size(40)
                        .build_cartesian_2d(0.0..rows.len() as f64, 0.0..max)?;
                    chart
                        .configure_mesh()
                        .disable_x_mesh()
                        .disable_x_axis()
                        .y_labels(5)
                        .y_label_formatter(&|v| human(*v))
                        .draw()?;
                    chart.draw_series(rows.iter().enumerate().map(|(i, row)| {
                        let x = i as f64;
                        Rectangle::new(
                            [(x + 0.1, 0.0), (x + 0.9, row.requests_per_sec)],
                            color(row.backend).filled(),
                        )
                    }))?;
                    chart.draw_series(rows.iter().enumerate().map(|(i, row)| {
                        Text::new(
                            human(row.requests_per_sec),
                            (i as f64 + 0.2, row.requests_per_sec * 1.08),
                            ("sans-serif", 10),
                        )
                    }))?;
                }
                for (i, backend) in backends.iter().enumerate() {
                    let x = 10 + (LEGEND_ENTRY_WIDTH * i as u32) as i32;
                    legend.draw(&Rectangle::new([(x, 20), (x + 12, 32)], color(*backend).filled()))?;
                    legend.draw(&Text::new(backend.to_string(), (x + 16, 22), ("sans-serif", 12)))?;
                }
                root.present()?;
                Ok(())
            })();
            if let Err(e) = drawn {
                tracing::warn!("cannot draw the chart: {e}");
            }
        }
        svg
    }
}

fn human(n: f64) -> String {
    if n >= 1e6 {
        format!("{:.2}M", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.0}k", n / 1e3)
    } else {
        format!("{n:.0}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_workloads() {
        let w = |connections, pipeline, payload| Workload {
            connections,
            pipeline,
            payload,
            ..Default::default()
        };
        assert_eq!("16x16".parse(), Ok(w(16, 16, None)));
        let bytes = |n| Some(Payload::Bytes(n));
        assert_eq!("16x16@64k".parse(), Ok(w(16, 16, bytes(65536))));
        assert_eq!("1x1@1m".parse(), Ok(w(1, 1, bytes(1 << 20))));
        assert_eq!("4x2@1000".parse(), Ok(w(4, 2, bytes(1000))));
        assert_eq!("16x16@log1k".parse(), Ok(w(16, 16, Some(Payload::Shape(Shape::Log1k)))));
        assert_eq!("64x1@blob64k".parse(), Ok(w(64, 1, Some(Payload::Shape(Shape::Blob64k)))));
        assert!("16x16@log2k".parse::<Workload>().unwrap_err().contains("log1k, blob16k"));
        let tls = Workload { tls: true, ..w(16, 16, bytes(1024)) };
        assert_eq!("16x16@1k+tls".parse(), Ok(tls));
        let handshakes = Workload { tls: true, reconnect_after: Some(1), ..w(16, 1, None) };
        assert_eq!("16x1+tls/r1".parse(), Ok(handshakes));
        for text in ["16x16@1k+tls", "16x1+tls/r1", "4x1/r10", "1x1@1m"] {
            assert_eq!(text.parse::<Workload>().unwrap().to_string(), text);
        }
        assert!("16x1/r0".parse::<Workload>().is_err());
        assert!("16x1/rx".parse::<Workload>().is_err());
        for text in ["16x16", "16x16@64k", "1x1@1m", "4x2@1000", "16x16@log1k", "16x16@blob16k+tls"] {
            assert_eq!(text.parse::<Workload>().unwrap().to_string(), text);
        }
        assert!("16".parse::<Workload>().is_err());
        assert!("0x1".parse::<Workload>().is_err());
        assert!("16x16@10".parse::<Workload>().is_err(), "shorter than an echo request");
        assert!("16x16@lots".parse::<Workload>().is_err());
    }

    #[test]
    fn steal_is_summed_over_the_pinned_cpus_only() {
        let before = "cpu  10 0 10 100 0 0 0 50 0 0\n\
                      cpu0 1 0 1 80 0 0 0 10 0 0\n\
                      cpu1 2 0 2 70 0 0 0 20 0 0\n\
                      cpu10 100 0 0 0 0 0 0 100 0 0\n\
                      intr 12345\n";
        let after = "cpu  10 0 10 100 0 0 0 50 0 0\n\
                     cpu0 31 0 1 80 0 0 0 80 0 0\n\
                     cpu1 52 0 2 100 0 0 0 40 0 0\n\
                     cpu10 900 0 0 0 0 0 0 900 0 0\n";
        let (b, a) = (CpuTicks::parse(before, &[0, 1]), CpuTicks::parse(after, &[0, 1]));
        assert_eq!(b, CpuTicks { steal: 30, total: 186 });
        assert_eq!(a, CpuTicks { steal: 120, total: 386 });
        // 90 of the 200 ticks that passed were stolen.
        assert_eq!(b.steal_percent_until(a), 45.0);
        assert_eq!(CpuTicks::parse(before, &[5]), CpuTicks::default());
        assert_eq!(a.steal_percent_until(a), 0.0);
    }

    #[test]
    fn ratios_from_disturbed_rounds_count_only_when_no_round_was_clean() {
        assert_eq!(median_ratio(&[(1.5, true), (0.5, false), (1.25, true)]), (Some(1.375), 2));
        assert_eq!(median_ratio(&[(0.5, false), (0.9, false), (1.3, false)]), (Some(0.9), 3));
        assert_eq!(median_ratio(&[]), (None, 0));
    }

    #[test]
    fn the_chart_makes_room_for_its_title_and_every_backend_with_one_workload() {
        let contenders = [
            Contender::Backend(Backend::Uring),
            Contender::Backend(Backend::TokioUring),
            Contender::Backend(Backend::Epoll),
            Contender::Backend(Backend::EpollMt),
            Contender::EchoBaseline,
        ];
        let workload: Workload = "16x16".parse().unwrap();
        let comparison = Comparison {
            machine: "a host whose description is long, as /proc/cpuinfo's model names are".into(),
            measurements: Vec::new(),
            summary: contenders
                .iter()
                .map(|&backend| Summary {
                    backend,
                    workload,
                    requests_per_sec: 1e6,
                    p99_us: 100.0,
                    server_cpu_us_per_request: 1.0,
                    server_busy_percent: 100.0,
                    steal_percent: 0.0,
                    vs_epoll: None,
                    vs_epoll_rounds: 0,
                    vs_baseline: None,
                })
                .collect(),
        };
        let svg = comparison.svg();
        let width: u32 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|w| w.parse().ok())
            .expect("the chart's width");
        let title =
            format!("ringcall compare: median requests/s (higher is better) — {}", comparison.machine);
        assert!(
            width >= 8 * title.chars().count() as u32,
            "{width} px for a title of {} characters",
            title.len()
        );
        assert!(width >= 130 * contenders.len() as u32, "{width} px for {} legend entries", contenders.len());
        for contender in contenders {
            let name = contender.to_string();
            assert!(svg.lines().any(|line| line.trim() == name), "{name} missing from the legend:\n{svg}");
        }
    }

    #[test]
    fn median_of_even_and_odd_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}

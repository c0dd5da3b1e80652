//! The load generator behind `ringcall bench`, for any server speaking the ringcall protocol.
//!
//! Each load thread runs a tokio current-thread runtime driving its share of the
//! connections. A connection keeps `pipeline` requests in flight (closed loop), or, with a
//! target rate, sends on a fixed schedule whatever the replies do (open loop) and measures
//! latency from each request's *intended* send time, so a stalled server is not hidden by
//! the client waiting for it (coordinated omission, as wrk2 corrects it).
//!
//! Replies are not parsed as JSON: the generator finds line ends with memchr and reads the
//! code off the `{"code":N` prefix every ringcall reply starts with, so it costs far less
//! per request than the server it measures.

pub mod compare;
pub mod echo_baseline;
mod report;
mod uring_load;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use report::{BenchReport, Latency, OutputFormat};

use ringcall_sys as sys;

/// When a run stops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StopAfter {
    /// Measure for this long (after the warm-up).
    Duration(Duration),
    /// Measure exactly this many requests (after the warm-up).
    Count(u64),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchConfig {
    /// The servers: connection `i` goes to `addrs[i % addrs.len()]` (client-side balancing
    /// of connections), and replies are counted per server.
    pub addrs: Vec<SocketAddr>,
    /// Connections.
    pub connections: usize,
    /// Requests in flight per connection (closed loop).
    pub pipeline: usize,
    /// When to stop.
    pub stop: StopAfter,
    /// Unmeasured run before measuring.
    pub warmup: Duration,
    /// Target total rate in requests/s (open loop); `None` for closed loop.
    pub rate: Option<f64>,
    /// Request lines, each ending in `\n`, sent in turn.
    pub requests: Vec<Vec<u8>>,
    /// Load threads.
    pub threads: usize,
    /// CPUs to pin the load threads to (in turn), if any.
    pub cpus: Vec<usize>,
    /// Print a one-line live progress display (only done on a terminal).
    pub progress: bool,
    /// How connections are made: TLS, the token hello, reconnections.
    pub connect: ConnectOptions,
}

/// How the load's connections are made.
#[derive(Debug, Clone, Default)]
pub struct ConnectOptions {
    /// Speak TLS (the handshakes of the first connections are made before measuring).
    pub tls: Option<ringcall::ClientTls>,
    /// Present this token as each connection's first line (not measured).
    pub token: Option<ringcall::HelloToken>,
    /// Close each connection after this many requests and open a new one (closed loop): the
    /// rate of new connections (with TLS, of full handshakes) under load.
    pub requests_per_connection: Option<u64>,
    /// Ask each connection for notices (protocol cmdid 3), and when the server says it is
    /// closing one, send nothing more on it, take its replies, and go on over a new one: a
    /// load that runs across a server's graceful restart.
    pub notices: bool,
}

impl ConnectOptions {
    /// Whether connections are plain TCP, kept for the whole run: what the io_uring load
    /// engine drives (it presents a token itself).
    fn plain_and_persistent(&self) -> bool {
        self.tls.is_none() && self.requests_per_connection.is_none() && !self.notices
    }
}

/// Whether a reply line says the server is closing its connection: a notice line, or a reply
/// marked `"closing":true` (right after its code).
fn says_closing(line: &[u8]) -> bool {
    line.starts_with(b"{\"notice\"")
        || memchr::memmem::find(&line[..line.len().min(40)], b"\"closing\":true").is_some()
}

impl BenchConfig {
    /// The shortest request line [`echo_request_of`](Self::echo_request_of) makes.
    pub const MIN_ECHO_BYTES: usize = ECHO_HEAD.len() + ECHO_TAIL.len();

    /// The seed's echo request, the default load.
    pub fn echo_request() -> Vec<u8> {
        b"{\"cmdid\":10000,\"timestamp\":1437300000,\"params\":{\"content\":\"Hello world!\"}}\n".to_vec()
    }

    /// An echo request of the seed's shape whose line (with its `\n`) is exactly `bytes`
    /// long (at least [`MIN_ECHO_BYTES`](Self::MIN_ECHO_BYTES)): its content is padded.
    pub fn echo_request_of(bytes: usize) -> Vec<u8> {
        let pad = bytes.saturating_sub(Self::MIN_ECHO_BYTES);
        let mut line = Vec::with_capacity(bytes.max(Self::MIN_ECHO_BYTES));
        line.extend_from_slice(ECHO_HEAD);
        line.extend(std::iter::repeat_n(b'x', pad));
        line.extend_from_slice(ECHO_TAIL);
        line
    }
}

const ECHO_HEAD: &[u8] = b"{\"cmdid\":10000,\"timestamp\":1437300000,\"params\":{\"content\":\"";
const ECHO_TAIL: &[u8] = b"\"}}\n";

/// Why a run could not be done.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Not a single connection could be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The server.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration cannot work.
    #[error("invalid bench configuration: {0}")]
    Config(String),
    /// A load thread could not start.
    #[error("cannot start a load thread: {0}")]
    Thread(std::io::Error),
}

const WARMUP: u8 = 0;
const MEASURE: u8 = 1;
const STOP: u8 = 2;

/// Whether the run is measuring now: bytes moved during the warm-up are not counted, like
/// its requests.
fn measuring(shared: &Shared) -> bool {
    shared.phase.load(Ordering::Relaxed) == MEASURE
}

/// Codes below this are counted in an array; others under "other".
const CODE_SLOTS: usize = 1000;
/// Open loop: requests allowed in flight on one connection before sending pauses.
const OPEN_LOOP_MAX_IN_FLIGHT: usize = 100_000;
/// How long to wait for replies still in flight when a timed run ends.
const DRAIN_WAIT: Duration = Duration::from_secs(5);

/// State shared by every load thread.
struct Shared {
    phase: AtomicU8,
    /// Count mode: measured requests handed out so far.
    tickets: AtomicU64,
    /// Measured replies so far (for progress and count mode).
    completed: AtomicU64,
}

/// One load thread's results.
struct ThreadResult {
    latency: Histogram<u64>,
    codes: Vec<u64>,
    other_codes: u64,
    invalid_replies: u64,
    errors: u64,
    unanswered: Unanswered,
    bytes_sent: u64,
    bytes_received: u64,
    /// Measured replies from each server (indexed like `BenchConfig::addrs`).
    per_endpoint: Vec<u64>,
    /// Connections opened while measuring (with `requests_per_connection`).
    connects: u64,
}

/// Requests sent on a connection that ended before their replies came, by how it ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Unanswered {
    /// The server closed the connection (end of file).
    pub closed: u64,
    /// The connection was reset (ECONNRESET, EPIPE, ECONNABORTED).
    pub reset: u64,
    /// No reply came within the drain wait after the run ended.
    pub timed_out: u64,
    /// Another I/O error (e.g. ETIMEDOUT: the peer host stopped answering).
    pub other: u64,
}

impl Unanswered {
    /// Every request sent and never answered.
    pub fn total(&self) -> u64 {
        self.closed + self.reset + self.timed_out + self.other
    }

    fn merge(&mut self, other: &Unanswered) {
        self.closed += other.closed;
        self.reset += other.reset;
        self.timed_out += other.timed_out;
        self.other += other.other;
    }
}

/// How a connection of the load ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Closed,
    Reset,
    TimedOut,
    Other,
}

impl Ended {
    fn from_errno(errno: i32) -> Self {
        match errno {
            libc::ECONNRESET | libc::EPIPE | libc::ECONNABORTED => Ended::Reset,
            _ => Ended::Other,
        }
    }

    fn from_io(err: &std::io::Error) -> Self {
        err.raw_os_error().map_or(Ended::Other, Ended::from_errno)
    }
}

impl ThreadResult {
    /// A connection ended with `in_flight` requests unanswered; counted once per connection
    /// in `errors` (a drain that timed out is not a connection error).
    fn connection_ended(&mut self, how: Ended, in_flight: usize) {
        let n = in_flight as u64;
        match how {
            Ended::Closed => self.unanswered.closed += n,
            Ended::Reset => self.unanswered.reset += n,
            Ended::TimedOut => self.unanswered.timed_out += n,
            Ended::Other => self.unanswered.other += n,
        }
        if how != Ended::TimedOut {
            self.errors += 1;
        }
    }

    fn new() -> Self {
        Self {
            latency: Histogram::new_with_bounds(1, 3_600_000_000_000, 3).expect("valid histogram bounds"),
            codes: vec![0; CODE_SLOTS],
            other_codes: 0,
            invalid_replies: 0,
            errors: 0,
            unanswered: Unanswered::default(),
            bytes_sent: 0,
            bytes_received: 0,
            per_endpoint: Vec::new(),
            connects: 0,
        }
    }

    fn merge(&mut self, other: &ThreadResult) {
        let _ = self.latency.add(&other.latency);
        for (a, b) in self.codes.iter_mut().zip(&other.codes) {
            *a += b;
        }
        self.other_codes += other.other_codes;
        self.invalid_replies += other.invalid_replies;
        self.errors += other.errors;
        self.unanswered.merge(&other.unanswered);
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.connects += other.connects;
        if self.per_endpoint.len() < other.per_endpoint.len() {
            self.per_endpoint.resize(other.per_endpoint.len(), 0);
        }
        for (a, b) in self.per_endpoint.iter_mut().zip(&other.per_endpoint) {
            *a += b;
        }
    }
}

/// Runs the load and reports.
///
/// # Errors
/// Bad configuration, or no connection could be made.
pub fn run(config: &BenchConfig) -> Result<BenchReport, BenchError> {
    if config.connections == 0 || config.pipeline == 0 || config.requests.is_empty() {
        return Err(BenchError::Config(
            "need at least one connection, one request in flight and one request".into(),
        ));
    }
    if config.rate.is_some() && config.connect.requests_per_connection.is_some() {
        return Err(BenchError::Config(
            "reconnecting after a number of requests works with the closed loop only (no rate)".into(),
        ));
    }
    if config.connect.requests_per_connection == Some(0) {
        return Err(BenchError::Config("a connection must carry at least one request".into()));
    }
    if config.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(BenchError::Config("the rate must be a positive number of requests/s".into()));
    }
    let _ = sys::raise_nofile_limit();
    // Fail fast with a clear error when the server is not there at all.
    if config.addrs.is_empty() {
        return Err(BenchError::Config("need at least one server address".into()));
    }
    for &addr in &config.addrs {
        std::net::TcpStream::connect(addr).map_err(|source| BenchError::Connect { addr, source })?;
    }

    let threads = config.threads.clamp(1, config.connections);
    let shared = Arc::new(Shared {
        phase: AtomicU8::new(if config.warmup.is_zero() { MEASURE } else { WARMUP }),
        tickets: AtomicU64::new(0),
        completed: AtomicU64::new(0),
    });
    let connected = Arc::new(std::sync::Barrier::new(threads + 1));
    let mut workers = Vec::with_capacity(threads);
    for t in 0..threads {
        let connections = (t..config.connections).step_by(threads).collect::<Vec<_>>();
        let (config, shared, connected) = (config.clone(), shared.clone(), connected.clone());
        let cpu = (!config.cpus.is_empty()).then(|| config.cpus[t % config.cpus.len()]);
        let worker = std::thread::Builder::new()
            .name(format!("ringcall-bench-{t}"))
            .spawn(move || {
                if let Some(cpu) = cpu {
                    let _ = sys::pin_to_cpu(cpu);
                }
                load_thread(&config, &shared, &connected, &connections)
            })
            .map_err(BenchError::Thread)?;
        workers.push(worker);
    }
    connected.wait();

    let progress = config.progress.then(|| report::Progress::start(shared.clone()));
    if !config.warmup.is_zero() {
        std::thread::sleep(config.warmup);
        shared.phase.store(MEASURE, Ordering::Release);
    }
    let started = Instant::now();
    let mut ended_early = None;
    if let StopAfter::Duration(d) = config.stop {
        // Every connection may be gone before the time is up (the server went away): then
        // there is nothing left to measure.
        while started.elapsed() < d {
            if workers.iter().all(|w| w.is_finished()) {
                ended_early = Some(started.elapsed());
                break;
            }
            std::thread::sleep((d - started.elapsed().min(d)).min(Duration::from_millis(50)));
        }
        shared.phase.store(STOP, Ordering::Release);
    }
    let mut total = ThreadResult::new();
    let mut measured_end = None;
    for worker in workers {
        let result = worker.join().expect("load thread panicked");
        total.merge(&result.0);
        measured_end = measured_end.max(Some(result.1));
    }
    let elapsed = match config.stop {
        StopAfter::Duration(d) => ended_early.unwrap_or(d),
        StopAfter::Count(_) => {
            measured_end.map_or(Duration::ZERO, |end| end.saturating_duration_since(started))
        }
    };
    drop(progress);
    Ok(BenchReport::new(config, total, elapsed))
}

/// Runs this thread's connections; returns its results and when its last measured reply came.
/// The closed loop runs on io_uring where it works, else (and for the open loop) on tokio.
fn load_thread(
    config: &BenchConfig,
    shared: &Arc<Shared>,
    connected: &std::sync::Barrier,
    connections: &[usize],
) -> (ThreadResult, Instant) {
    let mut result = ThreadResult::new();
    let mut streams = Vec::with_capacity(connections.len());
    for &index in connections {
        match std::net::TcpStream::connect(config.addrs[index % config.addrs.len()]) {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                streams.push((index, stream));
            }
            Err(_) => result.errors += 1,
        }
    }
    if let Some(token) = &config.connect.token
        && config.connect.tls.is_none()
    {
        // Over plain TCP the hello is said here, before either engine takes the streams.
        streams.retain(|(_, stream)| {
            let greeted = hello_blocking(stream, token);
            if let Err(e) = &greeted {
                tracing::warn!("token hello failed: {e}");
                result.errors += 1;
            }
            greeted.is_ok()
        });
    }
    if config.rate.is_none()
        && config.connect.plain_and_persistent()
        && let Ok(ring) = uring_load::UringLoad::setup()
    {
        let load = uring_load::UringLoad::new(ring, streams, config);
        connected.wait();
        let last = load.run(config, shared, &mut result).unwrap_or_else(|e| {
            tracing::warn!("load thread stopped: {e}");
            None
        });
        return (result, last.unwrap_or_else(Instant::now));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime for the load");
    runtime.block_on(async {
        let dialer = std::rc::Rc::new(Dialer::new(&config.connect));
        let mut tokio_streams = Vec::with_capacity(streams.len());
        for (index, stream) in streams {
            let registered = stream.set_nonblocking(true).and_then(|()| TcpStream::from_std(stream));
            let upgraded = match registered {
                Ok(stream) => dialer.upgrade(stream).await,
                Err(e) => Err(e),
            };
            match upgraded {
                Ok(stream) => tokio_streams.push((index, stream)),
                Err(e) => {
                    tracing::warn!("cannot set up a load connection: {e}");
                    result.errors += 1;
                }
            }
        }
        connected.wait();
        let local = tokio::task::LocalSet::new();
        let tasks: Vec<_> = tokio_streams
            .into_iter()
            .map(|(index, stream)| {
                local.spawn_local(connection(stream, index, config.clone(), shared.clone(), dialer.clone()))
            })
            .collect();
        local.await;
        let mut last = Instant::now();
        for task in tasks {
            if let Ok((conn_result, conn_last)) = task.await {
                result.merge(&conn_result);
                last = conn_last.unwrap_or(last).max(last);
            }
        }
        (result, last)
    })
}

/// A load connection on the tokio engine: plain TCP or TLS.
trait LoadIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> LoadIo for T {}

/// Opens load connections as [`ConnectOptions`] say.
struct Dialer {
    tls: Option<(tokio_rustls::TlsConnector, ringcall::rustls::pki_types::ServerName<'static>)>,
    token: Option<ringcall::HelloToken>,
    notices: bool,
}

impl Dialer {
    fn new(options: &ConnectOptions) -> Self {
        Self {
            tls: options
                .tls
                .as_ref()
                .map(|tls| (tokio_rustls::TlsConnector::from(tls.config()), tls.server_name().clone())),
            token: options.token.clone(),
            notices: options.notices,
        }
    }

    /// A new connection to `addr`, ready for requests.
    async fn dial(&self, addr: SocketAddr) -> std::io::Result<Box<dyn LoadIo>> {
        self.upgrade(TcpStream::connect(addr).await?).await
    }

    /// Makes `stream` ready for requests: its TLS handshake, then (with TLS; a plain one is
    /// greeted before) its token hello, then with notices the request for them.
    async fn upgrade(&self, stream: TcpStream) -> std::io::Result<Box<dyn LoadIo>> {
        stream.set_nodelay(true)?;
        let mut stream: Box<dyn LoadIo> = match &self.tls {
            None => Box::new(stream),
            Some((connector, name)) => {
                let mut stream = connector.connect(name.clone(), stream).await?;
                if let Some(token) = &self.token {
                    let reply = exchange(&mut stream, &token.hello_line(0)).await?;
                    check_hello_reply(&reply)?;
                }
                Box::new(stream)
            }
        };
        if self.notices {
            // A server from before notices answers 404: the load runs all the same.
            exchange(&mut stream, b"{\"cmdid\":3,\"params\":{\"notices\":true}}\n").await?;
        }
        Ok(stream)
    }
}

/// Writes `line` on a connection with nothing else in flight and reads its reply line.
async fn exchange(
    stream: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
    line: &[u8],
) -> std::io::Result<Vec<u8>> {
    stream.write_all(line).await?;
    stream.flush().await?;
    let mut reply = Vec::new();
    let mut byte = [0u8; 256];
    while !reply.contains(&b'\n') {
        let n = stream.read(&mut byte).await?;
        if n == 0 {
            return Err(std::io::Error::other("closed before answering"));
        }
        reply.extend_from_slice(&byte[..n]);
    }
    Ok(reply)
}

/// Presents `token` on a plain stream, before the load starts, and checks the reply.
fn hello_blocking(stream: &std::net::TcpStream, token: &ringcall::HelloToken) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let mut stream = stream;
    stream.write_all(&token.hello_line(0))?;
    // Nothing else is in flight: the reply is all that can arrive.
    let mut reply = Vec::new();
    let mut chunk = [0u8; 256];
    while !reply.contains(&b'\n') {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::other("closed before answering the token hello"));
        }
        reply.extend_from_slice(&chunk[..n]);
    }
    check_hello_reply(&reply)
}

fn check_hello_reply(reply: &[u8]) -> std::io::Result<()> {
    match reply_code(reply) {
        Some(0) => Ok(()),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("the server refused the token hello: {}", String::from_utf8_lossy(reply).trim_end()),
        )),
    }
}

/// Drives one connection (and, with `requests_per_connection`, the ones that follow it);
/// returns its results and when its last measured reply arrived.
async fn connection(
    mut stream: Box<dyn LoadIo>,
    index: usize,
    config: BenchConfig,
    shared: Arc<Shared>,
    dialer: std::rc::Rc<Dialer>,
) -> (ThreadResult, Option<Instant>) {
    let mut result = ThreadResult::new();
    let mut last_measured = None;
    // (send time — or intended send time in open loop —, measured?) per request in flight.
    let mut flight = Flight::new(index, &config);
    let mut out = Vec::with_capacity(4096);
    let mut buf = vec![0u8; 64 * 1024];
    let mut filled = 0;
    let interval = config.rate.map(|r| Duration::from_secs_f64(config.connections as f64 / r));
    // Spread the connections' schedules over one interval.
    let mut next_due = Instant::now()
        + interval.map_or(Duration::ZERO, |i| i.mul_f64(index as f64 / config.connections as f64));
    let mut stop_at: Option<Instant> = None;
    let addr = config.addrs[index % config.addrs.len()];
    // Requests this connection may still carry before it is replaced by a new one.
    let per_connection = config.connect.requests_per_connection;
    let mut budget = per_connection.unwrap_or(u64::MAX);
    // The server said it is closing this connection: nothing new goes on it.
    let mut closing = false;

    if interval.is_none() {
        let now = Instant::now();
        flight.issue_up_to(config.pipeline, &mut budget, &config, &shared, &mut out, now);
    }
    loop {
        if !out.is_empty() {
            if let Err(e) = stream.write_all(&out).await {
                result.connection_ended(Ended::from_io(&e), flight.len());
                break;
            }
            if measuring(&shared) {
                result.bytes_sent += out.len() as u64;
            }
            out.clear();
        }
        let stopped = Flight::stopping(&config, &shared);
        if stopped && flight.is_empty() {
            break;
        }
        if stopped && stop_at.is_none() {
            stop_at = Some(Instant::now() + DRAIN_WAIT);
        }
        let read = if let (Some(interval), false) = (interval, stopped) {
            tokio::select! {
                read = stream.read(&mut buf[filled..]) => Some(read),
                _ = tokio::time::sleep_until(next_due.into()), if flight.len() < OPEN_LOOP_MAX_IN_FLIGHT => {
                    let now = Instant::now();
                    while next_due <= now {
                        if !flight.issue(&config, &shared, &mut out, next_due) {
                            break;
                        }
                        next_due += interval;
                    }
                    None
                }
            }
        } else if let Some(deadline) = stop_at {
            match tokio::time::timeout_at(deadline.into(), stream.read(&mut buf[filled..])).await {
                Ok(read) => Some(read),
                Err(_) => {
                    result.connection_ended(Ended::TimedOut, flight.len());
                    break;
                }
            }
        } else {
            Some(stream.read(&mut buf[filled..]).await)
        };
        let Some(read) = read else { continue };
        let n = match read {
            Ok(0) => {
                result.connection_ended(Ended::Closed, flight.len());
                break;
            }
            Err(e) => {
                result.connection_ended(Ended::from_io(&e), flight.len());
                break;
            }
            Ok(n) => n,
        };
        if measuring(&shared) {
            result.bytes_received += n as u64;
        }
        filled += n;
        let now = Instant::now();
        let mut start = 0;
        let mut replies = 0u64;
        let mut measured = 0u64;
        while let Some(nl) = memchr::memchr(b'\n', &buf[start..filled]) {
            let line = &buf[start..start + nl];
            start += nl + 1;
            if config.connect.notices && says_closing(line) {
                closing = true;
                if line.starts_with(b"{\"notice\"") {
                    continue;
                }
            }
            match flight.reply(&mut result, line, now) {
                Reply::Measured => {
                    replies += 1;
                    measured += 1;
                }
                Reply::Unmeasured => replies += 1,
                Reply::Unexpected => {}
            }
        }
        if measured > 0 {
            shared.completed.fetch_add(measured, Ordering::Relaxed);
            last_measured = Some(now);
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if filled == buf.len() {
            // A reply longer than the buffer: grow it.
            buf.resize(buf.len() * 2, 0);
        }
        if interval.is_none() && !closing {
            flight.issue_up_to(replies as usize, &mut budget, &config, &shared, &mut out, now);
        }
        if (closing || (per_connection.is_some() && budget == 0))
            && flight.is_empty()
            && !Flight::stopping(&config, &shared)
        {
            // This connection carried its share: close it (close_notify with TLS) and carry
            // on over a new one.
            let _ = stream.shutdown().await;
            match dialer.dial(addr).await {
                Ok(new) => stream = new,
                Err(e) => {
                    result.connection_ended(Ended::from_io(&e), 0);
                    break;
                }
            }
            if shared.phase.load(Ordering::Acquire) == MEASURE {
                result.connects += 1;
            }
            filled = 0;
            budget = per_connection.unwrap_or(u64::MAX);
            closing = false;
            let now = Instant::now();
            flight.issue_up_to(config.pipeline, &mut budget, &config, &shared, &mut out, now);
        }
    }
    (result, last_measured)
}

/// What a reply line answered.
enum Reply {
    /// A request sent while measuring.
    Measured,
    /// A warm-up request.
    Unmeasured,
    /// Nothing was in flight: not a reply to us.
    Unexpected,
}

/// One connection's requests in flight, oldest first, and which request line goes next. The
/// closed- and open-loop drivers and the io_uring driver all issue and match through it.
struct Flight {
    /// (send time — or intended send time in open loop —, measured?) per request in flight.
    in_flight: VecDeque<(Instant, bool)>,
    next_request: usize,
    request_count: usize,
    /// Which of `BenchConfig::addrs` the connection goes to.
    endpoint: usize,
}

impl Flight {
    fn new(index: usize, config: &BenchConfig) -> Self {
        let request_count = config.requests.len();
        Self {
            in_flight: VecDeque::new(),
            next_request: index % request_count,
            request_count,
            endpoint: index % config.addrs.len().max(1),
        }
    }

    fn len(&self) -> usize {
        self.in_flight.len()
    }

    fn is_empty(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Appends the next request to `out` unless the run is stopping (or, counting, every
    /// measured request is handed out); `at` is its (intended) send time.
    fn issue(&mut self, config: &BenchConfig, shared: &Shared, out: &mut Vec<u8>, at: Instant) -> bool {
        let phase = shared.phase.load(Ordering::Acquire);
        if phase == STOP {
            return false;
        }
        let measured = phase == MEASURE;
        if measured
            && let StopAfter::Count(n) = config.stop
            && shared.tickets.fetch_add(1, Ordering::Relaxed) >= n
        {
            return false;
        }
        out.extend_from_slice(&config.requests[self.next_request]);
        self.next_request = (self.next_request + 1) % self.request_count;
        self.in_flight.push_back((at, measured));
        true
    }

    /// Issues up to `n` requests, and no more than `budget` (which it counts down).
    fn issue_up_to(
        &mut self,
        n: usize,
        budget: &mut u64,
        config: &BenchConfig,
        shared: &Shared,
        out: &mut Vec<u8>,
        now: Instant,
    ) {
        for _ in 0..n {
            if *budget == 0 || !self.issue(config, shared, out, now) {
                break;
            }
            *budget -= 1;
        }
    }

    /// Matches a reply line (without `\n`) received at `now` to the oldest request.
    fn reply(&mut self, result: &mut ThreadResult, line: &[u8], now: Instant) -> Reply {
        let Some((sent, measured)) = self.in_flight.pop_front() else {
            result.invalid_replies += 1;
            return Reply::Unexpected;
        };
        if !measured {
            return Reply::Unmeasured;
        }
        let _ = result.latency.record(now.saturating_duration_since(sent).as_nanos().max(1) as u64);
        if result.per_endpoint.len() <= self.endpoint {
            result.per_endpoint.resize(self.endpoint + 1, 0);
        }
        result.per_endpoint[self.endpoint] += 1;
        match reply_code(line) {
            Some(code) if (code as usize) < CODE_SLOTS => result.codes[code as usize] += 1,
            Some(_) => result.other_codes += 1,
            None => result.invalid_replies += 1,
        }
        Reply::Measured
    }

    /// Whether this run stops issuing: stopped, or every counted request handed out.
    fn stopping(config: &BenchConfig, shared: &Shared) -> bool {
        shared.phase.load(Ordering::Acquire) == STOP
            || matches!(config.stop, StopAfter::Count(n) if shared.tickets.load(Ordering::Relaxed) >= n)
    }
}

/// The code of a reply line (`{"code":N,…`), if it has that shape.
fn reply_code(line: &[u8]) -> Option<u16> {
    let digits = line.strip_prefix(b"{\"code\":")?;
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::{BenchConfig, reply_code};

    #[test]
    fn sized_echo_requests_are_exactly_that_long_and_valid_requests() {
        for bytes in [BenchConfig::MIN_ECHO_BYTES, 80, 1024, 65536, 1 << 20] {
            let line = BenchConfig::echo_request_of(bytes);
            assert_eq!(line.len(), bytes);
            assert_eq!(line.last(), Some(&b'\n'));
            let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(value["cmdid"], 10000);
            assert!(value["params"]["content"].is_string());
        }
    }

    #[test]
    fn reads_the_code_prefix() {
        assert_eq!(reply_code(b"{\"code\":0,\"data\":1}"), Some(0));
        assert_eq!(reply_code(b"{\"code\":404,\"error\":\"x\"}"), Some(404));
        assert_eq!(reply_code(b"garbage"), None);
    }
}

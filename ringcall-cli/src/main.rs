//! The `ringcall` command: `serve` runs the shipped server (built-ins plus echo), `call`
//! sends requests, `bench` loads any ringcall server, `compare` runs every backend.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ringcall::client::{Call, Client};
use ringcall::simd_json::prelude::Writable;
use ringcall::{Backend, DEFAULT_MAX_LINE, ServerConfig, handlers};
use ringcall_sys as sys;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

ringcall::routes! {
    /// The shipped server's own commands (ping and stats are built into every server).
    ShippedRoutes {
        10000 => handlers::echo,
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "ringcall",
    version,
    about = "Newline-delimited JSON RPC over persistent TCP, one io_uring ring per core"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server: ping (0), stats (1) and echo (10000).
    Serve(ServeArgs),
    /// Send one request and print the reply; with `-` as CMDID, send each NDJSON request line
    /// read from stdin and print one reply line per request.
    Call(CallArgs),
    /// Load-test any ringcall-protocol server.
    Bench(BenchArgs),
    /// Start the server once per backend and run the same workloads against each.
    Compare(CompareArgs),
    /// A bare io_uring echo loop (no framing, no JSON) on the `uring` backend's machinery:
    /// the transport's ceiling, which `compare --baseline` measures the backends against.
    EchoBaseline(EchoBaselineArgs),
    /// Watch a running server: its counters as rates, refreshed every interval.
    Top(TopArgs),
}

#[derive(clap::Args, Debug)]
struct TopArgs {
    /// Server address, HOST:PORT.
    #[arg(long, default_value = ringcall::DEFAULT_ADDR)]
    addr: String,
    /// Seconds between readings.
    #[arg(short = 'i', long, default_value_t = 1.0, allow_hyphen_values = true, value_parser = positive_seconds)]
    interval: f64,
    /// Screens to show, then exit (default: until interrupted).
    #[arg(short = 'n', long)]
    count: Option<u64>,
}

#[derive(clap::Args, Debug)]
struct CallArgs {
    /// Server address; several, comma-separated, make a client pool (the call goes to one of
    /// them, and to another if the first cannot be reached).
    #[arg(long, default_value = ringcall::DEFAULT_ADDR)]
    addr: String,
    /// Seconds to wait for the connection and each reply.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    #[command(flatten)]
    access: ClientAccessArgs,
    /// The command id, or `-` to read request lines from stdin.
    cmdid: String,
    /// The params, as a JSON object.
    params: Option<String>,
}

/// How a client is let in: TLS, a client certificate, the token hello.
#[derive(clap::Args, Debug)]
struct ClientAccessArgs {
    /// Speak TLS, trusting the CA certificates in this file (PEM).
    #[arg(long)]
    tls_ca: Option<std::path::PathBuf>,
    /// The name the servers' certificates must carry (default: the host of --addr, the
    /// first one's with several).
    #[arg(long, requires = "tls_ca")]
    tls_name: Option<String>,
    /// Mutual TLS: this client certificate (PEM); needs --tls-key.
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Present the token in this file first (servers started with --token-file).
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
}

impl ClientAccessArgs {
    /// The TLS settings for servers at `addrs` (comma-separated), if TLS is asked for.
    fn tls(&self, addrs: &str) -> anyhow::Result<Option<ringcall::ClientTls>> {
        let Some(ca) = &self.tls_ca else { return Ok(None) };
        let first = addrs.split(',').next().unwrap_or_default().trim();
        let host = first.rsplit_once(':').map_or(first, |(h, _)| h).trim_matches(['[', ']']);
        let name = self.tls_name.as_deref().unwrap_or(host);
        let identity = self.tls_cert.as_deref().zip(self.tls_key.as_deref());
        Ok(Some(ringcall::ClientTls::from_pem_files(ca, name, identity)?))
    }

    fn token(&self) -> anyhow::Result<Option<ringcall::HelloToken>> {
        Ok(self.token_file.as_deref().map(ringcall::HelloToken::from_file).transpose()?)
    }
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Server address, HOST:PORT (an IP address or a host name); several, comma-separated,
    /// spread the connections over them and report each one's share.
    #[arg(long, default_value = ringcall::DEFAULT_ADDR)]
    addr: String,
    /// Connections.
    #[arg(short = 'c', long, default_value_t = 16)]
    connections: usize,
    /// Requests in flight per connection (closed loop).
    #[arg(short = 'P', long, default_value_t = 1)]
    pipeline: usize,
    /// Seconds to measure (default 10 unless -n is given).
    #[arg(short = 'd', long, conflicts_with = "count")]
    duration: Option<f64>,
    /// Requests to measure, instead of a duration.
    #[arg(short = 'n', long)]
    count: Option<u64>,
    /// Seconds of unmeasured warm-up.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Target total rate in requests/s: open loop, latency corrected for coordinated omission.
    #[arg(short = 'R', long)]
    rate: Option<f64>,
    /// Command id of the request (ignored with --requests).
    #[arg(long, default_value_t = 10000)]
    cmdid: u32,
    /// Params of the request, a JSON object (default: the tornado-TCP seed's echo params).
    #[arg(long)]
    params: Option<String>,
    /// A file of NDJSON request lines, sent in turn.
    #[arg(long, conflicts_with_all = ["cmdid", "params"])]
    requests: Option<std::path::PathBuf>,
    /// Echo requests of this many bytes each (`1024`, `64k`, `1m`; replies are about as
    /// long) instead of the seed's 80-byte one.
    #[arg(long, conflicts_with_all = ["cmdid", "params", "requests"], value_parser = payload_size)]
    payload_bytes: Option<usize>,
    /// Requests shaped as callers really send them: `log1k` (a 1 KiB log record as Python's
    /// json.dumps writes it: nested, numbers, \uXXXX escapes), `blob16k`, `blob64k` (base64
    /// images with a few fields), `seed` (the tornado-TCP echo); see docs/benchmarks.md.
    #[arg(long, conflicts_with_all = ["cmdid", "params", "requests", "payload_bytes"], value_parser = shape_name)]
    shape: Option<ringcall_cli::bench::compare::Shape>,
    /// Load threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// CPUs to pin the load threads to, e.g. `1` or `2,3`.
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Output format.
    #[arg(long, default_value = "text")]
    output: ringcall_cli::bench::OutputFormat,
    /// Close each connection after this many requests and open a new one (closed loop
    /// only): measures new connections per second, with TLS full handshakes per second.
    #[arg(long, conflicts_with = "rate")]
    reconnect_after: Option<u64>,
    /// Ask each connection for notices, and when a server says it is closing one (a
    /// graceful restart, a connection's age), finish its requests in flight and go on over a
    /// new one: a load that runs across deploys without counting them as errors (closed
    /// loop; drives connections with tokio rather than the io_uring load engine).
    #[arg(long, conflicts_with = "rate")]
    notices: bool,
    #[command(flatten)]
    access: ClientAccessArgs,
}

#[derive(clap::Args, Debug)]
struct EchoBaselineArgs {
    /// Listen address (port 0: any free port); printed on stdout once listening.
    #[arg(long, default_value = ringcall::DEFAULT_ADDR)]
    addr: String,
    /// Threads, one ring each (0: one per CPU allowed).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Do not pin the threads to CPUs.
    #[arg(long)]
    no_pin: bool,
}

#[derive(clap::Args, Debug)]
struct CompareArgs {
    /// Also measure the bare io_uring echo loop (`ringcall echo-baseline`) on the plain
    /// workloads: the transport's ceiling, with each backend's ratio to it.
    #[arg(long)]
    baseline: bool,
    /// Backends to compare.
    #[arg(long, value_delimiter = ',', default_value = "uring,tokio-uring,epoll,epoll-mt")]
    backends: Vec<Backend>,
    /// Workloads, CONNECTIONSxINFLIGHT[@BYTES|@SHAPE][+tls][/rN] (e.g. `16x16@64k`: echo
    /// requests of 64 KiB; `16x16@log1k`: 1 KiB log records as Python sends them, also
    /// `@blob16k`, `@blob64k`, `@seed`; `16x16+tls`: over TLS; `16x1+tls/r1`: a new TLS
    /// connection per request).
    #[arg(long, value_delimiter = ',', default_value = ringcall_cli::bench::compare::DEFAULT_WORKLOADS)]
    workloads: Vec<ringcall_cli::bench::compare::Workload>,
    /// Interleaved rounds; the table shows medians.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds measured per run.
    #[arg(short = 'd', long, default_value_t = 3.0)]
    duration: f64,
    /// Seconds of warm-up per run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// CPUs for the servers (one worker each).
    #[arg(long, value_delimiter = ',', default_value = "0")]
    server_cpus: Vec<usize>,
    /// CPUs for the load (one load thread each).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    client_cpus: Vec<usize>,
    /// A run whose CPUs lose more than this share of their time to the hypervisor (steal,
    /// on a VM) is disturbed: it is repeated, and left out of the ratios to epoll.
    #[arg(long, default_value_t = 5.0)]
    max_steal: f64,
    /// How many times a disturbed run is repeated (keeping the least disturbed attempt).
    #[arg(long, default_value_t = 3)]
    retries: usize,
    /// Write every run and the medians as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Write an SVG bar chart of the medians here.
    #[arg(long)]
    svg: Option<std::path::PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on, HOST:PORT (an IP address or a host name; loopback by default).
    #[arg(long, default_value = ringcall::DEFAULT_ADDR)]
    addr: String,
    /// Worker threads, one per core (default: every CPU this process may use).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true, value_parser = whole_number)]
    threads: usize,
    /// Longest request line in bytes; longer lines get a 413 reply and the connection closes.
    #[arg(long, default_value_t = DEFAULT_MAX_LINE, allow_hyphen_values = true, value_parser = at_least_one)]
    max_line: usize,
    /// Connections one core serves at once; beyond it a new connection gets a 503 reply line
    /// and is closed.
    #[arg(
        long,
        default_value_t = ringcall::DEFAULT_MAX_CONNECTIONS_PER_CORE,
        allow_hyphen_values = true,
        value_parser = at_least_one
    )]
    max_connections_per_core: usize,
    /// Unsent reply bytes per connection before the server stops reading from that peer
    /// (backpressure); reading resumes when half has drained.
    #[arg(
        long,
        default_value_t = ringcall::DEFAULT_MAX_PENDING_OUTPUT,
        allow_hyphen_values = true,
        value_parser = at_least_one
    )]
    max_pending_output: usize,
    /// Seconds a connection may stay silent before it is closed (default: never).
    #[arg(long, allow_hyphen_values = true, value_parser = positive_seconds)]
    idle_timeout: Option<f64>,
    /// Seconds a peer may take to finish a line it started (slowloris defence), or to close
    /// after the server half-closed.
    #[arg(
        long,
        default_value_t = ringcall::DEFAULT_LINE_TIMEOUT.as_secs_f64(),
        allow_hyphen_values = true,
        value_parser = positive_seconds
    )]
    line_timeout: f64,
    /// Seconds a connection has to finish its TLS handshake and its token hello (on a TLS
    /// port, or with --token-file); a peer that does not is closed, so that half-open
    /// handshakes cannot hold connection slots.
    #[arg(
        long,
        default_value_t = ringcall::DEFAULT_HELLO_TIMEOUT.as_secs_f64(),
        allow_hyphen_values = true,
        value_parser = positive_seconds
    )]
    hello_timeout: f64,
    /// Seconds a connection keeps being served after the server told it that it is closing
    /// it (at shutdown): replies say `"closing":true`, clients that asked for notices get a
    /// notice line, and FIN follows once the grace is over (or the client closed first).
    /// Give clients that act on the notice time to move their calls: 1 for rolling deploys.
    #[arg(long, default_value_t = 0.0, allow_hyphen_values = true, value_parser = seconds)]
    drain_grace: f64,
    /// Seconds after which a connection is drained and closed like at a shutdown (less up to
    /// a tenth, at random), so persistent connections are recycled and rebalance onto new or
    /// restarted servers. Give clients notices and a --drain-grace too.
    #[arg(long, allow_hyphen_values = true, value_parser = positive_seconds)]
    max_connection_age: Option<f64>,
    /// Share --addr with another `ringcall serve` of this user (SO_REUSEPORT): for a
    /// hand-over, start the new server with it while the old one serves, then stop the old
    /// one with SIGTERM (docs/operations.md). Without it, start-up fails while another
    /// process listens on the port.
    #[arg(long)]
    share_port: bool,
    /// Print a one-line stats summary every this many seconds (it is logged at debug level
    /// every 10 s otherwise).
    #[arg(long, allow_hyphen_values = true, value_parser = positive_seconds)]
    stats_interval: Option<f64>,
    /// I/O backend.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Seconds a graceful shutdown (SIGINT/SIGTERM) waits for connections to drain.
    #[arg(long, default_value_t = 10.0, allow_hyphen_values = true, value_parser = seconds)]
    shutdown_timeout: f64,
    /// Do not pin worker threads to CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Also write the address the server listens on (with the real port when 0 was asked
    /// for) to this file once it is serving; it is always printed to stdout.
    #[arg(long)]
    addr_file: Option<std::path::PathBuf>,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (off unless given).
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Log (warn) every request whose handler takes this many milliseconds or more, with
    /// its cmdid, code, core and peer (off unless given).
    #[arg(long, allow_hyphen_values = true, value_parser = positive_millis)]
    slow_ms: Option<f64>,
    /// Serve TLS with this certificate chain (PEM, leaf first); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Mutual TLS: require a client certificate signed by a CA in this file (PEM); the
    /// client's identity is the first DNS name of its certificate.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<std::path::PathBuf>,
    /// Access policy (TOML: which client identity may call which cmdids; see
    /// docs/operations.md); needs --tls-client-ca.
    #[arg(long, requires = "tls_client_ca")]
    acl: Option<std::path::PathBuf>,
    /// Serve each connection on the core that accepted it, as the kernel's SO_REUSEPORT
    /// hash chose, instead of handing it to the core holding the fewest.
    #[arg(long)]
    no_balance: bool,
    /// Admit a connection only once its first line presents the token in this file
    /// (`{"cmdid":2,"params":{"token":"…"}}`): for plain TCP on one host. The token crosses
    /// the wire in clear text; across hosts, use TLS with client certificates.
    #[arg(long)]
    token_file: Option<std::path::PathBuf>,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, never in a log file or a journal.
        .with_ansi(std::io::stderr().is_terminal())
        // A closed stderr must not turn a log line into a panic (tracing would eprintln!).
        .log_internal_errors(false)
        .init();
    let result = match Cli::parse().command {
        Command::Serve(args) => serve(args),
        Command::Call(args) => call(args),
        Command::Bench(args) => bench(args),
        Command::Compare(args) => compare(args),
        Command::EchoBaseline(args) => echo_baseline(args),
        Command::Top(args) => top(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: a library error that already shows
/// its cause in its message would otherwise repeat it.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// `HOST:PORT` of a server to connect to: an IP address or a host name (its first address).
fn resolve_server(addr: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .with_context(|| format!("cannot resolve {addr:?} (expected HOST:PORT, e.g. 127.0.0.1:8889)"))?
        .next()
        .with_context(|| format!("{addr:?} resolves to no address"))
}

/// A request shape for `--shape`.
fn shape_name(text: &str) -> Result<ringcall_cli::bench::compare::Shape, String> {
    use ringcall_cli::bench::compare::Shape;
    Shape::from_name(text).ok_or_else(|| {
        let names: Vec<&str> = Shape::ALL.iter().map(|s| s.name()).collect();
        format!("{text:?} is not a shape: {}", names.join(", "))
    })
}

/// A request size for `--payload-bytes`.
fn payload_size(text: &str) -> Result<usize, String> {
    use ringcall_cli::bench::BenchConfig;
    match ringcall_cli::bench::compare::parse_bytes(text) {
        Some(bytes) if bytes >= BenchConfig::MIN_ECHO_BYTES => Ok(bytes),
        _ => Err(format!(
            "expected a size of at least {} bytes, e.g. 1024, 64k or 1m (got '{text}')",
            BenchConfig::MIN_ECHO_BYTES
        )),
    }
}

/// A whole number, 0 or more.
fn whole_number(text: &str) -> Result<usize, String> {
    text.trim().parse().map_err(|_| format!("expected a whole number, 0 or more (got '{text}')"))
}

/// A whole number, 1 or more (bytes, connections).
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("expected a whole number, 1 or more (got '{text}')")),
    }
}

/// Seconds, 0 or more (fractions allowed).
fn seconds(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => Ok(s),
        _ => Err(format!("expected seconds, 0 or more, e.g. 30 or 0.5 (got '{text}')")),
    }
}

/// Milliseconds, more than 0 (fractions allowed).
fn positive_millis(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(ms) if ms.is_finite() && ms > 0.0 => Ok(ms),
        _ => Err(format!("expected milliseconds, more than 0, e.g. 50 or 0.5 (got '{text}')")),
    }
}

/// Seconds, more than 0 (fractions allowed).
fn positive_seconds(text: &str) -> Result<f64, String> {
    match seconds(text) {
        Ok(s) if s > 0.0 => Ok(s),
        _ => Err(format!("expected seconds, more than 0, e.g. 30 or 0.5 (got '{text}')")),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let open_files = sys::raise_nofile_limit().unwrap_or_else(|e| {
        tracing::warn!("cannot raise the open-file limit: {e}");
        0
    });
    let config = ServerConfig {
        // The builder resolves `args.addr` (a host name too) and replaces this.
        addr: ringcall::ServerConfig::default().addr,
        threads: args.threads,
        limits: ringcall::Limits {
            max_line: args.max_line,
            max_connections_per_core: args.max_connections_per_core.max(1),
            max_pending_output: args.max_pending_output.max(1),
            idle_timeout: args.idle_timeout.map(|s| Duration::from_secs_f64(s.max(0.001))),
            line_timeout: Duration::from_secs_f64(args.line_timeout.max(0.001)),
            slow_request: args.slow_ms.map(|ms| Duration::from_secs_f64(ms / 1000.0)),
            // The shipped commands answer at once; only services that defer replies need it.
            max_deferred: ringcall::DEFAULT_MAX_DEFERRED,
            deferred_timeout: Some(ringcall::DEFAULT_DEFERRED_TIMEOUT),
            hello_timeout: Duration::from_secs_f64(args.hello_timeout.max(0.001)),
            max_deferred_per_core: ringcall::DEFAULT_MAX_DEFERRED_PER_CORE,
            drain_grace: Duration::from_secs_f64(args.drain_grace.max(0.0)),
            max_connection_age: args.max_connection_age.map(Duration::from_secs_f64),
        },
        // `auto` resolved here, so that an error names the backend that failed.
        backend: args.backend.resolve(),
        pin_threads: !args.no_pin,
        shutdown_timeout: Duration::from_secs_f64(args.shutdown_timeout.max(0.0)),
        // SIGINT/SIGTERM drain the server, a second one exits with 130: the library does it.
        handle_signals: true,
        // The shipped commands answer at once: no async runtime or blocking pool is started.
        exec: ringcall::ExecConfig::default(),
        tls: match (&args.tls_cert, &args.tls_key, &args.tls_client_ca) {
            (Some(cert), Some(key), None) => Some(ringcall::TlsConfig::from_pem_files(cert, key)?),
            (Some(cert), Some(key), Some(ca)) => {
                let tls = ringcall::TlsConfig::mutual_from_pem_files(cert, key, ca)?;
                Some(match &args.acl {
                    Some(acl) => tls.with_acl(ringcall::Acl::from_file(acl)?),
                    None => tls,
                })
            }
            _ => None,
        },
        token: args.token_file.as_deref().map(ringcall::HelloToken::from_file).transpose()?,
        balance_connections: !args.no_balance,
        share_port: args.share_port,
    };
    let server = ringcall::ServerBuilder::config(config.clone())
        .addr(args.addr.as_str())
        .start(ShippedRoutes)
        .with_context(|| format!("cannot start the {} server", config.backend))?;
    if let Some(addr) = &args.metrics_addr {
        let metrics = ringcall::metrics::serve(resolve_server(addr)?, server.stats_registry())
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(addr = %metrics.local_addr(), "metrics at http://{}/metrics", metrics.local_addr());
    }
    announce_address(server.local_addr(), args.addr_file.as_deref())?;
    tracing::info!(
        backend = %server.backend(),
        threads = server.threads(),
        addr = %server.local_addr(),
        max_line = config.limits.max_line,
        open_files,
        "ringcall serving"
    );
    let (interval, level) = match args.stats_interval {
        Some(secs) => (Duration::from_secs_f64(secs.max(0.1)), tracing::Level::INFO),
        None => (Duration::from_secs(10), tracing::Level::DEBUG),
    };
    let stats = server.stats_registry();
    std::thread::Builder::new()
        .name("ringcall-stats".into())
        .spawn(move || log_stats(&stats, interval, level))
        .context("cannot spawn the stats thread")?;
    server.wait()?;
    tracing::info!("ringcall stopped");
    Ok(())
}

/// Tells whoever started the server where it listens: the address alone on one line of
/// stdout (the only thing `serve` prints there), and, if asked, in a file written whole
/// (renamed into place) so a reader never sees half of it.
fn announce_address(addr: SocketAddr, file: Option<&std::path::Path>) -> anyhow::Result<()> {
    use std::io::Write;
    if let Some(path) = file {
        let partial = path.with_extension("partial");
        std::fs::write(&partial, format!("{addr}\n"))
            .and_then(|()| std::fs::rename(&partial, path))
            .with_context(|| format!("cannot write the address to {}", path.display()))?;
    }
    let mut stdout = std::io::stdout().lock();
    // Nobody reading stdout is no reason to stop serving.
    let _ = writeln!(stdout, "{addr}").and_then(|()| stdout.flush());
    Ok(())
}

fn call(args: CallArgs) -> anyhow::Result<()> {
    use std::io::Write;
    let timeout = Duration::from_secs_f64(args.timeout.max(0.001));
    let token = args.access.token()?;
    if args.cmdid == "-" {
        anyhow::ensure!(
            args.params.is_none(),
            "with `-`, each stdin line is a whole request; give no params"
        );
        anyhow::ensure!(
            args.access.tls_ca.is_none(),
            "`-` (stdin) speaks plain TCP only; over TLS, give the cmdid and params, or pipe \
             the lines through `openssl s_client -quiet -connect HOST:PORT -CAfile CA`"
        );
        return call_stdin(&args.addr, timeout, token.as_ref());
    }
    let cmdid: u32 = args.cmdid.parse().context("CMDID must be an integer from 0 to 4294967295, or -")?;
    let call = match &args.params {
        Some(params) => Call::with_json(cmdid, params)?,
        None => Call::new(cmdid),
    };
    let tls = args.access.tls(&args.addr)?;
    let response = if args.addr.contains(',') {
        let endpoints: Vec<&str> = args.addr.split(',').map(str::trim).collect();
        let config = ringcall::pool::PoolConfig {
            timeout,
            connect_timeout: timeout,
            tls,
            token,
            ..Default::default()
        };
        let pool = ringcall::pool::Pool::with_endpoints(&endpoints, config)?;
        pool.call(&call, ringcall::pool::CallOptions::default())?
    } else {
        let client = match tls {
            Some(tls) => Client::connect_tls(&args.addr, timeout, tls)?,
            None => Client::connect_timeout(&args.addr, timeout)?,
        };
        match token {
            Some(token) => client.with_token(token)?,
            None => client,
        }
        .send(&call)?
    };
    anyhow::ensure!(
        response.code == 0,
        "server replied {}: {}",
        response.code,
        response.error.unwrap_or_default()
    );
    writeln!(std::io::stdout().lock(), "{}", response.data.encode())?;
    Ok(())
}

/// Sends stdin's request lines as they are and prints the reply lines, in order.
fn call_stdin(addr: &str, timeout: Duration, token: Option<&ringcall::HelloToken>) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let stream = std::net::TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    stream.set_read_timeout(Some(timeout))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    if let Some(token) = token {
        // The hello's reply is not one of stdin's: it is checked, not printed.
        writer.write_all(&token.hello_line(0))?;
        reader.read_until(b'\n', &mut line).context("reading the reply to the token hello")?;
        let reply = ringcall::client::decode_reply(&mut line, Some(0))?;
        anyhow::ensure!(
            reply.code == 0,
            "the server refused the token hello: {} {}",
            reply.code,
            reply.error.unwrap_or_default()
        );
    }
    // Send from a thread so a long input is pipelined while replies stream back.
    let sender = std::thread::spawn(move || -> std::io::Result<usize> {
        let mut sent = 0;
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            writer.write_all(line.as_bytes())?;
            writer.write_all(b"\n")?;
            sent += 1;
        }
        writer.shutdown(std::net::Shutdown::Write)?;
        Ok(sent)
    });
    let mut replies = 0usize;
    let mut out = std::io::stdout().lock();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).context("reading replies")?;
        if n == 0 {
            break;
        }
        out.write_all(&line)?;
        replies += 1;
    }
    let sent = sender.join().map_err(|_| anyhow::anyhow!("stdin thread panicked"))??;
    anyhow::ensure!(replies == sent, "sent {sent} requests but the server closed after {replies} replies");
    Ok(())
}

fn bench(args: BenchArgs) -> anyhow::Result<()> {
    use ringcall_cli::bench::{BenchConfig, StopAfter};
    let requests = match &args.requests {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let lines: Vec<Vec<u8>> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| format!("{}\n", l.trim_end_matches('\r')).into_bytes())
                .collect();
            anyhow::ensure!(!lines.is_empty(), "{} holds no request lines", path.display());
            lines
        }
        None if args.payload_bytes.is_some() => {
            vec![BenchConfig::echo_request_of(args.payload_bytes.unwrap_or_default())]
        }
        None if args.shape.is_some() => args.shape.map(|shape| shape.request()).into_iter().collect(),
        None => match &args.params {
            Some(params) => {
                let mut line = Vec::new();
                ringcall::client::encode_call(&mut line, &Call::with_json(args.cmdid, params)?, 0);
                vec![line]
            }
            None if args.cmdid == ringcall::handlers::ECHO => vec![BenchConfig::echo_request()],
            None => vec![format!("{{\"cmdid\":{}}}\n", args.cmdid).into_bytes()],
        },
    };
    let stop = match (args.count, args.duration) {
        (Some(n), _) => StopAfter::Count(n),
        (None, d) => StopAfter::Duration(Duration::from_secs_f64(d.unwrap_or(10.0).max(0.001))),
    };
    let addrs = args.addr.split(',').map(|a| resolve_server(a.trim())).collect::<anyhow::Result<Vec<_>>>()?;
    let config = BenchConfig {
        addrs,
        connections: args.connections,
        pipeline: args.pipeline,
        stop,
        warmup: Duration::from_secs_f64(args.warmup.max(0.0)),
        rate: args.rate,
        requests,
        threads: args.threads,
        cpus: args.cpus,
        progress: std::io::stderr().is_terminal(),
        connect: ringcall_cli::bench::ConnectOptions {
            tls: args.access.tls(&args.addr)?,
            token: args.access.token()?,
            requests_per_connection: args.reconnect_after,
            notices: args.notices,
        },
    };
    let report = ringcall_cli::bench::run(&config)?;
    print!("{}", report.render(args.output));
    let lost = report.unanswered.total();
    anyhow::ensure!(
        lost == 0,
        "{lost} requests were sent and never answered (the report says how their connections ended)"
    );
    Ok(())
}

fn echo_baseline(args: EchoBaselineArgs) -> anyhow::Result<()> {
    let cpus = sys::allowed_cpus();
    let threads = if args.threads == 0 { cpus.len() } else { args.threads };
    let pin = if args.no_pin { &[][..] } else { &cpus[..] };
    let addr = ringcall_cli::bench::echo_baseline::serve(resolve_server(&args.addr)?, threads, pin)
        .with_context(|| format!("cannot start the echo baseline on {}", args.addr))?;
    announce_address(addr, None)?;
    // The threads echo until the process is stopped.
    loop {
        std::thread::park();
    }
}

fn top(args: TopArgs) -> anyhow::Result<()> {
    use ringcall_cli::top::{Reading, Stats, render};
    let timeout = Duration::from_secs(10);
    let mut client = Client::connect_timeout(&args.addr, timeout)?;
    let mut read = || -> anyhow::Result<Reading> {
        let data = client.send(&Call::new(handlers::STATS))?.into_result()?;
        let stats: Stats = ringcall::simd_json::serde::from_owned_value(data)
            .context("the stats reply is not what this version of ringcall returns")?;
        Ok(Reading { at: std::time::Instant::now(), stats })
    };
    let interval = Duration::from_secs_f64(args.interval);
    // Redraw in place on a terminal; elsewhere one screen after the other.
    let clear = if std::io::stdout().is_terminal() { "\x1b[H\x1b[2J" } else { "" };
    let mut before = read()?;
    let mut shown = 0;
    while args.count.is_none_or(|count| shown < count) {
        std::thread::sleep(interval);
        let now = read()?;
        print!("{clear}{}", render(&args.addr, &before, &now));
        if clear.is_empty() {
            println!();
        }
        before = now;
        shown += 1;
    }
    Ok(())
}

fn compare(args: CompareArgs) -> anyhow::Result<()> {
    use ringcall_cli::bench::compare::{self, CompareConfig};
    let config = CompareConfig {
        server_binary: std::env::current_exe().context("cannot find the ringcall executable")?,
        backends: args.backends,
        baseline: args.baseline,
        workloads: args.workloads,
        rounds: args.rounds.max(1),
        duration: Duration::from_secs_f64(args.duration.max(0.01)),
        warmup: Duration::from_secs_f64(args.warmup.max(0.0)),
        server_cpus: args.server_cpus,
        client_cpus: args.client_cpus,
        max_steal_percent: args.max_steal,
        retries: args.retries,
    };
    let comparison = compare::run(&config)?;
    println!("{}", comparison.machine);
    print!("{}", comparison.table());
    if let Some(path) = &args.json {
        std::fs::write(path, comparison.json(&config))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        std::fs::write(path, comparison.svg()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Logs a one-line summary of the counters every `interval`, with rates since the last line.
fn log_stats(stats: &ringcall::stats::StatsRegistry, interval: Duration, level: tracing::Level) {
    let mut last = stats.total();
    loop {
        std::thread::sleep(interval);
        let now = stats.total();
        let per_sec = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / interval.as_secs_f64();
        let errors = now.replies.iter().skip(1).sum::<u64>();
        let line = format!(
            "stats: {} connections open ({} total), {:.0} requests/s, {} requests, {} error replies, \
             {:.0} KiB/s in, {:.0} KiB/s out, {} rejected, {} backpressure pauses, {} idle + {} line + {} hello \
             timeouts, {} shed",
            now.connections_open,
            now.connections_total,
            per_sec(now.requests, last.requests),
            now.requests,
            errors,
            per_sec(now.bytes_in, last.bytes_in) / 1024.0,
            per_sec(now.bytes_out, last.bytes_out) / 1024.0,
            now.rejected_connections,
            now.backpressure_pauses,
            now.idle_timeouts,
            now.line_timeouts,
            now.hello_timeouts,
            now.deferred_shed,
        );
        if level == tracing::Level::INFO {
            tracing::info!("{line}");
        } else {
            tracing::debug!("{line}");
        }
        last = now;
    }
}

//! Server configuration, the builder users call, start-up (listeners, one worker per core)
//! and the shutdown fan-out to every worker.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

pub(crate) use crate::backend::Backend;
use crate::backend::worker::{StopSignal, WorkerConfig, WorkerError, WorkerSetup};
use crate::backend::{self, sys};
use crate::dispatch::{Routes, Service};
use crate::exec::{ExecConfig, Executors};
use crate::handlers;
use crate::signals;
use crate::stats::StatsRegistry;
use ringcall_core::Limits;

/// Everything a server needs to start.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (default `127.0.0.1:8889`, loopback only).
    pub addr: SocketAddr,
    /// Worker threads, one per core; 0 means one per CPU this process may use.
    pub threads: usize,
    /// Protocol limits.
    pub limits: Limits,
    /// The I/O driver.
    pub backend: Backend,
    /// Pin each worker to its own CPU.
    pub pin_threads: bool,
    /// How long a graceful shutdown waits for connections to drain.
    pub shutdown_timeout: Duration,
    /// Begin a graceful shutdown at the first SIGINT or SIGTERM, and exit with status 130 at
    /// a second one (see [`ServerBuilder::handle_signals`]).
    pub handle_signals: bool,
    /// The async runtime and blocking pool of handlers that use them.
    pub exec: ExecConfig,
    /// Serve TLS with this certificate and key (`None`: plain TCP).
    pub tls: Option<ringcall_core::TlsConfig>,
    /// Hand each new connection to the core holding the fewest (connection balancing, see
    /// `docs/architecture.md`), instead of serving it where the kernel's `SO_REUSEPORT`
    /// hash put it. On by default; `epoll-mt` balances by moving tasks instead.
    pub balance_connections: bool,
    /// Admit a connection only after its first line presents this token
    /// ([`HelloToken`](ringcall_core::HelloToken)); `None`: no hello is asked for.
    pub token: Option<ringcall_core::HelloToken>,
    /// Share the port with another server process of the same user (`SO_REUSEPORT`): for a
    /// hand-over, start the new binary with it while the old one serves, then stop the old
    /// one (docs/operations.md). Off: start-up fails while another process listens there.
    pub share_port: bool,
}

/// The default listen address.
pub const DEFAULT_ADDR: &str = "127.0.0.1:8889";

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            addr: DEFAULT_ADDR.parse().expect("valid default address"),
            threads: 0,
            limits: Limits::default(),
            backend: Backend::default(),
            pin_threads: true,
            shutdown_timeout: Duration::from_secs(10),
            handle_signals: true,
            exec: ExecConfig::default(),
            tls: None,
            token: None,
            balance_connections: true,
            share_port: false,
        }
    }
}

impl ServerConfig {
    /// The worker count after resolving 0 to the number of usable CPUs.
    pub fn resolved_threads(&self) -> usize {
        if self.threads == 0 { sys::allowed_cpus().len() } else { self.threads }
    }
}

/// Why a server could not start or stopped abnormally. Each message names the cause and,
/// where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The address could not be resolved.
    #[error(
        "cannot resolve listen address {addr:?} (expected HOST:PORT, e.g. 127.0.0.1:8889 or localhost:8889): {source}"
    )]
    Resolve {
        /// What was given.
        addr: String,
        /// Why it failed.
        source: io::Error,
    },
    /// The listening socket could not be created.
    #[error("cannot listen on {addr}: {source}{hint}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why it failed.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// A worker could not start: io_uring or the runtime of its backend is unavailable.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// Any other start-up failure (thread spawn, eventfd, …).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: io::Error,
    },
    /// A worker thread panicked.
    #[error("worker thread for core {0} panicked")]
    WorkerPanicked(usize),
}

impl ServerError {
    pub(crate) fn listen(addr: SocketAddr, source: io::Error) -> Self {
        let hint = match source.raw_os_error() {
            Some(libc::EADDRINUSE) => {
                " (the port stayed in use: another process listens there; stop it or pick another \
                 --addr)"
            }
            Some(libc::EACCES) => " (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
            Some(libc::EADDRNOTAVAIL) => " (that IP address is not configured on this host)",
            _ => "",
        };
        ServerError::Listen { addr, source, hint }
    }
}

/// Builds and starts a server.
#[derive(Debug, Clone, Default)]
pub struct ServerBuilder {
    config: ServerConfig,
    addr: Option<String>,
}

/// Entry point: `Server::builder()…start(service)`.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// A builder with the default configuration.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }
}

impl ServerBuilder {
    /// Starts from a full configuration.
    pub fn config(config: ServerConfig) -> Self {
        Self { config, addr: None }
    }

    /// The number of worker threads the server will run: `threads`, or one per usable CPU
    /// (for a service that sizes per-core state up front).
    pub fn resolved_threads(&self) -> usize {
        self.config.resolved_threads().max(1)
    }

    /// Address to listen on, e.g. `127.0.0.1:0` for any free port.
    pub fn addr(mut self, addr: impl Into<String>) -> Self {
        self.addr = Some(addr.into());
        self
    }

    /// Worker threads (0: one per usable CPU).
    pub fn threads(mut self, threads: usize) -> Self {
        self.config.threads = threads;
        self
    }

    /// Longest accepted request line in bytes.
    pub fn max_line(mut self, bytes: usize) -> Self {
        self.config.limits.max_line = bytes;
        self
    }

    /// Connections one core serves at once (beyond: a 503 reply line, then close).
    pub fn max_connections_per_core(mut self, connections: usize) -> Self {
        self.config.limits.max_connections_per_core = connections;
        self
    }

    /// Unsent reply bytes per connection before reading from it pauses.
    pub fn max_pending_output(mut self, bytes: usize) -> Self {
        self.config.limits.max_pending_output = bytes;
        self
    }

    /// Close connections silent for this long.
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.limits.idle_timeout = timeout;
        self
    }

    /// Close connections that do not finish their TLS handshake and token hello within this
    /// long (default [`DEFAULT_HELLO_TIMEOUT`](crate::DEFAULT_HELLO_TIMEOUT)).
    pub fn hello_timeout(mut self, timeout: Duration) -> Self {
        self.config.limits.hello_timeout = timeout;
        self
    }

    /// Drain and close connections this old, like at a shutdown (notice, grace, FIN), so
    /// they rebalance onto new or restarted servers. See
    /// [`Limits::max_connection_age`](crate::Limits::max_connection_age).
    pub fn max_connection_age(mut self, age: Duration) -> Self {
        self.config.limits.max_connection_age = Some(age);
        self
    }

    /// Share the port with another server process of this user, for a hand-over (see
    /// [`ServerConfig::share_port`]).
    pub fn share_port(mut self, share: bool) -> Self {
        self.config.share_port = share;
        self
    }

    /// At shutdown, keep serving each connection this long after telling it the server is
    /// closing it, before FIN (default 0: FIN once what arrived is answered). See
    /// [`Limits::drain_grace`](crate::Limits::drain_grace).
    pub fn drain_grace(mut self, grace: Duration) -> Self {
        self.config.limits.drain_grace = grace;
        self
    }

    /// Close connections that do not finish a started line within this long.
    pub fn line_timeout(mut self, timeout: Duration) -> Self {
        self.config.limits.line_timeout = timeout;
        self
    }

    /// Log at warn level every request whose handler runs this long or longer, naming its
    /// cmdid, code, core and peer.
    pub fn slow_request(mut self, threshold: Duration) -> Self {
        self.config.limits.slow_request = Some(threshold);
        self
    }

    /// Deferred replies one core may have pending over all its connections; a handler that
    /// defers beyond it has its request answered 503 at once (default
    /// [`DEFAULT_MAX_DEFERRED_PER_CORE`](crate::DEFAULT_MAX_DEFERRED_PER_CORE)).
    pub fn max_deferred_per_core(mut self, replies: usize) -> Self {
        self.config.limits.max_deferred_per_core = replies.max(1);
        self
    }

    /// Deferred replies one connection may have pending before reading from it pauses.
    pub fn max_deferred(mut self, replies: usize) -> Self {
        self.config.limits.max_deferred = replies.max(1);
        self
    }

    /// How long a deferred reply may take when its request set no `timeout_ms` (default 60 s;
    /// `None`: as long as it takes). Past it the caller gets a 504 in the reply's place and the
    /// late answer is dropped, as with `timeout_ms`; counted in `deadline_expired`.
    pub fn deferred_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.limits.deferred_timeout = timeout;
        self
    }

    /// Threads of the async runtime that runs async handler work on `uring` (default: one
    /// per worker); the tokio backends run it on each core's own runtime.
    pub fn async_threads(mut self, threads: usize) -> Self {
        self.config.exec.async_threads = threads;
        self
    }

    /// Threads of the blocking pool ([`Ctx::spawn_blocking`](crate::Ctx::spawn_blocking);
    /// default: one per CPU).
    pub fn blocking_threads(mut self, threads: usize) -> Self {
        self.config.exec.blocking_threads = threads;
        self
    }

    /// Jobs that may wait for a blocking thread; beyond, a job is answered 503 (default
    /// 1024).
    pub fn blocking_queue(mut self, jobs: usize) -> Self {
        self.config.exec.blocking_queue = jobs;
        self
    }

    /// Serves TLS on every connection, with this certificate and key
    /// ([`TlsConfig::from_pem_files`](ringcall_core::TlsConfig::from_pem_files)).
    pub fn tls(mut self, tls: ringcall_core::TlsConfig) -> Self {
        self.config.tls = Some(tls);
        self
    }

    /// Admits a connection only once its first line is the hello presenting `token`: for
    /// plain TCP on one host, where it keeps out whoever lacks the secret. It crosses the
    /// wire in clear text: across hosts, use [`tls`](Self::tls) with client certificates.
    pub fn token(mut self, token: ringcall_core::HelloToken) -> Self {
        self.config.token = Some(token);
        self
    }

    /// Whether new connections go to the least loaded core (on by default; see
    /// [`ServerConfig::balance_connections`]).
    pub fn balance_connections(mut self, balance: bool) -> Self {
        self.config.balance_connections = balance;
        self
    }

    /// The I/O driver.
    pub fn backend(mut self, backend: Backend) -> Self {
        self.config.backend = backend;
        self
    }

    /// Whether to pin each worker to its own CPU (default on).
    pub fn pin_threads(mut self, pin: bool) -> Self {
        self.config.pin_threads = pin;
        self
    }

    /// How long a graceful shutdown waits for connections to drain.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.shutdown_timeout = timeout;
        self
    }

    /// Whether SIGINT and SIGTERM shut the server down gracefully (default on): the first
    /// signal stops accepting, answers every request received and closes each connection
    /// once its peer has closed or the shutdown timeout has passed, after which
    /// [`ServerHandle::wait`] returns; a second signal exits the process at once with status
    /// 130. Every server of the process that has it on stops at the same signal. A signal
    /// that arrives while no such server runs has its default effect.
    ///
    /// Turn it off to handle signals yourself, and stop the server from code with
    /// [`ServerHandle::stop`] or a [`Stopper`].
    pub fn handle_signals(mut self, on: bool) -> Self {
        self.config.handle_signals = on;
        self
    }

    /// Binds, starts one worker per core serving `service` and returns once every worker is
    /// serving. Each worker makes its own state with [`Service::local`] on its thread.
    ///
    /// # Errors
    /// The address cannot be resolved or bound, or the backend cannot be set up here.
    pub fn start<S: Service>(mut self, service: S) -> Result<ServerHandle, ServerError> {
        let service = Arc::new(service);
        if let Some(addr) = self.addr.take() {
            self.config.addr = resolve(&addr)?;
        }
        let mut config = self.config;
        config.backend = config.backend.resolve();
        let threads = config.resolved_threads().max(1);
        config.threads = threads;
        // epoll-mt is one work-stealing runtime behind one listener; every other backend
        // runs one worker per core, each with its own SO_REUSEPORT listener.
        let workers_wanted = if config.backend == Backend::EpollMt { 1 } else { threads };
        let (listeners, local_addr) = if config.share_port {
            sys::shared_listeners(config.addr, workers_wanted).map(|listeners| (listeners, config.addr))
        } else {
            sys::reuseport_listeners(config.addr, workers_wanted)
        }
        .map_err(|e| ServerError::listen(config.addr, e))?;
        if config.tls.is_none() && !local_addr.ip().is_loopback() {
            tracing::warn!(
                addr = %local_addr,
                "serving plain TCP on a non-loopback address: anyone who can reach it can call \
                 every command, and the traffic crosses the network in clear text; give it a \
                 certificate (--tls-cert/--tls-key) to serve other hosts"
            );
        }
        let control = Arc::new(
            StopSignal::new(workers_wanted)
                .map_err(|source| ServerError::Io { what: "cannot create eventfd", source })?,
        );
        let worker_config = WorkerConfig {
            limits: config.limits,
            shutdown_timeout: config.shutdown_timeout,
            threads,
            pin_threads: config.pin_threads,
        };
        let commands: Vec<u32> = [handlers::PING, handlers::STATS]
            .into_iter()
            .chain(<S::Routes as Routes<S>>::CMDIDS.iter().copied())
            .collect();
        let stats = StatsRegistry::with_commands(threads, &commands);
        let exec = Executors::new(config.exec, threads);
        let cpus = sys::allowed_cpus();
        let (ready_tx, ready_rx) = mpsc::channel();
        let signals = match config.handle_signals {
            true => Some(
                signals::register(control.clone(), config.tls.clone())
                    .map_err(|source| ServerError::Io { what: "cannot install signal handlers", source })?,
            ),
            false => None,
        };
        let mut handle = ServerHandle {
            local_addr,
            backend: config.backend,
            threads,
            stats: stats.clone(),
            control: control.clone(),
            workers: Vec::with_capacity(workers_wanted),
            _signals: signals,
        };
        // Several cores with a listener each: the kernel's hash spreads connections, and the
        // balancer evens out what it leaves uneven.
        let balancer = (config.balance_connections && workers_wanted > 1)
            .then(|| crate::backend::balance::Balancer::new(stats.clone()));
        for (core, listener) in listeners.into_iter().enumerate() {
            let setup = WorkerSetup {
                core,
                cpu: config.pin_threads.then(|| cpus[core % cpus.len()]),
                listener,
                config: worker_config,
                stats: stats.clone(),
                stop: control.clone(),
                exec: exec.clone(),
                access: ringcall_core::Access { tls: config.tls.clone(), token: config.token.clone() },
                balancer: balancer.clone(),
                ready: ready_tx.clone(),
            };
            let backend = config.backend;
            let service = service.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ringcall-{core}"))
                .spawn(move || backend::run(backend, setup, service));
            match spawned {
                Ok(worker) => handle.workers.push(worker),
                Err(source) => {
                    handle.stop();
                    return Err(ServerError::Io { what: "cannot spawn worker thread", source });
                }
            }
        }
        drop(ready_tx);
        for _ in 0..workers_wanted {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    handle.stop();
                    let _ = handle.join();
                    return Err(e.into());
                }
                Err(_) => {
                    handle.stop();
                    return Err(handle.join().err().unwrap_or(ServerError::WorkerPanicked(0)));
                }
            }
        }
        Ok(handle)
    }
}

/// `HOST:PORT` with an IP address or a host name. A name is looked up, its first IPv4 address
/// preferred (`localhost` means 127.0.0.1 to most clients, even where `::1` comes first), and
/// what it resolved to is logged.
fn resolve(addr: &str) -> Result<SocketAddr, ServerError> {
    if let Ok(literal) = addr.parse() {
        return Ok(literal);
    }
    let resolve_err = |source| ServerError::Resolve { addr: addr.to_owned(), source };
    let found: Vec<SocketAddr> = addr.to_socket_addrs().map_err(resolve_err)?.collect();
    let chosen = found
        .iter()
        .find(|a| a.is_ipv4())
        .or(found.first())
        .copied()
        .ok_or_else(|| resolve_err(io::Error::new(io::ErrorKind::NotFound, "the name has no address")))?;
    tracing::info!(requested = addr, resolved = %chosen, "listen address resolved");
    Ok(chosen)
}

/// Begins a graceful shutdown of the server it came from; cheap to clone.
#[derive(Debug, Clone)]
pub struct Stopper(Arc<StopSignal>);

impl Stopper {
    /// Begins a graceful shutdown (idempotent).
    pub fn stop(&self) {
        self.0.stop();
    }
}

/// A running server. Dropping it stops the server gracefully and waits for it.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    backend: Backend,
    threads: usize,
    stats: Arc<StatsRegistry>,
    control: Arc<StopSignal>,
    workers: Vec<JoinHandle<()>>,
    /// Unregisters the server from the signal handlers when the handle goes.
    _signals: Option<signals::Registration>,
}

impl ServerHandle {
    /// The address the server listens on (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The backend serving.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Number of worker threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The server's counters.
    pub fn stats(&self) -> &StatsRegistry {
        &self.stats
    }

    /// A shared handle to the counters, for a thread that outlives this borrow.
    pub fn stats_registry(&self) -> Arc<StatsRegistry> {
        self.stats.clone()
    }

    /// Begins a graceful shutdown: stop accepting, answer what was received, close.
    pub fn stop(&self) {
        self.control.stop();
    }

    /// A handle that can begin the shutdown from another thread (e.g. a signal handler).
    pub fn stopper(&self) -> Stopper {
        Stopper(self.control.clone())
    }

    /// Waits until every worker has exited.
    ///
    /// # Errors
    /// A worker panicked.
    pub fn wait(mut self) -> Result<(), ServerError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), ServerError> {
        let mut result = Ok(());
        for (core, worker) in self.workers.drain(..).enumerate() {
            if worker.join().is_err() {
                result = Err(ServerError::WorkerPanicked(core));
            }
        }
        result
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
        let _ = self.join();
    }
}

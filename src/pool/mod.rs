//! A client pool over several servers: what a caller uses when one ringcall host is not
//! enough (docs/operations.md, "Running several hosts").
//!
//! - **Balancing**: each call goes to the less busy of two endpoints picked at random
//!   (power of two choices on requests in flight), over `connections_per_endpoint`
//!   multiplexed connections per endpoint (many calls in flight on each).
//! - **Failure**: an endpoint whose connection fails is taken out; a probe task pings it
//!   (cmdid 0) with exponential backoff and jitter and puts it back once it answers.
//! - **Retries**: a failed call is sent to another endpoint only when that is safe — its
//!   request never reached the server whole (so it did not run), or the caller marked it
//!   idempotent — and only while the retry budget allows (at most `retry_ratio` of calls,
//!   plus `retry_floor` per second), so a failing cluster is not hit by a retry storm.
//! - **Deadlines**: a call's timeout bounds everything (connecting, retries, the reply), and
//!   is sent as the request's `timeout_ms`, so the server stops working on it too.
//! - **Discovery**: endpoints come from a [`Discover`] source — a static list, DNS names or
//!   SRV records re-resolved on an interval, a file re-read when it changes, or your own —
//!   and are
//!   added and removed as it changes.
//!
//! Nothing is lost silently: every call returns a reply or a [`PoolError`] that says what
//! happened and whether the request may have run.

mod discover;
mod mux;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use discover::{Discover, DnsNames, DnsSrv, EndpointFile, StaticList};
use mux::{Failure, Mux};

use crate::client::{Call, ClientError, Response};

/// How a pool behaves.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Multiplexed connections per endpoint (each carries many calls in flight).
    pub connections_per_endpoint: usize,
    /// A call's deadline when it sets none: connecting, retries and the reply together.
    pub timeout: Duration,
    /// Longest wait for one connection to be made.
    pub connect_timeout: Duration,
    /// First wait before probing an endpoint taken out; doubles per failure (with jitter).
    pub backoff_min: Duration,
    /// Longest wait between probes.
    pub backoff_max: Duration,
    /// How often the endpoint source is asked again.
    pub rediscover_every: Duration,
    /// Retries allowed, as a share of calls made.
    pub retry_ratio: f64,
    /// Retries allowed per second on top of the ratio.
    pub retry_floor: f64,
    /// Speak TLS to every endpoint (the endpoints' certificates must carry the name it
    /// gives).
    pub tls: Option<ringcall_core::ClientTls>,
    /// Present this token on every new connection (servers started with `--token-file`).
    pub token: Option<ringcall_core::HelloToken>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            connections_per_endpoint: 1,
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(2),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            rediscover_every: Duration::from_secs(5),
            retry_ratio: 0.2,
            retry_floor: 10.0,
            tls: None,
            token: None,
        }
    }
}

/// Per call: whether it may run twice, and its deadline.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallOptions {
    /// Running it twice does no harm (a read, a put of the same value): a call that failed
    /// after it was written may then be retried on another endpoint.
    pub idempotent: bool,
    /// Overrides [`PoolConfig::timeout`].
    pub timeout: Option<Duration>,
}

impl CallOptions {
    /// Options for an idempotent call.
    pub fn idempotent() -> Self {
        Self { idempotent: true, timeout: None }
    }
}

/// Why a call through the pool has no reply.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No endpoint is up (all are down or none is known).
    #[error("no endpoint is up ({0}); the pool keeps probing them")]
    NoEndpoint(String),
    /// The deadline passed first.
    #[error("no reply within {0:?}{1}")]
    Timeout(Duration, &'static str),
    /// The request was written, the connection then failed, and it could not be retried (not
    /// idempotent, or no retry budget or endpoint left): it may or may not have run.
    #[error("{endpoint}: {source}; the request may have run (not retried: {why})")]
    MayHaveRun {
        /// The endpoint it was sent to.
        endpoint: String,
        /// What failed.
        source: ClientError,
        /// Why it was not retried.
        why: &'static str,
    },
    /// The request never ran: every endpoint tried failed before it was written.
    #[error("the request did not run: {0}")]
    NotRun(String),
}

/// The retry budget: a token bucket filled by calls (`retry_ratio` per call) and by time
/// (`retry_floor` per second), capped so a burst of retries stays bounded.
#[derive(Debug)]
struct Budget {
    tokens: f64,
    last: Instant,
}

/// One server the pool sends to.
struct Endpoint {
    addr: String,
    conns: Mutex<Vec<Option<Arc<Mux>>>>,
    health: Mutex<Health>,
    /// Calls in flight through this endpoint (what balancing compares).
    in_flight: AtomicU64,
    /// Replies received from it, for tests and per-endpoint reports.
    answered: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
enum Health {
    Up,
    /// Taken out after a failure; probed at `retry_at`.
    Down {
        failures: u32,
        retry_at: Instant,
    },
}

struct Inner {
    config: PoolConfig,
    endpoints: Mutex<Vec<Arc<Endpoint>>>,
    budget: Mutex<Budget>,
    rng: AtomicU64,
}

/// An async client pool (see the module docs). Cheap to clone; its background task (probes,
/// rediscovery) stops when the last clone is dropped.
#[derive(Clone)]
pub struct AsyncPool {
    inner: Arc<Inner>,
}

/// Each endpoint's address, whether it is up, and the replies it gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointStatus {
    /// `HOST:PORT`.
    pub addr: String,
    /// Whether calls go to it.
    pub up: bool,
    /// Replies received from it since it joined the pool.
    pub answered: u64,
}

impl AsyncPool {
    /// A pool over the endpoints `discover` names, on the current tokio runtime (a task there
    /// probes endpoints taken out and asks `discover` again every `rediscover_every`).
    ///
    /// # Errors
    /// The first discovery fails.
    pub async fn new(discover: impl Discover, config: PoolConfig) -> Result<Self, std::io::Error> {
        let first = discover.endpoints().await?;
        let seed = Instant::now().elapsed().as_nanos() as u64 ^ (std::process::id() as u64) << 32 | 1;
        let inner = Arc::new(Inner {
            endpoints: Mutex::new(Vec::new()),
            budget: Mutex::new(Budget { tokens: config.retry_floor, last: Instant::now() }),
            rng: AtomicU64::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1),
            config,
        });
        inner.reconcile(first);
        tokio::spawn(maintain(Arc::downgrade(&inner), discover));
        Ok(Self { inner })
    }

    /// Sends `call` and waits for its reply (see [`CallOptions`] for retries and deadline).
    ///
    /// # Errors
    /// See [`PoolError`]; a server's error reply (`code` other than 0) is a reply, not an
    /// error here.
    pub async fn call(&self, call: &Call, options: CallOptions) -> Result<Response, PoolError> {
        let timeout = options.timeout.unwrap_or(self.inner.config.timeout);
        let deadline = Instant::now() + timeout;
        match tokio::time::timeout_at(deadline.into(), self.inner.call(call, options, deadline)).await {
            Ok(result) => result,
            Err(_) => Err(PoolError::Timeout(timeout, "")),
        }
    }

    /// Each endpoint's state.
    pub fn status(&self) -> Vec<EndpointStatus> {
        self.inner.endpoints().iter().map(|e| e.status()).collect()
    }
}

impl Endpoint {
    fn new(addr: String, connections: usize) -> Self {
        Self {
            addr,
            conns: Mutex::new(vec![None; connections.max(1)]),
            health: Mutex::new(Health::Up),
            in_flight: AtomicU64::new(0),
            answered: AtomicU64::new(0),
        }
    }

    fn is_up(&self) -> bool {
        matches!(*lock(&self.health), Health::Up)
    }

    fn status(&self) -> EndpointStatus {
        EndpointStatus {
            addr: self.addr.clone(),
            up: self.is_up(),
            answered: self.answered.load(Ordering::Relaxed),
        }
    }

    /// One of its connections (the least busy), connecting it if needed.
    async fn connection(&self, config: &PoolConfig, pick: u64) -> Result<Arc<Mux>, ClientError> {
        let (slot, existing) = {
            let mut conns = lock(&self.conns);
            // A connection the server is closing takes nothing new: let it go (it closes
            // once its outstanding calls are answered) and connect again in its place.
            for conn in conns.iter_mut() {
                if conn.as_ref().is_some_and(|c| c.is_closing()) {
                    conn.take();
                }
            }
            let live: Vec<(usize, &Arc<Mux>)> =
                conns.iter().enumerate().filter_map(|(i, c)| c.as_ref().map(|c| (i, c))).collect();
            if live.len() == conns.len() {
                let best = live.iter().min_by_key(|(_, c)| c.in_flight()).expect("at least one connection");
                return Ok(best.1.clone());
            }
            // Fill an empty slot (spread over slots by the caller's random pick).
            let empty =
                (0..conns.len()).map(|i| (i + pick as usize) % conns.len()).find(|&i| conns[i].is_none());
            (empty.expect("a free slot"), live.first().map(|(_, c)| (*c).clone()))
        };
        match Mux::connect(&self.addr, config.connect_timeout, config.tls.as_ref(), config.token.as_ref())
            .await
        {
            Ok(mux) => {
                lock(&self.conns)[slot] = Some(mux.clone());
                Ok(mux)
            }
            // Another live connection carries the call meanwhile.
            Err(_) if existing.is_some() => Ok(existing.expect("checked")),
            Err(e) => Err(e),
        }
    }

    /// Takes the endpoint out after a failure, to be probed later.
    fn take_out(&self, config: &PoolConfig, rng: &AtomicU64, why: &dyn std::fmt::Display) {
        let mut health = lock(&self.health);
        let failures = match *health {
            Health::Up => {
                tracing::warn!(endpoint = %self.addr, "endpoint taken out of the pool: {why}");
                1
            }
            Health::Down { failures, .. } => failures.saturating_add(1),
        };
        *health = Health::Down { failures, retry_at: Instant::now() + backoff(config, failures, rng) };
        for conn in lock(&self.conns).iter_mut() {
            if let Some(c) = conn.take() {
                c.close();
            }
        }
    }
}

/// Exponential backoff with full jitter: a random wait in [min, min * 2^failures], capped.
fn backoff(config: &PoolConfig, failures: u32, rng: &AtomicU64) -> Duration {
    let ceiling = config.backoff_min.saturating_mul(1 << failures.min(16)).min(config.backoff_max);
    let span = ceiling.saturating_sub(config.backoff_min).as_nanos() as u64;
    config.backoff_min + Duration::from_nanos(if span == 0 { 0 } else { next_random(rng) % span })
}

/// xorshift64*: balancing and jitter need spread, not secrecy.
fn next_random(rng: &AtomicU64) -> u64 {
    let mut x = rng.load(Ordering::Relaxed);
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    rng.store(x, Ordering::Relaxed);
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Inner {
    fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        lock(&self.endpoints).clone()
    }

    /// Adds the endpoints `found` names that the pool lacks, and drops the ones it no
    /// longer names (their calls in flight finish).
    fn reconcile(&self, found: Vec<String>) {
        let mut endpoints = lock(&self.endpoints);
        endpoints.retain(|e| found.contains(&e.addr));
        for addr in found {
            if !endpoints.iter().any(|e| e.addr == addr) {
                endpoints.push(Arc::new(Endpoint::new(addr, self.config.connections_per_endpoint)));
            }
        }
    }

    /// Power of two choices among the endpoints that are up and not tried yet.
    fn pick(&self, tried: &[String]) -> Option<Arc<Endpoint>> {
        let candidates: Vec<Arc<Endpoint>> =
            self.endpoints().into_iter().filter(|e| e.is_up() && !tried.contains(&e.addr)).collect();
        match candidates.len() {
            0 => None,
            1 => candidates.into_iter().next(),
            n => {
                let r = next_random(&self.rng);
                let a = (r % n as u64) as usize;
                let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
                let load = |i: usize| candidates[i].in_flight.load(Ordering::Relaxed);
                Some(candidates[if load(b) < load(a) { b } else { a }].clone())
            }
        }
    }

    /// Takes a retry token if the budget has one.
    fn try_retry(&self) -> bool {
        let mut budget = lock(&self.budget);
        let now = Instant::now();
        let refill = now.saturating_duration_since(budget.last).as_secs_f64() * self.config.retry_floor;
        budget.last = now;
        budget.tokens = (budget.tokens + refill).min(self.config.retry_floor.max(1.0) * 10.0);
        if budget.tokens >= 1.0 {
            budget.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn earn_retry(&self) {
        let mut budget = lock(&self.budget);
        budget.tokens =
            (budget.tokens + self.config.retry_ratio).min(self.config.retry_floor.max(1.0) * 10.0);
    }

    async fn call(
        &self,
        call: &Call,
        options: CallOptions,
        deadline: Instant,
    ) -> Result<Response, PoolError> {
        self.earn_retry();
        let mut tried: Vec<String> = Vec::new();
        let mut not_run: Vec<String> = Vec::new();
        loop {
            let Some(endpoint) = self.pick(&tried) else {
                let all = self.endpoints();
                if !not_run.is_empty() {
                    return Err(PoolError::NotRun(not_run.join("; ")));
                }
                let states: Vec<String> = all
                    .iter()
                    .map(|e| format!("{} {}", e.addr, if e.is_up() { "up" } else { "down" }))
                    .collect();
                return Err(PoolError::NoEndpoint(if states.is_empty() {
                    "none known".into()
                } else {
                    states.join(", ")
                }));
            };
            tried.push(endpoint.addr.clone());
            let pick = next_random(&self.rng);
            let conn = match endpoint.connection(&self.config, pick).await {
                Ok(conn) => conn,
                Err(e) => {
                    endpoint.take_out(&self.config, &self.rng, &e);
                    not_run.push(format!("{}: {e}", endpoint.addr));
                    continue;
                }
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let timeout_ms = u64::try_from(remaining.as_millis()).unwrap_or(u64::MAX).max(1);
            endpoint.in_flight.fetch_add(1, Ordering::Relaxed);
            let result = conn.call(call, Some(timeout_ms)).await;
            endpoint.in_flight.fetch_sub(1, Ordering::Relaxed);
            match result {
                Ok(response) => {
                    endpoint.answered.fetch_add(1, Ordering::Relaxed);
                    return Ok(response);
                }
                Err(Failure::NotWritten(e)) => {
                    endpoint.take_out(&self.config, &self.rng, &e);
                    not_run.push(format!("{}: {e}", endpoint.addr));
                    if !self.try_retry() {
                        return Err(PoolError::NotRun(format!(
                            "{} (retry budget spent)",
                            not_run.join("; ")
                        )));
                    }
                }
                Err(Failure::Written(e)) => {
                    endpoint.take_out(&self.config, &self.rng, &e);
                    let why = if !options.idempotent {
                        "not marked idempotent"
                    } else if !self.try_retry() {
                        "retry budget spent"
                    } else {
                        continue;
                    };
                    return Err(PoolError::MayHaveRun { endpoint: endpoint.addr.clone(), source: e, why });
                }
            }
        }
    }
}

/// The pool's background task: probes endpoints taken out (a ping; back in once answered)
/// and asks the source for endpoints again, until the pool is dropped.
async fn maintain(pool: std::sync::Weak<Inner>, discover: impl Discover) {
    let mut last_discovery = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let Some(inner) = pool.upgrade() else { return };
        let now = Instant::now();
        for endpoint in inner.endpoints() {
            {
                let mut health = lock(&endpoint.health);
                let Health::Down { failures, retry_at } = *health else { continue };
                if retry_at > now {
                    continue;
                }
                // Not probed again until this probe is over.
                *health = Health::Down { failures, retry_at: now + inner.config.backoff_max * 4 };
            }
            let inner = inner.clone();
            tokio::spawn(async move {
                let probe = async {
                    let mux = Mux::connect(
                        &endpoint.addr,
                        inner.config.connect_timeout,
                        inner.config.tls.as_ref(),
                        inner.config.token.as_ref(),
                    )
                    .await?;
                    match mux.call(&Call::new(ringcall_core::PING), None).await {
                        Ok(r) if r.code == 0 => Ok(mux),
                        Ok(r) => {
                            Err(ClientError::Server { code: r.code, message: r.error.unwrap_or_default() })
                        }
                        Err(Failure::NotWritten(e) | Failure::Written(e)) => Err(e),
                    }
                };
                match tokio::time::timeout(inner.config.connect_timeout * 2, probe).await {
                    Ok(Ok(mux)) => {
                        lock(&endpoint.conns)[0] = Some(mux);
                        *lock(&endpoint.health) = Health::Up;
                        tracing::info!(endpoint = %endpoint.addr, "endpoint back in the pool");
                    }
                    Ok(Err(e)) => endpoint.take_out(&inner.config, &inner.rng, &e),
                    Err(_) => endpoint.take_out(&inner.config, &inner.rng, &"the probe timed out"),
                }
            });
        }
        if now.saturating_duration_since(last_discovery) >= inner.config.rediscover_every {
            last_discovery = now;
            drop(inner);
            match discover.endpoints().await {
                Ok(found) => match pool.upgrade() {
                    Some(inner) => inner.reconcile(found),
                    None => return,
                },
                Err(e) => tracing::warn!("endpoint discovery failed (the known endpoints stay): {e}"),
            }
        }
    }
}

/// A blocking client pool: an [`AsyncPool`] on a runtime of its own (one thread), for
/// callers that are not async. Any number of threads may call at once.
pub struct Pool {
    pool: AsyncPool,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Pool {
    /// A pool over `discover`'s endpoints.
    ///
    /// # Errors
    /// The runtime cannot start, or the first discovery fails.
    pub fn new(discover: impl Discover, config: PoolConfig) -> Result<Self, std::io::Error> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("ringcall-pool")
            .enable_all()
            .build()?;
        let pool = runtime.block_on(AsyncPool::new(discover, config))?;
        Ok(Self { pool, runtime: Some(runtime) })
    }

    /// A pool over a fixed list of `HOST:PORT` endpoints.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn with_endpoints(endpoints: &[&str], config: PoolConfig) -> Result<Self, std::io::Error> {
        Self::new(StaticList::new(endpoints.iter().map(|s| s.to_string()).collect()), config)
    }

    /// Sends `call` and waits for its reply. Must not be called from inside an async
    /// runtime (use [`AsyncPool`] there).
    ///
    /// # Errors
    /// See [`AsyncPool::call`].
    pub fn call(&self, call: &Call, options: CallOptions) -> Result<Response, PoolError> {
        self.runtime.as_ref().expect("present until dropped").block_on(self.pool.call(call, options))
    }

    /// Each endpoint's state.
    pub fn status(&self) -> Vec<EndpointStatus> {
        self.pool.status()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // Dropping a runtime inside another would panic; this never blocks.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

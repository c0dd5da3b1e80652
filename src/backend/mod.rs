//! The I/O drivers. Each moves bytes between sockets and the shared protocol core
//! ([`crate::protocol::Processor`]) and nothing else: framing, parsing, dispatch and reply
//! encoding never live here.
//!
//! - [`uring`]: native io_uring, one ring per core (what `auto` picks where it works).
//! - [`balance`]: hands new connections to the least loaded core.
//! - [`tokio_uring`]: the tokio-uring runtime, one per core.
//! - [`epoll`]: tokio's current-thread runtime, one per core.
//! - [`epoll_mt`]: tokio's multi-thread runtime behind one listener.
//! - `tokio_conn`: the connection loop the two epoll backends share.
//! - [`sys`]: sockets, affinity, limits and wake-ups shared by every driver.
//! - [`worker`]: the contract between the server and a worker thread.
//!
//! Every connection rule (backpressure, deadlines, FIN, draining, the connection limit)
//! lives in [`crate::protocol::connection`]; a driver only turns its answers into syscalls.

pub mod balance;
pub mod epoll;
pub mod epoll_mt;
pub mod sys;
pub(crate) mod tokio_conn;
pub mod tokio_uring;
pub mod uring;
pub mod worker;

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use std::sync::Arc;

use crate::dispatch::Service;
use worker::WorkerSetup;

/// The I/O driver that moves bytes for the protocol core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// `uring` where io_uring works on this host, else `epoll`; the choice is logged.
    #[default]
    Auto,
    /// Native io_uring: one ring per core, multishot accept and recv, provided buffers.
    Uring,
    /// tokio-uring: one runtime per core, ownership-passing reads and writes.
    TokioUring,
    /// tokio's current-thread runtime per core (epoll), `SO_REUSEPORT` listener per core.
    Epoll,
    /// tokio's work-stealing multi-thread runtime (epoll) behind one listener.
    EpollMt,
}

impl Backend {
    /// Every concrete backend (not `auto`), in the order they are documented.
    pub const ALL: [Backend; 4] = [Backend::Uring, Backend::TokioUring, Backend::Epoll, Backend::EpollMt];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Uring => "uring",
            Backend::TokioUring => "tokio-uring",
            Backend::Epoll => "epoll",
            Backend::EpollMt => "epoll-mt",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        std::iter::once(Backend::Auto).chain(Backend::ALL).find(|b| b.name() == s).ok_or_else(|| {
            format!("unknown backend {s:?} (expected auto, uring, tokio-uring, epoll or epoll-mt)")
        })
    }
}

/// Usable bytes of a receive buffer; each is followed by [`crate::protocol::PADDING`] bytes.
pub(crate) const RECV_BUF_SIZE: usize = 16 * 1024;

/// Pause before accepting again after an accept error such as EMFILE, so it cannot spin.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// While accept keeps failing (descriptors exhausted), at most one warning per this long.
pub(crate) const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// The log of accept failures of one worker: the first failure is logged at once, repeats
/// at most every [`ACCEPT_ERROR_LOG_EVERY`] with the number left unlogged, and the first
/// success after failures says accepting works again. Without it, exhausted descriptors
/// would log a line every [`ACCEPT_BACKOFF`].
#[derive(Debug)]
pub(crate) struct AcceptErrorLog {
    core: usize,
    last_warned: Option<Instant>,
    unlogged: u64,
    failures: u64,
}

impl AcceptErrorLog {
    /// The log of the worker on `core`.
    pub(crate) fn new(core: usize) -> Self {
        Self { core, last_warned: None, unlogged: 0, failures: 0 }
    }

    /// Records a failed accept; returns whether it was logged.
    pub(crate) fn failed(&mut self, err: &std::io::Error, now: Instant) -> bool {
        self.failures += 1;
        if self.last_warned.is_some_and(|at| now.saturating_duration_since(at) < ACCEPT_ERROR_LOG_EVERY) {
            self.unlogged += 1;
            return false;
        }
        tracing::warn!(
            core = self.core,
            unlogged_since_last_warning = self.unlogged,
            "accept failed: {err}; retrying every {ACCEPT_BACKOFF:?} (repeats are logged at most every \
             {ACCEPT_ERROR_LOG_EVERY:?}; EMFILE means the open-file limit is reached: raise `ulimit -n` \
             or lower --max-connections-per-core)"
        );
        self.last_warned = Some(now);
        self.unlogged = 0;
        true
    }

    /// Records a successful accept; after failures, logs that accepting works again.
    #[inline]
    pub(crate) fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(core = self.core, failures = self.failures, "accepting connections again");
            *self = Self::new(self.core);
        }
    }
}

/// Resolves `auto` to the backend this host supports, logging the choice and why; any other
/// backend is returned as it is. The server does this when it starts; call it first to name
/// the backend that will run (in an error message, say).
pub fn resolve(backend: Backend) -> Backend {
    if backend != Backend::Auto {
        return backend;
    }
    match uring::probe() {
        Ok(()) => {
            tracing::info!("backend auto: using uring (io_uring with multishot and buffer rings works here)");
            Backend::Uring
        }
        Err(e) => {
            tracing::info!(
                "backend auto: using epoll because io_uring is unavailable: {e}. {}",
                uring::diagnose(&e)
            );
            Backend::Epoll
        }
    }
}

/// For a connection task: resolves once answers to its deferred replies wait in `mailbox`;
/// never while it has none.
pub(crate) async fn deferred_ready(mailbox: Option<&crate::protocol::Mailbox>) {
    match mailbox {
        Some(mailbox) => std::future::poll_fn(|cx| mailbox.poll_ready(cx)).await,
        None => std::future::pending().await,
    }
}

/// Runs one worker thread of `backend` until the server shuts down.
pub(crate) fn run<S: Service>(backend: Backend, setup: WorkerSetup, service: Arc<S>) {
    if let Some(cpu) = setup.cpu
        && let Err(e) = sys::pin_to_cpu(cpu)
    {
        tracing::warn!(core = setup.core, cpu, "cannot pin worker to its CPU: {e}");
    }
    match backend {
        Backend::Uring | Backend::Auto => uring::run(setup, service),
        Backend::TokioUring => tokio_uring::run(setup, service),
        Backend::Epoll => epoll::run(setup, service),
        Backend::EpollMt => epoll_mt::run(setup, service),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_failures_are_logged_once_per_interval_and_recovery_resets() {
        let mut log = AcceptErrorLog::new(0);
        let err = std::io::Error::from_raw_os_error(libc::EMFILE);
        let start = Instant::now();
        assert!(log.failed(&err, start), "the first failure is logged");
        for i in 1..100 {
            assert!(!log.failed(&err, start + ACCEPT_BACKOFF * i), "repeats within the interval are not");
        }
        assert_eq!(log.unlogged, 99);
        assert!(log.failed(&err, start + ACCEPT_ERROR_LOG_EVERY), "one per interval");
        assert_eq!(log.unlogged, 0);
        log.succeeded();
        assert!(log.failed(&err, start + ACCEPT_ERROR_LOG_EVERY), "a new episode is logged at once");
    }
}

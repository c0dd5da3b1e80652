//! The I/O drivers. Each moves bytes between sockets and the shared protocol core
//! ([`ringcall_core::Processor`]) and nothing else: framing, parsing, dispatch and reply
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
//! lives in [`ringcall_core::connection`]; a driver only turns its answers into syscalls.

pub(crate) mod balance;
pub(crate) mod epoll;
pub(crate) mod epoll_mt;
pub(crate) mod tokio_conn;
pub(crate) mod tokio_core;
pub(crate) mod tokio_uring;
pub(crate) mod uring;
pub(crate) mod worker;

use std::fmt;
use std::str::FromStr;

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

    /// Resolves `auto` to the backend this host supports, logging the choice and why; any
    /// other backend is returned as it is. The server does this when it starts; call it
    /// first to name the backend that will run (in an error message, say).
    pub fn resolve(self) -> Backend {
        if self != Backend::Auto {
            return self;
        }
        match uring::probe() {
            Ok(()) => {
                tracing::info!(
                    "backend auto: using uring (io_uring with multishot and buffer rings works here)"
                );
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

pub(crate) use ringcall_sys as sys;
/// Usable bytes of a receive buffer; each is followed by [`ringcall_core::PADDING`] bytes.
pub(crate) use ringcall_sys::RECV_BUF_SIZE;

/// Names the peer of `fd` in `conn`'s logs, if they would name it (a `getpeername` call
/// per connection, made only then).
pub(crate) fn name_peer(fd: std::os::fd::BorrowedFd<'_>, conn: &mut ringcall_core::Connection) {
    if conn.wants_peer()
        && let Some(peer) = socket2::SockRef::from(&fd).peer_addr().ok().and_then(|a| a.as_socket())
    {
        conn.set_peer(peer);
    }
}

/// For a connection task: resolves once answers to its deferred replies wait in `mailbox`;
/// never while it has none.
pub(crate) async fn deferred_ready(mailbox: Option<&ringcall_core::Mailbox>) {
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

//! The I/O drivers. Each moves bytes between sockets and the shared protocol core
//! ([`crate::protocol::Processor`]) and nothing else: framing, parsing, dispatch and reply
//! encoding never live here.
//!
//! - [`uring`]: native io_uring, one ring per core (what `auto` picks where it works).
//! - [`tokio_uring`]: the tokio-uring runtime, one per core.
//! - [`epoll`]: tokio's current-thread runtime, one per core.
//! - [`epoll_mt`]: tokio's multi-thread runtime behind one listener.
//! - `tokio_conn`: the connection loop the two epoll backends share.
//! - [`sys`]: sockets, affinity, limits and wake-ups shared by every driver.

pub mod epoll;
pub mod epoll_mt;
pub mod sys;
pub(crate) mod tokio_conn;
pub mod tokio_uring;
pub mod uring;

use std::time::Duration;

use crate::dispatch::Routes;
use crate::server::{Backend, WorkerSetup};

/// Usable bytes of a receive buffer; each is followed by [`crate::protocol::PADDING`] bytes.
pub(crate) const RECV_BUF_SIZE: usize = 16 * 1024;

/// Pause before accepting again after an accept error such as EMFILE, so it cannot spin.
pub(crate) const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// The deadline of the wait that comes next: the rest of a started line must arrive within
/// the line timeout; otherwise the connection may stay silent for the idle timeout.
/// Returns the deadline and whether it is the idle one.
pub(crate) fn next_deadline(
    limits: &crate::protocol::Limits,
    waiting_since: Option<std::time::Instant>,
    last_activity: std::time::Instant,
) -> Option<(std::time::Instant, bool)> {
    match waiting_since {
        Some(since) => Some((since + limits.line_timeout, false)),
        None => limits.idle_timeout.map(|idle| (last_activity + idle, true)),
    }
}

/// Resolves `auto` to the backend this host supports, logging the choice and why.
pub(crate) fn resolve(backend: Backend) -> Backend {
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

/// Runs one worker thread of `backend` until the server shuts down.
pub(crate) fn run<R: Routes>(backend: Backend, setup: WorkerSetup) {
    if let Some(cpu) = setup.cpu
        && let Err(e) = sys::pin_to_cpu(cpu)
    {
        tracing::warn!(core = setup.core, cpu, "cannot pin worker to its CPU: {e}");
    }
    match backend {
        Backend::Uring | Backend::Auto => uring::run::<R>(setup),
        Backend::TokioUring => tokio_uring::run::<R>(setup),
        Backend::Epoll => epoll::run::<R>(setup),
        Backend::EpollMt => epoll_mt::run::<R>(setup),
    }
}

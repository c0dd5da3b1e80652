//! The I/O drivers. Each moves bytes between sockets and the shared protocol core
//! ([`crate::protocol::Processor`]) and nothing else: framing, parsing, dispatch and reply
//! encoding never live here.
//!
//! - [`uring`]: native io_uring, one ring per core (the default).
//! - [`sys`]: sockets, affinity, limits and wake-ups shared by every driver.

pub mod sys;
pub mod uring;

use crate::dispatch::Routes;
use crate::server::{Backend, WorkerSetup};

/// Runs one worker thread of `backend` until the server shuts down.
pub(crate) fn run<R: Routes>(backend: Backend, setup: WorkerSetup) {
    if let Some(cpu) = setup.cpu
        && let Err(e) = sys::pin_to_cpu(cpu)
    {
        tracing::warn!(core = setup.core, cpu, "cannot pin worker to its CPU: {e}");
    }
    match backend {
        Backend::Uring => uring::run::<R>(setup),
    }
}

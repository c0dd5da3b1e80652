//! The contract between the server and a backend's worker threads: what a worker is given
//! (its core, CPU, listener, configuration, counters and the stop signal) and how it reports
//! that it is serving. Backends depend on this module, never on `server`.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use super::Backend;
use super::sys::EventFd;
use crate::stats::StatsRegistry;
use ringcall_core::Limits;

/// What a worker needs to know of the server's configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerConfig {
    /// The limits every connection obeys.
    pub limits: Limits,
    /// How long a graceful shutdown waits for connections to drain.
    pub shutdown_timeout: Duration,
    /// Worker threads of the server (the runtime size of `epoll-mt`).
    pub threads: usize,
    /// Whether `epoll-mt` pins its runtime threads (the others are pinned before they start).
    pub pin_threads: bool,
}

/// The server's stop signal: a flag, one eventfd per worker (for workers blocked in the
/// kernel) and a watch channel (for async workers).
#[derive(Debug)]
pub(crate) struct StopSignal {
    stopping: AtomicBool,
    wakers: Vec<EventFd>,
    watch: tokio::sync::watch::Sender<bool>,
}

impl StopSignal {
    /// A signal for `workers` workers.
    pub(crate) fn new(workers: usize) -> io::Result<Self> {
        Ok(Self {
            stopping: AtomicBool::new(false),
            wakers: (0..workers).map(|_| EventFd::new()).collect::<io::Result<_>>()?,
            watch: tokio::sync::watch::Sender::new(false),
        })
    }

    /// Whether a shutdown has begun.
    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// For async workers: resolves once a shutdown has begun.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<bool> {
        self.watch.subscribe()
    }

    /// The eventfd that becomes readable when worker `core` must stop.
    pub(crate) fn waker(&self, core: usize) -> &EventFd {
        &self.wakers[core]
    }

    /// Begins the shutdown (idempotent).
    pub(crate) fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.watch.send_replace(true);
        for waker in &self.wakers {
            waker.notify();
        }
    }
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// io_uring could not be set up on this host.
    #[error("io_uring is not available here: {source}. {hint}")]
    IoUringUnavailable {
        /// The error from io_uring_setup or a registration.
        source: io::Error,
        /// The likely cause and the fix.
        hint: String,
    },
    /// The async runtime of a tokio-based backend could not be built.
    #[error("cannot start the {backend} runtime: {source}")]
    Runtime {
        /// The backend.
        backend: Backend,
        /// Why.
        source: io::Error,
    },
    /// Any other start-up failure.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: io::Error,
    },
}

/// What each worker thread is given.
pub(crate) struct WorkerSetup {
    /// The worker's index (its counters and its eventfd).
    pub core: usize,
    /// The CPU it is pinned to, if any.
    pub cpu: Option<usize>,
    /// Its listening socket.
    pub listener: OwnedFd,
    /// The configuration it serves with.
    pub config: WorkerConfig,
    /// Every core's counters.
    pub stats: Arc<StatsRegistry>,
    /// The stop signal.
    pub stop: Arc<StopSignal>,
    /// Where handlers' async and blocking work runs (shared by every worker).
    pub exec: Arc<crate::exec::Executors>,
    /// How connections are admitted (TLS, the token hello).
    pub access: ringcall_core::Access,
    /// Where connections accepted here go when another core holds fewer (`None`: each
    /// core serves what it accepts).
    pub balancer: Option<Arc<super::balance::Balancer>>,
    /// Reports the end of the worker's set-up: `Ok` once it is serving.
    pub ready: mpsc::Sender<Result<(), WorkerError>>,
}

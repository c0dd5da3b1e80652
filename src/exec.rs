//! Where handlers' async and blocking work runs, off the core's ring.
//!
//! - Async work ([`Ctx::spawn`](crate::Ctx::spawn)) runs on the core's own tokio runtime
//!   where the backend has one (`epoll`, `epoll-mt`, `tokio-uring`: the work stays on its
//!   core), and on a tokio runtime the server owns for `uring` (`async_threads` threads,
//!   started at the first async handler).
//! - Blocking work ([`Ctx::spawn_blocking`](crate::Ctx::spawn_blocking)) runs on a bounded
//!   pool of `blocking_threads` threads with a queue of at most `blocking_queue` jobs; a job
//!   that finds the queue full is answered 503 at once (load is shed, never queued without
//!   bound). A job whose request's deadline has passed by the time a thread takes it is
//!   skipped.
//!
//! Nothing is started until a handler first uses it.

use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, OnceLock};

use crate::HandlerError;
use ringcall_core::Deferred;

/// Sizes of the async runtime and the blocking pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecConfig {
    /// Threads of the async runtime `uring` servers run async handlers on (0: one per
    /// worker). The tokio backends run them on each core's own runtime instead.
    pub async_threads: usize,
    /// Threads of the blocking pool (0: one per CPU this process may use).
    pub blocking_threads: usize,
    /// Jobs that may wait for a blocking thread; beyond, a job is answered 503.
    pub blocking_queue: usize,
}

/// Default [`ExecConfig::blocking_queue`].
pub const DEFAULT_BLOCKING_QUEUE: usize = 1024;

impl Default for ExecConfig {
    fn default() -> Self {
        Self { async_threads: 0, blocking_threads: 0, blocking_queue: DEFAULT_BLOCKING_QUEUE }
    }
}

/// Blocking work and the reply it answers (given back, to answer 503, if it cannot queue).
pub(crate) struct Job {
    pub deferred: Deferred,
    pub work: Box<dyn FnOnce(Deferred) + Send>,
}

/// A fixed set of threads taking jobs from a bounded queue.
struct BlockingPool {
    queue: SyncSender<Job>,
}

impl BlockingPool {
    fn start(threads: usize, queue: usize) -> Self {
        let (tx, rx) = sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ringcall-blocking-{i}"))
                .spawn(move || take_jobs(&rx));
            if let Err(e) = spawned {
                tracing::error!("cannot start blocking thread {i}: {e}");
            }
        }
        Self { queue: tx }
    }
}

fn take_jobs(rx: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job, never while running one.
        let job = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
        match job {
            // A request whose deadline passed while it waited has its 504: skip the work.
            Ok(Job { deferred, .. }) if deferred.expired_at(std::time::Instant::now()) => deferred.expire(),
            // Nobody waits for the answer any more (the connection closed): skip the work.
            Ok(Job { deferred, .. }) if deferred.is_abandoned() => drop(deferred),
            Ok(Job { deferred, work }) => work(deferred),
            // The server is gone.
            Err(_) => return,
        }
    }
}

/// The server's async runtime (for `uring`) and blocking pool, started when first used.
pub(crate) struct Executors {
    config: ExecConfig,
    workers: usize,
    runtime: OnceLock<tokio::runtime::Runtime>,
    blocking: OnceLock<BlockingPool>,
}

impl std::fmt::Debug for Executors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executors").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Executors {
    /// Executors for a server of `workers` worker threads.
    pub(crate) fn new(config: ExecConfig, workers: usize) -> Arc<Self> {
        Arc::new(Self { config, workers, runtime: OnceLock::new(), blocking: OnceLock::new() })
    }

    /// Where async work of a handler on this thread goes: the thread's own tokio runtime if
    /// it runs in one, else the server's.
    pub(crate) fn async_handle(&self) -> tokio::runtime::Handle {
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            return handle;
        }
        self.runtime
            .get_or_init(|| {
                let threads = if self.config.async_threads == 0 {
                    self.workers.max(1)
                } else {
                    self.config.async_threads
                };
                tracing::info!(threads, "starting the async runtime for async handlers");
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(threads)
                    .thread_name("ringcall-async")
                    .enable_all()
                    .build()
                    .expect("cannot start the tokio runtime for async handlers")
            })
            .handle()
            .clone()
    }

    /// Queues `job` on the blocking pool; a job that finds the queue full is answered 503.
    pub(crate) fn run_blocking(&self, job: Job) {
        let pool = self.blocking.get_or_init(|| {
            let threads = match self.config.blocking_threads {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            };
            tracing::info!(threads, queue = self.config.blocking_queue, "starting the blocking pool");
            BlockingPool::start(threads, self.config.blocking_queue)
        });
        match pool.queue.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(job)) => {
                let queue = self.config.blocking_queue;
                job.deferred.error(HandlerError::unavailable(format!(
                    "overloaded: {queue} jobs already wait for a blocking thread; retry later"
                )));
            }
            Err(TrySendError::Disconnected(job)) => {
                job.deferred.error(HandlerError::unavailable("the blocking pool has stopped"));
            }
        }
    }
}

impl Drop for Executors {
    fn drop(&mut self) {
        // Dropped on whichever thread lets go last, possibly inside another runtime, where
        // a blocking shutdown would panic.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

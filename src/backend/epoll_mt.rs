//! The `epoll-mt` backend: tokio's work-stealing multi-thread runtime with `--threads`
//! workers behind one listener — what most tokio servers deploy. Connection tasks may move
//! between workers, so each worker thread keeps its own protocol processor in a
//! thread-local and a task uses the one of the thread it is running on; the listener's one
//! engine (its connection table, timers, shutdown) sits behind a lock, taken once per event
//! and never across an await.

use std::any::Any;
use std::cell::RefCell;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use super::Backend;
use super::sys;
use super::tokio_conn::{serve_connection, tokio_listener};
use super::tokio_core::{CoreAccess, CoreEngine, CoreIo, serve_worker};
use super::worker::{WorkerError, WorkerSetup};
use crate::dispatch::Service;
use crate::stats::StatsRegistry;
use ringcall_core::Limits;

thread_local! {
    /// This worker thread's `CoreIo<S>` (type-erased: a thread-local cannot be generic).
    static THREAD_CORE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Finds (or creates) the processor of the worker thread a task runs on, and the engine.
struct ThreadCore<S: Service> {
    service: Arc<S>,
    exec: Arc<crate::exec::Executors>,
    access: ringcall_core::Access,
    stats: Arc<StatsRegistry>,
    limits: Limits,
    next_index: Arc<AtomicUsize>,
    engine: Arc<Mutex<CoreEngine>>,
    _routes: PhantomData<fn() -> S>,
}

impl<S: Service> Clone for ThreadCore<S> {
    fn clone(&self) -> Self {
        Self {
            service: self.service.clone(),
            exec: self.exec.clone(),
            access: self.access.clone(),
            stats: self.stats.clone(),
            limits: self.limits,
            next_index: self.next_index.clone(),
            engine: self.engine.clone(),
            _routes: PhantomData,
        }
    }
}

impl<S: Service> CoreAccess<S> for ThreadCore<S> {
    fn with<T>(&self, f: impl FnOnce(&mut CoreIo<S>) -> T) -> T {
        THREAD_CORE.with(|slot| {
            let mut slot = slot.borrow_mut();
            let core = slot.get_or_insert_with(|| {
                let index = self.next_index.fetch_add(1, Ordering::Relaxed) % self.stats.cores();
                Box::new(CoreIo::<S>::new(
                    index,
                    self.service.clone(),
                    self.exec.clone(),
                    self.access.clone(),
                    self.stats.clone(),
                    self.limits,
                ))
            });
            f(core.downcast_mut::<CoreIo<S>>().expect("one server per runtime thread"))
        })
    }

    fn engine<T>(&self, f: impl FnOnce(&mut CoreEngine) -> T) -> T {
        f(&mut self.engine.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

pub(crate) fn run<S: Service>(setup: WorkerSetup, service: Arc<S>) {
    let threads = setup.config.threads.max(1);
    let cpus = sys::allowed_cpus();
    let pin = setup.config.pin_threads;
    let started = AtomicUsize::new(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("ringcall-mt")
        .enable_all()
        .on_thread_start(move || {
            let index = started.fetch_add(1, Ordering::Relaxed);
            if pin && index < threads {
                let _ = sys::pin_to_cpu(cpus[index % cpus.len()]);
            }
        })
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(source) => {
            let _ = setup.ready.send(Err(WorkerError::Runtime { backend: Backend::EpollMt, source }));
            return;
        }
    };
    // The accept loop runs on a worker, not on this thread: a connection's task is then
    // allocated by a worker that also frees it, so the allocator can give the memory back
    // (a block freed by another thread waits for its owner's next allocation, which an idle
    // accept thread never makes).
    let server = runtime.spawn(serve::<S>(setup, service));
    if let Err(e) = runtime.block_on(server) {
        tracing::error!("the epoll-mt accept loop failed: {e}");
    }
}

async fn serve<S: Service>(mut setup: WorkerSetup, service: Arc<S>) {
    let exec = setup.exec.clone();
    let access = setup.access.clone();
    let threads = setup.config.threads.max(1);
    // The cores behind one listener share its engine, and its connection limit.
    setup.config.limits.max_connections_per_core =
        setup.config.limits.max_connections_per_core.saturating_mul(threads);
    serve_worker::<S, _, _>(
        setup,
        tokio_listener,
        |_, stats, limits, engine| ThreadCore::<S> {
            service,
            exec,
            access,
            stats,
            limits,
            next_index: Arc::new(AtomicUsize::new(0)),
            engine: Arc::new(Mutex::new(engine)),
            _routes: PhantomData,
        },
        |stream, handle, waker, core| {
            tokio::spawn(serve_connection(stream, handle, waker, core));
        },
    )
    .await;
}

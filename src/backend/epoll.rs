//! The `epoll` backend: one tokio current-thread runtime per core, each with its own
//! `SO_REUSEPORT` listener; connections of a core share its protocol engine and receive
//! buffer. The apples-to-apples epoll baseline for `uring`.

use super::Backend;
use super::tokio_conn::{CoreAccess, CoreIo, serve_connection, serve_worker};
use super::worker::{WorkerError, WorkerSetup};
use crate::dispatch::Service;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// This core's engine, shared by the connection tasks of its runtime (one thread).
struct LocalCore<S: Service>(Rc<RefCell<CoreIo<S>>>);

impl<S: Service> Clone for LocalCore<S> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<S: Service> CoreAccess<S> for LocalCore<S> {
    fn with<T>(&self, f: impl FnOnce(&mut CoreIo<S>) -> T) -> T {
        f(&mut self.0.borrow_mut())
    }
}

pub(crate) fn run<S: Service>(setup: WorkerSetup, service: Arc<S>) {
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(source) => {
            let _ = setup.ready.send(Err(WorkerError::Runtime { backend: Backend::Epoll, source }));
            return;
        }
    };
    tokio::task::LocalSet::new().block_on(&runtime, serve::<S>(setup, service));
}

async fn serve<S: Service>(setup: WorkerSetup, service: Arc<S>) {
    let exec = setup.exec.clone();
    let access = setup.access.clone();
    serve_worker::<S, _>(
        setup,
        1,
        |core, stats, limits| {
            LocalCore(Rc::new(RefCell::new(CoreIo::new(core, service, exec, access, stats, limits))))
        },
        |stream, access, drain, guard| {
            tokio::task::spawn_local(async move {
                serve_connection(stream, access, drain).await;
                drop(guard);
            });
        },
    )
    .await;
}

//! The `epoll` backend: one tokio current-thread runtime per core, each with its own
//! `SO_REUSEPORT` listener; connections of a core share its processor, receive buffer and
//! engine. The apples-to-apples epoll baseline for `uring`.

use super::Backend;
use super::tokio_conn::{serve_connection, tokio_listener};
use super::tokio_core::{CoreIo, LocalCore, serve_worker};
use super::worker::{WorkerError, WorkerSetup};
use crate::dispatch::Service;
use std::sync::Arc;

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
    serve_worker::<S, _, _>(
        setup,
        tokio_listener,
        |core, stats, limits, engine| {
            LocalCore::new(CoreIo::new(core, service, exec, access, stats, limits), engine)
        },
        |stream, handle, waker, core| {
            tokio::task::spawn_local(serve_connection(stream, handle, waker, core));
        },
    )
    .await;
}

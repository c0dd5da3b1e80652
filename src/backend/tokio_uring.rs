//! The `tokio-uring` backend: one tokio-uring runtime per core, each with its own
//! `SO_REUSEPORT` listener, reading and writing with ownership-passing io_uring operations.
//!
//! Each connection owns its receive buffer (the buffer is handed to the kernel for every
//! read), there is no multishot or provided-buffer ring, and the ring is waited on through
//! tokio's epoll reactor: the reasons it trails the native `uring` backend.
//!
//! tokio-uring cannot cancel an operation by dropping its future, so nothing here races a
//! read or an accept against a timer. Shutdown instead shuts the sockets' read side: a
//! pending accept fails, and a pending read returns what the kernel holds, then end of file.

use std::cell::RefCell;
use std::collections::HashSet;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;

use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::{TcpListener, TcpStream};

use super::tokio_conn::ConnTracker;
use super::{ACCEPT_BACKOFF, RECV_BUF_SIZE, sys, uring};
use crate::dispatch::Routes;
use crate::protocol::{Flow, PADDING, Processor, Session};
use crate::server::{ServerError, WorkerSetup};

/// Output buffers that grew past this are freed once written.
const OUT_KEEP: usize = 64 * 1024;

pub(crate) fn run<R: Routes>(setup: WorkerSetup) {
    // Runtime::new reports a ring that cannot be created; tokio_uring::start would panic.
    let runtime = match tokio_uring::Runtime::new(&tokio_uring::builder()) {
        Ok(runtime) => runtime,
        Err(source) => {
            let hint = uring::diagnose(&source);
            let _ = setup.ready.send(Err(ServerError::IoUringUnavailable { source, hint }));
            return;
        }
    };
    runtime.block_on(serve::<R>(setup));
}

type Shared<T> = Rc<RefCell<T>>;

async fn serve<R: Routes>(setup: WorkerSetup) {
    let WorkerSetup { core, listener, config, stats, control, ready, .. } = setup;
    let listener = std::net::TcpListener::from(listener);
    let listener_fd = listener.as_raw_fd();
    let listener = TcpListener::from_std(listener);
    let processor: Shared<Processor<R>> = Rc::new(RefCell::new(Processor::new(core, stats, config.limits)));
    let live: Shared<HashSet<RawFd>> = Rc::default();
    let tracker = Arc::new(ConnTracker::default());
    let _ = ready.send(Ok(()));
    drop(ready);

    let spawn_connection = {
        let (processor, live, tracker, control) =
            (processor.clone(), live.clone(), tracker.clone(), control.clone());
        move |stream: TcpStream| {
            let fd = stream.as_raw_fd();
            live.borrow_mut().insert(fd);
            if control.stopping() {
                // Draining already: it gets what the kernel holds, then end of file.
                sys::shutdown(fd, libc::SHUT_RD);
            }
            let (processor, live, guard) = (processor.clone(), live.clone(), tracker.guard());
            tokio_uring::spawn(async move {
                serve_connection(stream, processor, live).await;
                drop(guard);
            });
        }
    };

    let mut stop = control.subscribe();
    let (live_at_stop, spawn_at_stop) = (live.clone(), spawn_connection.clone());
    tokio_uring::spawn(async move {
        let _ = stop.wait_for(|stopping| *stopping).await;
        // Connections the kernel already established may carry requests: serve them too.
        // Shutting down a listener's read side resets its backlog, so take it in first.
        let _ = sys::set_nonblocking(listener_fd);
        sys::accept_backlog(listener_fd, |fd| {
            spawn_at_stop(TcpStream::from_std(std::net::TcpStream::from(fd)))
        });
        // Wakes the pending accept, and makes each pending read return what the kernel
        // holds, then end of file.
        sys::shutdown(listener_fd, libc::SHUT_RD);
        for &fd in live_at_stop.borrow().iter() {
            sys::shutdown(fd, libc::SHUT_RD);
        }
    });

    loop {
        match listener.accept().await {
            Ok((stream, _)) => spawn_connection(stream),
            Err(_) if control.stopping() => {}
            Err(e) => {
                tracing::warn!(core, "accept failed: {e}; retrying in {ACCEPT_BACKOFF:?}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
        if control.stopping() {
            break;
        }
    }
    drop(listener);
    super::tokio_conn::drain(&tracker, config.shutdown_timeout, core).await;
}

async fn serve_connection<R: Routes>(
    stream: TcpStream,
    processor: Shared<Processor<R>>,
    live: Shared<HashSet<RawFd>>,
) {
    let _ = stream.set_nodelay(true);
    let fd = stream.as_raw_fd();
    processor.borrow().stats().connection_opened();
    if let Err(e) = drive(&stream, &processor).await {
        tracing::debug!("connection error: {e}");
    }
    live.borrow_mut().remove(&fd);
    processor.borrow().stats().connection_closed();
}

async fn drive<R: Routes>(stream: &TcpStream, processor: &Shared<Processor<R>>) -> std::io::Result<()> {
    let mut session = Session::new();
    let mut buf = vec![0u8; RECV_BUF_SIZE + PADDING];
    let mut out = Vec::new();
    loop {
        let (read, slice) = stream.read(buf.slice(..RECV_BUF_SIZE)).await;
        buf = slice.into_inner();
        let n = read?;
        if n == 0 {
            session.finish();
            return Ok(());
        }
        let flow = processor.borrow_mut().on_recv(&mut session, &mut buf, n, &mut out);
        if !out.is_empty() {
            let (written, returned) = stream.write_all(out).await;
            out = returned;
            written?;
            processor.borrow().stats().bytes_out(out.len());
            out.clear();
            if out.capacity() > OUT_KEEP {
                out = Vec::new();
            }
        }
        if flow == Flow::Close {
            // FIN after the 413, then discard until the peer closes (see tokio_conn::linger).
            stream.shutdown(Shutdown::Write)?;
            loop {
                let (read, slice) = stream.read(buf.slice(..RECV_BUF_SIZE)).await;
                buf = slice.into_inner();
                if read? == 0 {
                    return Ok(());
                }
            }
        }
    }
}

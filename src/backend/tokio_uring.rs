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

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::{TcpListener, TcpStream};

use super::next_deadline;
use super::tokio_conn::ConnTracker;
use super::{ACCEPT_BACKOFF, AcceptErrorLog, RECV_BUF_SIZE, sys, uring};
use crate::dispatch::Routes;
use crate::protocol::reply::TOO_MANY_CONNECTIONS;
use crate::protocol::{Flow, PADDING, Processor, Session};
use crate::server::{ServerError, WorkerSetup};

/// How often connections are checked against their idle and line deadlines.
const TICK: Duration = Duration::from_secs(1);
/// A write still pending after this long means the peer is not reading its replies.
const STALLED_WRITE: Duration = Duration::from_millis(50);
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

/// When a connection last moved bytes, since when it owes us the rest of a line (or its
/// close after our FIN), and which deadline closed it, if one did. Read by the per-core
/// ticker, which cannot cancel a pending read: it shuts the socket down instead.
struct ConnClock {
    last_activity: Cell<Instant>,
    waiting_since: Cell<Option<Instant>>,
    /// Closed by one of its deadlines.
    timed_out: Cell<bool>,
}

impl ConnClock {
    fn new() -> Rc<Self> {
        Rc::new(Self {
            last_activity: Cell::new(Instant::now()),
            waiting_since: Cell::new(None),
            timed_out: Cell::new(false),
        })
    }
}

type Live = Shared<HashMap<RawFd, Rc<ConnClock>>>;

async fn serve<R: Routes>(setup: WorkerSetup) {
    let WorkerSetup { core, listener, config, stats, control, ready, .. } = setup;
    let limits = config.limits;
    let listener = std::net::TcpListener::from(listener);
    let listener_fd = listener.as_raw_fd();
    let listener = TcpListener::from_std(listener);
    let processor: Shared<Processor<R>> = Rc::new(RefCell::new(Processor::new(core, stats, limits)));
    let live: Live = Rc::default();
    let tracker = Arc::new(ConnTracker::default());
    let _ = ready.send(Ok(()));
    drop(ready);

    let spawn_connection = {
        let (processor, live, tracker, control) =
            (processor.clone(), live.clone(), tracker.clone(), control.clone());
        move |stream: TcpStream| {
            let fd = stream.as_raw_fd();
            if live.borrow().len() >= limits.max_connections_per_core {
                processor.borrow().stats().connection_rejected();
                tracing::debug!(core, "connection refused: core at its connection limit");
                sys::refuse(fd, TOO_MANY_CONNECTIONS);
                return;
            }
            let clock = ConnClock::new();
            live.borrow_mut().insert(fd, clock.clone());
            if control.stopping() {
                // Draining already: it gets what the kernel holds, then end of file.
                sys::shutdown(fd, libc::SHUT_RD);
            }
            let (processor, live, guard) = (processor.clone(), live.clone(), tracker.guard());
            tokio_uring::spawn(async move {
                serve_connection(stream, processor, live, clock).await;
                drop(guard);
            });
        }
    };

    let (live_at_tick, processor_at_tick) = (live.clone(), processor.clone());
    tokio_uring::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        loop {
            tick.tick().await;
            let now = Instant::now();
            for (&fd, clock) in live_at_tick.borrow().iter() {
                let deadline = next_deadline(&limits, clock.waiting_since.get(), clock.last_activity.get());
                if let Some((_, idle)) = deadline.filter(|(at, _)| *at <= now)
                    && !clock.timed_out.get()
                {
                    clock.timed_out.set(true);
                    // Counted before the close, so whoever sees the close sees the count.
                    let processor = processor_at_tick.borrow();
                    if idle {
                        processor.stats().idle_timeout()
                    } else {
                        processor.stats().line_timeout()
                    }
                    sys::shutdown(fd, libc::SHUT_RDWR);
                }
            }
        }
    });

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
        for &fd in live_at_stop.borrow().keys() {
            sys::shutdown(fd, libc::SHUT_RD);
        }
    });

    let mut errors = AcceptErrorLog::new(core);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                errors.succeeded();
                spawn_connection(stream)
            }
            Err(_) if control.stopping() => {}
            Err(e) => {
                errors.failed(&e, Instant::now());
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
    live: Live,
    clock: Rc<ConnClock>,
) {
    let _ = stream.set_nodelay(true);
    let fd = stream.as_raw_fd();
    processor.borrow().stats().connection_opened();
    if let Err(e) = drive(&stream, &processor, &clock).await {
        tracing::debug!("connection error: {e}");
    }
    live.borrow_mut().remove(&fd);
    processor.borrow().stats().connection_closed();
}

async fn drive<R: Routes>(
    stream: &TcpStream,
    processor: &Shared<Processor<R>>,
    clock: &ConnClock,
) -> std::io::Result<()> {
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
        let now = Instant::now();
        clock.last_activity.set(now);
        let flow = processor.borrow_mut().on_recv(&mut session, &mut buf, n, &mut out);
        let waiting =
            if session.pending_bytes() > 0 { clock.waiting_since.get().or(Some(now)) } else { None };
        clock.waiting_since.set(waiting);
        if !out.is_empty() {
            // No read is issued until the replies are written: a peer that does not read
            // stops being read from (backpressure).
            let (written, returned) = write_all(stream, out, processor).await;
            out = returned;
            written?;
            processor.borrow().stats().bytes_out(out.len());
            out.clear();
            if out.capacity() > OUT_KEEP {
                out = Vec::new();
            }
            clock.last_activity.set(Instant::now());
        }
        if flow == Flow::Close {
            // FIN after the 413, then discard until the peer closes (see tokio_conn::linger);
            // the ticker bounds the wait by the line timeout.
            stream.shutdown(Shutdown::Write)?;
            clock.waiting_since.set(Some(Instant::now()));
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

/// Writes all of `out` and returns it. A write the kernel cannot finish at once (the socket
/// buffer is full: the peer is not reading) counts as a backpressure pause.
async fn write_all<R: Routes>(
    stream: &TcpStream,
    out: Vec<u8>,
    processor: &Shared<Processor<R>>,
) -> (std::io::Result<()>, Vec<u8>) {
    let (mut out, mut written, mut counted) = (out, 0, false);
    while written < out.len() {
        let write = stream.write(out.slice(written..)).submit();
        tokio::pin!(write);
        // The write future is never dropped before it completes (that would not cancel it).
        let (result, slice) = tokio::select! {
            biased;
            done = &mut write => done,
            _ = tokio::time::sleep(STALLED_WRITE), if !counted => {
                counted = true;
                processor.borrow().stats().backpressure_pause();
                write.await
            }
        };
        out = slice.into_inner();
        match result {
            Ok(0) => return (Err(std::io::ErrorKind::WriteZero.into()), out),
            Ok(n) => written += n,
            Err(e) => return (Err(e), out),
        }
    }
    (Ok(()), out)
}

//! The connection loop of the readiness-based (epoll) backends, `epoll` and `epoll-mt`:
//! wait until the socket is readable, read everything it holds into the core's receive
//! buffer, feed it to the protocol core, write the replies of that batch with one send.
//!
//! The receive buffer belongs to the core, not the connection (read with `try_read` right
//! after readiness), so an idle connection holds no buffer, as with the uring pool.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

use super::{ACCEPT_BACKOFF, AcceptErrorLog, RECV_BUF_SIZE, next_deadline, sys};
use crate::dispatch::Routes;
use crate::protocol::reply::TOO_MANY_CONNECTIONS;
use crate::protocol::{Flow, Limits, PADDING, Processor, Session};
use crate::server::{ServerError, WorkerSetup};
use crate::stats::StatsRegistry;

/// Output buffers that grew past this are freed once written, bounding idle memory.
const OUT_KEEP: usize = 64 * 1024;

/// One core's protocol engine and its receive buffer.
pub(crate) struct CoreIo<R: Routes> {
    pub processor: Processor<R>,
    pub buf: Box<[u8]>,
}

impl<R: Routes> CoreIo<R> {
    pub fn new(core: usize, stats: Arc<StatsRegistry>, limits: Limits) -> Self {
        Self { processor: Processor::new(core, stats, limits), buf: vec![0; RECV_BUF_SIZE + PADDING].into() }
    }
}

/// How a connection task reaches the [`CoreIo`] of the thread it runs on.
pub(crate) trait CoreAccess<R: Routes>: Clone + 'static {
    fn with<T>(&self, f: impl FnOnce(&mut CoreIo<R>) -> T) -> T;
}

/// Counts a worker's open connections so shutdown can wait for them to drain.
#[derive(Debug, Default)]
pub(crate) struct ConnTracker {
    open: AtomicUsize,
    all_closed: Notify,
}

/// Held by a connection task; dropping it counts the connection as closed.
pub(crate) struct ConnGuard(Arc<ConnTracker>);

impl ConnTracker {
    pub fn guard(self: &Arc<Self>) -> ConnGuard {
        self.open.fetch_add(1, Ordering::Relaxed);
        ConnGuard(self.clone())
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    async fn all_closed(&self) {
        loop {
            let notified = self.all_closed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.all_closed.notify_waiters();
        }
    }
}

/// Turns a listener made by [`sys::reuseport_listeners`] into a tokio listener.
fn tokio_listener(fd: std::os::fd::OwnedFd) -> io::Result<TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// The body of an epoll worker: registers its listener, reports readiness, accepts until
/// the stop signal, then drains. `workers_per_listener` cores share this listener (the
/// connection limit is per core). `make_access` builds how tasks reach their core's engine;
/// `spawn` starts a connection task on the backend's runtime.
pub(crate) async fn serve_worker<R: Routes, A: CoreAccess<R>>(
    setup: WorkerSetup,
    workers_per_listener: usize,
    make_access: impl FnOnce(usize, Arc<StatsRegistry>, Limits) -> A,
    spawn: impl Fn(TcpStream, A, watch::Receiver<bool>, ConnGuard),
) {
    let WorkerSetup { core, listener, config, stats, control, ready, .. } = setup;
    let listener = match tokio_listener(listener) {
        Ok(listener) => listener,
        Err(source) => {
            let _ =
                ready.send(Err(ServerError::Io { what: "cannot register the listener with tokio", source }));
            return;
        }
    };
    let access = make_access(core, stats, config.limits);
    let tracker = Arc::new(ConnTracker::default());
    let _ = ready.send(Ok(()));
    drop(ready);
    let stop = control.subscribe();
    let max_connections = config.limits.max_connections_per_core.saturating_mul(workers_per_listener);
    accept_until_stopped(&listener, core, stop.clone(), |stream| {
        if tracker.open() >= max_connections {
            reject(stream, &access);
        } else {
            spawn(stream, access.clone(), stop.clone(), tracker.guard());
        }
    })
    .await;
    drop(listener);
    drain(&tracker, config.shutdown_timeout, core).await;
}

/// Accepts until the stop signal, then takes in the connections already in the backlog
/// (they may carry requests owed a reply); backs off after errors such as EMFILE instead of
/// spinning.
async fn accept_until_stopped(
    listener: &TcpListener,
    core: usize,
    mut stop: watch::Receiver<bool>,
    mut on_connection: impl FnMut(TcpStream),
) {
    let mut errors = AcceptErrorLog::new(core);
    loop {
        tokio::select! {
            biased;
            _ = stop.wait_for(|stopping| *stopping) => {
                sys::accept_backlog(listener.as_raw_fd(), |fd| {
                    match TcpStream::from_std(std::net::TcpStream::from(fd)) {
                        Ok(stream) => on_connection(stream),
                        Err(e) => tracing::debug!("cannot register a connection at shutdown: {e}"),
                    }
                });
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    errors.succeeded();
                    on_connection(stream)
                }
                Err(e) => {
                    errors.failed(&e, Instant::now());
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

/// Waits for every connection to finish, at most `timeout`; logs what was left.
pub(crate) async fn drain(tracker: &ConnTracker, timeout: Duration, core: usize) {
    tracing::info!(core, connections = tracker.open(), ?timeout, "shutting down: draining connections");
    if tokio::time::timeout(timeout, tracker.all_closed()).await.is_err() {
        tracing::warn!(
            core,
            connections = tracker.open(),
            "shutdown deadline passed: closing undrained connections"
        );
    }
}

enum Step {
    Data(Flow),
    Eof,
    WouldBlock,
}

/// A connection closed by one of its deadlines; counted, then reported as its end.
fn timed_out<R: Routes, A: CoreAccess<R>>(access: &A, idle: bool) -> io::Error {
    access.with(|core| {
        let stats = core.processor.stats();
        if idle { stats.idle_timeout() } else { stats.line_timeout() }
    });
    let what = if idle { "idle timeout" } else { "line timeout" };
    io::Error::new(io::ErrorKind::TimedOut, what)
}

/// Awaits `wait`, or fails with the timeout error if `deadline` passes first.
async fn within<R: Routes, A: CoreAccess<R>, T>(
    access: &A,
    deadline: Option<(Instant, bool)>,
    wait: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    match deadline {
        Some((at, idle)) => match tokio::time::timeout_at(at.into(), wait).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(access, idle)),
        },
        None => wait.await,
    }
}

/// Refuses a connection beyond the connection limit: a 503 line, then close.
pub(crate) fn reject<R: Routes, A: CoreAccess<R>>(stream: TcpStream, access: &A) {
    // Counted first, so whoever sees the reply sees the count.
    access.with(|core| core.processor.stats().connection_rejected());
    sys::refuse(stream.as_raw_fd(), TOO_MANY_CONNECTIONS);
    tracing::debug!("connection refused: at the connection limit");
}

/// Serves one connection until it closes.
pub(crate) async fn serve_connection<R: Routes, A: CoreAccess<R>>(
    stream: TcpStream,
    access: A,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    access.with(|core| core.processor.stats().connection_opened());
    if let Err(e) = drive(&stream, &access, &mut stop).await {
        tracing::debug!("connection error: {e}");
    }
    access.with(|core| core.processor.stats().connection_closed());
}

async fn drive<R: Routes, A: CoreAccess<R>>(
    stream: &TcpStream,
    access: &A,
    stop: &mut watch::Receiver<bool>,
) -> io::Result<()> {
    let limits = access.with(|core| core.processor.limits());
    let mut session = Session::new();
    let mut out = Vec::new();
    let mut draining = *stop.borrow();
    let mut last_activity = Instant::now();
    let mut waiting_since: Option<Instant> = None;
    loop {
        let deadline = next_deadline(&limits, waiting_since, last_activity);
        if draining {
            within(access, deadline, stream.readable()).await?;
        } else {
            let readable = async {
                tokio::select! {
                    ready = stream.readable() => ready.map(|()| false),
                    _ = stop.wait_for(|stopping| *stopping) => Ok(true),
                }
            };
            draining = within(access, deadline, readable).await?;
        }
        let mut end = None;
        while out.len() < limits.max_pending_output {
            let step = access.with(|core| match stream.try_read(&mut core.buf[..RECV_BUF_SIZE]) {
                Ok(0) => Ok(Step::Eof),
                Ok(n) => Ok(Step::Data(core.processor.on_recv(&mut session, &mut core.buf, n, &mut out))),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Step::WouldBlock),
                Err(e) => Err(e),
            })?;
            match step {
                Step::Data(Flow::Continue) => last_activity = Instant::now(),
                Step::Data(Flow::Close) => {
                    end = Some(Flow::Close);
                    break;
                }
                Step::Eof => {
                    session.finish();
                    end = Some(Flow::Continue);
                    break;
                }
                Step::WouldBlock => break,
            }
        }
        waiting_since =
            if session.pending_bytes() > 0 { waiting_since.or(Some(last_activity)) } else { None };
        if !out.is_empty() {
            // While the peer does not read, nothing more is read from it: the socket buffers
            // fill and TCP's flow control stops the peer (backpressure).
            write_all(stream, &out, || access.with(|core| core.processor.stats().backpressure_pause()))
                .await?;
            access.with(|core| core.processor.stats().bytes_out(out.len()));
            out.clear();
            if out.capacity() > OUT_KEEP {
                out = Vec::new();
            }
            last_activity = Instant::now();
        }
        match end {
            // The peer half-closed and every reply is out.
            Some(Flow::Continue) => return Ok(()),
            Some(Flow::Close) => return linger(stream, access, &limits).await,
            // Draining for shutdown: close once the kernel holds no unread request bytes.
            None if draining && sys::unread_bytes(stream.as_raw_fd()) == 0 => {
                return linger(stream, access, &limits).await;
            }
            None => {}
        }
    }
}

/// Writes everything; calls `on_full` once if it has to wait for the peer to read (the
/// socket buffer is full: backpressure).
async fn write_all(stream: &TcpStream, mut bytes: &[u8], on_full: impl FnOnce()) -> io::Result<()> {
    let mut on_full = Some(on_full);
    while !bytes.is_empty() {
        match stream.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(on_full) = on_full.take() {
                    on_full();
                }
                stream.writable().await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Sends FIN after the last reply, then discards input until the peer closes (at most the
/// line timeout), so unread input cannot turn the close into a reset that destroys replies
/// still in flight.
async fn linger<R: Routes, A: CoreAccess<R>>(
    stream: &TcpStream,
    access: &A,
    limits: &Limits,
) -> io::Result<()> {
    sys::shutdown(stream.as_raw_fd(), libc::SHUT_WR);
    let deadline = Some((Instant::now() + limits.line_timeout, false));
    loop {
        within(access, deadline, stream.readable()).await?;
        match access.with(|core| stream.try_read(&mut core.buf[..RECV_BUF_SIZE])) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}

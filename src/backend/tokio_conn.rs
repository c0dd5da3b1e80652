//! The connection loop of the readiness-based (epoll) backends, `epoll` and `epoll-mt`:
//! send what the connection's state machine owes, then wait for what it asks for —
//! readable (if it reads), writable (if a send could not finish), its next deadline, the
//! stop signal — and feed the event back. Every rule is the state machine's
//! ([`Connection`]); this loop only makes the syscalls.
//!
//! The receive buffer belongs to the core, not the connection (read with `try_read` right
//! after readiness), so an idle connection holds no buffer, as with the uring pool.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

use super::balance::Balancer;
use super::worker::{WorkerError, WorkerSetup};
use super::{ACCEPT_BACKOFF, AcceptErrorLog, RECV_BUF_SIZE, deferred_ready, sys};
use crate::dispatch::Service;
use crate::protocol::{Admission, Connection, Limits, PADDING, Processor, Step};
use crate::stats::StatsRegistry;

/// One core's protocol engine and its receive buffer.
pub(crate) struct CoreIo<S: Service> {
    pub processor: Processor<S>,
    pub buf: Box<[u8]>,
}

impl<S: Service> CoreIo<S> {
    pub fn new(
        core: usize,
        service: Arc<S>,
        exec: Arc<crate::exec::Executors>,
        access: crate::protocol::Access,
        stats: Arc<StatsRegistry>,
        limits: Limits,
    ) -> Self {
        Self {
            processor: Processor::new(core, service, stats, limits).with_executors(exec).with_access(access),
            buf: vec![0; RECV_BUF_SIZE + PADDING].into(),
        }
    }
}

/// How a connection task reaches the [`CoreIo`] of the thread it runs on.
pub(crate) trait CoreAccess<S: Service>: Clone + 'static {
    fn with<T>(&self, f: impl FnOnce(&mut CoreIo<S>) -> T) -> T;
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
pub(crate) async fn serve_worker<S: Service, A: CoreAccess<S>>(
    setup: WorkerSetup,
    workers_per_listener: usize,
    make_access: impl FnOnce(usize, Arc<StatsRegistry>, Limits) -> A,
    spawn: impl Fn(TcpStream, A, Drain, ConnGuard),
) {
    let WorkerSetup { core, listener, config, stats, stop, ready, balancer, .. } = setup;
    let listener = match tokio_listener(listener) {
        Ok(listener) => listener,
        Err(source) => {
            let _ =
                ready.send(Err(WorkerError::Io { what: "cannot register the listener with tokio", source }));
            return;
        }
    };
    let access = make_access(core, stats, config.limits);
    let tracker = Arc::new(ConnTracker::default());
    let _ = ready.send(Ok(()));
    drop(ready);
    let drain_signal = Drain { stop: stop.subscribe(), timeout: config.shutdown_timeout };
    // The limit is per core; the cores behind one listener share it.
    let admission = Limits {
        max_connections_per_core: config.limits.max_connections_per_core.saturating_mul(workers_per_listener),
        ..config.limits
    };
    let handed = Arc::new(tokio::sync::Notify::new());
    if let Some(balancer) = &balancer {
        let handed = handed.clone();
        balancer.serve(core, move || handed.notify_one());
    }
    let balance = balancer.as_deref().map(|balancer| (balancer, &*handed));
    accept_until_stopped(&listener, core, stop.subscribe(), balance, |stream| {
        match access.with(|core| admission.admit(tracker.open(), core.processor.stats())) {
            Admission::Accept => spawn(stream, access.clone(), drain_signal.clone(), tracker.guard()),
            Admission::Refuse(line) => sys::refuse(stream.as_fd(), line),
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
    balance: Option<(&Balancer, &tokio::sync::Notify)>,
    mut on_connection: impl FnMut(TcpStream),
) {
    let mut errors = AcceptErrorLog::new(core);
    let mut serve = |stream: io::Result<TcpStream>| match stream {
        Ok(stream) => on_connection(stream),
        Err(e) => tracing::debug!("cannot register a connection: {e}"),
    };
    let registered = |fd: OwnedFd| TcpStream::from_std(std::net::TcpStream::from(fd));
    loop {
        tokio::select! {
            biased;
            // The guard `wait_for` returns is dropped inside, so this future stays Send.
            () = async { drop(stop.wait_for(|stopping| *stopping).await) } => {
                sys::accept_backlog(listener.as_fd(), |fd| serve(registered(fd)));
                if let Some((balancer, _)) = balance {
                    balancer.stop(core).into_iter().for_each(|fd| serve(registered(fd)));
                }
                return;
            }
            () = async { balance.expect("guarded").1.notified().await }, if balance.is_some() => {
                if let Some((balancer, _)) = balance {
                    balancer.take(core).into_iter().for_each(|fd| serve(registered(fd)));
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    errors.succeeded();
                    match balance.map(|(balancer, _)| (balancer, balancer.target(core))) {
                        Some((balancer, target)) if target != core => {
                            // Handed over as a plain socket, out of this runtime's reactor.
                            match stream.into_std().map(OwnedFd::from) {
                                Ok(fd) => {
                                    if let Some(fd) = balancer.hand_over(target, fd) {
                                        serve(registered(fd));
                                    }
                                }
                                Err(e) => tracing::debug!("cannot hand a connection over: {e}"),
                            }
                        }
                        _ => serve(Ok(stream)),
                    }
                }
                Err(e) => {
                    errors.failed(&e, Instant::now());
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
}

/// Waits for every connection to finish, at most `timeout` (each closes itself at its
/// shutdown deadline; this is the worker's backstop); logs what was left.
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

/// The stop signal as a connection sees it, and how long it may drain.
#[derive(Clone)]
pub(crate) struct Drain {
    pub stop: watch::Receiver<bool>,
    pub timeout: Duration,
}

/// Serves one connection until its state machine closes it.
pub(crate) async fn serve_connection<S: Service, A: CoreAccess<S>>(
    stream: TcpStream,
    access: A,
    drain: Drain,
) {
    let _ = stream.set_nodelay(true);
    let Drain { mut stop, timeout } = drain;
    // One clock read per wake-up: the events handled together share it.
    let mut now = Instant::now();
    let mut conn = access.with(|core| core.processor.open_connection(now));
    sys::name_peer(stream.as_fd(), &mut conn);
    let mut draining = false;
    loop {
        if !draining && *stop.borrow() {
            draining = true;
            conn.on_shutdown(now + timeout);
        }
        flush(&stream, &mut conn, &access, now);
        match conn.poll(now, || sys::unread_bytes(stream.as_fd())) {
            Step::Wait => {}
            Step::ShutdownWrite => sys::shutdown(stream.as_fd(), Shutdown::Write),
            Step::Close(reason) => {
                tracing::debug!(?reason, "connection closed");
                break;
            }
        }
        let deadline = conn.poll_timeout();
        let (read, write) = (conn.wants_read(), conn.wants_send());
        let mailbox = conn.mailbox().cloned();
        let event = tokio::select! {
            () = deferred_ready(mailbox.as_deref()), if mailbox.is_some() => Wake::Deferred,
            ready = stream.readable(), if read => Wake::Readable(ready.is_ok()),
            ready = stream.writable(), if write => Wake::Writable(ready.is_ok()),
            () = sleep_until(deadline), if deadline.is_some() => Wake::Deadline,
            _ = stop.wait_for(|stopping| *stopping), if !draining => Wake::Stop,
        };
        now = Instant::now();
        match event {
            Wake::Readable(true) => receive(&stream, &mut conn, &access, now),
            Wake::Readable(false) | Wake::Writable(false) => conn.on_error(),
            Wake::Deadline => access.with(|core| conn.on_timeout(now, core.processor.stats())),
            Wake::Deferred => access.with(|core| conn.on_deferred(core.processor.stats())),
            Wake::Writable(true) | Wake::Stop => {}
        }
    }
    access.with(|core| conn.finish(core.processor.stats()));
}

/// What ended a connection's wait (`false`: the readiness wait failed).
enum Wake {
    Readable(bool),
    Writable(bool),
    Deadline,
    Stop,
    /// Answers to deferred replies arrived.
    Deferred,
}

async fn sleep_until(deadline: Option<Instant>) {
    if let Some(at) = deadline {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Reads what the kernel holds, while the connection wants to read, into the core's buffer
/// (or into a long line's own buffer, when the connection lends it) and feeds it to the
/// connection.
fn receive<S: Service, A: CoreAccess<S>>(
    stream: &TcpStream,
    conn: &mut Connection,
    access: &A,
    now: Instant,
) {
    while conn.wants_read() {
        let more = access.with(|core| match conn.lend_line() {
            Some(mut line) => {
                // The rest of a long line goes straight into its own buffer.
                let read = stream.try_read_buf(&mut line.target());
                conn.on_line_recv(&mut core.processor, line, now);
                read_went_on(conn, read, now)
            }
            None => {
                let read = stream.try_read(&mut core.buf[..RECV_BUF_SIZE]);
                if let Ok(n @ 1..) = read {
                    conn.on_recv(&mut core.processor, &mut core.buf, n, now);
                }
                read_went_on(conn, read, now)
            }
        });
        if !more {
            break;
        }
    }
}

/// Tells the connection how a read ended (its bytes are fed already); whether to read on.
fn read_went_on(conn: &mut Connection, read: io::Result<usize>, now: Instant) -> bool {
    match read {
        Ok(0) => {
            conn.on_peer_closed(now);
            false
        }
        Ok(_) => true,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => false,
        Err(e) => {
            tracing::debug!("recv failed: {e}");
            conn.on_error();
            false
        }
    }
}

/// Writes what the connection owes until done or the socket buffer is full.
fn flush<S: Service, A: CoreAccess<S>>(stream: &TcpStream, conn: &mut Connection, access: &A, now: Instant) {
    while let Some(bytes) = conn.start_send() {
        let written = stream.try_write(bytes);
        let progressed = access.with(|core| {
            let stats = core.processor.stats();
            match written {
                Ok(n) => {
                    conn.on_sent(n, now, stats);
                    n > 0
                }
                Err(e) => {
                    conn.on_sent(0, now, stats);
                    if e.kind() != io::ErrorKind::WouldBlock {
                        tracing::debug!("send failed: {e}");
                        conn.on_error();
                    }
                    false
                }
            }
        });
        if !progressed {
            break;
        }
    }
}

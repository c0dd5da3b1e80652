//! The `tokio-uring` backend: one tokio-uring runtime per core, each with its own
//! `SO_REUSEPORT` listener, reading and writing with ownership-passing io_uring operations.
//!
//! Each connection owns its receive buffer (the buffer is handed to the kernel for every
//! read; the rest of a long line is read into the line's own buffer instead, when the
//! connection lends it), there is no multishot or provided-buffer ring, and the ring is
//! waited on through tokio's epoll reactor: the reasons it trails the native `uring` backend.
//!
//! Every rule is the connection's state machine ([`Connection`]). Each connection is one
//! task that keeps a read in flight while the machine wants to read and a write in flight
//! while it owes bytes, both at once, and acts on whichever completes; one timer task per core
//! wakes connections at their deadlines. tokio-uring cannot cancel an operation by dropping
//! its future, so a pending read or a stuck write is ended by shutting the socket down.
//!
//! Draining asks whether the kernel holds unread requests (`FIONREAD`), which is the whole
//! truth only if the pending read has not taken bytes whose completion is still to be
//! handled. So a count of 0 is confirmed by a no-op submitted after it: the ring completes
//! in order, so once the no-op is back, a read that took bytes before the count has
//! completed too, and is handled first. Then the connection sends FIN and waits for the
//! peer's close, as on every backend.

use std::cell::RefCell;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use slab::Slab;
use tokio::sync::Notify;
use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::{TcpListener, TcpStream};

use super::worker::{WorkerError, WorkerSetup};
use super::{ACCEPT_BACKOFF, AcceptErrorLog, RECV_BUF_SIZE, sys, uring};
use crate::dispatch::Service;
use crate::protocol::{Admission, Connection, Limits, LineBuf, PADDING, Processor, State, Step, Timers};

/// How long a read waits for the write in flight before it is issued anyway. Reading only
/// after the write completes lets requests accumulate in the kernel, so one read takes a
/// batch of them (a read issued at once would return every request alone: a third fewer
/// requests per second with 16 pipelined per connection); a write that takes longer means
/// the peer is slow to read, and then reading goes on alongside it, up to the connection's
/// `max_pending_output`, as on every backend.
const READ_DEFER: std::time::Duration = std::time::Duration::from_millis(1);

pub(crate) fn run<S: Service>(setup: WorkerSetup, service: Arc<S>) {
    // Runtime::new reports a ring that cannot be created; tokio_uring::start would panic.
    let runtime = match tokio_uring::Runtime::new(&tokio_uring::builder()) {
        Ok(runtime) => runtime,
        Err(source) => {
            let hint = uring::diagnose(&source);
            let _ = setup.ready.send(Err(WorkerError::IoUringUnavailable { source, hint }));
            return;
        }
    };
    runtime.block_on(serve::<S>(setup, service));
}

/// One connection: its socket, its state machine, and how its tasks wake each other.
struct Conn {
    stream: TcpStream,
    generation: u32,
    conn: RefCell<Connection>,
    /// Wakes the connection's task: a deadline passed or the shutdown began.
    wake: Notify,
}

/// The descriptor of a tokio-uring stream (which implements only `AsRawFd`).
fn fd_of(stream: &TcpStream) -> std::os::fd::BorrowedFd<'_> {
    // SAFETY: the stream owns the descriptor and outlives the borrow.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd()) }
}

impl Conn {
    fn closed(&self) -> bool {
        matches!(self.conn.borrow().state(), State::Closed(_))
    }

    /// Ends the operations in flight (a pending read, a write stuck on a peer that does not
    /// read) and wakes the connection's task.
    fn end(&self) {
        sys::shutdown(fd_of(&self.stream), Shutdown::Both);
        self.wake.notify_one();
    }
}

/// What the tasks of one core share.
struct Core<S: Service> {
    processor: RefCell<Processor<S>>,
    conns: RefCell<Slab<Rc<Conn>>>,
    timers: RefCell<Timers<(usize, u32)>>,
    /// Wakes the timer task: a deadline earlier than the one it sleeps for was scheduled.
    timer_changed: Notify,
    all_closed: Notify,
    next_generation: std::cell::Cell<u32>,
    drain_deadline: std::cell::Cell<Option<Instant>>,
    limits: Limits,
}

impl<S: Service> Core<S> {
    fn schedule(&self, slot: usize, conn: &Conn) {
        if let Some(at) = conn.conn.borrow_mut().reschedule() {
            let earlier = self.timers.borrow().next().is_none_or(|next| at < next);
            self.timers.borrow_mut().schedule(at, (slot, conn.generation));
            if earlier {
                self.timer_changed.notify_one();
            }
        }
    }
}

async fn serve<S: Service>(setup: WorkerSetup, service: Arc<S>) {
    let WorkerSetup { core: index, listener, config, stats, stop, ready, exec, access, balancer, .. } = setup;
    let limits = config.limits;
    let listener = std::net::TcpListener::from(listener);
    let listener_fd = listener.as_raw_fd();
    let listener = TcpListener::from_std(listener);
    let core = Rc::new(Core {
        processor: RefCell::new(
            Processor::<S>::new(index, service, stats, limits).with_executors(exec).with_access(access),
        ),
        conns: RefCell::new(Slab::new()),
        timers: RefCell::new(Timers::default()),
        timer_changed: Notify::new(),
        all_closed: Notify::new(),
        next_generation: std::cell::Cell::new(0),
        drain_deadline: std::cell::Cell::new(None),
        limits,
    });
    if let Some(balancer) = &balancer {
        // Connections other cores hand over, taken in by a task of this core.
        let handed = Arc::new(Notify::new());
        let here = handed.clone();
        balancer.serve(index, move || handed.notify_one());
        let core = core.clone();
        let balancer = balancer.clone();
        tokio_uring::spawn(async move {
            loop {
                here.notified().await;
                for fd in balancer.take(index) {
                    open(&core, TcpStream::from_std(std::net::TcpStream::from(fd)));
                }
            }
        });
    }
    let _ = ready.send(Ok(()));
    drop(ready);

    tokio_uring::spawn(fire_timers(core.clone()));

    let mut stop_rx = stop.subscribe();
    let core_at_stop = core.clone();
    let stop_balancer = balancer.clone();
    tokio_uring::spawn(async move {
        let _ = stop_rx.wait_for(|stopping| *stopping).await;
        let core = core_at_stop;
        let deadline = Instant::now() + config.shutdown_timeout;
        core.drain_deadline.set(Some(deadline));
        // SAFETY: the listener outlives this task's use of its descriptor (the accept loop
        // ends only after the shutdown below).
        let listener = unsafe { std::os::fd::BorrowedFd::borrow_raw(listener_fd) };
        // Connections the kernel already established may carry requests: serve them too.
        // Shutting down a listener's read side resets its backlog, so take it in first.
        let _ = sys::set_nonblocking(listener);
        sys::accept_backlog(listener, |fd| open(&core, TcpStream::from_std(std::net::TcpStream::from(fd))));
        for fd in stop_balancer.as_ref().map(|b| b.stop(index)).unwrap_or_default() {
            open(&core, TcpStream::from_std(std::net::TcpStream::from(fd)));
        }
        // Wakes the pending accept.
        sys::shutdown(listener, Shutdown::Read);
        tracing::info!(
            core = index,
            connections = core.conns.borrow().len(),
            timeout = ?config.shutdown_timeout,
            "shutting down: draining connections"
        );
        let conns: Vec<(usize, Rc<Conn>)> = core.conns.borrow().iter().map(|(s, c)| (s, c.clone())).collect();
        for (slot, conn) in conns {
            conn.conn.borrow_mut().on_shutdown(deadline);
            core.schedule(slot, &conn);
            conn.wake.notify_one();
        }
    });

    let mut errors = AcceptErrorLog::new(index);
    loop {
        match listener.accept().await {
            // Accepted while the shutdown began: it may carry requests, so it is served
            // (draining) like the backlog.
            Ok((stream, _)) => {
                errors.succeeded();
                match balancer.as_ref().map(|b| (b, b.target(index))) {
                    Some((balancer, target)) if target != index => hand_over(&core, balancer, target, stream),
                    _ => open(&core, stream),
                }
                if stop.stopping() {
                    break;
                }
            }
            Err(_) if stop.stopping() => break,
            Err(e) => {
                errors.failed(&e, Instant::now());
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
    drop(listener);
    // Every connection closes by its shutdown deadline at the latest; this is a backstop.
    let backstop = config.shutdown_timeout + std::time::Duration::from_secs(1);
    let drained = tokio::time::timeout(backstop, async {
        while !core.conns.borrow().is_empty() {
            core.all_closed.notified().await;
        }
    });
    if drained.await.is_err() {
        tracing::warn!(core = index, connections = core.conns.borrow().len(), "shutdown deadline passed");
    }
}

/// Hands `stream` to core `target`'s inbox, or serves it here if `target` takes none now.
fn hand_over<S: Service>(
    core: &Rc<Core<S>>,
    balancer: &super::balance::Balancer,
    target: usize,
    stream: TcpStream,
) {
    // SAFETY: the descriptor is the stream's, open for the duration of this borrow.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(stream.as_raw_fd()) }.try_clone_to_owned();
    match fd {
        // The copy goes over; this runtime's stream (and its descriptor) is dropped.
        Ok(fd) => {
            drop(stream);
            if let Some(fd) = balancer.hand_over(target, fd) {
                open(core, TcpStream::from_std(std::net::TcpStream::from(fd)));
            }
        }
        Err(e) => {
            tracing::debug!("cannot hand a connection over: {e}");
            open(core, stream);
        }
    }
}

/// Admits a connection (or refuses it beyond the limit) and starts its tasks.
fn open<S: Service>(core: &Rc<Core<S>>, stream: TcpStream) {
    let admission = core.limits.admit(core.conns.borrow().len(), core.processor.borrow().stats());
    if let Admission::Refuse(line) = admission {
        sys::refuse(fd_of(&stream), line);
        return;
    }
    let _ = stream.set_nodelay(true);
    let mut connection = core.processor.borrow().open_connection(Instant::now());
    sys::name_peer(fd_of(&stream), &mut connection);
    if let Some(deadline) = core.drain_deadline.get() {
        connection.on_shutdown(deadline);
    }
    core.next_generation.set(core.next_generation.get().wrapping_add(1));
    let conn = Rc::new(Conn {
        stream,
        generation: core.next_generation.get(),
        conn: RefCell::new(connection),
        wake: Notify::new(),
    });
    let slot = core.conns.borrow_mut().insert(conn.clone());
    let core = core.clone();
    tokio_uring::spawn(async move {
        serve_connection(&core, slot, &conn).await;
        // Ends whatever is still in flight; dropping those operations is safe (tokio-uring
        // keeps their buffers until the kernel is done with them).
        conn.end();
        core.conns.borrow_mut().remove(slot);
        if let Ok(connection) = Rc::try_unwrap(conn).map(|c| c.conn.into_inner()) {
            connection.finish(core.processor.borrow().stats());
        }
        core.all_closed.notify_waiters();
    });
}

/// What a read fills: the connection's receive buffer, or the lent buffer of a long line.
enum ReadBuf {
    Own(Vec<u8>),
    Line(LineBuf),
}

async fn read_op(stream: &TcpStream, buf: ReadBuf) -> (std::io::Result<usize>, ReadBuf) {
    match buf {
        ReadBuf::Own(buf) => {
            let (read, slice) = stream.read(buf.slice(..RECV_BUF_SIZE)).await;
            (read, ReadBuf::Own(slice.into_inner()))
        }
        ReadBuf::Line(line) => {
            let (read, line) = stream.read(line).await;
            (read, ReadBuf::Line(line))
        }
    }
}

// SAFETY: the bytes are those the read may fill (already received, then the room), on the
// heap: the pointer stays valid while the `LineBuf` lives, wherever it moves.
unsafe impl tokio_uring::buf::IoBuf for LineBuf {
    fn stable_ptr(&self) -> *const u8 {
        self.read_start()
    }

    fn bytes_init(&self) -> usize {
        self.received()
    }

    fn bytes_total(&self) -> usize {
        self.received() + self.room()
    }
}

// SAFETY: as above; `set_init` is told how many bytes from the start are now written.
unsafe impl tokio_uring::buf::IoBufMut for LineBuf {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.read_ptr()
    }

    unsafe fn set_init(&mut self, pos: usize) {
        if let Some(more) = pos.checked_sub(self.received()).filter(|&n| n > 0) {
            // SAFETY: the read wrote up to `pos`, within `bytes_total`.
            unsafe { self.filled(more) };
        }
    }
}

async fn write_op(stream: &TcpStream, buf: Vec<u8>, offset: usize) -> (std::io::Result<usize>, Vec<u8>) {
    let (written, slice) = stream.write(buf.slice(offset..)).submit().await;
    (written, slice.into_inner())
}

/// Serves one connection until its state machine closes it: a read in flight while it wants
/// to read, a write in flight while it owes bytes, both at once, and the events fed back.
async fn serve_connection<S: Service>(core: &Core<S>, slot: usize, conn: &Conn) {
    // Not zeroed: a read touches only the pages it fills, so an idle connection keeps one
    // page of its buffer resident, not all of it (recycled memory would have to be cleared).
    let mut recv_buf = Some(Vec::with_capacity(RECV_BUF_SIZE + PADDING));
    let mut reading = std::pin::pin!(None);
    let mut writing = std::pin::pin!(None);
    // While a write is in flight, the next read waits for it (or for READ_DEFER to pass).
    // The timer and the wake-up are made once and re-armed: a select! builds the futures of
    // disabled branches too, and building a timer touches the runtime's shared handle.
    let mut read_deferred_until: Option<Instant> = None;
    let mut defer = std::pin::pin!(tokio::time::sleep(READ_DEFER));
    let mut wake = std::pin::pin!(conn.wake.notified());
    // Draining: a no-op confirming that the kernel held nothing unread (see the module docs).
    let mut settling = std::pin::pin!(None);
    let mut unread = Unread::Unknown;
    loop {
        let now = Instant::now();
        let mut asked = false;
        let step = conn.conn.borrow_mut().poll(now, || {
            asked = true;
            match unread {
                Unread::Confirmed => 0,
                Unread::Unknown | Unread::Confirming => 1,
            }
        });
        // If the count is not 0, the pending read brings those bytes and the machine asks
        // again.
        if asked
            && unread == Unread::Unknown
            && settling.is_none()
            && sys::unread_bytes(fd_of(&conn.stream)) == 0
        {
            unread = Unread::Confirming;
            settling.set(Some(tokio_uring::no_op()));
        }
        match step {
            Step::Wait => {}
            Step::ShutdownWrite => sys::shutdown(fd_of(&conn.stream), Shutdown::Write),
            Step::Close(reason) => {
                tracing::debug!(?reason, "connection closed");
                return;
            }
        }
        if writing.is_none() {
            let lent = conn.conn.borrow_mut().lend_send();
            if let Some((buf, offset)) = lent {
                writing.set(Some(write_op(&conn.stream, buf, offset)));
            }
        }
        if reading.is_none() && recv_buf.is_some() && conn.conn.borrow().wants_read() {
            if writing.is_none() || read_deferred_until.is_some_and(|at| at <= now) {
                read_deferred_until = None;
                // The rest of a long line goes straight into its own buffer.
                let line = conn.conn.borrow_mut().lend_line();
                let buf = line.map(ReadBuf::Line).or_else(|| recv_buf.take().map(ReadBuf::Own));
                reading.set(buf.map(|buf| read_op(&conn.stream, buf)));
            } else if read_deferred_until.is_none() {
                read_deferred_until = Some(now + READ_DEFER);
                defer.as_mut().reset((now + READ_DEFER).into());
            }
        }
        core.schedule(slot, conn);
        let mailbox = conn.conn.borrow().mailbox().cloned();
        tokio::select! {
            // A read that completed before a no-op is handled before it.
            biased;
            (read, buf) = async { reading.as_mut().as_pin_mut().expect("a read in flight").await },
                if reading.is_some() =>
            {
                reading.set(None);
                // What the kernel held may have changed: count again.
                unread = Unread::Unknown;
                let now = Instant::now();
                let mut c = conn.conn.borrow_mut();
                match buf {
                    ReadBuf::Own(mut buf) => {
                        if let Ok(n @ 1..) = read {
                            // The read set the length to what it received; the parser wants
                            // PADDING bytes past it.
                            buf.resize(n + PADDING, 0);
                            c.on_recv(&mut core.processor.borrow_mut(), &mut buf, n, now);
                        }
                        buf.clear();
                        recv_buf = Some(buf);
                    }
                    ReadBuf::Line(line) => c.on_line_recv(&mut core.processor.borrow_mut(), line, now),
                }
                match read {
                    Ok(0) => c.on_peer_closed(now),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!("recv failed: {e}");
                        c.on_error();
                    }
                }
            }
            (written, buf) = async { writing.as_mut().as_pin_mut().expect("a write in flight").await },
                if writing.is_some() =>
            {
                writing.set(None);
                let processor = core.processor.borrow();
                let mut c = conn.conn.borrow_mut();
                match written {
                    Ok(n) => c.on_sent_lent(buf, n, Instant::now(), processor.stats()),
                    Err(e) => {
                        tracing::debug!("send failed: {e}");
                        c.on_sent_lent(buf, 0, Instant::now(), processor.stats());
                        c.on_error();
                    }
                }
            }
            _ = async { settling.as_mut().as_pin_mut().expect("a no-op in flight").await },
                if settling.is_some() =>
            {
                settling.set(None);
                if unread == Unread::Confirming {
                    unread = Unread::Confirmed;
                }
            }
            () = defer.as_mut(), if read_deferred_until.is_some() => {}
            () = super::deferred_ready(mailbox.as_deref()), if mailbox.is_some() => {
                conn.conn.borrow_mut().on_deferred(core.processor.borrow().stats());
            }
            () = wake.as_mut() => wake.set(conn.wake.notified()),
        }
    }
}

/// While draining: what is known of the bytes the kernel holds unread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unread {
    Unknown,
    /// Counted 0; a no-op submitted since must come back before that is sure.
    Confirming,
    /// Counted 0, and no read completed since.
    Confirmed,
}

/// Wakes connections at their deadlines; one task per core.
async fn fire_timers<S: Service>(core: Rc<Core<S>>) {
    loop {
        let next = core.timers.borrow().next();
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at.into()) => {}
                    () = core.timer_changed.notified() => continue,
                }
            }
            None => {
                core.timer_changed.notified().await;
                continue;
            }
        }
        let now = Instant::now();
        loop {
            let due = core.timers.borrow_mut().pop_due(now);
            let Some((at, (slot, generation))) = due else { break };
            let conn = core.conns.borrow().get(slot).filter(|c| c.generation == generation).cloned();
            let Some(conn) = conn else { continue };
            {
                let mut c = conn.conn.borrow_mut();
                c.timer_fired(at);
                c.on_timeout(now, core.processor.borrow().stats());
            }
            if conn.closed() {
                conn.end();
            } else {
                // A deadline may have answered deferred replies with 504s to send.
                if conn.conn.borrow().wants_send() {
                    conn.wake.notify_one();
                }
                core.schedule(slot, &conn);
            }
        }
    }
}

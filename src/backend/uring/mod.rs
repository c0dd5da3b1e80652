//! The native io_uring driver: one ring per core, multishot accept, multishot recv into a
//! provided-buffer ring (a one-shot recv straight into a long line's own buffer once the
//! connection lends it), one batched send per connection per loop turn, and one
//! `io_uring_enter` per loop turn.
//!
//! Each worker owns its ring, its buffer pool, its connections with their operations in
//! flight, its protocol [`Processor`] and its [`Engine`]; nothing is shared with other cores
//! except the read-mostly counters. Every rule lives in the core — a connection's in
//! [`Connection`], the core's (admission, hand-over, timers, shutdown) in the [`Engine`] —
//! and this driver only turns their answers into submissions and waits on one ring for
//! completions and for the engine's next timeout.
//!
//! - `op`: what a completion's `user_data` names; `wake`: eventfds other threads ring;
//!   `durable`: durable appends on the ring. Ring setup, its diagnosis and the receive
//!   buffers are `ringcall_sys::uring`'s, shared with the command-line tools' io_uring loops.
//!
//! Connection places are only reused once no operation referring to them is in flight, and
//! every `user_data` carries the connection's generation, so a late completion can never be
//! taken for another connection's.

mod durable;
mod op;
mod wake;

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use io_uring::types::{Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};

use ringcall_sys::uring::{BGID, BufferPool, CQ_ENTRIES, build_ring, push_entry};
pub(crate) use ringcall_sys::uring::{diagnose, probe};

use super::sys;
use super::worker::{WorkerError, WorkerSetup};
use crate::dispatch::{Dispatcher, Service};
use durable::DurableRing;
use op::{Op, conn_data, split_user_data, user_data, with_total_limit};
use ringcall_core::{Action, Connection, Decision, Engine, Handle, LineBuf, Processor, Step};
use wake::Wakeups;

/// A recv ended with the error `-res`: the connection fails, unless the recv was cancelled
/// on purpose (paused, switching to a line's buffer, or closing).
fn recv_failed(core: usize, conn: &mut Connection, res: i32) {
    if res != -libc::ECANCELED {
        tracing::debug!(core, "recv failed: {}", io::Error::from_raw_os_error(-res));
        conn.on_error();
    }
}

/// Starts a worker: sets up its ring, reports readiness, serves until shut down.
pub(crate) fn run<S: Service>(setup: WorkerSetup, service: Arc<S>) {
    let ready = setup.ready.clone();
    match Worker::<S>::new(setup, service) {
        Ok(mut worker) => {
            let _ = ready.send(Ok(()));
            drop(ready);
            if let Err(e) = worker.serve() {
                tracing::error!(core = worker.engine.core(), "uring worker stopped: {e}");
            }
        }
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    }
}

/// The receive of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recv {
    Off,
    /// A multishot recv into the pool.
    Armed,
    /// A one-shot recv into the lent buffer of a long line (`Conn::line`).
    Direct,
    /// A cancel was issued; the final completion is still to come.
    Cancelling,
}

/// One connection on this core: its socket, the operations it has in flight, its rules.
struct Conn {
    fd: OwnedFd,
    handle: Handle,
    recv: Recv,
    /// The socket was shut down both ways to end the operations in flight before closing.
    ending: bool,
    /// Its mailbox (made at its first deferred reply) has this core's waker.
    waker_set: bool,
    /// The line buffer a one-shot recv is filling (owned here until it completes; boxed,
    /// since most connections never read a line this long).
    line: Option<Box<LineBuf>>,
    conn: Connection,
}

/// The connections of this core, at their engine handles' places.
#[derive(Default)]
struct Conns(Vec<Option<Conn>>);

impl Conns {
    fn get_mut(&mut self, handle: Handle) -> Option<&mut Conn> {
        self.0.get_mut(handle.index()).and_then(Option::as_mut).filter(|c| c.handle == handle)
    }

    fn insert(&mut self, conn: Conn) {
        let index = conn.handle.index();
        if self.0.len() <= index {
            self.0.resize_with(index + 1, || None);
        }
        self.0[index] = Some(conn);
    }

    fn remove(&mut self, handle: Handle) -> Option<Conn> {
        let conn = self.0.get_mut(handle.index())?.take();
        // The engine reuses the lowest free places: the table shrinks back with it.
        while self.0.last().is_some_and(Option::is_none) {
            self.0.pop();
        }
        conn
    }
}

/// The listener's multishot accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accept {
    Armed,
    /// Not armed: after a failure (the engine backs off) or once stopped.
    Idle,
    /// A cancel is in flight.
    Cancelling,
}

/// What one loop turn reuses.
#[derive(Default)]
struct Turn {
    /// Connections with replies to send at the end of this turn (may repeat).
    sends: Vec<Handle>,
    completions: Vec<cqueue::Entry>,
    /// Connections to drive again (deferred answers, settled counts).
    handles: Vec<Handle>,
}

/// How connections are received: the pool the multishot recvs fill, and what the kernel
/// takes of them.
struct Receive {
    pool: BufferPool,
    /// Whether the kernel takes a total byte limit on a multishot recv (6.16 and later);
    /// cleared by the first recv that fails with EINVAL.
    limit: bool,
}

/// Where connections come from: the listener with its multishot accept, and the balancer
/// that hands connections between cores.
struct Acceptor {
    listener: OwnedFd,
    accept: Accept,
    balancer: Option<Arc<super::balance::Balancer>>,
}

struct Worker<S: Service> {
    // Field order matters for drop: the ring goes before the buffers it points into.
    ring: IoUring,
    recv: Receive,
    processor: Processor<Dispatcher<S>>,
    engine: Engine,
    conns: Conns,
    acceptor: Acceptor,
    wakeups: Wakeups,
    durable: DurableRing,
    turn: Turn,
    /// The time at the start of this loop turn (one clock read per turn).
    now: Instant,
}

impl<S: Service> Worker<S> {
    fn new(setup: WorkerSetup, service: Arc<S>) -> Result<Self, WorkerError> {
        let unavailable =
            |source: io::Error| WorkerError::IoUringUnavailable { hint: diagnose(&source), source };
        let ring = build_ring().map_err(unavailable)?;
        let pool = BufferPool::new(&ring, ringcall_core::PADDING).map_err(unavailable)?;
        let limits = setup.config.limits;
        let dispatcher = Dispatcher::new(setup.core, setup.stats.cores(), service)
            .with_executors(setup.exec)
            .with_durable_ring();
        let processor = Processor::new(setup.core, dispatcher, setup.stats, limits).with_access(setup.access);
        let mut engine =
            Engine::new(setup.core, limits.max_connections_per_core, setup.config.shutdown_timeout);
        if processor.tls().is_some() {
            engine.refuse_in_band();
        }
        let wakeups = Wakeups::new(setup.stop).map_err(|source| WorkerError::Io {
            what: "cannot create the eventfd for deferred replies",
            source,
        })?;
        let mut worker = Self {
            ring,
            recv: Receive { pool, limit: true },
            processor,
            engine,
            conns: Conns::default(),
            acceptor: Acceptor { listener: setup.listener, accept: Accept::Idle, balancer: setup.balancer },
            wakeups,
            durable: DurableRing::default(),
            turn: Turn { completions: Vec::with_capacity(CQ_ENTRIES as usize), ..Turn::default() },
            now: Instant::now(),
        };
        worker.arm_accept().map_err(unavailable)?;
        let stop = worker.wakeups.stop_read(worker.engine.core());
        worker.push(stop).map_err(unavailable)?;
        let deferred = worker.wakeups.deferred_read();
        worker.push(deferred).map_err(unavailable)?;
        worker.ring.submit().map_err(unavailable)?;
        if let Some(balancer) = &worker.acceptor.balancer {
            let wake = worker.wakeups.deferred.clone();
            balancer.serve(worker.engine.core(), move || wake.notify());
        }
        Ok(worker)
    }

    fn core(&self) -> usize {
        self.engine.core()
    }

    /// Queues an SQE, submitting first if the submission queue is full.
    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        // SAFETY: every buffer an entry points to is owned by the worker (connection buffers,
        // the wake-up buffers, the pool) and outlives the operation: places are only freed
        // once their operations have completed.
        unsafe { push_entry(&mut self.ring, &entry) }
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        let entry = opcode::AcceptMulti::new(Fd(self.acceptor.listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(Op::Accept, 0, 0));
        self.acceptor.accept = Accept::Armed;
        self.push(entry)
    }

    fn serve(&mut self) -> io::Result<()> {
        loop {
            self.durable
                .start(&mut self.ring, |kicks| self.processor.dispatcher().take_durable_kicks(kicks))?;
            self.queue_sends()?;
            self.recv.pool.publish();
            // Durable I/O in flight reads its batch's bytes: the worker waits for it.
            if self.engine.finished() && self.durable.is_idle() {
                return Ok(());
            }
            let waited = match self.engine.poll_timeout() {
                Some(at) => {
                    let timeout = Timespec::from(at.saturating_duration_since(Instant::now()));
                    self.ring.submitter().submit_with_args(1, &SubmitArgs::new().timespec(&timeout))
                }
                None => self.ring.submit_and_wait(1),
            };
            match waited {
                Ok(_) => {}
                // The earliest deadline came; EINTR: a signal; EBUSY: the CQ is full, reap first.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            self.now = Instant::now();
            let mut completions = std::mem::take(&mut self.turn.completions);
            completions.extend(self.ring.completion());
            for cqe in completions.drain(..) {
                self.complete(&cqe)?;
            }
            self.turn.completions = completions;
            self.engine.on_timeout(self.now);
            self.run_actions()?;
            if self.engine.has_unsettled() && self.ring.completion().is_empty() {
                // Only now, with every received byte handled, may a draining connection
                // learn that the kernel holds nothing more for it.
                let mut handles = std::mem::take(&mut self.turn.handles);
                self.engine.take_unsettled(&mut handles);
                for handle in handles.drain(..) {
                    self.drive(handle, true)?;
                }
                self.turn.handles = handles;
            }
        }
    }

    /// Carries out what the engine asks.
    fn run_actions(&mut self) -> io::Result<()> {
        while let Some(action) = self.engine.poll_action() {
            match action {
                Action::Timeout(handle) => {
                    let Some(c) = self.conns.get_mut(handle) else { continue };
                    self.engine.on_conn_timeout(handle, &mut c.conn, self.now, self.processor.stats());
                    self.drive(handle, false)?;
                }
                Action::Drive(handle) => self.drive(handle, false)?,
                Action::StartAccepting => {
                    if self.acceptor.accept == Accept::Idle {
                        self.arm_accept()?;
                    }
                }
                Action::StopAccepting => match self.acceptor.accept {
                    Accept::Armed => {
                        self.acceptor.accept = Accept::Cancelling;
                        let entry = opcode::AsyncCancel::new(user_data(Op::Accept, 0, 0))
                            .build()
                            .user_data(user_data(Op::Cancel, 0, 0));
                        self.push(entry)?;
                    }
                    Accept::Idle => self.engine.accept_stopped(),
                    Accept::Cancelling => {}
                },
                Action::TakeBacklog => {
                    if sys::set_nonblocking(self.acceptor.listener.as_fd()).is_ok() {
                        let mut backlog = Vec::new();
                        sys::accept_backlog(self.acceptor.listener.as_fd(), |fd| backlog.push(fd));
                        for fd in backlog {
                            self.admit(fd)?;
                        }
                    }
                    if let Some(balancer) = self.acceptor.balancer.clone() {
                        for fd in balancer.stop(self.core()) {
                            self.admit(fd)?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn complete(&mut self, cqe: &cqueue::Entry) -> io::Result<()> {
        let (op, generation, slot) = split_user_data(cqe.user_data());
        let handle = Handle::from_parts(slot, generation);
        match op {
            Some(Op::Accept) => self.on_accept(cqe),
            Some(Op::Recv) => self.on_recv(handle, cqe),
            Some(Op::Send) => self.on_send(handle, cqe.result()),
            Some(Op::Wake) => self.on_stop_signal(),
            Some(Op::Deferred) => self.on_deferred(),
            Some(op @ (Op::DurableWrite | Op::DurableSync)) => {
                self.durable.complete(&mut self.ring, slot, op, cqe.result())
            }
            Some(Op::Cancel) | None => Ok(()),
        }
    }

    fn on_stop_signal(&mut self) -> io::Result<()> {
        if !self.wakeups.stop.stopping() {
            // A spurious wake-up: keep listening for the real one.
            let entry = self.wakeups.stop_read(self.core());
            return self.push(entry);
        }
        self.engine.on_shutdown(self.now);
        self.run_actions()
    }

    fn on_accept(&mut self, cqe: &cqueue::Entry) -> io::Result<()> {
        let more = cqueue::more(cqe.flags());
        let res = cqe.result();
        if res >= 0 {
            // SAFETY: the kernel just created this descriptor for us.
            let fd = unsafe { OwnedFd::from_raw_fd(res) };
            let target = self.acceptor.balancer.as_ref().map(|b| b.target(self.core()));
            let decision = self.engine.on_accepted(self.now, target, self.processor.stats(), || ());
            self.decided(decision, fd)?;
        } else if res != -libc::ECANCELED {
            self.engine.on_accept_failed(self.now, &io::Error::from_raw_os_error(-res));
        }
        if !more {
            let cancelled = self.acceptor.accept == Accept::Cancelling;
            self.acceptor.accept = Accept::Idle;
            match self.engine.listening() {
                ringcall_core::Listening::Accepting => self.arm_accept()?,
                ringcall_core::Listening::Stopping if cancelled => self.engine.accept_stopped(),
                // Backing off: the engine's retry re-arms it.
                _ => {}
            }
        }
        Ok(())
    }

    /// Serves a connection from another core or the backlog, or refuses it at the limit.
    fn admit(&mut self, fd: OwnedFd) -> io::Result<()> {
        let decision = self.engine.admit(self.now, self.processor.stats(), || ());
        self.decided(decision, fd)
    }

    fn decided(&mut self, decision: Decision, fd: OwnedFd) -> io::Result<()> {
        match decision {
            Decision::Serve(handle) => self.open(handle, fd),
            Decision::Refuse(line) => {
                sys::refuse(fd.as_fd(), line);
                Ok(())
            }
            Decision::HandOver(target) => {
                let balancer = self.acceptor.balancer.as_ref().expect("a hand-over needs a balancer");
                match balancer.hand_over(target, fd) {
                    None => Ok(()),
                    // That core takes none now: served here.
                    Some(fd) => self.admit(fd),
                }
            }
        }
    }

    fn open(&mut self, handle: Handle, fd: OwnedFd) -> io::Result<()> {
        if let Err(e) = sys::set_nodelay(fd.as_fd()) {
            tracing::debug!(core = self.core(), "TCP_NODELAY failed: {e}");
        }
        let mut conn = self.processor.open_connection(self.now);
        super::name_peer(fd.as_fd(), &mut conn);
        self.conns.insert(Conn {
            fd,
            handle,
            recv: Recv::Off,
            ending: false,
            waker_set: false,
            line: None,
            conn,
        });
        self.drive(handle, false)
    }

    fn on_recv(&mut self, handle: Handle, cqe: &cqueue::Entry) -> io::Result<()> {
        let res = cqe.result();
        let bid = cqueue::buffer_select(cqe.flags());
        let Some(c) = self.conns.get_mut(handle) else {
            if let Some(bid) = bid {
                self.recv.pool.give_back(bid);
            }
            return Ok(());
        };
        if let Some(line) = c.line.take() {
            let mut line = *line;
            // The one-shot recv into a line's buffer.
            c.recv = Recv::Off;
            if res > 0 {
                // SAFETY: the kernel wrote `res` bytes at the pointer, within the room given.
                unsafe { line.filled(res as usize) };
            }
            c.conn.on_line_recv(&mut self.processor, line, self.now);
            if res == 0 {
                c.conn.on_peer_closed(self.now);
            } else if res < 0 {
                recv_failed(self.engine.core(), &mut c.conn, res);
            }
            return self.drive(handle, false);
        }
        if !cqueue::more(cqe.flags()) {
            // Also where a recv's byte limit was reached: drive() arms the next one.
            c.recv = Recv::Off;
        }
        if res == -libc::EINVAL && self.recv.limit {
            // A kernel before 6.16 refuses the byte limit: read without it from now on.
            tracing::debug!(
                core = self.engine.core(),
                "multishot recv without a byte limit (kernel before 6.16)"
            );
            self.recv.limit = false;
        } else if res > 0 {
            let bid = bid.expect("recv completion with data carries a buffer id");
            c.conn.on_recv(&mut self.processor, self.recv.pool.buffer(bid), res as usize, self.now);
            self.recv.pool.give_back(bid);
        } else if res == 0 {
            c.conn.on_peer_closed(self.now);
        } else if res != -libc::ENOBUFS {
            // ENOBUFS: the pool ran dry this turn; buffers come back before the recv is
            // re-armed.
            recv_failed(self.engine.core(), &mut c.conn, res);
        }
        self.drive(handle, false)
    }

    fn on_send(&mut self, handle: Handle, res: i32) -> io::Result<()> {
        let Some(c) = self.conns.get_mut(handle) else { return Ok(()) };
        c.conn.on_sent(res.max(0) as usize, self.now, self.processor.stats());
        if res < 0 {
            tracing::debug!(core = self.engine.core(), "send failed: {}", io::Error::from_raw_os_error(-res));
            c.conn.on_error();
        }
        self.drive(handle, false)
    }

    /// Deferred replies were answered: each connection named takes its answers in; the same
    /// wake-up brings connections other cores handed over.
    fn on_deferred(&mut self) -> io::Result<()> {
        let mut ready = std::mem::take(&mut self.turn.handles);
        self.wakeups.deferred.take(&mut ready);
        for &handle in &ready {
            let Some(c) = self.conns.get_mut(handle) else { continue };
            c.conn.on_deferred(self.now, self.processor.stats());
            self.drive(handle, false)?;
        }
        ready.clear();
        self.turn.handles = ready;
        if let Some(balancer) = self.acceptor.balancer.clone() {
            for fd in balancer.take(self.core()) {
                self.admit(fd)?;
            }
        }
        let entry = self.wakeups.deferred_read();
        self.push(entry)
    }

    /// Turns what the engine says of a connection into submissions: FIN or close, recv on or
    /// off, a send at the end of the turn. `settled` says that every completion so far is
    /// handled, so the kernel's count of unread bytes is the whole truth.
    fn drive(&mut self, handle: Handle, settled: bool) -> io::Result<()> {
        let Some(c) = self.conns.get_mut(handle) else { return Ok(()) };
        if !c.waker_set
            && let Some(mailbox) = c.conn.mailbox()
        {
            c.waker_set = true;
            mailbox.set_waker(self.wakeups.deferred.waker(handle));
            // Answers may have come before the waker was set (a handler that dropped its
            // handle, work that finished on another thread at once): taken before the engine
            // is asked, so their replies are sent in this turn.
            c.conn.on_deferred(self.now, self.processor.stats());
        }
        let fd = c.fd.as_fd();
        let interest = self.engine.drive(handle, &mut c.conn, &mut self.processor, self.now, || {
            settled.then(|| sys::unread_bytes(fd))
        });
        match interest.step {
            Step::Wait => {}
            Step::ShutdownWrite => sys::shutdown(fd, Shutdown::Write),
            Step::Close(_) => return self.close(handle),
        }
        let target = conn_data(Op::Recv, handle);
        match (interest.read, c.recv) {
            (true, Recv::Off) => {
                let entry = if let Some(mut line) = c.conn.lend_line() {
                    let room = line.room().try_into().unwrap_or(u32::MAX);
                    let entry = opcode::Recv::new(Fd(fd.as_raw_fd()), line.read_ptr(), room).build();
                    c.line = Some(Box::new(line));
                    c.recv = Recv::Direct;
                    entry
                } else {
                    c.recv = Recv::Armed;
                    let entry = opcode::RecvMulti::new(Fd(fd.as_raw_fd()), BGID).build();
                    if self.recv.limit {
                        // Ends by itself near the backpressure limit, instead of reading on for
                        // as many buffers as arrive before a cancel lands.
                        let budget = c.conn.read_budget().try_into().unwrap_or(u32::MAX);
                        with_total_limit(entry, budget)
                    } else {
                        entry
                    }
                };
                self.push(entry.user_data(target))?;
            }
            // A long line: its rest is read straight into its buffer once the multishot recv
            // has ended. Or backpressure, the peer's FIN or a timeout: stop reading.
            (true, Recv::Armed) if interest.line_read => self.cancel_recv(handle)?,
            (false, Recv::Armed | Recv::Direct) => self.cancel_recv(handle)?,
            _ => {}
        }
        if interest.send {
            self.turn.sends.push(handle);
        }
        if interest.urgent {
            // A TLS handshake's flight leaves now, not after the rest of the turn's work.
            self.queue_sends()?;
            self.ring.submit()?;
        }
        Ok(())
    }

    fn cancel_recv(&mut self, handle: Handle) -> io::Result<()> {
        if let Some(c) = self.conns.get_mut(handle) {
            c.recv = Recv::Cancelling;
        }
        let entry = opcode::AsyncCancel::new(conn_data(Op::Recv, handle)).build().user_data(user_data(
            Op::Cancel,
            handle.index(),
            0,
        ));
        self.push(entry)
    }

    /// Releases a closed connection once no operation refers to it; until then, shuts the
    /// socket down so the operations in flight end.
    fn close(&mut self, handle: Handle) -> io::Result<()> {
        let Some(c) = self.conns.get_mut(handle) else { return Ok(()) };
        if c.recv == Recv::Off && !c.conn.send_in_flight() {
            let c = self.conns.remove(handle).expect("just found");
            self.engine.release(handle, c.conn, self.processor.stats());
            return Ok(());
        }
        if !c.ending {
            c.ending = true;
            // Ends a send stuck on a peer that does not read, and the multishot recv.
            sys::shutdown(c.fd.as_fd(), Shutdown::Both);
            if matches!(c.recv, Recv::Armed | Recv::Direct) {
                self.cancel_recv(handle)?;
            }
        }
        Ok(())
    }

    /// Starts one send per connection with new output: the batch of every reply produced
    /// this loop turn.
    fn queue_sends(&mut self) -> io::Result<()> {
        let mut sends = std::mem::take(&mut self.turn.sends);
        for handle in sends.drain(..) {
            let Some(c) = self.conns.get_mut(handle) else { continue };
            let Some(bytes) = c.conn.start_send() else { continue };
            let entry = opcode::Send::new(Fd(c.fd.as_raw_fd()), bytes.as_ptr(), bytes.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(conn_data(Op::Send, handle));
            self.push(entry)?;
        }
        self.turn.sends = sends;
        Ok(())
    }
}

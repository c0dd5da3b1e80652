//! The native io_uring driver: one ring per core, multishot accept, multishot recv into a
//! provided-buffer ring, one batched send per connection per loop turn, and one
//! `io_uring_enter` per loop turn.
//!
//! Each worker owns its ring, its buffer pool, its connections and its protocol
//! [`Processor`]; nothing is shared with other cores except the read-mostly counters.
//!
//! Connection slots are only reused once no operation referring to them is in flight, and
//! every `user_data` carries the slot's generation, so a late completion can never be taken
//! for another connection's.

use std::io;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, Fd, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};

use super::{ACCEPT_BACKOFF, AcceptErrorLog, next_deadline, sys};
use crate::dispatch::Routes;
use crate::protocol::reply::TOO_MANY_CONNECTIONS;
use crate::protocol::{Flow, Limits, PADDING, Processor, Session};
use crate::server::{ServerError, WorkerSetup};

/// Usable bytes per pooled receive buffer (each is followed by [`PADDING`] bytes of slack).
const BUF_SIZE: usize = super::RECV_BUF_SIZE;
/// Receive buffers per core (a power of two, at most 32768).
const BUF_COUNT: u16 = 512;
/// The provided-buffer group id.
pub(crate) const BGID: u16 = 0;
/// Submission queue entries; the completion queue is sized larger so bursts of multishot
/// completions do not overflow it.
const SQ_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 16 * 1024;
/// How often connections are checked against their idle and line deadlines.
const TICK: Duration = Duration::from_secs(1);
/// Output buffers that grew past this are freed once drained, bounding idle memory.
const OUT_KEEP: usize = 64 * 1024;

/// Operation kinds, in the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Accept = 1,
    Recv = 2,
    Send = 3,
    Wake = 4,
    AcceptRetry = 5,
    DrainDeadline = 6,
    Cancel = 7,
    Tick = 8,
}

impl Op {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Op::Accept,
            2 => Op::Recv,
            3 => Op::Send,
            4 => Op::Wake,
            5 => Op::AcceptRetry,
            6 => Op::DrainDeadline,
            7 => Op::Cancel,
            8 => Op::Tick,
            _ => return None,
        })
    }
}

fn user_data(op: Op, slot: u32, generation: u32) -> u64 {
    (op as u64) << 56 | u64::from(generation & 0x00ff_ffff) << 32 | u64::from(slot)
}

fn split_user_data(ud: u64) -> (Option<Op>, u32, u32) {
    (Op::from_u8((ud >> 56) as u8), ((ud >> 32) & 0x00ff_ffff) as u32, ud as u32)
}

/// Starts a worker: sets up its ring, reports readiness, serves until shut down.
pub(crate) fn run<R: Routes>(setup: WorkerSetup) {
    let ready = setup.ready.clone();
    match Worker::<R>::new(setup) {
        Ok(mut worker) => {
            let _ = ready.send(Ok(()));
            drop(ready);
            if let Err(e) = worker.serve() {
                tracing::error!(core = worker.core, "uring worker stopped: {e}");
            }
        }
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    }
}

/// Creates a ring with the fastest flags this kernel accepts.
pub(crate) fn build_ring() -> io::Result<IoUring> {
    let attempts: [fn(&mut io_uring::Builder); 3] = [
        |b| {
            b.setup_single_issuer().setup_defer_taskrun();
        },
        |b| {
            b.setup_coop_taskrun();
        },
        |_| {},
    ];
    let mut last = None;
    for configure in attempts {
        let mut builder = IoUring::builder();
        builder.setup_cqsize(CQ_ENTRIES).setup_submit_all();
        configure(&mut builder);
        match builder.build(SQ_ENTRIES) {
            Ok(ring) => return Ok(ring),
            // EINVAL: a flag this kernel does not know; try fewer.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("io_uring_setup failed")))
}

/// Checks that this host can run the `uring` backend: a ring and a provided-buffer ring.
pub(crate) fn probe() -> io::Result<()> {
    let ring = build_ring()?;
    BufferPool::new(&ring).map(drop)
}

/// Why io_uring setup failed, and what to do about it.
pub(crate) fn diagnose(err: &io::Error) -> String {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match err.raw_os_error() {
        Some(libc::ENOSYS) => {
            "The kernel has no io_uring (built without CONFIG_IO_URING, or older than 5.19 \
             for multishot and buffer rings). Use --backend epoll."
                .into()
        }
        Some(libc::EPERM) | Some(libc::EACCES) => match disabled {
            Some(2) => "io_uring is disabled by sysctl kernel.io_uring_disabled=2. \
                 Set it to 0 (sysctl -w kernel.io_uring_disabled=0) or use --backend epoll."
                .into(),
            Some(1) => "sysctl kernel.io_uring_disabled=1 allows io_uring only to the group in \
                 kernel.io_uring_group. Add this user to it, set the sysctl to 0, or use --backend epoll."
                .into(),
            _ => "A seccomp profile blocks io_uring (Docker's and many container runtimes' default \
                 profiles do). Allow io_uring_setup/io_uring_enter/io_uring_register in the profile \
                 or use --backend epoll."
                .into(),
        },
        Some(libc::ENOMEM) => "Not enough locked memory for the ring and its buffers \
             (RLIMIT_MEMLOCK, `ulimit -l`, is 8 MiB by default). Raise it (ulimit -l unlimited, or \
             LimitMEMLOCK=infinity in a systemd unit) or run fewer --threads."
            .into(),
        _ => "Use --backend epoll on this host.".into(),
    }
}

/// The per-core pool of receive buffers, shared with the kernel as a provided-buffer ring.
/// Each buffer is `BUF_SIZE` usable bytes plus `PADDING` bytes of slack for the parser.
pub(crate) struct BufferPool {
    ring: *mut BufRingEntry,
    ring_bytes: usize,
    storage: Box<[u8]>,
    tail: u16,
}

const STRIDE: usize = BUF_SIZE + PADDING;

impl BufferPool {
    pub(crate) fn new(ring: &IoUring) -> io::Result<Self> {
        let ring_bytes = usize::from(BUF_COUNT) * size_of::<BufRingEntry>();
        // SAFETY: anonymous private mapping; the kernel requires page alignment, which mmap gives.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut pool = Self {
            ring: addr.cast(),
            ring_bytes,
            storage: vec![0u8; usize::from(BUF_COUNT) * STRIDE].into_boxed_slice(),
            tail: 0,
        };
        // SAFETY: the mapping lives as long as the pool, which outlives the ring's use of it
        // (the worker drops the ring first).
        unsafe { ring.submitter().register_buf_ring_with_flags(addr as u64, BUF_COUNT, BGID, 0)? };
        for bid in 0..BUF_COUNT {
            pool.give_back(bid);
        }
        pool.publish();
        Ok(pool)
    }

    /// The received bytes of buffer `bid`, followed by its padding.
    pub(crate) fn buffer(&mut self, bid: u16) -> &mut [u8] {
        let start = usize::from(bid) * STRIDE;
        &mut self.storage[start..start + STRIDE]
    }

    /// Queues buffer `bid` for the kernel again; visible after [`publish`](Self::publish).
    pub(crate) fn give_back(&mut self, bid: u16) {
        let addr = self.storage.as_ptr() as u64 + (usize::from(bid) * STRIDE) as u64;
        let index = usize::from(self.tail & (BUF_COUNT - 1));
        // SAFETY: index < BUF_COUNT, inside the mapping.
        let entry = unsafe { &mut *self.ring.add(index) };
        entry.set_addr(addr);
        entry.set_len(BUF_SIZE as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Makes every buffer given back so far visible to the kernel.
    pub(crate) fn publish(&self) {
        // SAFETY: the tail field lives in the first entry of the mapping; the kernel reads it
        // with acquire semantics, so a release store orders the entries written before it.
        unsafe {
            let tail = BufRingEntry::tail(self.ring) as *const AtomicU16;
            (*tail).store(self.tail, Ordering::Release);
        }
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in new().
        unsafe { libc::munmap(self.ring.cast(), self.ring_bytes) };
    }
}

/// One connection's state on this core.
struct Conn {
    fd: RawFd,
    generation: u32,
    session: Session,
    /// Replies produced since the last send was queued.
    out: Vec<u8>,
    /// The bytes the kernel is sending now, and how many of them it has sent.
    sending: Vec<u8>,
    sent: usize,
    recv_armed: bool,
    send_in_flight: bool,
    queued_for_send: bool,
    /// The peer closed its side: no more bytes will arrive.
    read_done: bool,
    /// We sent FIN after the last reply; waiting for the peer to close.
    write_shut: bool,
    /// Close as soon as no operation is in flight (discard anything unsent).
    dead: bool,
    /// Finish what is owed, then close (413, or server shutdown).
    closing: bool,
    /// Reading is paused: the peer is not reading its replies (backpressure).
    paused: bool,
    /// A cancel of the multishot recv was issued to pause reading.
    recv_cancelled: bool,
    /// Last time bytes moved in either direction.
    last_activity: Instant,
    /// Since when the peer owes us the rest of a line, or its close after our FIN.
    waiting_since: Option<Instant>,
}

impl Conn {
    fn new(fd: RawFd, generation: u32, now: Instant) -> Self {
        Self {
            fd,
            generation,
            session: Session::new(),
            out: Vec::new(),
            sending: Vec::new(),
            sent: 0,
            recv_armed: false,
            send_in_flight: false,
            queued_for_send: false,
            read_done: false,
            write_shut: false,
            dead: false,
            closing: false,
            paused: false,
            recv_cancelled: false,
            last_activity: now,
            waiting_since: None,
        }
    }

    /// Reply bytes produced and not yet sent.
    fn unsent(&self) -> usize {
        self.out.len() + self.sending.len() - self.sent
    }
}

struct Worker<R: Routes> {
    core: usize,
    // Field order matters for drop: the ring goes before the buffers it points into.
    ring: IoUring,
    pool: BufferPool,
    processor: Processor<R>,
    listener: std::os::fd::OwnedFd,
    control: std::sync::Arc<crate::server::Control>,
    conns: Vec<Option<Conn>>,
    free_slots: Vec<u32>,
    next_generation: u32,
    open_conns: usize,
    send_queue: Vec<u32>,
    completions: Vec<cqueue::Entry>,
    wake_buf: Box<u64>,
    accept_backoff: Box<Timespec>,
    drain_timeout: Box<Timespec>,
    shutdown_timeout: Duration,
    accepting: bool,
    accept_armed: bool,
    accept_errors: AcceptErrorLog,
    draining_since: Option<Instant>,
    deadline_passed: bool,
    settle_all_pending: bool,
    limits: Limits,
    /// The time at the start of this loop turn (one clock read per turn).
    now: Instant,
    tick: Box<Timespec>,
}

impl<R: Routes> Worker<R> {
    fn new(setup: WorkerSetup) -> Result<Self, ServerError> {
        let unavailable =
            |source: io::Error| ServerError::IoUringUnavailable { hint: diagnose(&source), source };
        let ring = build_ring().map_err(unavailable)?;
        let pool = BufferPool::new(&ring).map_err(unavailable)?;
        let processor = Processor::new(setup.core, setup.stats, setup.config.limits);
        let mut worker = Self {
            core: setup.core,
            ring,
            pool,
            processor,
            listener: setup.listener,
            control: setup.control,
            conns: Vec::new(),
            free_slots: Vec::new(),
            next_generation: 0,
            open_conns: 0,
            send_queue: Vec::new(),
            completions: Vec::with_capacity(CQ_ENTRIES as usize),
            wake_buf: Box::new(0),
            accept_backoff: Box::new(Timespec::from(ACCEPT_BACKOFF)),
            drain_timeout: Box::new(Timespec::from(setup.config.shutdown_timeout)),
            shutdown_timeout: setup.config.shutdown_timeout,
            accepting: true,
            accept_armed: false,
            accept_errors: AcceptErrorLog::new(setup.core),
            draining_since: None,
            deadline_passed: false,
            settle_all_pending: false,
            limits: setup.config.limits,
            now: Instant::now(),
            tick: Box::new(Timespec::from(TICK)),
        };
        worker.arm_accept().map_err(unavailable)?;
        worker.arm_wake().map_err(unavailable)?;
        worker.arm_tick().map_err(unavailable)?;
        worker.ring.submit().map_err(unavailable)?;
        Ok(worker)
    }

    /// Queues an SQE, submitting first if the submission queue is full.
    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an entry points to is owned by the worker (connection
            // buffers, boxed timespecs, the pool) and outlives the operation: slots are only
            // freed once their operations have completed.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        let entry = opcode::AcceptMulti::new(Fd(self.listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(Op::Accept, 0, 0));
        self.accept_armed = true;
        self.push(entry)
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let fd = self.control.waker(self.core).raw();
        let entry = opcode::Read::new(Fd(fd), (&mut *self.wake_buf as *mut u64).cast(), 8)
            .build()
            .user_data(user_data(Op::Wake, 0, 0));
        self.push(entry)
    }

    fn arm_tick(&mut self) -> io::Result<()> {
        let entry = opcode::Timeout::new(&*self.tick).build().user_data(user_data(Op::Tick, 0, 0));
        self.push(entry)
    }

    fn arm_recv(&mut self, slot: u32) -> io::Result<()> {
        let conn = self.conns[slot as usize].as_mut().expect("live slot");
        conn.recv_armed = true;
        let entry = opcode::RecvMulti::new(Fd(conn.fd), BGID).build().user_data(user_data(
            Op::Recv,
            slot,
            conn.generation,
        ));
        self.push(entry)
    }

    fn serve(&mut self) -> io::Result<()> {
        loop {
            self.queue_sends()?;
            self.pool.publish();
            if self.finished() {
                return Ok(());
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The CQ is full: reap before submitting more.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
            self.now = Instant::now();
            let mut completions = std::mem::take(&mut self.completions);
            completions.extend(self.ring.completion());
            for cqe in completions.drain(..) {
                self.complete(&cqe)?;
            }
            self.completions = completions;
            if self.settle_all_pending && self.ring.completion().is_empty() {
                // After the whole batch, so no received bytes are still waiting to be handled.
                self.settle_all_pending = false;
                for slot in 0..self.conns.len() as u32 {
                    self.settle(slot)?;
                }
            }
        }
    }

    fn finished(&self) -> bool {
        self.draining_since.is_some() && self.open_conns == 0 && !self.accept_armed
    }

    fn complete(&mut self, cqe: &cqueue::Entry) -> io::Result<()> {
        let (op, generation, slot) = split_user_data(cqe.user_data());
        match op {
            Some(Op::Accept) => self.on_accept(cqe),
            Some(Op::Recv) => self.on_recv(slot, generation, cqe),
            Some(Op::Send) => self.on_send(slot, generation, cqe.result()),
            Some(Op::Wake) => self.begin_shutdown(),
            Some(Op::AcceptRetry) => {
                if self.accepting && !self.accept_armed {
                    self.arm_accept()?;
                }
                Ok(())
            }
            Some(Op::DrainDeadline) => {
                self.force_close_all();
                Ok(())
            }
            Some(Op::Tick) => self.on_tick(),
            Some(Op::Cancel) | None => Ok(()),
        }
    }

    fn on_accept(&mut self, cqe: &cqueue::Entry) -> io::Result<()> {
        let more = cqueue::more(cqe.flags());
        if !more {
            self.accept_armed = false;
        }
        let res = cqe.result();
        if res >= 0 {
            let fd = res;
            self.accept_errors.succeeded();
            if !self.accepting {
                // SAFETY: fd was just accepted and is owned by nobody else.
                unsafe { libc::close(fd) };
            } else if self.open_conns >= self.limits.max_connections_per_core {
                self.reject(fd);
            } else {
                self.open(fd)?;
            }
        } else if res != -libc::ECANCELED {
            let err = io::Error::from_raw_os_error(-res);
            self.accept_errors.failed(&err, Instant::now());
            if !more && self.accepting {
                let entry = opcode::Timeout::new(&*self.accept_backoff).build().user_data(user_data(
                    Op::AcceptRetry,
                    0,
                    0,
                ));
                self.push(entry)?;
            }
            return Ok(());
        }
        if !more && self.accepting && !self.accept_armed {
            self.arm_accept()?;
        }
        Ok(())
    }

    /// Refuses a connection beyond `max_connections_per_core`: a 503 line, then close.
    fn reject(&mut self, fd: RawFd) {
        // Counted first, so whoever sees the reply sees the count.
        self.processor.stats().connection_rejected();
        sys::refuse(fd, TOO_MANY_CONNECTIONS);
        // SAFETY: fd was just accepted and is owned by nobody else.
        unsafe { libc::close(fd) };
        tracing::debug!(
            core = self.core,
            open = self.open_conns,
            "connection refused: core at its connection limit"
        );
    }

    fn open(&mut self, fd: RawFd) -> io::Result<()> {
        if let Err(e) = sys::set_nodelay(fd) {
            tracing::debug!(core = self.core, "TCP_NODELAY failed: {e}");
        }
        self.next_generation = self.next_generation.wrapping_add(1) & 0x00ff_ffff;
        let conn = Conn::new(fd, self.next_generation, self.now);
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.conns[slot as usize] = Some(conn);
                slot
            }
            None => {
                self.conns.push(Some(conn));
                (self.conns.len() - 1) as u32
            }
        };
        self.open_conns += 1;
        self.processor.stats().connection_opened();
        self.arm_recv(slot)
    }

    /// The live connection in `slot` if `generation` is its generation.
    fn conn(&mut self, slot: u32, generation: u32) -> Option<&mut Conn> {
        self.conns.get_mut(slot as usize)?.as_mut().filter(|c| c.generation == generation)
    }

    fn on_recv(&mut self, slot: u32, generation: u32, cqe: &cqueue::Entry) -> io::Result<()> {
        let res = cqe.result();
        let more = cqueue::more(cqe.flags());
        let bid = cqueue::buffer_select(cqe.flags());
        let Some(conn) =
            self.conns.get_mut(slot as usize).and_then(Option::as_mut).filter(|c| c.generation == generation)
        else {
            if let Some(bid) = bid {
                self.pool.give_back(bid);
            }
            return Ok(());
        };
        let mut rearm = !more;
        // Cancelled to pause reading (backpressure): not an error.
        let mut paused_on_purpose = false;
        if !more {
            conn.recv_armed = false;
            paused_on_purpose = std::mem::take(&mut conn.recv_cancelled) && res == -libc::ECANCELED;
        }
        if res > 0 {
            conn.last_activity = self.now;
            let bid = bid.expect("recv completion with data carries a buffer id");
            if !(conn.dead || conn.write_shut || conn.read_done) {
                let buf = self.pool.buffer(bid);
                let flow = self.processor.on_recv(&mut conn.session, buf, res as usize, &mut conn.out);
                if flow == Flow::Close {
                    // The session now discards input; reply, then half-close.
                    conn.closing = true;
                }
                conn.waiting_since = if conn.session.pending_bytes() > 0 {
                    conn.waiting_since.or(Some(self.now))
                } else {
                    None
                };
                if conn.unsent() > self.limits.max_pending_output && !conn.paused {
                    // The peer does not read its replies: stop reading its requests until
                    // it has read half of them.
                    conn.paused = true;
                    self.processor.stats().backpressure_pause();
                    if conn.recv_armed && more {
                        conn.recv_cancelled = true;
                        let target = user_data(Op::Recv, slot, conn.generation);
                        let cancel = opcode::AsyncCancel::new(target).build().user_data(user_data(
                            Op::Cancel,
                            slot,
                            conn.generation,
                        ));
                        if !conn.out.is_empty() && !conn.queued_for_send {
                            conn.queued_for_send = true;
                            self.send_queue.push(slot);
                        }
                        self.push(cancel)?;
                        return self.settle(slot);
                    }
                }
                if !conn.out.is_empty() && !conn.queued_for_send {
                    conn.queued_for_send = true;
                    self.send_queue.push(slot);
                }
            }
            self.pool.give_back(bid);
        } else if res == 0 {
            // Orderly shutdown by the peer: answer what was received, then close.
            let dropped = conn.session.finish();
            if dropped > 0 {
                tracing::debug!(core = self.core, dropped, "peer closed with an unterminated line");
            }
            conn.read_done = true;
            rearm = false;
        } else if paused_on_purpose {
            // Re-armed below unless still paused (resuming re-arms it otherwise).
        } else if res == -libc::ENOBUFS {
            // The pool ran dry this turn; buffers come back before the re-armed recv runs.
            tracing::trace!(core = self.core, "receive buffer pool empty");
        } else {
            if res != -libc::ECANCELED {
                let err = io::Error::from_raw_os_error(-res);
                tracing::debug!(core = self.core, "recv failed: {err}");
            }
            conn.dead = true;
            rearm = false;
        }
        if rearm && !conn.dead && !conn.read_done && !conn.paused {
            self.arm_recv(slot)?;
        }
        self.settle(slot)
    }

    /// Once a second: close connections past their idle or line deadline.
    fn on_tick(&mut self) -> io::Result<()> {
        let now = Instant::now();
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_mut() else { continue };
            if conn.dead {
                continue;
            }
            match next_deadline(&self.limits, conn.waiting_since, conn.last_activity) {
                Some((at, idle)) if at <= now => {
                    conn.dead = true;
                    if idle {
                        self.processor.stats().idle_timeout();
                        tracing::debug!(core = self.core, "closing an idle connection");
                    } else {
                        self.processor.stats().line_timeout();
                        tracing::debug!(core = self.core, "closing a connection that did not finish in time");
                    }
                }
                _ => continue,
            }
            self.settle(slot as u32)?;
        }
        if self.draining_since.is_none() || self.open_conns > 0 {
            self.arm_tick()?;
        }
        Ok(())
    }

    fn on_send(&mut self, slot: u32, generation: u32, res: i32) -> io::Result<()> {
        let (core, now, max_pending_output) = (self.core, self.now, self.limits.max_pending_output);
        let Some(conn) = self.conn(slot, generation) else {
            return Ok(());
        };
        conn.send_in_flight = false;
        if res < 0 {
            let err = io::Error::from_raw_os_error(-res);
            tracing::debug!(core, "send failed: {err}");
            conn.dead = true;
        } else {
            conn.sent += res as usize;
            conn.last_activity = now;
            let total = conn.sent;
            if total < conn.sending.len() {
                // Partial send: the rest goes out before anything queued after it.
                self.processor.stats().bytes_out(res as usize);
                self.submit_send(slot)?;
                return Ok(());
            }
            conn.sending.clear();
            conn.sent = 0;
            if conn.sending.capacity() > OUT_KEEP {
                conn.sending = Vec::new();
            }
            let queue = !conn.out.is_empty() && !conn.queued_for_send;
            if queue {
                conn.queued_for_send = true;
            }
            let resume = conn.paused && conn.unsent() <= max_pending_output / 2;
            if resume {
                conn.paused = false;
            }
            let arm = resume && !conn.recv_armed && !conn.read_done && !conn.dead;
            self.processor.stats().bytes_out(res as usize);
            if queue {
                self.send_queue.push(slot);
            }
            if arm {
                self.arm_recv(slot)?;
            }
        }
        self.settle(slot)
    }

    /// Starts one send per connection with new output: the batch of every reply produced
    /// this loop turn.
    fn queue_sends(&mut self) -> io::Result<()> {
        let mut queue = std::mem::take(&mut self.send_queue);
        for &slot in &queue {
            let Some(conn) = self.conns[slot as usize].as_mut() else {
                continue;
            };
            conn.queued_for_send = false;
            if conn.send_in_flight || conn.dead || conn.out.is_empty() {
                continue;
            }
            std::mem::swap(&mut conn.out, &mut conn.sending);
            conn.sent = 0;
            self.submit_send(slot)?;
        }
        queue.clear();
        self.send_queue = queue;
        Ok(())
    }

    fn submit_send(&mut self, slot: u32) -> io::Result<()> {
        let conn = self.conns[slot as usize].as_mut().expect("live slot");
        let rest = &conn.sending[conn.sent..];
        conn.send_in_flight = true;
        let entry = opcode::Send::new(Fd(conn.fd), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data(Op::Send, slot, conn.generation));
        self.push(entry)
    }

    /// Moves a connection towards its end once nothing more is owed to it: half-close after
    /// the last reply, release the slot when no operation is in flight.
    fn settle(&mut self, slot: u32) -> io::Result<()> {
        let draining = self.draining_since.is_some();
        let Some(conn) = self.conns[slot as usize].as_mut() else {
            return Ok(());
        };
        if draining && !conn.dead {
            conn.closing = true;
        }
        let output_done = !conn.send_in_flight && conn.out.is_empty();
        if !conn.dead && output_done {
            if conn.read_done && !conn.closing {
                // The peer half-closed and every reply is out: done.
                conn.dead = true;
            } else if conn.closing && !conn.write_shut && (conn.read_done || sys::unread_bytes(conn.fd) == 0)
            {
                // Send FIN after the last reply; keep reading (and discarding) until the
                // peer closes too, so unread input cannot turn our close into a reset that
                // destroys the replies in flight. While draining for shutdown, bytes the
                // kernel already holds are requests still owed a reply: wait for them.
                sys::shutdown(conn.fd, libc::SHUT_WR);
                conn.write_shut = true;
                conn.waiting_since = Some(self.now);
            }
            if conn.write_shut && conn.read_done {
                conn.dead = true;
            }
        }
        if conn.dead {
            if conn.recv_armed {
                // Ends the multishot recv; its final completion calls settle again.
                sys::shutdown(conn.fd, libc::SHUT_RDWR);
                let entry = opcode::AsyncCancel::new(user_data(Op::Recv, slot, conn.generation))
                    .build()
                    .user_data(user_data(Op::Cancel, slot, conn.generation));
                return self.push(entry);
            }
            if !conn.send_in_flight {
                // SAFETY: the fd is ours and no operation refers to it any more.
                unsafe { libc::close(conn.fd) };
                self.conns[slot as usize] = None;
                self.free_slots.push(slot);
                self.open_conns -= 1;
                self.processor.stats().connection_closed();
            }
        }
        Ok(())
    }

    fn begin_shutdown(&mut self) -> io::Result<()> {
        if self.draining_since.is_some() || !self.control.stopping() {
            // A spurious wake-up: keep listening for the real one.
            return if self.draining_since.is_none() { self.arm_wake() } else { Ok(()) };
        }
        self.draining_since = Some(Instant::now());
        // Connections the kernel already established may carry requests: serve them too.
        if sys::set_nonblocking(self.listener.as_raw_fd()).is_ok() {
            let mut backlog = Vec::new();
            sys::accept_backlog(self.listener.as_raw_fd(), |fd| backlog.push(fd));
            for fd in backlog {
                self.open(fd.into_raw_fd())?;
            }
        }
        self.accepting = false;
        if self.accept_armed {
            let entry = opcode::AsyncCancel::new(user_data(Op::Accept, 0, 0)).build().user_data(user_data(
                Op::Cancel,
                0,
                0,
            ));
            self.push(entry)?;
        }
        tracing::info!(
            core = self.core,
            connections = self.open_conns,
            timeout = ?self.shutdown_timeout,
            "shutting down: draining connections"
        );
        let deadline =
            opcode::Timeout::new(&*self.drain_timeout).build().user_data(user_data(Op::DrainDeadline, 0, 0));
        self.push(deadline)?;
        self.settle_all_pending = true;
        Ok(())
    }

    fn force_close_all(&mut self) {
        if self.deadline_passed {
            return;
        }
        self.deadline_passed = true;
        let mut left = 0;
        for slot in 0..self.conns.len() {
            if let Some(conn) = self.conns[slot].as_mut() {
                conn.dead = true;
                left += 1;
                let _ = self.settle(slot as u32);
            }
        }
        if left > 0 {
            tracing::warn!(
                core = self.core,
                connections = left,
                "shutdown deadline passed: closing undrained connections"
            );
        }
    }
}

impl<R: Routes> Drop for Worker<R> {
    fn drop(&mut self) {
        for conn in self.conns.iter().flatten() {
            // SAFETY: the fds are ours; the ring is torn down with the worker.
            unsafe { libc::close(conn.fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_failures_name_the_cause_and_the_fix() {
        let hint = |errno| diagnose(&io::Error::from_raw_os_error(errno));
        assert!(hint(libc::ENOSYS).contains("--backend epoll"));
        assert!(hint(libc::ENOMEM).contains("RLIMIT_MEMLOCK"));
        let denied = hint(libc::EPERM);
        assert!(denied.contains("seccomp") || denied.contains("io_uring_disabled"), "{denied}");
        assert!(denied.contains("--backend epoll"));
    }

    #[test]
    fn user_data_round_trips() {
        let ud = user_data(Op::Send, 123_456, 0x00ab_cdef);
        assert_eq!(split_user_data(ud), (Some(Op::Send), 0x00ab_cdef, 123_456));
    }
}

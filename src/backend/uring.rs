//! The native io_uring driver: one ring per core, multishot accept, multishot recv into a
//! provided-buffer ring (a one-shot recv straight into a long line's own buffer once the
//! connection lends it), one batched send per connection per loop turn, and one
//! `io_uring_enter` per loop turn.
//!
//! Each worker owns its ring, its buffer pool, its connections and its protocol
//! [`Processor`]; nothing is shared with other cores except the read-mostly counters. Every
//! connection rule lives in [`Connection`]: this driver only turns its answers into
//! submissions (recv on or off, send, FIN, close) and waits on one ring for completions and
//! for the earliest connection deadline.
//!
//! Connection slots are only reused once no operation referring to them is in flight, and
//! every `user_data` carries the connection's generation, so a late completion can never be
//! taken for another connection's.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Instant;

use io_uring::types::{BufRingEntry, Fd, SubmitArgs, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};
use slab::Slab;

use super::worker::{StopSignal, WorkerError, WorkerSetup};
use super::{ACCEPT_BACKOFF, AcceptErrorLog, sys};
use crate::dispatch::Service;
use crate::protocol::{
    Admission, CloseReason, Connection, Limits, LineBuf, PADDING, Processor, State, Step, Timers,
};

/// Usable bytes per pooled receive buffer (each is followed by [`PADDING`] bytes of slack).
const BUF_SIZE: usize = super::RECV_BUF_SIZE;
/// Receive buffers per core (a power of two, at most 32768). Few, because the kernel takes
/// them in turn: every byte received is written to the next buffer and read back from it at
/// once, so the pool's size is the memory the receive path cycles through. 512 buffers
/// (8 MiB) made each copy miss the caches — at 64 KiB requests `uring` spent 63 µs of CPU
/// per request to `epoll`'s 52 (which reads into one buffer); with 64 (1 MiB), 61 to 62
/// (`docs/benchmarks.md`). Fewer risk running dry (`ENOBUFS`) under many connections.
const BUF_COUNT: u16 = 64;
/// The provided-buffer group id.
pub const BGID: u16 = 0;
/// Submission queue entries; the completion queue is sized larger so bursts of multishot
/// completions do not overflow it.
const SQ_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 16 * 1024;

/// Operation kinds, in the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Accept = 1,
    Recv = 2,
    Send = 3,
    Wake = 4,
    AcceptRetry = 5,
    Cancel = 6,
    /// The eventfd of deferred replies answered off the core.
    Deferred = 7,
    /// A durable append's write (linked to the sync after it).
    DurableWrite = 8,
    /// A durable append's `fdatasync`.
    DurableSync = 9,
}

impl Op {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Op::Accept,
            2 => Op::Recv,
            3 => Op::Send,
            4 => Op::Wake,
            5 => Op::AcceptRetry,
            6 => Op::Cancel,
            7 => Op::Deferred,
            8 => Op::DurableWrite,
            9 => Op::DurableSync,
            _ => return None,
        })
    }
}

fn user_data(op: Op, slot: usize, generation: u32) -> u64 {
    (op as u64) << 56 | u64::from(generation & 0x00ff_ffff) << 32 | slot as u64 & 0xffff_ffff
}

fn split_user_data(ud: u64) -> (Option<Op>, u32, usize) {
    (Op::from_u8((ud >> 56) as u8), ((ud >> 32) & 0x00ff_ffff) as u32, ud as u32 as usize)
}

/// Byte offset of `optlen` in `struct io_uring_sqe` (the union with `splice_fd_in` and
/// `file_index`), which the kernel reads as a multishot recv's total byte limit.
const SQE_OPTLEN: usize = 44;
const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);

/// A multishot recv that ends (a completion without `IORING_CQE_F_MORE`) once `limit` bytes
/// have arrived. io-uring 0.7 has no setter for this field, so it is written into the SQE.
fn with_total_limit(entry: squeue::Entry, limit: u32) -> squeue::Entry {
    // SAFETY: `Entry` is `#[repr(C)]` around the 64-byte `io_uring_sqe` (size asserted
    // above), every bit pattern of which is a valid value; only the `optlen` bytes change.
    let mut sqe: [u8; 64] = unsafe { std::mem::transmute(entry) };
    sqe[SQE_OPTLEN..SQE_OPTLEN + 4].copy_from_slice(&limit.to_ne_bytes());
    unsafe { std::mem::transmute(sqe) }
}

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
                tracing::error!(core = worker.core, "uring worker stopped: {e}");
            }
        }
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    }
}

/// Queues `entry` on `ring`, submitting first while the submission queue is full.
///
/// # Safety
/// Every buffer `entry` points to must stay valid and unmoved until its completion.
pub unsafe fn push_entry(ring: &mut IoUring, entry: &squeue::Entry) -> io::Result<()> {
    loop {
        // SAFETY: the caller keeps the entry's buffers alive until it completes.
        if unsafe { ring.submission().push(entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
}

/// Creates a ring with the fastest flags this kernel accepts.
pub fn build_ring() -> io::Result<IoUring> {
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
pub struct BufferPool {
    ring: *mut BufRingEntry,
    ring_bytes: usize,
    storage: Box<[u8]>,
    tail: u16,
}

const STRIDE: usize = BUF_SIZE + PADDING;

impl BufferPool {
    /// Registers the pool with `ring` as buffer group [`BGID`], every buffer handed to the kernel.
    ///
    /// # Errors
    /// The mapping or the registration failed (old kernel, locked-memory limit).
    pub fn new(ring: &IoUring) -> io::Result<Self> {
        let ring_bytes = usize::from(BUF_COUNT) * size_of::<BufRingEntry>();
        // SAFETY: a fresh anonymous private mapping; the kernel requires page alignment, which
        // mmap gives.
        let addr = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                ring_bytes,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )?
        };
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
    pub fn buffer(&mut self, bid: u16) -> &mut [u8] {
        let start = usize::from(bid) * STRIDE;
        &mut self.storage[start..start + STRIDE]
    }

    /// Queues buffer `bid` for the kernel again; visible after [`publish`](Self::publish).
    pub fn give_back(&mut self, bid: u16) {
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
    pub fn publish(&self) {
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
        let _ = unsafe { rustix::mm::munmap(self.ring.cast(), self.ring_bytes) };
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
    generation: u32,
    recv: Recv,
    /// The socket was shut down both ways to end the operations in flight before closing.
    ending: bool,
    /// Its mailbox (made at its first deferred reply) has this core's waker.
    waker_set: bool,
    /// The line buffer a one-shot recv is filling (owned here until it completes).
    line: Option<LineBuf>,
    conn: Connection,
}

/// How answers to deferred replies, completed on any thread, reach this core: the waker of
/// each connection's mailbox names the connection here and makes the eventfd the ring reads
/// readable (once per batch: while the list is not empty, the core has a wake-up coming).
struct DeferredWake {
    ready: std::sync::Mutex<Vec<(usize, u32)>>,
    eventfd: sys::EventFd,
}

/// The waker of one connection's mailbox on a `uring` core.
struct ConnWaker {
    slot: usize,
    generation: u32,
    core: Arc<DeferredWake>,
}

impl std::task::Wake for ConnWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let first = {
            let mut ready = self.core.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            ready.push((self.slot, self.generation));
            ready.len() == 1
        };
        if first {
            self.core.eventfd.notify();
        }
    }
}

/// The listener's multishot accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accept {
    Armed,
    /// Failed (e.g. EMFILE); a timeout re-arms it after [`ACCEPT_BACKOFF`].
    BackingOff,
    /// Shutting down: a cancel is in flight.
    Cancelling,
    Stopped,
}

struct Worker<S: Service> {
    core: usize,
    // Field order matters for drop: the ring goes before the buffers it points into.
    ring: IoUring,
    pool: BufferPool,
    processor: Processor<S>,
    listener: OwnedFd,
    stop: Arc<StopSignal>,
    conns: Slab<Conn>,
    next_generation: u32,
    timers: Timers<(usize, u32)>,
    /// Connections with replies to send at the end of this loop turn (may repeat).
    send_queue: Vec<usize>,
    completions: Vec<cqueue::Entry>,
    wake_buf: Box<u64>,
    deferred: Arc<DeferredWake>,
    deferred_buf: Box<u64>,
    /// Hands connections to less loaded cores and brings theirs here (through the deferred
    /// eventfd's wake-up).
    balancer: Option<Arc<super::balance::Balancer>>,
    /// Reused list of connections whose deferred replies were answered.
    deferred_ready: Vec<(usize, u32)>,
    /// Files with a durable write and sync in flight on this ring (kept alive until both
    /// complete: the kernel reads the batch's bytes).
    durable: Slab<Arc<crate::durable::Shared>>,
    /// Reused list of files with appends to start.
    durable_kicks: Vec<Arc<crate::durable::Shared>>,
    accept_backoff: Box<Timespec>,
    accept: Accept,
    accept_errors: AcceptErrorLog,
    /// When the shutdown began, and when it closes what is left.
    drain_deadline: Option<Instant>,
    /// Draining connections to poll again once this turn's completions are all handled
    /// (may repeat).
    drain_checks: Vec<usize>,
    deadline_logged: bool,
    /// Whether the kernel takes a total byte limit on a multishot recv (6.16 and later);
    /// cleared by the first recv that fails with EINVAL.
    recv_limit: bool,
    limits: Limits,
    shutdown_timeout: std::time::Duration,
    /// The time at the start of this loop turn (one clock read per turn).
    now: Instant,
}

impl<S: Service> Worker<S> {
    fn new(setup: WorkerSetup, service: Arc<S>) -> Result<Self, WorkerError> {
        let unavailable =
            |source: io::Error| WorkerError::IoUringUnavailable { hint: diagnose(&source), source };
        let ring = build_ring().map_err(unavailable)?;
        let pool = BufferPool::new(&ring).map_err(unavailable)?;
        let processor = {
            let mut processor = Processor::new(setup.core, service, setup.stats, setup.config.limits)
                .with_executors(setup.exec)
                .with_access(setup.access);
            processor.enable_durable_ring();
            processor
        };
        let mut worker = Self {
            core: setup.core,
            ring,
            pool,
            processor,
            listener: setup.listener,
            stop: setup.stop,
            conns: Slab::new(),
            next_generation: 0,
            timers: Timers::default(),
            send_queue: Vec::new(),
            completions: Vec::with_capacity(CQ_ENTRIES as usize),
            wake_buf: Box::new(0),
            deferred: Arc::new(DeferredWake {
                ready: std::sync::Mutex::new(Vec::new()),
                eventfd: sys::EventFd::new().map_err(|source| WorkerError::Io {
                    what: "cannot create the eventfd for deferred replies",
                    source,
                })?,
            }),
            deferred_buf: Box::new(0),
            balancer: setup.balancer,
            deferred_ready: Vec::new(),
            durable: Slab::new(),
            durable_kicks: Vec::new(),
            accept_backoff: Box::new(Timespec::from(ACCEPT_BACKOFF)),
            accept: Accept::Stopped,
            accept_errors: AcceptErrorLog::new(setup.core),
            drain_deadline: None,
            drain_checks: Vec::new(),
            deadline_logged: false,
            recv_limit: true,
            limits: setup.config.limits,
            shutdown_timeout: setup.config.shutdown_timeout,
            now: Instant::now(),
        };
        worker.arm_accept().map_err(unavailable)?;
        worker.arm_wake().map_err(unavailable)?;
        worker.arm_deferred().map_err(unavailable)?;
        worker.ring.submit().map_err(unavailable)?;
        if let Some(balancer) = &worker.balancer {
            let wake = worker.deferred.clone();
            balancer.serve(worker.core, move || wake.eventfd.notify());
        }
        Ok(worker)
    }

    /// Queues an SQE, submitting first if the submission queue is full.
    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        // SAFETY: every buffer an entry points to is owned by the worker (connection buffers,
        // boxed timespecs, the pool) and outlives the operation: slots are only freed once
        // their operations have completed.
        unsafe { push_entry(&mut self.ring, &entry) }
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        let entry = opcode::AcceptMulti::new(Fd(self.listener.as_raw_fd()))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data(Op::Accept, 0, 0));
        self.accept = Accept::Armed;
        self.push(entry)
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let fd = self.stop.waker(self.core).as_fd().as_raw_fd();
        let entry = opcode::Read::new(Fd(fd), (&mut *self.wake_buf as *mut u64).cast(), 8)
            .build()
            .user_data(user_data(Op::Wake, 0, 0));
        self.push(entry)
    }

    fn arm_deferred(&mut self) -> io::Result<()> {
        let fd = self.deferred.eventfd.as_fd().as_raw_fd();
        let entry = opcode::Read::new(Fd(fd), (&mut *self.deferred_buf as *mut u64).cast(), 8)
            .build()
            .user_data(user_data(Op::Deferred, 0, 0));
        self.push(entry)
    }

    /// Deferred replies were answered: each connection named takes its answers in.
    fn on_deferred(&mut self) -> io::Result<()> {
        let mut ready = std::mem::take(&mut self.deferred_ready);
        std::mem::swap(
            &mut *self.deferred.ready.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            &mut ready,
        );
        for &(slot, generation) in &ready {
            let Some(c) = self.conns.get_mut(slot).filter(|c| c.generation == generation) else { continue };
            c.conn.on_deferred(self.processor.stats());
            self.drive(slot, false)?;
        }
        ready.clear();
        self.deferred_ready = ready;
        // The same wake-up brings connections other cores handed over.
        if let Some(balancer) = self.balancer.clone() {
            for fd in balancer.take(self.core) {
                self.admit(fd)?;
            }
        }
        self.arm_deferred()
    }

    /// Starts the durable appends handlers made since the last turn: one write of each
    /// file's batch, linked to one `fdatasync`.
    fn start_durable(&mut self) -> io::Result<()> {
        let mut kicks = std::mem::take(&mut self.durable_kicks);
        self.processor.take_durable_kicks(&mut kicks);
        for shared in kicks.drain(..) {
            shared.queued.store(false, Ordering::Relaxed);
            let io = crate::durable::lock(&shared.commit).poll();
            if let Some(io) = io {
                let slot = self.durable.insert(shared);
                self.submit_durable(slot, io)?;
            }
        }
        self.durable_kicks = kicks;
        Ok(())
    }

    fn submit_durable(&mut self, slot: usize, io: crate::durable::WriteAndSync) -> io::Result<()> {
        let fd = Fd(self.durable[slot].file.as_raw_fd());
        let write = opcode::Write::new(fd, io.ptr, io.len.try_into().unwrap_or(u32::MAX))
            .offset(io.offset)
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(user_data(Op::DurableWrite, slot, 0));
        let sync = opcode::Fsync::new(fd)
            .flags(io_uring::types::FsyncFlags::DATASYNC)
            .build()
            .user_data(user_data(Op::DurableSync, slot, 0));
        // A link must not be split across submissions: make room for both first.
        let room = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if room < 2 {
            self.ring.submit()?;
        }
        self.push(write)?;
        self.push(sync)
    }

    fn on_durable(&mut self, slot: usize, op: Op, res: i32) -> io::Result<()> {
        let Some(shared) = self.durable.get(slot) else { return Ok(()) };
        let (next, busy) = {
            let mut commit = crate::durable::lock(&shared.commit);
            let next = if op == Op::DurableWrite { commit.on_write(res) } else { commit.on_sync(res) };
            (next, commit.busy())
        };
        match next {
            Some(io) => self.submit_durable(slot, io),
            None => {
                if !busy {
                    self.durable.remove(slot);
                }
                Ok(())
            }
        }
    }

    fn serve(&mut self) -> io::Result<()> {
        loop {
            self.start_durable()?;
            self.queue_sends()?;
            self.pool.publish();
            if self.finished() {
                return Ok(());
            }
            let waited = match self.timers.next() {
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
            let mut completions = std::mem::take(&mut self.completions);
            completions.extend(self.ring.completion());
            for cqe in completions.drain(..) {
                self.complete(&cqe)?;
            }
            self.completions = completions;
            self.fire_timers()?;
            if !self.drain_checks.is_empty() && self.ring.completion().is_empty() {
                // Only now, with every received byte handled, may a draining connection
                // learn that the kernel holds nothing more for it.
                let mut checks = std::mem::take(&mut self.drain_checks);
                for slot in checks.drain(..) {
                    self.drive(slot, true)?;
                }
                self.drain_checks = checks;
            }
        }
    }

    fn finished(&self) -> bool {
        // Durable I/O in flight reads its batch's bytes: the worker waits for it.
        self.drain_deadline.is_some()
            && self.conns.is_empty()
            && self.accept == Accept::Stopped
            && self.durable.is_empty()
    }

    fn complete(&mut self, cqe: &cqueue::Entry) -> io::Result<()> {
        let (op, generation, slot) = split_user_data(cqe.user_data());
        match op {
            Some(Op::Accept) => self.on_accept(cqe),
            Some(Op::Recv) => self.on_recv(slot, generation, cqe),
            Some(Op::Send) => self.on_send(slot, generation, cqe.result()),
            Some(Op::Wake) => self.begin_shutdown(),
            Some(Op::Deferred) => self.on_deferred(),
            Some(op @ (Op::DurableWrite | Op::DurableSync)) => self.on_durable(slot, op, cqe.result()),
            Some(Op::AcceptRetry) => {
                if self.accept == Accept::BackingOff {
                    self.arm_accept()?;
                }
                Ok(())
            }
            Some(Op::Cancel) | None => Ok(()),
        }
    }

    fn fire_timers(&mut self) -> io::Result<()> {
        while let Some((at, (slot, generation))) = self.timers.pop_due(self.now) {
            let Some(c) = self.conns.get_mut(slot).filter(|c| c.generation == generation) else { continue };
            c.conn.timer_fired(at);
            c.conn.on_timeout(self.now, self.processor.stats());
            if c.conn.state() == State::Closed(CloseReason::ShutdownDeadline) && !self.deadline_logged {
                self.deadline_logged = true;
                tracing::warn!(
                    core = self.core,
                    connections = self.conns.len(),
                    "shutdown deadline passed: closing undrained connections"
                );
            }
            self.drive(slot, false)?;
        }
        Ok(())
    }

    fn on_accept(&mut self, cqe: &cqueue::Entry) -> io::Result<()> {
        let more = cqueue::more(cqe.flags());
        let res = cqe.result();
        if res >= 0 {
            // SAFETY: the kernel just created this descriptor for us.
            let fd = unsafe { OwnedFd::from_raw_fd(res) };
            self.accept_errors.succeeded();
            // Accepted while the shutdown began (before the cancel took effect): it may carry
            // requests, so it is served, draining, like the backlog.
            let fd = match &self.balancer {
                Some(balancer) => balancer.place(self.core, fd),
                None => Some(fd),
            };
            if let Some(fd) = fd {
                self.admit(fd)?;
            }
        } else if res != -libc::ECANCELED {
            let err = io::Error::from_raw_os_error(-res);
            self.accept_errors.failed(&err, Instant::now());
        }
        if !more {
            match self.accept {
                Accept::Armed if res >= 0 => self.arm_accept()?,
                Accept::Armed => {
                    self.accept = Accept::BackingOff;
                    let entry = opcode::Timeout::new(&*self.accept_backoff).build().user_data(user_data(
                        Op::AcceptRetry,
                        0,
                        0,
                    ));
                    self.push(entry)?;
                }
                Accept::Cancelling => self.accept = Accept::Stopped,
                Accept::BackingOff | Accept::Stopped => {}
            }
        }
        Ok(())
    }

    /// Serves a new connection, or refuses it beyond the connection limit.
    fn admit(&mut self, fd: OwnedFd) -> io::Result<()> {
        match self.limits.admit(self.conns.len(), self.processor.stats()) {
            Admission::Accept => self.open(fd),
            Admission::Refuse(line) => {
                sys::refuse(fd.as_fd(), line);
                Ok(())
            }
        }
    }

    fn open(&mut self, fd: OwnedFd) -> io::Result<()> {
        if let Err(e) = sys::set_nodelay(fd.as_fd()) {
            tracing::debug!(core = self.core, "TCP_NODELAY failed: {e}");
        }
        self.next_generation = self.next_generation.wrapping_add(1) & 0x00ff_ffff;
        let mut conn = self.processor.open_connection(self.now);
        sys::name_peer(fd.as_fd(), &mut conn);
        if let Some(deadline) = self.drain_deadline {
            conn.on_shutdown(deadline);
        }
        let slot = self.conns.insert(Conn {
            fd,
            generation: self.next_generation,
            recv: Recv::Off,
            ending: false,
            waker_set: false,
            line: None,
            conn,
        });
        self.drive(slot, false)
    }

    fn on_recv(&mut self, slot: usize, generation: u32, cqe: &cqueue::Entry) -> io::Result<()> {
        let res = cqe.result();
        let bid = cqueue::buffer_select(cqe.flags());
        let Some(c) = self.conns.get_mut(slot).filter(|c| c.generation == generation) else {
            if let Some(bid) = bid {
                self.pool.give_back(bid);
            }
            return Ok(());
        };
        if let Some(mut line) = c.line.take() {
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
                recv_failed(self.core, &mut c.conn, res);
            }
            return self.drive(slot, false);
        }
        if !cqueue::more(cqe.flags()) {
            // Also where a recv's byte limit was reached: drive() arms the next one.
            c.recv = Recv::Off;
        }
        if res == -libc::EINVAL && self.recv_limit {
            // A kernel before 6.16 refuses the byte limit: read without it from now on.
            tracing::debug!(core = self.core, "multishot recv without a byte limit (kernel before 6.16)");
            self.recv_limit = false;
        } else if res > 0 {
            let bid = bid.expect("recv completion with data carries a buffer id");
            c.conn.on_recv(&mut self.processor, self.pool.buffer(bid), res as usize, self.now);
            self.pool.give_back(bid);
        } else if res == 0 {
            c.conn.on_peer_closed(self.now);
        } else if res != -libc::ENOBUFS {
            // ENOBUFS: the pool ran dry this turn; buffers come back before the recv is
            // re-armed.
            recv_failed(self.core, &mut c.conn, res);
        }
        self.drive(slot, false)
    }

    fn on_send(&mut self, slot: usize, generation: u32, res: i32) -> io::Result<()> {
        let Some(c) = self.conns.get_mut(slot).filter(|c| c.generation == generation) else {
            return Ok(());
        };
        c.conn.on_sent(res.max(0) as usize, self.now, self.processor.stats());
        if res < 0 {
            tracing::debug!(core = self.core, "send failed: {}", io::Error::from_raw_os_error(-res));
            c.conn.on_error();
        }
        self.drive(slot, false)
    }

    /// Turns what the connection asks for into submissions: FIN or close, recv on or off,
    /// a send at the end of the turn, its next deadline. `settled` says that every completion
    /// so far is handled, so the kernel's count of unread bytes is the whole truth.
    fn drive(&mut self, slot: usize, settled: bool) -> io::Result<()> {
        let Some(c) = self.conns.get_mut(slot) else { return Ok(()) };
        let fd = c.fd.as_fd();
        match c.conn.poll(self.now, || if settled { sys::unread_bytes(fd) } else { 1 }) {
            Step::Wait if !settled && c.conn.state() == State::Draining => self.drain_checks.push(slot),
            Step::Wait => {}
            Step::ShutdownWrite => sys::shutdown(fd, Shutdown::Write),
            Step::Close(_) => return self.close(slot),
        }
        let target = user_data(Op::Recv, slot, c.generation);
        match (c.conn.wants_read(), c.recv) {
            (true, Recv::Off) => {
                let entry = if let Some(mut line) = c.conn.lend_line() {
                    let room = line.room().try_into().unwrap_or(u32::MAX);
                    let entry = opcode::Recv::new(Fd(fd.as_raw_fd()), line.read_ptr(), room).build();
                    c.line = Some(line);
                    c.recv = Recv::Direct;
                    entry
                } else {
                    c.recv = Recv::Armed;
                    let entry = opcode::RecvMulti::new(Fd(fd.as_raw_fd()), BGID).build();
                    if self.recv_limit {
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
            (true, Recv::Armed) if c.conn.wants_line_read() => {
                // A long line: its rest is read straight into its buffer once the multishot
                // recv has ended.
                c.recv = Recv::Cancelling;
                let entry =
                    opcode::AsyncCancel::new(target).build().user_data(user_data(Op::Cancel, slot, 0));
                self.push(entry)?;
            }
            (false, Recv::Armed | Recv::Direct) => {
                // Backpressure, the peer's FIN or a timeout: stop reading.
                c.recv = Recv::Cancelling;
                let entry =
                    opcode::AsyncCancel::new(target).build().user_data(user_data(Op::Cancel, slot, 0));
                self.push(entry)?;
            }
            _ => {}
        }
        let c = &mut self.conns[slot];
        if !c.waker_set
            && let Some(mailbox) = c.conn.mailbox()
        {
            c.waker_set = true;
            let waker = ConnWaker { slot, generation: c.generation, core: self.deferred.clone() };
            mailbox.set_waker(std::task::Waker::from(Arc::new(waker)));
            // Answers may have come before the waker was set.
            c.conn.on_deferred(self.processor.stats());
        }
        let urgent = c.conn.wants_send() && c.conn.is_handshaking();
        if c.conn.wants_send() {
            self.send_queue.push(slot);
        }
        if let Some(at) = c.conn.reschedule() {
            self.timers.schedule(at, (slot, c.generation));
        }
        if urgent {
            // A TLS handshake's flight leaves now, not after the rest of the turn's work.
            self.queue_sends()?;
            self.ring.submit()?;
        }
        Ok(())
    }

    /// Releases a closed connection once no operation refers to it; until then, shuts the
    /// socket down so the operations in flight end.
    fn close(&mut self, slot: usize) -> io::Result<()> {
        let c = &mut self.conns[slot];
        if c.recv == Recv::Off && !c.conn.send_in_flight() {
            let c = self.conns.remove(slot);
            c.conn.finish(self.processor.stats());
            return Ok(());
        }
        if !c.ending {
            c.ending = true;
            // Ends a send stuck on a peer that does not read, and the multishot recv.
            sys::shutdown(c.fd.as_fd(), Shutdown::Both);
            if matches!(c.recv, Recv::Armed | Recv::Direct) {
                c.recv = Recv::Cancelling;
                let target = user_data(Op::Recv, slot, c.generation);
                let entry =
                    opcode::AsyncCancel::new(target).build().user_data(user_data(Op::Cancel, slot, 0));
                self.push(entry)?;
            }
        }
        Ok(())
    }

    /// Starts one send per connection with new output: the batch of every reply produced
    /// this loop turn.
    fn queue_sends(&mut self) -> io::Result<()> {
        let mut queue = std::mem::take(&mut self.send_queue);
        for slot in queue.drain(..) {
            let Some(c) = self.conns.get_mut(slot) else { continue };
            let Some(bytes) = c.conn.start_send() else { continue };
            let entry = opcode::Send::new(Fd(c.fd.as_raw_fd()), bytes.as_ptr(), bytes.len() as u32)
                .flags(libc::MSG_NOSIGNAL)
                .build()
                .user_data(user_data(Op::Send, slot, c.generation));
            self.push(entry)?;
        }
        self.send_queue = queue;
        Ok(())
    }

    fn begin_shutdown(&mut self) -> io::Result<()> {
        if !self.stop.stopping() {
            // A spurious wake-up: keep listening for the real one.
            return self.arm_wake();
        }
        if self.drain_deadline.is_some() {
            return Ok(());
        }
        let deadline = self.now + self.shutdown_timeout;
        self.drain_deadline = Some(deadline);
        // Connections the kernel already established may carry requests: serve them too.
        if sys::set_nonblocking(self.listener.as_fd()).is_ok() {
            let mut backlog = Vec::new();
            sys::accept_backlog(self.listener.as_fd(), |fd| backlog.push(fd));
            for fd in backlog {
                self.admit(fd)?;
            }
        }
        if let Some(balancer) = self.balancer.clone() {
            for fd in balancer.stop(self.core) {
                self.admit(fd)?;
            }
        }
        match self.accept {
            Accept::Armed => {
                self.accept = Accept::Cancelling;
                let entry = opcode::AsyncCancel::new(user_data(Op::Accept, 0, 0))
                    .build()
                    .user_data(user_data(Op::Cancel, 0, 0));
                self.push(entry)?;
            }
            // A pending retry timeout finds the state Stopped and does nothing.
            Accept::BackingOff => self.accept = Accept::Stopped,
            Accept::Cancelling | Accept::Stopped => {}
        }
        tracing::info!(
            core = self.core,
            connections = self.conns.len(),
            timeout = ?self.shutdown_timeout,
            "shutting down: draining connections"
        );
        let slots: Vec<usize> = self.conns.iter().map(|(slot, _)| slot).collect();
        for slot in slots {
            self.conns[slot].conn.on_shutdown(deadline);
            self.drive(slot, false)?;
        }
        Ok(())
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

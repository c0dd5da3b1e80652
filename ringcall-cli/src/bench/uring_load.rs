//! The closed-loop load on io_uring, used wherever io_uring works: one ring per load thread,
//! multishot recv into a provided-buffer ring and one batched send per connection per loop
//! turn — the same machinery as the `uring` server, so the load generator costs no more per
//! request than the server it measures (a readiness-based client pays an event, a read and a
//! write system call per request and becomes the bottleneck with many connections).

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use io_uring::types::{Fd, Timespec};
use io_uring::{IoUring, cqueue, opcode, squeue};

use super::{BenchConfig, DRAIN_WAIT, Ended, Flight, Reply, Shared, ThreadResult};
use ringcall_sys::uring::{BGID, BufferPool, build_ring, push_entry};

const RECV: u64 = 1;
const SEND: u64 = 2;
const TICK: u64 = 3;
/// Wake-up period, so a change of phase is noticed even when no reply arrives.
const TICK_EVERY: Duration = Duration::from_millis(50);

struct Conn {
    stream: TcpStream,
    flight: Flight,
    out: Vec<u8>,
    sending: Vec<u8>,
    sent: usize,
    send_in_flight: bool,
    recv_armed: bool,
    /// The start of a reply line split across receives.
    carry: Vec<u8>,
    dead: bool,
}

/// One load thread's connections on one ring.
pub(super) struct UringLoad {
    ring: IoUring,
    pool: BufferPool,
    conns: Vec<Conn>,
    tick: Box<Timespec>,
}

fn ud(kind: u64, index: usize) -> u64 {
    kind << 32 | index as u64
}

impl UringLoad {
    /// A ring and its buffer pool, if io_uring works here.
    pub(super) fn setup() -> io::Result<(IoUring, BufferPool)> {
        let ring = build_ring()?;
        let pool = BufferPool::new(&ring, 0)?;
        Ok((ring, pool))
    }

    /// The driver for `streams` (connected already), keyed by connection index.
    pub(super) fn new(
        (ring, pool): (IoUring, BufferPool),
        streams: Vec<(usize, TcpStream)>,
        config: &BenchConfig,
    ) -> Self {
        let conns = streams
            .into_iter()
            .map(|(index, stream)| Conn {
                stream,
                flight: Flight::new(index, config),
                out: Vec::with_capacity(1024),
                sending: Vec::with_capacity(1024),
                sent: 0,
                send_in_flight: false,
                recv_armed: false,
                carry: Vec::new(),
                dead: false,
            })
            .collect();
        Self { ring, pool, conns, tick: Box::new(Timespec::from(TICK_EVERY)) }
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        // SAFETY: every buffer an entry points to (the connections' send buffers, the boxed
        // timespec, the pool) lives until the ring is dropped with `self`.
        unsafe { push_entry(&mut self.ring, &entry) }
    }

    fn arm_recv(&mut self, i: usize) -> io::Result<()> {
        self.conns[i].recv_armed = true;
        let entry =
            opcode::RecvMulti::new(Fd(self.conns[i].stream.as_raw_fd()), BGID).build().user_data(ud(RECV, i));
        self.push(entry)
    }

    fn submit_send(&mut self, i: usize) -> io::Result<()> {
        let conn = &mut self.conns[i];
        let rest = &conn.sending[conn.sent..];
        conn.send_in_flight = true;
        let entry = opcode::Send::new(Fd(conn.stream.as_raw_fd()), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(SEND, i));
        self.push(entry)
    }

    fn arm_tick(&mut self) -> io::Result<()> {
        let entry = opcode::Timeout::new(&*self.tick).build().user_data(ud(TICK, 0));
        self.push(entry)
    }

    /// Runs until the phase says stop (and replies in flight are in, or `DRAIN_WAIT` passed).
    /// Returns when the last measured reply arrived.
    pub(super) fn run(
        mut self,
        config: &BenchConfig,
        shared: &Shared,
        result: &mut ThreadResult,
    ) -> io::Result<Option<Instant>> {
        let mut last_measured = None;
        let now = Instant::now();
        for i in 0..self.conns.len() {
            self.arm_recv(i)?;
            let conn = &mut self.conns[i];
            for _ in 0..config.pipeline {
                if !conn.flight.issue(config, shared, &mut conn.out, now) {
                    break;
                }
            }
        }
        self.arm_tick()?;
        let mut stop_at = None;
        let mut cqes = Vec::with_capacity(4096);
        loop {
            for i in 0..self.conns.len() {
                let conn = &mut self.conns[i];
                if !conn.send_in_flight && !conn.dead && !conn.out.is_empty() {
                    std::mem::swap(&mut conn.out, &mut conn.sending);
                    conn.sent = 0;
                    if super::measuring(shared) {
                        result.bytes_sent += conn.sending.len() as u64;
                    }
                    self.submit_send(i)?;
                }
            }
            self.pool.publish();
            if self.conns.iter().all(|c| c.dead) {
                // The server went away: nothing left to measure.
                break;
            }
            if Flight::stopping(config, shared) {
                let now = Instant::now();
                let deadline = *stop_at.get_or_insert(now + DRAIN_WAIT);
                if self.conns.iter().all(|c| c.dead || c.flight.is_empty()) {
                    break;
                }
                if now >= deadline {
                    for conn in self.conns.iter().filter(|c| !c.dead && !c.flight.is_empty()) {
                        result.connection_ended(Ended::TimedOut, conn.flight.len());
                    }
                    break;
                }
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            cqes.extend(self.ring.completion());
            let mut measured = 0u64;
            for cqe in cqes.drain(..) {
                let (kind, i) = (cqe.user_data() >> 32, (cqe.user_data() & 0xffff_ffff) as usize);
                match kind {
                    RECV => measured += self.on_recv(i, &cqe, config, shared, result, now)?,
                    SEND => self.on_send(i, cqe.result(), result)?,
                    _ => self.arm_tick()?,
                }
            }
            if measured > 0 {
                shared.completed.fetch_add(measured, std::sync::atomic::Ordering::Relaxed);
                last_measured = Some(now);
            }
        }
        Ok(last_measured)
    }

    fn on_recv(
        &mut self,
        i: usize,
        cqe: &cqueue::Entry,
        config: &BenchConfig,
        shared: &Shared,
        result: &mut ThreadResult,
        now: Instant,
    ) -> io::Result<u64> {
        let res = cqe.result();
        let more = cqueue::more(cqe.flags());
        let conn = &mut self.conns[i];
        if !more {
            conn.recv_armed = false;
        }
        let mut measured = 0;
        if res > 0 {
            let bid = cqueue::buffer_select(cqe.flags()).expect("recv data carries a buffer id");
            let data = &self.pool.buffer(bid)[..res as usize];
            if super::measuring(shared) {
                result.bytes_received += res as u64;
            }
            let mut replies = 0u64;
            let mut on_line = |flight: &mut Flight, line: &[u8]| match flight.reply(result, line, now) {
                Reply::Measured => {
                    replies += 1;
                    measured += 1;
                }
                Reply::Unmeasured => replies += 1,
                Reply::Unexpected => {}
            };
            let mut start = 0;
            if !conn.carry.is_empty() {
                match memchr::memchr(b'\n', data) {
                    Some(nl) => {
                        conn.carry.extend_from_slice(&data[..nl]);
                        let line = std::mem::take(&mut conn.carry);
                        on_line(&mut conn.flight, &line);
                        conn.carry = line;
                        conn.carry.clear();
                        start = nl + 1;
                    }
                    None => {
                        conn.carry.extend_from_slice(data);
                        start = data.len();
                    }
                }
            }
            while let Some(nl) = memchr::memchr(b'\n', &data[start..]) {
                on_line(&mut conn.flight, &data[start..start + nl]);
                start += nl + 1;
            }
            conn.carry.extend_from_slice(&data[start..]);
            self.pool.give_back(bid);
            for _ in 0..replies {
                if !conn.flight.issue(config, shared, &mut conn.out, now) {
                    break;
                }
            }
        } else if res != -libc::ENOBUFS {
            // The server closed or reset the connection.
            if !conn.dead {
                conn.dead = true;
                let how = if res == 0 { Ended::Closed } else { Ended::from_errno(-res) };
                result.connection_ended(how, conn.flight.len());
            }
            return Ok(measured);
        }
        if !more && !self.conns[i].dead {
            self.arm_recv(i)?;
        }
        Ok(measured)
    }

    fn on_send(&mut self, i: usize, res: i32, result: &mut ThreadResult) -> io::Result<()> {
        let conn = &mut self.conns[i];
        conn.send_in_flight = false;
        if res < 0 {
            if !conn.dead {
                conn.dead = true;
                result.connection_ended(Ended::from_errno(-res), conn.flight.len());
            }
            return Ok(());
        }
        conn.sent += res as usize;
        if conn.sent < conn.sending.len() {
            return self.submit_send(i);
        }
        conn.sending.clear();
        Ok(())
    }
}

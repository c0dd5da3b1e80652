//! The transport ceiling `ringcall compare --baseline` measures the backends against: a bare
//! io_uring echo loop on the `uring` backend's machinery — one ring per thread, an
//! SO_REUSEPORT listener each, multishot accept, multishot recv into the same provided-buffer
//! ring, one batched send per connection per turn — with no framing and no JSON: the bytes
//! received are copied to the connection's output and sent back. Whatever `uring` needs above
//! this at a given size is what the framework costs there.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use io_uring::types::Fd;
use io_uring::{IoUring, cqueue, opcode, squeue};
use ringcall_sys as sys;
use ringcall_sys::uring::{BGID, BufferPool, build_ring, push_entry};

const ACCEPT: u64 = 1;
const RECV: u64 = 2;
const SEND: u64 = 3;

/// One echoed connection.
struct Conn {
    fd: OwnedFd,
    /// Received and not yet sent.
    out: Vec<u8>,
    /// Being sent, from `sent` on.
    sending: Vec<u8>,
    sent: usize,
    send_in_flight: bool,
    recv_armed: bool,
    /// The peer closed or the connection failed: released once nothing is in flight.
    closing: bool,
}

/// Binds `threads` SO_REUSEPORT listeners on `addr` and echoes on each from its own thread
/// (pinned to `cpus` in turn, if given); returns the address bound. Runs until the process
/// ends.
///
/// # Errors
/// The listeners cannot be bound, or io_uring cannot be set up.
pub fn serve(addr: SocketAddr, threads: usize, cpus: &[usize]) -> io::Result<SocketAddr> {
    let (listeners, local) = sys::reuseport_listeners(addr, threads.max(1))?;
    let count = listeners.len();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    for (i, listener) in listeners.into_iter().enumerate() {
        let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
        let ready_tx = ready_tx.clone();
        std::thread::Builder::new().name(format!("echo-baseline-{i}")).spawn(move || {
            if let Some(cpu) = cpu {
                let _ = sys::pin_to_cpu(cpu);
            }
            let echo = build_ring().and_then(|ring| {
                let pool = BufferPool::new(&ring, 0)?;
                Ok(Echo::new(ring, pool, listener))
            });
            match echo {
                Ok(echo) => {
                    let _ = ready_tx.send(Ok(()));
                    drop(ready_tx);
                    if let Err(e) = echo.run() {
                        tracing::error!("echo baseline thread {i} stopped: {e}");
                    }
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        })?;
    }
    drop(ready_tx);
    for result in ready.iter().take(count) {
        result?;
    }
    Ok(local)
}

struct Echo {
    ring: IoUring,
    pool: BufferPool,
    listener: OwnedFd,
    conns: slab::Slab<Conn>,
    to_send: Vec<usize>,
}

fn ud(op: u64, slot: usize) -> u64 {
    op << 32 | slot as u64
}

impl Echo {
    fn new(ring: IoUring, pool: BufferPool, listener: OwnedFd) -> Self {
        Self { ring, pool, listener, conns: slab::Slab::new(), to_send: Vec::new() }
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        // SAFETY: every buffer an entry points to (a connection's `sending`, the pool) stays
        // put until its completion: `sending` is not touched while its send is in flight,
        // and connections are released only with nothing in flight.
        unsafe { push_entry(&mut self.ring, &entry) }
    }

    fn arm_accept(&mut self) -> io::Result<()> {
        self.push(opcode::AcceptMulti::new(Fd(self.listener.as_raw_fd())).build().user_data(ud(ACCEPT, 0)))
    }

    fn arm_recv(&mut self, slot: usize) -> io::Result<()> {
        let fd = Fd(self.conns[slot].fd.as_raw_fd());
        self.push(opcode::RecvMulti::new(fd, BGID).build().user_data(ud(RECV, slot)))
    }

    fn send(&mut self, slot: usize) -> io::Result<()> {
        let c = &mut self.conns[slot];
        if c.send_in_flight || c.closing {
            return Ok(());
        }
        if c.sent == c.sending.len() {
            if c.out.is_empty() {
                return Ok(());
            }
            std::mem::swap(&mut c.out, &mut c.sending);
            c.out.clear();
            c.sent = 0;
        }
        c.send_in_flight = true;
        let rest = &c.sending[c.sent..];
        let entry = opcode::Send::new(Fd(c.fd.as_raw_fd()), rest.as_ptr(), rest.len() as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(SEND, slot));
        self.push(entry)
    }

    fn run(mut self) -> io::Result<()> {
        self.arm_accept()?;
        let mut cqes = Vec::with_capacity(4096);
        loop {
            for slot in std::mem::take(&mut self.to_send) {
                if self.conns.contains(slot) {
                    self.send(slot)?;
                }
            }
            self.pool.publish();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
            cqes.extend(self.ring.completion());
            for cqe in cqes.drain(..) {
                self.complete(&cqe)?;
            }
        }
    }

    fn complete(&mut self, cqe: &cqueue::Entry) -> io::Result<()> {
        let (op, slot) = (cqe.user_data() >> 32, (cqe.user_data() & 0xffff_ffff) as usize);
        let res = cqe.result();
        match op {
            ACCEPT => {
                if res >= 0 {
                    // SAFETY: the kernel just made this descriptor for us.
                    let fd = unsafe { OwnedFd::from_raw_fd(res) };
                    let _ = sys::set_nodelay(std::os::fd::AsFd::as_fd(&fd));
                    let slot = self.conns.insert(Conn {
                        fd,
                        out: Vec::new(),
                        sending: Vec::new(),
                        sent: 0,
                        send_in_flight: false,
                        recv_armed: true,
                        closing: false,
                    });
                    self.arm_recv(slot)?;
                }
                if !cqueue::more(cqe.flags()) {
                    self.arm_accept()?;
                }
            }
            RECV => {
                let bid = cqueue::buffer_select(cqe.flags());
                if res > 0 {
                    let bid = bid.expect("a recv with data names its buffer");
                    let data = &self.pool.buffer(bid)[..res as usize];
                    self.conns[slot].out.extend_from_slice(data);
                    self.pool.give_back(bid);
                    self.to_send.push(slot);
                }
                if !cqueue::more(cqe.flags()) {
                    self.conns[slot].recv_armed = false;
                    if (res > 0 || res == -libc::ENOBUFS) && !self.conns[slot].closing {
                        self.conns[slot].recv_armed = true;
                        self.arm_recv(slot)?;
                    } else {
                        self.end(slot);
                    }
                }
            }
            SEND => {
                let c = &mut self.conns[slot];
                c.send_in_flight = false;
                if res < 0 {
                    self.end(slot);
                } else {
                    c.sent += res as usize;
                    if c.closing {
                        self.end(slot);
                    } else {
                        self.to_send.push(slot);
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The connection ended: its socket is shut down so the operations in flight end, and it
    /// goes once none is left.
    fn end(&mut self, slot: usize) {
        let c = &mut self.conns[slot];
        if !c.closing {
            c.closing = true;
            sys::shutdown(std::os::fd::AsFd::as_fd(&c.fd), std::net::Shutdown::Both);
        }
        if !c.send_in_flight && !c.recv_armed {
            self.conns.remove(slot);
        }
    }
}

//! The system calls ringcall's backends and its command-line tools share, over
//! `OwnedFd`/`BorrowedFd` (socket2 and rustix, no raw descriptors): listening sockets with
//! `SO_REUSEPORT`, socket options, CPU affinity, the open-file limit, eventfd wake-ups, and
//! ([`uring`]) an io_uring ring with the fastest flags the kernel takes and its pool of
//! provided receive buffers. An internal crate: the `ringcall` library's public API does not
//! expose it.

pub mod uring;

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::net::{RecvFlags, SendFlags, SocketFlags};
use socket2::{Domain, Socket, Type};

/// Listen backlog for every listener: large, since bursts of reconnects are normal.
const BACKLOG: i32 = 4096;

/// A listening TCP socket on `addr`; with `reuse_port`, several may share the address and
/// the kernel spreads incoming connections over them.
pub fn listen(addr: SocketAddr, reuse_port: bool) -> io::Result<OwnedFd> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM.cloexec(), None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// The address a socket is bound to.
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    socket2::SockRef::from(&fd)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP socket"))
}

/// `n` listeners sharing one address with `SO_REUSEPORT`, one per core.
///
/// Before that, a plain bind (no `SO_REUSEPORT`) checks that nobody listens there yet:
/// without it a second server on the same port would silently join the group and take half
/// the connections. Port 0 is resolved once, so every listener shares the chosen port. With
/// `share`, that check is skipped on purpose: the listeners join the group of another
/// process of the same user on the port (a hand-over to a new binary), or start it.
pub fn shared_listeners(addr: SocketAddr, n: usize) -> io::Result<Vec<OwnedFd>> {
    if addr.port() == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "sharing a port needs a port number, not 0"));
    }
    (0..n).map(|_| listen(addr, true)).collect()
}

/// [`shared_listeners`]' counterpart for a port this process must have to itself.
///
/// A port still held by a listener that is being closed (a server killed a moment ago, whose
/// io_uring ring the kernel tears down asynchronously, holding the listener until then) is
/// waited for, up to [`BIND_RETRY`]; a port held longer is in use, and that is the error.
pub fn reuseport_listeners(addr: SocketAddr, n: usize) -> io::Result<(Vec<OwnedFd>, SocketAddr)> {
    let mut attempts = 0;
    loop {
        let chosen = {
            let probe = listen_when_free(addr)?;
            local_addr(probe.as_fd())?
        };
        match (0..n).map(|_| listen(chosen, true)).collect::<io::Result<Vec<_>>>() {
            Ok(listeners) => return Ok((listeners, chosen)),
            // Port 0: between the probe and the group, another socket (an outgoing
            // connection's ephemeral port, say) took the port the kernel had chosen.
            Err(e) if addr.port() == 0 && e.raw_os_error() == Some(libc::EADDRINUSE) && attempts < 8 => {
                attempts += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// How long start-up waits for a port that is in use to be released.
pub const BIND_RETRY: Duration = Duration::from_secs(2);

/// [`listen`] without `SO_REUSEPORT`, retrying while the address is in use, up to
/// [`BIND_RETRY`].
fn listen_when_free(addr: SocketAddr) -> io::Result<OwnedFd> {
    let started = Instant::now();
    let mut waited = false;
    loop {
        match listen(addr, false) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) && started.elapsed() < BIND_RETRY => {
                if !waited {
                    waited = true;
                    tracing::info!(
                        %addr,
                        "address in use; waiting up to {BIND_RETRY:?} for it to be released \
                         (a server that just exited may hold it while the kernel closes it)"
                    );
                }
                std::thread::sleep(BIND_RETRY_STEP);
            }
            Ok(fd) if waited => {
                tracing::info!(%addr, waited = ?started.elapsed(), "address released");
                return Ok(fd);
            }
            result => return result,
        }
    }
}

const BIND_RETRY_STEP: Duration = Duration::from_millis(10);

/// Accepts every connection already waiting in `listener`'s backlog, without blocking.
///
/// Used at shutdown: a connection the kernel has established may already carry requests, and
/// closing the listener would reset it. Those connections are served like the others.
pub fn accept_backlog(listener: BorrowedFd<'_>, mut on_connection: impl FnMut(OwnedFd)) {
    loop {
        match rustix::net::accept_with(listener, SocketFlags::CLOEXEC | SocketFlags::NONBLOCK) {
            Ok(fd) => on_connection(fd),
            Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => continue,
            Err(rustix::io::Errno::AGAIN) => return,
            Err(err) => {
                tracing::debug!("accepting the backlog at shutdown stopped: {err}");
                return;
            }
        }
    }
}

/// Puts a descriptor in non-blocking mode.
pub fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    socket2::SockRef::from(&fd).set_nonblocking(true)
}

/// Disables Nagle's algorithm: replies are small and latency matters more than packet count.
pub fn set_nodelay(fd: BorrowedFd<'_>) -> io::Result<()> {
    Ok(rustix::net::sockopt::set_tcp_nodelay(fd, true)?)
}

/// Shuts down one or both directions of a socket; failure ("not connected") is harmless here.
pub fn shutdown(fd: BorrowedFd<'_>, how: Shutdown) {
    let how = match how {
        Shutdown::Read => rustix::net::Shutdown::Read,
        Shutdown::Write => rustix::net::Shutdown::Write,
        Shutdown::Both => rustix::net::Shutdown::Both,
    };
    let _ = rustix::net::shutdown(fd, how);
}

/// Most bytes [`refuse`] discards from a refused peer before closing.
const REFUSE_DISCARD_LIMIT: usize = 64 << 10;

/// Refuses a just-accepted connection with the one reply line `line` (the 503), without
/// blocking: sends it, sends FIN after it, and discards what the peer already sent, so that
/// closing the socket (the caller's job) sends no reset. A reset could make the peer's
/// kernel drop the reply before it was read; a client that connects and writes at once would
/// then see "connection reset" instead of the 503. Bytes that arrive after the close still
/// get a reset, but by then the reply and the FIN are in the peer's receive queue.
pub fn refuse(fd: BorrowedFd<'_>, line: &[u8]) {
    // A fresh socket's send buffer takes one short line; DONTWAIT keeps this from blocking.
    let _ = rustix::net::send(fd, line, SendFlags::DONTWAIT | SendFlags::NOSIGNAL);
    shutdown(fd, Shutdown::Write);
    let mut scratch = [0u8; 4096];
    let mut discarded = 0;
    while discarded < REFUSE_DISCARD_LIMIT {
        match rustix::net::recv(fd, &mut scratch, RecvFlags::DONTWAIT) {
            Ok((n, _)) if n > 0 => discarded += n,
            _ => break,
        }
    }
}

/// Bytes received by the kernel on `fd` and not yet read (0 when unknown).
pub fn unread_bytes(fd: BorrowedFd<'_>) -> usize {
    rustix::io::ioctl_fionread(fd).map_or(0, |n| n as usize)
}

/// The CPUs this process may run on (honours `taskset`), in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    let cpus: Vec<usize> = match rustix::thread::sched_getaffinity(None) {
        Ok(set) => (0..rustix::thread::CpuSet::MAX_CPU).filter(|&c| set.is_set(c)).collect(),
        Err(_) => Vec::new(),
    };
    if cpus.is_empty() {
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
    } else {
        cpus
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    Ok(rustix::thread::sched_setaffinity(None, &set)?)
}

/// Raises the soft open-file limit to the hard limit (as redis does); returns the new limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current != limit.maximum {
        limit.current = limit.maximum;
        setrlimit(Resource::Nofile, limit)?;
    }
    Ok(limit.current.unwrap_or(u64::MAX))
}

/// Usable bytes of a receive buffer (each is followed by the parser's padding).
pub const RECV_BUF_SIZE: usize = 16 * 1024;

/// An eventfd used to wake a worker blocked in the kernel.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<Self> {
        use rustix::event::{EventfdFlags, eventfd};
        Ok(Self(eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?))
    }

    /// Makes the eventfd readable.
    pub fn notify(&self) {
        // A full counter (EAGAIN) is still readable, so the error is harmless.
        let _ = rustix::io::write(&self.0, &1u64.to_ne_bytes());
    }

    /// The descriptor, to poll or read from a ring.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

#[cfg(test)]
mod refuse_tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;

    #[test]
    fn a_refused_peer_that_already_sent_gets_the_line_then_a_clean_end_of_file() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        // On loopback the bytes are in the server socket's queue when write returns.
        client.write_all(b"{\"cmdid\":0}\n{\"cmdid\":0}\n").unwrap();
        let (server, _) = listener.accept().unwrap();
        super::refuse(server.as_fd(), b"{\"code\":503}\n");
        drop(server);
        let mut received = Vec::new();
        // A reset would make this fail with ECONNRESET instead of ending cleanly.
        client.read_to_end(&mut received).expect("end of file, not a reset");
        assert_eq!(received, b"{\"code\":503}\n");
    }
}

//! Thin, checked wrappers over the system calls every backend shares: listening sockets with
//! `SO_REUSEPORT`, socket options, CPU affinity, the open-file limit and eventfd wake-ups.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Listen backlog for every listener: large, since bursts of reconnects are normal.
const BACKLOG: i32 = 4096;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn set_opt(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: value outlives the call and its size is passed.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &value as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as _,
        )
    })
    .map(drop)
}

/// A listening TCP socket on `addr`; with `reuse_port`, several may share the address and
/// the kernel spreads incoming connections over them.
pub fn listen(addr: SocketAddr, reuse_port: bool) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = cvt(unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if reuse_port {
        set_opt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    }
    let (storage, len) = sockaddr(&addr);
    // SAFETY: storage holds a valid sockaddr of length len.
    cvt(unsafe { libc::bind(fd.as_raw_fd(), &storage as *const _ as *const libc::sockaddr, len) })?;
    // SAFETY: fd is a bound socket.
    cvt(unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) })?;
    Ok(fd)
}

/// The address a socket is bound to.
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: zeroed sockaddr_storage is valid; getsockname writes at most len bytes.
    let mut storage: libc::sockaddr_storage = unsafe { zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    cvt(unsafe { libc::getsockname(fd, &mut storage as *mut _ as *mut libc::sockaddr, &mut len) })?;
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { *(&storage as *const _ as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { *(&storage as *const _ as *const libc::sockaddr_in6) };
            let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Ok(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, "unknown address family")),
    }
}

/// `n` listeners sharing one address with `SO_REUSEPORT`, one per core.
///
/// Before that, a plain bind (no `SO_REUSEPORT`) checks that nobody listens there yet:
/// without it a second server on the same port would silently join the group and take half
/// the connections. Port 0 is resolved once, so every listener shares the chosen port.
pub fn reuseport_listeners(addr: SocketAddr, n: usize) -> io::Result<(Vec<OwnedFd>, SocketAddr)> {
    let mut addr = addr;
    {
        let probe = listen(addr, false)?;
        addr = local_addr(probe.as_raw_fd())?;
    }
    let listeners = (0..n).map(|_| listen(addr, true)).collect::<io::Result<Vec<_>>>()?;
    Ok((listeners, addr))
}

/// Accepts every connection already waiting in `listener`'s backlog, without blocking.
///
/// Used at shutdown: a connection the kernel has established may already carry requests, and
/// closing the listener would reset it. Those connections are served like the others.
pub fn accept_backlog(listener: RawFd, mut on_connection: impl FnMut(OwnedFd)) {
    loop {
        // SAFETY: accept4 with null address pointers; the fd is owned right away.
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR | libc::ECONNABORTED) => continue,
                Some(libc::EAGAIN) => return,
                _ => {
                    tracing::debug!("accepting the backlog at shutdown stopped: {err}");
                    return;
                }
            }
        }
        // SAFETY: fd was just returned by accept4.
        on_connection(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// Puts a descriptor in non-blocking mode.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain fcntl calls on a descriptor we own.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) }).map(drop)
}

/// Disables Nagle's algorithm: replies are small and latency matters more than packet count.
pub fn set_nodelay(fd: RawFd) -> io::Result<()> {
    set_opt(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1)
}

/// Shuts down one or both directions of a socket, ignoring "not connected".
pub fn shutdown(fd: RawFd, how: libc::c_int) {
    // SAFETY: plain shutdown(2) on a descriptor we own; failure is harmless here.
    unsafe { libc::shutdown(fd, how) };
}

/// Most bytes [`refuse`] discards from a refused peer before closing.
const REFUSE_DISCARD_LIMIT: usize = 64 << 10;

/// Refuses a just-accepted connection with the one reply line `line` (the 503), without
/// blocking: sends it, sends FIN after it, and discards what the peer already sent, so that
/// closing the socket (the caller's job) sends no reset. A reset could make the peer's
/// kernel drop the reply before it was read; a client that connects and writes at once would
/// then see "connection reset" instead of the 503. Bytes that arrive after the close still
/// get a reset, but by then the reply and the FIN are in the peer's receive queue.
pub fn refuse(fd: RawFd, line: &[u8]) {
    // SAFETY: send(2) of a valid slice on a descriptor the caller owns; a fresh socket's send
    // buffer takes one short line, and MSG_DONTWAIT keeps this from ever blocking.
    unsafe { libc::send(fd, line.as_ptr().cast(), line.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    shutdown(fd, libc::SHUT_WR);
    let mut scratch = [0u8; 4096];
    let mut discarded = 0;
    while discarded < REFUSE_DISCARD_LIMIT {
        // SAFETY: recv(2) into a stack buffer of the given length.
        let n = unsafe { libc::recv(fd, scratch.as_mut_ptr().cast(), scratch.len(), libc::MSG_DONTWAIT) };
        if n <= 0 {
            break;
        }
        discarded += n as usize;
    }
}

/// Bytes received by the kernel on `fd` and not yet read (0 when unknown).
pub fn unread_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) } < 0 { 0 } else { n.max(0) as usize }
}

/// The CPUs this process may run on (honours `taskset`), in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { zeroed() };
    let ok = unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) } == 0;
    let cpus: Vec<usize> = if ok {
        (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
    } else {
        cpus
    }
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays in bounds for cpu < CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    cvt(unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) }).map(drop)
}

/// Raises the soft open-file limit to the hard limit (as redis does); returns the new limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    // SAFETY: rlimit is plain data, filled by getrlimit.
    let mut lim: libc::rlimit = unsafe { zeroed() };
    cvt(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        cvt(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(lim.rlim_cur as u64)
}

/// An eventfd used to wake a worker blocked in the kernel.
#[derive(Debug)]
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new non-blocking, close-on-exec eventfd.
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain eventfd(2) call; the fd is owned right away.
        let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the eventfd readable.
    pub fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64; a full counter (EAGAIN) is still readable.
        unsafe { libc::write(self.0.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
    }

    /// The raw descriptor, to poll or read from a ring.
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod refuse_tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn a_refused_peer_that_already_sent_gets_the_line_then_a_clean_end_of_file() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        // On loopback the bytes are in the server socket's queue when write returns.
        client.write_all(b"{\"cmdid\":0}\n{\"cmdid\":0}\n").unwrap();
        let (server, _) = listener.accept().unwrap();
        super::refuse(server.as_raw_fd(), b"{\"code\":503}\n");
        drop(server);
        let mut received = Vec::new();
        // A reset would make this fail with ECONNRESET instead of ending cleanly.
        client.read_to_end(&mut received).expect("end of file, not a reset");
        assert_eq!(received, b"{\"code\":503}\n");
    }
}

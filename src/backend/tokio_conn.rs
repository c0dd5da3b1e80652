//! The connection task of the readiness-based (epoll) backends, `epoll` and `epoll-mt`:
//! send what the connection's state machine owes, ask the engine what it wants, then wait
//! for that — readable (if it reads), writable (if a send could not finish), deferred
//! answers, the engine's wake-up (a deadline, the drain notice) — and feed the event back.
//! Every rule is the core's ([`Connection`], [`ringcall_core::Engine`]); this loop only
//! makes the syscalls. The per-core tasks around it are [`super::tokio_core`]'s.
//!
//! The receive buffer belongs to the core, not the connection (read with `try_read` right
//! after readiness), so an idle connection holds no buffer, as with the uring pool.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};

use super::tokio_core::{Core, CoreAccess, Listen, Socket, Waker};
use super::{RECV_BUF_SIZE, deferred_ready, sys};
use crate::dispatch::Service;
use ringcall_core::{Connection, Handle, Step};

impl Socket for TcpStream {
    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        TcpStream::from_std(std::net::TcpStream::from(fd))
    }

    fn into_fd(self) -> io::Result<OwnedFd> {
        self.into_std().map(OwnedFd::from)
    }
}

impl Listen for TcpListener {
    type Stream = TcpStream;

    fn fd(&self) -> BorrowedFd<'_> {
        self.as_fd()
    }

    async fn accept(&self) -> io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(stream, _)| stream)
    }
}

/// Turns a listener made by [`sys::reuseport_listeners`] into a tokio listener.
pub(crate) fn tokio_listener(fd: OwnedFd) -> io::Result<TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// Serves one connection until its state machine closes it.
pub(crate) async fn serve_connection<S: Service, A: CoreAccess<S>>(
    stream: TcpStream,
    handle: Handle,
    waker: Waker,
    core: Core<S, A>,
) {
    let _ = stream.set_nodelay(true);
    // One clock read per wake-up: the events handled together share it.
    let mut now = Instant::now();
    let mut conn = core.access.with(|io| io.processor.open_connection(now));
    super::name_peer(stream.as_fd(), &mut conn);
    // Made once and re-armed after it fires: a `Notified` registers with its `Notify` when
    // first polled, and would register (and deregister) again on every turn if remade.
    let mut woken = std::pin::pin!(waker.notified());
    loop {
        flush(&stream, &mut conn, &core.access, now);
        // Reads go on until the kernel has nothing more, so its count is the whole truth.
        let interest = core.drive(handle, &mut conn, now, || Some(sys::unread_bytes(stream.as_fd())));
        match interest.step {
            Step::Wait => {}
            Step::ShutdownWrite => sys::shutdown(stream.as_fd(), Shutdown::Write),
            Step::Close(reason) => {
                tracing::debug!(?reason, "connection closed");
                break;
            }
        }
        let mailbox = conn.mailbox().cloned();
        let event = tokio::select! {
            () = deferred_ready(mailbox.as_deref()), if mailbox.is_some() => Wake::Deferred,
            ready = stream.readable(), if interest.read => Wake::Readable(ready.is_ok()),
            ready = stream.writable(), if interest.send => Wake::Writable(ready.is_ok()),
            () = woken.as_mut() => {
                woken.set(waker.notified());
                Wake::Engine
            }
        };
        now = Instant::now();
        match event {
            Wake::Readable(true) => receive(&stream, &mut conn, &core.access, now),
            Wake::Readable(false) | Wake::Writable(false) => conn.on_error(),
            Wake::Engine => core.woken(&mut conn, now),
            Wake::Deferred => core.access.with(|io| conn.on_deferred(now, io.processor.stats())),
            Wake::Writable(true) => {}
        }
    }
    core.release(handle, conn);
}

/// What ended a connection's wait (`false`: the readiness wait failed).
enum Wake {
    Readable(bool),
    Writable(bool),
    /// The engine has something for it: a deadline, the drain notice.
    Engine,
    /// Answers to deferred replies arrived.
    Deferred,
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

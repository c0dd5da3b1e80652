//! The `tokio-uring` backend: one tokio-uring runtime per core, each with its own
//! `SO_REUSEPORT` listener, reading and writing with ownership-passing io_uring operations.
//!
//! Each connection owns its receive buffer (the buffer is handed to the kernel for every
//! read; the rest of a long line is read into the line's own buffer instead, when the
//! connection lends it), there is no multishot or provided-buffer ring, and the ring is
//! waited on through tokio's epoll reactor: the reasons it trails the native `uring` backend.
//!
//! Every rule is the core's ([`Connection`], [`ringcall_core::Engine`]); the per-core
//! tasks (accepting, timers, shutdown) are [`super::tokio_core`]'s, shared with the epoll
//! backends. Each connection is one task that keeps a read in flight while the machine
//! wants to read and a write in flight while it owes bytes, both at once, and acts on
//! whichever completes. tokio-uring cannot cancel an operation by dropping its future, so a
//! pending read or a stuck write is ended by shutting the socket down.
//!
//! Draining asks whether the kernel holds unread requests (`FIONREAD`), which is the whole
//! truth only if the pending read has not taken bytes whose completion is still to be
//! handled. So a count of 0 is confirmed by a no-op submitted after it: the ring completes
//! in order, so once the no-op is back, a read that took bytes before the count has
//! completed too, and is handled first. Then the connection sends FIN and waits for the
//! peer's close, as on every backend.

use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use tokio_uring::buf::BoundedBuf;
use tokio_uring::net::{TcpListener, TcpStream};

use super::tokio_core::{Core, CoreAccess, CoreIo, Listen, LocalCore, Socket, Waker, serve_worker};
use super::worker::{WorkerError, WorkerSetup};
use super::{RECV_BUF_SIZE, sys, uring};
use crate::dispatch::Service;
use ringcall_core::{Connection, Handle, LineBuf, PADDING, Step};

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

/// The descriptor of a tokio-uring stream (which implements only `AsRawFd`).
fn fd_of(stream: &impl AsRawFd) -> BorrowedFd<'_> {
    // SAFETY: the stream owns the descriptor and outlives the borrow.
    unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) }
}

impl Socket for TcpStream {
    fn fd(&self) -> BorrowedFd<'_> {
        fd_of(self)
    }

    fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        Ok(TcpStream::from_std(std::net::TcpStream::from(fd)))
    }

    fn into_fd(self) -> io::Result<OwnedFd> {
        // A copy goes out; this runtime's stream (and its descriptor) is dropped.
        fd_of(&self).try_clone_to_owned()
    }
}

impl Listen for TcpListener {
    type Stream = TcpStream;

    fn fd(&self) -> BorrowedFd<'_> {
        fd_of(self)
    }

    async fn accept(&self) -> io::Result<TcpStream> {
        TcpListener::accept(self).await.map(|(stream, _)| stream)
    }
}

async fn serve<S: Service>(setup: WorkerSetup, service: Arc<S>) {
    let exec = setup.exec.clone();
    let access = setup.access.clone();
    serve_worker::<S, _, _>(
        setup,
        |fd| Ok(TcpListener::from_std(std::net::TcpListener::from(fd))),
        |core, stats, limits, engine| {
            LocalCore::new(CoreIo::new(core, service, exec, access, stats, limits), engine)
        },
        |stream, handle, waker, core| {
            tokio_uring::spawn(serve_connection(stream, handle, waker, core));
        },
    )
    .await;
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
            let (read, line) = stream.read(LineRead(line)).await;
            (read, ReadBuf::Line(line.0))
        }
    }
}

/// A lent line buffer as tokio-uring's owned-buffer read takes it.
struct LineRead(LineBuf);

// SAFETY: the bytes are those the read may fill (already received, then the room), on the
// heap: the pointer stays valid while the `LineBuf` lives, wherever it moves.
unsafe impl tokio_uring::buf::IoBuf for LineRead {
    fn stable_ptr(&self) -> *const u8 {
        self.0.read_start()
    }

    fn bytes_init(&self) -> usize {
        self.0.received()
    }

    fn bytes_total(&self) -> usize {
        self.0.received() + self.0.room()
    }
}

// SAFETY: as above; `set_init` is told how many bytes from the start are now written.
unsafe impl tokio_uring::buf::IoBufMut for LineRead {
    fn stable_mut_ptr(&mut self) -> *mut u8 {
        self.0.read_ptr()
    }

    unsafe fn set_init(&mut self, pos: usize) {
        if let Some(more) = pos.checked_sub(self.0.received()).filter(|&n| n > 0) {
            // SAFETY: the read wrote up to `pos`, within `bytes_total`.
            unsafe { self.0.filled(more) };
        }
    }
}

async fn write_op(stream: &TcpStream, buf: Vec<u8>, offset: usize) -> (std::io::Result<usize>, Vec<u8>) {
    let (written, slice) = stream.write(buf.slice(offset..)).submit().await;
    (written, slice.into_inner())
}

/// Serves one connection until its state machine closes it: a read in flight while it wants
/// to read, a write in flight while it owes bytes, both at once, and the events fed back.
async fn serve_connection<S: Service, A: CoreAccess<S>>(
    stream: TcpStream,
    handle: Handle,
    waker: Waker,
    core: Core<S, A>,
) {
    let _ = stream.set_nodelay(true);
    let mut conn = core.access.with(|io| io.processor.open_connection(Instant::now()));
    super::name_peer(fd_of(&stream), &mut conn);
    serve_io(&stream, handle, &waker, &core, &mut conn).await;
    // Ends whatever is still in flight; dropping those operations is safe (tokio-uring keeps
    // their buffers until the kernel is done with them).
    sys::shutdown(fd_of(&stream), Shutdown::Both);
    core.release(handle, conn);
}

async fn serve_io<S: Service, A: CoreAccess<S>>(
    stream: &TcpStream,
    handle: Handle,
    waker: &Waker,
    core: &Core<S, A>,
    conn: &mut Connection,
) {
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
    let mut wake = std::pin::pin!(waker.notified());
    // Draining: a no-op confirming that the kernel held nothing unread (see the module docs).
    let mut settling = std::pin::pin!(None);
    let mut unread = Unread::Unknown;
    loop {
        let now = Instant::now();
        let mut asked = false;
        let interest = core.drive(handle, conn, now, || {
            asked = true;
            Some(match unread {
                Unread::Confirmed => 0,
                Unread::Unknown | Unread::Confirming => 1,
            })
        });
        // If the count is not 0, the pending read brings those bytes and the machine asks
        // again.
        if asked && unread == Unread::Unknown && settling.is_none() && sys::unread_bytes(fd_of(stream)) == 0 {
            unread = Unread::Confirming;
            settling.set(Some(tokio_uring::no_op()));
        }
        match interest.step {
            Step::Wait => {}
            Step::ShutdownWrite => sys::shutdown(fd_of(stream), Shutdown::Write),
            Step::Close(reason) => {
                tracing::debug!(?reason, "connection closed");
                // The operations in flight end once the socket is shut down; awaiting them
                // frees their buffers before the connection counts as closed.
                sys::shutdown(fd_of(stream), Shutdown::Both);
                if let Some(read) = reading.as_mut().as_pin_mut() {
                    drop(read.await);
                }
                if let Some(write) = writing.as_mut().as_pin_mut() {
                    drop(write.await);
                }
                if let Some(no_op) = settling.as_mut().as_pin_mut() {
                    drop(no_op.await);
                }
                return;
            }
        }
        if writing.is_none()
            && let Some((buf, offset)) = conn.lend_send()
        {
            writing.set(Some(write_op(stream, buf, offset)));
        }
        if reading.is_none() && recv_buf.is_some() && interest.read {
            if writing.is_none() || read_deferred_until.is_some_and(|at| at <= now) {
                read_deferred_until = None;
                // The rest of a long line goes straight into its own buffer.
                let buf = conn.lend_line().map(ReadBuf::Line).or_else(|| recv_buf.take().map(ReadBuf::Own));
                reading.set(buf.map(|buf| read_op(stream, buf)));
            } else if read_deferred_until.is_none() {
                read_deferred_until = Some(now + READ_DEFER);
                defer.as_mut().reset((now + READ_DEFER).into());
            }
        }
        let mailbox = conn.mailbox().cloned();
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
                core.access.with(|io| match buf {
                    ReadBuf::Own(mut buf) => {
                        if let Ok(n @ 1..) = read {
                            // The read set the length to what it received; the parser wants
                            // PADDING bytes past it.
                            buf.resize(n + PADDING, 0);
                            conn.on_recv(&mut io.processor, &mut buf, n, now);
                        }
                        buf.clear();
                        recv_buf = Some(buf);
                    }
                    ReadBuf::Line(line) => conn.on_line_recv(&mut io.processor, line, now),
                });
                match read {
                    Ok(0) => conn.on_peer_closed(now),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!("recv failed: {e}");
                        conn.on_error();
                    }
                }
            }
            (written, buf) = async { writing.as_mut().as_pin_mut().expect("a write in flight").await },
                if writing.is_some() =>
            {
                writing.set(None);
                core.access.with(|io| {
                    let stats = io.processor.stats();
                    match written {
                        Ok(n) => conn.on_sent_lent(buf, n, Instant::now(), stats),
                        Err(e) => {
                            tracing::debug!("send failed: {e}");
                            conn.on_sent_lent(buf, 0, Instant::now(), stats);
                            conn.on_error();
                        }
                    }
                });
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
                core.access.with(|io| conn.on_deferred(Instant::now(), io.processor.stats()));
            }
            () = wake.as_mut() => {
                wake.set(waker.notified());
                core.woken(conn, Instant::now());
            }
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

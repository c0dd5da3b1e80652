//! How a `uring` core is woken from other threads: the server's stop signal, answers to
//! deferred replies completed on any thread, and connections other cores hand over. Each is
//! an eventfd the ring keeps a read on.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};

use io_uring::opcode;
use io_uring::squeue;
use io_uring::types::Fd;

use super::op::{Op, user_data};
use crate::backend::sys::EventFd;
use crate::backend::worker::StopSignal;
use ringcall_core::Handle;

/// How answers to deferred replies reach this core: the waker of each connection's mailbox
/// names the connection here and makes the eventfd the ring reads readable (once per batch:
/// while the list is not empty, the core has a wake-up coming). Connections handed over by
/// other cores ring the same eventfd.
pub(super) struct DeferredWake {
    ready: Mutex<Vec<Handle>>,
    eventfd: EventFd,
}

impl DeferredWake {
    pub(super) fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self { ready: Mutex::new(Vec::new()), eventfd: EventFd::new()? }))
    }

    /// Wakes the core without naming a connection (a hand-over).
    pub(super) fn notify(&self) {
        self.eventfd.notify();
    }

    /// Swaps the connections named since the last call into `into` (emptied first).
    pub(super) fn take(&self, into: &mut Vec<Handle>) {
        into.clear();
        std::mem::swap(&mut *self.ready.lock().unwrap_or_else(PoisonError::into_inner), into);
    }

    /// The mailbox waker of connection `handle`.
    pub(super) fn waker(self: &Arc<Self>, handle: Handle) -> std::task::Waker {
        std::task::Waker::from(Arc::new(ConnWaker { handle, core: self.clone() }))
    }
}

/// The waker of one connection's mailbox on a `uring` core.
struct ConnWaker {
    handle: Handle,
    core: Arc<DeferredWake>,
}

impl std::task::Wake for ConnWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let first = {
            let mut ready = self.core.ready.lock().unwrap_or_else(PoisonError::into_inner);
            ready.push(self.handle);
            ready.len() == 1
        };
        if first {
            self.core.eventfd.notify();
        }
    }
}

/// The eventfd reads a core keeps armed, with the 8-byte buffers the kernel reads into.
pub(super) struct Wakeups {
    /// The server's stop signal.
    pub(super) stop: Arc<StopSignal>,
    pub(super) deferred: Arc<DeferredWake>,
    deferred_buf: Box<u64>,
    stop_buf: Box<u64>,
}

impl Wakeups {
    pub(super) fn new(stop: Arc<StopSignal>) -> io::Result<Self> {
        Ok(Self { stop, deferred: DeferredWake::new()?, deferred_buf: Box::new(0), stop_buf: Box::new(0) })
    }

    /// The read of core `core`'s eventfd of the stop signal.
    pub(super) fn stop_read(&mut self, core: usize) -> squeue::Entry {
        let fd = self.stop.waker(core).as_fd().as_raw_fd();
        opcode::Read::new(Fd(fd), (&mut *self.stop_buf as *mut u64).cast(), 8).build().user_data(user_data(
            Op::Wake,
            0,
            0,
        ))
    }

    /// The read of the deferred replies' eventfd.
    pub(super) fn deferred_read(&mut self) -> squeue::Entry {
        let fd = self.deferred.eventfd.as_fd().as_raw_fd();
        opcode::Read::new(Fd(fd), (&mut *self.deferred_buf as *mut u64).cast(), 8)
            .build()
            .user_data(user_data(Op::Deferred, 0, 0))
    }
}

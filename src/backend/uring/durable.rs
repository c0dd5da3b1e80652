//! Durable appends on the ring: each file with appends waiting gets one write of its batch
//! linked to one `fdatasync`; the file is kept alive here until both complete (the kernel
//! reads the batch's bytes).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use io_uring::types::Fd;
use io_uring::{IoUring, opcode, squeue};
use slab::Slab;

use super::op::{Op, user_data};
use crate::durable::{Shared, WriteAndSync};
use ringcall_sys::uring::push_entry;

/// The files with a durable write and sync in flight on one ring.
#[derive(Default)]
pub(super) struct DurableRing {
    in_flight: Slab<Arc<Shared>>,
    /// Reused list of files with appends to start.
    kicks: Vec<Arc<Shared>>,
}

impl DurableRing {
    /// No durable I/O is in flight.
    pub(super) fn is_idle(&self) -> bool {
        self.in_flight.is_empty()
    }

    /// Starts the appends handlers made since the last turn (`take` fills the list).
    pub(super) fn start(
        &mut self,
        ring: &mut IoUring,
        take: impl FnOnce(&mut Vec<Arc<Shared>>),
    ) -> io::Result<()> {
        let mut kicks = std::mem::take(&mut self.kicks);
        take(&mut kicks);
        for shared in kicks.drain(..) {
            shared.queued.store(false, Ordering::Relaxed);
            let io = crate::durable::lock(&shared.commit).poll();
            if let Some(io) = io {
                let slot = self.in_flight.insert(shared);
                self.submit(ring, slot, io)?;
            }
        }
        self.kicks = kicks;
        Ok(())
    }

    fn submit(&mut self, ring: &mut IoUring, slot: usize, io: WriteAndSync) -> io::Result<()> {
        let fd = Fd(self.in_flight[slot].file.as_raw_fd());
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
            let sq = ring.submission();
            sq.capacity() - sq.len()
        };
        if room < 2 {
            ring.submit()?;
        }
        // SAFETY: the batch's bytes belong to the file's commit state, kept alive in
        // `in_flight` until both operations complete.
        unsafe {
            push_entry(ring, &write)?;
            push_entry(ring, &sync)
        }
    }

    /// The write or the sync of file `slot` completed with `res`.
    pub(super) fn complete(&mut self, ring: &mut IoUring, slot: usize, op: Op, res: i32) -> io::Result<()> {
        let Some(shared) = self.in_flight.get(slot) else { return Ok(()) };
        let (next, busy) = {
            let mut commit = crate::durable::lock(&shared.commit);
            let next = if op == Op::DurableWrite { commit.on_write(res) } else { commit.on_sync(res) };
            // Rare (a full or failing disk): done here, blocking, rather than as more ring ops.
            crate::durable::truncate_after_failure(shared, &mut commit);
            (next, commit.busy())
        };
        match next {
            Some(io) => self.submit(ring, slot, io),
            None => {
                if !busy {
                    self.in_flight.remove(slot);
                }
                Ok(())
            }
        }
    }
}

//! The per-core pool of receive buffers, shared with the kernel as a provided-buffer ring.

use std::io;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;
use io_uring::types::BufRingEntry;

/// Usable bytes per pooled receive buffer (each is followed by the pool's slack).
const BUF_SIZE: usize = crate::RECV_BUF_SIZE;
/// Receive buffers per core (a power of two, at most 32768). Few, because the kernel takes
/// them in turn: every byte received is written to the next buffer and read back from it at
/// once, so the pool's size is the memory the receive path cycles through; fewer risk
/// running dry (`ENOBUFS`) under many connections. The measurements behind the number are in
/// `docs/benchmarks.md` ("After the receive pool change").
const BUF_COUNT: u16 = 64;
/// The provided-buffer group id.
pub const BGID: u16 = 0;

/// The pool: `BUF_COUNT` buffers of `BUF_SIZE` usable bytes, each followed by readable slack
/// the kernel never writes (the parser's padding), registered as buffer group [`BGID`].
pub struct BufferPool {
    ring: *mut BufRingEntry,
    ring_bytes: usize,
    storage: Box<[u8]>,
    stride: usize,
    tail: u16,
}

impl BufferPool {
    /// Registers the pool with `ring` as buffer group [`BGID`], every buffer handed to the
    /// kernel, each followed by `slack` bytes.
    ///
    /// # Errors
    /// The mapping or the registration failed (old kernel, locked-memory limit).
    pub fn new(ring: &IoUring, slack: usize) -> io::Result<Self> {
        let stride = BUF_SIZE + slack;
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
            storage: vec![0u8; usize::from(BUF_COUNT) * stride].into_boxed_slice(),
            stride,
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

    /// The received bytes of buffer `bid`, followed by its slack.
    pub fn buffer(&mut self, bid: u16) -> &mut [u8] {
        let start = usize::from(bid) * self.stride;
        &mut self.storage[start..start + self.stride]
    }

    /// Queues buffer `bid` for the kernel again; visible after [`publish`](Self::publish).
    pub fn give_back(&mut self, bid: u16) {
        let addr = self.storage.as_ptr() as u64 + (usize::from(bid) * self.stride) as u64;
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

//! What a `uring` operation is, encoded in its `user_data`: the kind of operation in the top
//! byte, then the connection's generation (24 bits) and its place (32 bits), so a late
//! completion is never taken for another connection's; and the one SQE field io-uring 0.7
//! has no setter for.

use io_uring::squeue;

use ringcall_core::Handle;

/// Operation kinds, in the top byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Op {
    Accept = 1,
    Recv = 2,
    Send = 3,
    /// The eventfd of the server's stop signal.
    Wake = 4,
    Cancel = 6,
    /// The eventfd of deferred replies answered off the core (and of connections handed over).
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
            6 => Op::Cancel,
            7 => Op::Deferred,
            8 => Op::DurableWrite,
            9 => Op::DurableSync,
            _ => return None,
        })
    }
}

/// The `user_data` of operation `op` on the connection (or durable file) at `slot`.
pub(super) fn user_data(op: Op, slot: usize, generation: u32) -> u64 {
    (op as u64) << 56 | u64::from(generation & 0x00ff_ffff) << 32 | slot as u64 & 0xffff_ffff
}

/// The `user_data` of operation `op` on connection `handle`.
pub(super) fn conn_data(op: Op, handle: Handle) -> u64 {
    user_data(op, handle.index(), handle.generation())
}

/// The operation, generation and slot a completion's `user_data` names.
pub(super) fn split_user_data(ud: u64) -> (Option<Op>, u32, usize) {
    (Op::from_u8((ud >> 56) as u8), ((ud >> 32) & 0x00ff_ffff) as u32, ud as u32 as usize)
}

/// Byte offset of `optlen` in `struct io_uring_sqe` (the union with `splice_fd_in` and
/// `file_index`), which the kernel reads as a multishot recv's total byte limit.
const SQE_OPTLEN: usize = 44;
const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);

/// A multishot recv that ends (a completion without `IORING_CQE_F_MORE`) once `limit` bytes
/// have arrived. io-uring 0.7 has no setter for this field, so it is written into the SQE.
pub(super) fn with_total_limit(entry: squeue::Entry, limit: u32) -> squeue::Entry {
    // SAFETY: `Entry` is `#[repr(C)]` around the 64-byte `io_uring_sqe` (size asserted
    // above), every bit pattern of which is a valid value; only the `optlen` bytes change.
    let mut sqe: [u8; 64] = unsafe { std::mem::transmute(entry) };
    sqe[SQE_OPTLEN..SQE_OPTLEN + 4].copy_from_slice(&limit.to_ne_bytes());
    unsafe { std::mem::transmute(sqe) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips() {
        let ud = user_data(Op::Send, 123_456, 0x00ab_cdef);
        assert_eq!(split_user_data(ud), (Some(Op::Send), 0x00ab_cdef, 123_456));
        let handle = Handle::from_parts(7, 0x00ff_ffff);
        assert_eq!(split_user_data(conn_data(Op::Recv, handle)), (Some(Op::Recv), 0x00ff_ffff, 7));
    }
}

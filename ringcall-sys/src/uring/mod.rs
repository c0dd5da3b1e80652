//! io_uring set-up shared by the `uring` backend and the command-line tools' io_uring loops
//! (the load generator, the echo baseline): the ring ([`ring`]) and the provided-buffer pool
//! ([`pool`]).

pub mod pool;
pub mod ring;

pub use pool::{BGID, BufferPool};
pub use ring::{CQ_ENTRIES, build_ring, diagnose, probe, push_entry};

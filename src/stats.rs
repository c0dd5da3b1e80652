//! Per-core counters, merged on read.
//!
//! Each core owns one [`CoreStats`] and is its only writer, so an increment is a plain
//! load + store of a relaxed atomic (no locked instruction, no shared cache line: each core's
//! block is padded to its own cache lines). Readers on other cores (the stats command, the
//! periodic log line) see values that are at most a few instructions stale.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// The reply codes counted separately; anything else is counted as `other`.
pub const COUNTED_CODES: [u16; 6] = [0, 400, 404, 413, 500, 503];

/// One core's counters. Written only by the owning core.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CoreStats {
    connections_closed: AtomicU64,
    connections_total: AtomicU64,
    requests: AtomicU64,
    replies: [AtomicU64; COUNTED_CODES.len() + 1],
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    rejected_connections: AtomicU64,
    backpressure_pauses: AtomicU64,
    idle_timeouts: AtomicU64,
    line_timeouts: AtomicU64,
}

/// Single-writer increment: the owning core is the only writer, so no locked
/// read-modify-write is needed.
#[inline]
fn bump(counter: &AtomicU64, by: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(by), Relaxed);
}

impl CoreStats {
    /// A connection was accepted.
    #[inline]
    pub fn connection_opened(&self) {
        bump(&self.connections_total, 1);
    }

    /// A connection was closed.
    #[inline]
    pub fn connection_closed(&self) {
        bump(&self.connections_closed, 1);
    }

    /// A request line was framed (valid or not).
    #[inline]
    pub fn request(&self) {
        bump(&self.requests, 1);
    }

    /// A reply with `code` was encoded.
    #[inline]
    pub fn reply(&self, code: u16) {
        let slot = COUNTED_CODES.iter().position(|&c| c == code).unwrap_or(COUNTED_CODES.len());
        bump(&self.replies[slot], 1);
    }

    /// Bytes received from peers.
    #[inline]
    pub fn bytes_in(&self, n: usize) {
        bump(&self.bytes_in, n as u64);
    }

    /// Bytes sent to peers.
    #[inline]
    pub fn bytes_out(&self, n: usize) {
        bump(&self.bytes_out, n as u64);
    }

    /// A connection was refused with a 503 because the core was full.
    #[inline]
    pub fn connection_rejected(&self) {
        bump(&self.rejected_connections, 1);
        self.reply(503);
    }

    /// Reading from a peer paused because it does not read its replies.
    #[inline]
    pub fn backpressure_pause(&self) {
        bump(&self.backpressure_pauses, 1);
    }

    /// A connection was closed for sending nothing for `--idle-timeout`.
    #[inline]
    pub fn idle_timeout(&self) {
        bump(&self.idle_timeouts, 1);
    }

    /// A connection was closed for not finishing a line within `--line-timeout`.
    #[inline]
    pub fn line_timeout(&self) {
        bump(&self.line_timeouts, 1);
    }

    /// A copy of the counters.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut replies = [0; COUNTED_CODES.len() + 1];
        for (dst, src) in replies.iter_mut().zip(&self.replies) {
            *dst = src.load(Relaxed);
        }
        let connections_total = self.connections_total.load(Relaxed);
        let connections_closed = self.connections_closed.load(Relaxed);
        StatsSnapshot {
            // Under epoll-mt a connection may close on another worker than it opened on, so
            // one core's difference can be negative; the total is exact.
            connections_open: connections_total.saturating_sub(connections_closed),
            connections_closed,
            connections_total,
            requests: self.requests.load(Relaxed),
            replies,
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            rejected_connections: self.rejected_connections.load(Relaxed),
            backpressure_pauses: self.backpressure_pauses.load(Relaxed),
            idle_timeouts: self.idle_timeouts.load(Relaxed),
            line_timeouts: self.line_timeouts.load(Relaxed),
        }
    }
}

/// A point-in-time copy of one core's counters, or their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Connections open now.
    pub connections_open: u64,
    /// Connections closed since start.
    pub connections_closed: u64,
    /// Connections accepted since start.
    pub connections_total: u64,
    /// Request lines framed since start.
    pub requests: u64,
    /// Replies by code, in the order of [`COUNTED_CODES`], then all other codes.
    pub replies: [u64; COUNTED_CODES.len() + 1],
    /// Bytes received.
    pub bytes_in: u64,
    /// Bytes sent.
    pub bytes_out: u64,
    /// Connections refused with a 503 because their core was full.
    pub rejected_connections: u64,
    /// Times reading from a peer paused because it did not read its replies.
    pub backpressure_pauses: u64,
    /// Connections closed by `--idle-timeout`.
    pub idle_timeouts: u64,
    /// Connections closed by `--line-timeout`.
    pub line_timeouts: u64,
}

impl StatsSnapshot {
    /// Replies sent with `code` (codes outside [`COUNTED_CODES`] are summed under any of them).
    pub fn replies_with(&self, code: u16) -> u64 {
        let slot = COUNTED_CODES.iter().position(|&c| c == code).unwrap_or(COUNTED_CODES.len());
        self.replies[slot]
    }

    fn add(&mut self, other: &StatsSnapshot) {
        self.connections_total += other.connections_total;
        self.connections_closed += other.connections_closed;
        self.connections_open = self.connections_total.saturating_sub(self.connections_closed);
        self.requests += other.requests;
        for (a, b) in self.replies.iter_mut().zip(&other.replies) {
            *a += b;
        }
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.rejected_connections += other.rejected_connections;
        self.backpressure_pauses += other.backpressure_pauses;
        self.idle_timeouts += other.idle_timeouts;
        self.line_timeouts += other.line_timeouts;
    }
}

/// Every core's counters, shared read-only between the cores.
#[derive(Debug)]
pub struct StatsRegistry {
    cores: Box<[CoreStats]>,
}

impl StatsRegistry {
    /// Counters for `cores` cores.
    pub fn new(cores: usize) -> Arc<Self> {
        Arc::new(Self { cores: (0..cores).map(|_| CoreStats::default()).collect() })
    }

    /// The counters of core `index`.
    pub fn core(&self, index: usize) -> &CoreStats {
        &self.cores[index]
    }

    /// How many cores are counted.
    pub fn cores(&self) -> usize {
        self.cores.len()
    }

    /// One snapshot per core.
    pub fn per_core(&self) -> impl Iterator<Item = StatsSnapshot> + '_ {
        self.cores.iter().map(CoreStats::snapshot)
    }

    /// The sum over all cores.
    pub fn total(&self) -> StatsSnapshot {
        let mut total = StatsSnapshot::default();
        for core in self.per_core() {
            total.add(&core);
        }
        total
    }
}

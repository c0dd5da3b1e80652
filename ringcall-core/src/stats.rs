//! Per-core counters, merged on read.
//!
//! Each core owns one [`CoreStats`] and is its only writer, so an increment is a plain
//! load + store of a relaxed atomic (no locked instruction, no shared cache line: each core's
//! block is padded to its own cache lines). Readers on other cores (the stats command, the
//! periodic log line) see values that are at most a few instructions stale.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// The reply codes counted separately; anything else is counted as `other`.
pub const COUNTED_CODES: [u16; 9] = [0, 400, 401, 403, 404, 413, 500, 503, 504];

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
    hello_timeouts: AtomicU64,
    connections_retired: AtomicU64,
    deferred_shed: AtomicU64,
    line_timeouts: AtomicU64,
    deferred: AtomicU64,
    deferred_settled: AtomicU64,
    deferred_abandoned: AtomicU64,
    deadline_expired: AtomicU64,
    late_replies: AtomicU64,
    /// Per command: replies by code and handler time (see [`CommandStats`]).
    commands: Commands,
    /// Whether commands are counted and timed: on once metrics are served.
    time_handlers: std::sync::atomic::AtomicBool,
    /// Time in the server per batch of replies (see [`CoreStats::batch_sent`]).
    batch: Histogram,
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

    /// Connections open on this core now (read from any thread).
    pub fn open_connections(&self) -> u64 {
        let closed = self.connections_closed.load(Relaxed);
        self.connections_total.load(Relaxed).saturating_sub(closed)
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

    /// A connection was closed for not finishing its TLS handshake or hello in time.
    pub fn hello_timeout(&self) {
        bump(&self.hello_timeouts, 1);
    }

    /// A connection reached its maximum age and began draining.
    pub fn connection_retired(&self) {
        bump(&self.connections_retired, 1);
    }

    /// A connection was closed for not finishing a line within `--line-timeout`.
    #[inline]
    pub fn line_timeout(&self) {
        bump(&self.line_timeouts, 1);
    }

    /// A handler deferred its reply.
    #[inline]
    pub fn deferred(&self) {
        bump(&self.deferred, 1);
    }

    /// Deferred replies pending on this core now (read by the core that writes them).
    #[inline]
    pub fn deferred_pending(&self) -> u64 {
        self.deferred.load(Relaxed).saturating_sub(self.deferred_settled.load(Relaxed))
    }

    /// A request was answered 503 because too many deferred replies were pending on the core.
    #[inline]
    pub fn deferred_shed(&self) {
        bump(&self.deferred_shed, 1);
    }

    /// A deferred reply was answered, expired or abandoned: no longer pending.
    #[inline]
    pub fn deferred_settled(&self) {
        bump(&self.deferred_settled, 1);
    }

    /// A deferred reply's connection closed before it was answered; its answer is dropped.
    #[inline]
    pub fn deferred_abandoned(&self) {
        bump(&self.deferred_abandoned, 1);
    }

    /// A request's `timeout_ms` passed before its handler answered: a 504 was sent.
    #[inline]
    pub fn deadline_expired(&self) {
        bump(&self.deadline_expired, 1);
    }

    /// A deferred answer came after its 504 and was dropped.
    #[inline]
    pub fn late_reply(&self) {
        bump(&self.late_replies, 1);
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
            hello_timeouts: self.hello_timeouts.load(Relaxed),
            connections_retired: self.connections_retired.load(Relaxed),
            deferred_shed: self.deferred_shed.load(Relaxed),
            line_timeouts: self.line_timeouts.load(Relaxed),
            deferred: self.deferred.load(Relaxed),
            deferred_pending: self.deferred.load(Relaxed).saturating_sub(self.deferred_settled.load(Relaxed)),
            deferred_settled: self.deferred_settled.load(Relaxed),
            deferred_abandoned: self.deferred_abandoned.load(Relaxed),
            deadline_expired: self.deadline_expired.load(Relaxed),
            late_replies: self.late_replies.load(Relaxed),
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
    /// Connections closed for not finishing their TLS handshake or token hello within
    /// `--hello-timeout`.
    pub hello_timeouts: u64,
    /// Connections drained and closed for reaching `--max-connection-age`.
    pub connections_retired: u64,
    /// Requests answered 503 because `max_deferred_per_core` deferred replies were pending.
    pub deferred_shed: u64,
    /// Connections closed by `--line-timeout`.
    pub line_timeouts: u64,
    /// Replies deferred by their handlers since start.
    pub deferred: u64,
    /// Deferred replies not answered yet (held in their connections' output).
    pub deferred_pending: u64,
    /// Deferred replies answered, expired or abandoned. (Under epoll-mt a reply may be
    /// deferred on one worker and settled on another, so pending is exact only in the total.)
    pub deferred_settled: u64,
    /// Deferred replies whose connection closed first (their answers were dropped).
    pub deferred_abandoned: u64,
    /// Requests answered 504 because their `timeout_ms` passed first.
    pub deadline_expired: u64,
    /// Deferred answers dropped because a 504 was sent first.
    pub late_replies: u64,
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
        self.hello_timeouts += other.hello_timeouts;
        self.connections_retired += other.connections_retired;
        self.deferred_shed += other.deferred_shed;
        self.line_timeouts += other.line_timeouts;
        self.deferred += other.deferred;
        self.deferred_settled += other.deferred_settled;
        self.deferred_pending = self.deferred.saturating_sub(self.deferred_settled);
        self.deferred_abandoned += other.deferred_abandoned;
        self.deadline_expired += other.deadline_expired;
        self.late_replies += other.late_replies;
    }
}

/// Upper bounds of the handler-time histogram's buckets, in microseconds: 1 µs to about 1 s,
/// doubling; one more bucket counts everything above.
pub const LATENCY_BUCKETS_US: [u64; 21] = {
    let mut bounds = [0; 21];
    let mut i = 0;
    while i < bounds.len() {
        bounds[i] = 1 << i;
        i += 1;
    }
    bounds
};

/// A latency histogram over [`LATENCY_BUCKETS_US`], written by one core.
#[derive(Debug, Default)]
struct Histogram {
    nanos: AtomicU64,
    /// Not cumulative: bucket `i` counts times in (bound `i-1`, bound `i`].
    buckets: [AtomicU64; LATENCY_BUCKETS_US.len() + 1],
}

impl Histogram {
    #[inline]
    fn observe(&self, time: Duration) {
        let nanos = u64::try_from(time.as_nanos()).unwrap_or(u64::MAX);
        bump(&self.nanos, nanos);
        // ceil(log2(µs)): the first bound at or above the time.
        let micros = nanos.div_ceil(1000).max(1);
        let bucket = (u64::BITS - (micros - 1).leading_zeros()) as usize;
        bump(&self.buckets[bucket.min(LATENCY_BUCKETS_US.len())], 1);
    }

    fn seconds(&self) -> f64 {
        self.nanos.load(Relaxed) as f64 / 1e9
    }

    fn buckets(&self) -> [u64; LATENCY_BUCKETS_US.len() + 1] {
        self.buckets.each_ref().map(|c| c.load(Relaxed))
    }
}

/// One command's counters on one core: its replies by code and how long its handler ran.
/// Written only by the owning core, like the rest of [`CoreStats`].
#[derive(Debug, Default)]
pub struct CommandStats {
    replies: [AtomicU64; COUNTED_CODES.len() + 1],
    handler: Histogram,
    in_server: Histogram,
}

impl CommandStats {
    /// A request for this command was answered with `code`, after its handler ran for
    /// `handler` if it was timed.
    #[inline]
    pub fn record(&self, code: u16, handler: Option<Duration>) {
        let slot = COUNTED_CODES.iter().position(|&c| c == code).unwrap_or(COUNTED_CODES.len());
        bump(&self.replies[slot], 1);
        if let Some(handler) = handler {
            self.handler.observe(handler);
        }
    }

    /// A reply to this command was sent whole, `time` after its request was read.
    #[inline]
    pub fn sent(&self, time: Duration) {
        self.in_server.observe(time);
    }

    fn snapshot(&self, cmdid: u32) -> CommandSnapshot {
        CommandSnapshot {
            cmdid,
            replies: self.replies.each_ref().map(|c| c.load(Relaxed)),
            handler_seconds: self.handler.seconds(),
            handler_buckets: self.handler.buckets(),
            in_server_seconds: self.in_server.seconds(),
            in_server_buckets: self.in_server.buckets(),
        }
    }
}

/// A command's counters at one moment, on one core or summed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CommandSnapshot {
    /// The command.
    pub cmdid: u32,
    /// Replies by code, in the order of [`COUNTED_CODES`], then all other codes.
    pub replies: [u64; COUNTED_CODES.len() + 1],
    /// Total handler time.
    pub handler_seconds: f64,
    /// Handler times per bucket of [`LATENCY_BUCKETS_US`] (not cumulative), then above.
    pub handler_buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    /// Total time in the server of its replies: from reading the request to the end of the
    /// send that carried the reply.
    pub in_server_seconds: f64,
    /// Times in the server per bucket of [`LATENCY_BUCKETS_US`] (not cumulative), then above.
    pub in_server_buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
}

impl CommandSnapshot {
    /// Requests answered (every code).
    pub fn requests(&self) -> u64 {
        self.replies.iter().sum()
    }

    /// Requests whose handler was timed (those answered while metrics were served).
    pub fn timed(&self) -> u64 {
        self.handler_buckets.iter().sum()
    }

    fn add(&mut self, other: &CommandSnapshot) {
        for (a, b) in self.replies.iter_mut().zip(&other.replies) {
            *a += b;
        }
        self.handler_seconds += other.handler_seconds;
        for (a, b) in self.handler_buckets.iter_mut().zip(&other.handler_buckets) {
            *a += b;
        }
        self.in_server_seconds += other.in_server_seconds;
        for (a, b) in self.in_server_buckets.iter_mut().zip(&other.in_server_buckets) {
            *a += b;
        }
    }
}

/// The commands a core counts one by one: those of the routing table and the built-ins,
/// sorted by cmdid (found by binary search), fixed when the server starts.
#[derive(Debug, Default)]
struct Commands {
    cmdids: Arc<[u32]>,
    stats: Box<[CommandStats]>,
}

impl CoreStats {
    /// The counters of `cmdid`, if it is in the routing table (unknown cmdids are counted
    /// only in the core's totals).
    #[inline]
    pub fn command(&self, cmdid: u32) -> Option<&CommandStats> {
        let index = self.commands.cmdids.binary_search(&cmdid).ok()?;
        Some(&self.commands.stats[index])
    }

    /// Whether to count and time commands (see [`StatsRegistry::time_handlers`]).
    #[inline]
    pub fn times_handlers(&self) -> bool {
        self.time_handlers.load(Relaxed)
    }

    /// A batch of replies was sent whole, `waited` after the oldest request it answers
    /// arrived: the time those requests spent in the server (reading, handling, waiting
    /// behind earlier replies, sending). Counted while metrics are served.
    #[inline]
    pub fn batch_sent(&self, waited: Duration) {
        if self.times_handlers() {
            self.batch.observe(waited);
        }
    }

    /// Time in the server per batch of replies: the total, and per bucket of
    /// [`LATENCY_BUCKETS_US`] (not cumulative), then above.
    pub fn batch_times(&self) -> (f64, [u64; LATENCY_BUCKETS_US.len() + 1]) {
        (self.batch.seconds(), self.batch.buckets())
    }
}

/// Every core's counters, shared read-only between the cores.
#[derive(Debug)]
pub struct StatsRegistry {
    cores: Box<[CoreStats]>,
}

impl StatsRegistry {
    /// Counters for `cores` cores, none per command.
    pub fn new(cores: usize) -> Arc<Self> {
        Self::with_commands(cores, &[])
    }

    /// Counters for `cores` cores, and per command for each of `cmdids`.
    pub fn with_commands(cores: usize, cmdids: &[u32]) -> Arc<Self> {
        let mut sorted = cmdids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let cmdids: Arc<[u32]> = sorted.into();
        let core = || CoreStats {
            commands: Commands {
                cmdids: cmdids.clone(),
                stats: cmdids.iter().map(|_| CommandStats::default()).collect(),
            },
            ..CoreStats::default()
        };
        Arc::new(Self { cores: (0..cores).map(|_| core()).collect() })
    }

    /// Counts and times every command from now on, for the `command_replies` counters and
    /// the `command_handler_seconds` histograms: a lookup and two clock reads per request,
    /// which cost up to a tenth of the throughput of the cheapest requests (an 80-byte echo
    /// at 16 connections x 16 in flight), so it is off until metrics are served.
    pub fn time_handlers(&self) {
        for core in self.cores.iter() {
            core.time_handlers.store(true, Relaxed);
        }
    }

    /// Per command, the counters of every core summed, in cmdid order.
    pub fn commands(&self) -> Vec<CommandSnapshot> {
        let Some(first) = self.cores.first() else { return Vec::new() };
        let mut total: Vec<CommandSnapshot> =
            first.commands.cmdids.iter().zip(&first.commands.stats).map(|(&c, s)| s.snapshot(c)).collect();
        for core in &self.cores[1..] {
            for (sum, (&cmdid, stats)) in
                total.iter_mut().zip(core.commands.cmdids.iter().zip(&core.commands.stats))
            {
                sum.add(&stats.snapshot(cmdid));
            }
        }
        total
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_times_land_in_the_first_bucket_at_or_above_them() {
        let stats = StatsRegistry::with_commands(1, &[2000, 7]);
        let command = stats.core(0).command(2000).unwrap();
        assert!(stats.core(0).command(3000).is_none(), "not in the table");
        for (nanos, bucket) in [(1, 0), (1_000, 0), (1_001, 1), (2_000, 1), (3_000, 2), (1_048_576_000, 20)] {
            let before = command.handler.buckets[bucket].load(Relaxed);
            command.record(0, Some(Duration::from_nanos(nanos)));
            assert_eq!(command.handler.buckets[bucket].load(Relaxed), before + 1, "{nanos} ns");
        }
        command.record(500, Some(Duration::from_secs(5)));
        assert_eq!(command.handler.buckets[LATENCY_BUCKETS_US.len()].load(Relaxed), 1, "above every bound");
        // Not timed (metrics not served): counted as a reply, not in the histogram.
        command.record(404, None);
        let snapshot = stats.commands().into_iter().find(|c| c.cmdid == 2000).unwrap();
        assert_eq!(snapshot.requests(), 8);
        assert_eq!(snapshot.timed(), 7);
        assert_eq!(snapshot.replies[COUNTED_CODES.iter().position(|&c| c == 500).unwrap()], 1);
        assert!(
            (snapshot.handler_seconds - (5.0 + 1.0485760e0 + 7_002e-9)).abs() < 1e-6,
            "{}",
            snapshot.handler_seconds
        );
    }

    #[test]
    fn command_counts_sum_over_the_cores() {
        let stats = StatsRegistry::with_commands(2, &[5000]);
        assert!(!stats.core(1).times_handlers());
        stats.time_handlers();
        assert!(stats.core(0).times_handlers() && stats.core(1).times_handlers());
        stats.core(0).command(5000).unwrap().record(0, None);
        stats.core(1).command(5000).unwrap().record(0, None);
        assert_eq!(stats.commands()[0].requests(), 2);
    }
}

//! `ringcall top`: a running server's counters as rates, read from its stats command (cmdid
//! 1) every interval and shown as the difference from the reading before.

use std::fmt::Write as _;
use std::time::Instant;

use serde::Deserialize;

/// One core's counters, or their total, as the stats command returns them.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Counters {
    pub connections_open: u64,
    pub connections_total: u64,
    pub requests: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub rejected_connections: u64,
    pub backpressure_pauses: u64,
    pub idle_timeouts: u64,
    pub line_timeouts: u64,
    /// Absent from servers older than the counter.
    #[serde(default)]
    pub hello_timeouts: u64,
    /// Requests answered 503 because the core had too many deferred replies pending
    /// (absent from servers older than the counter).
    #[serde(default)]
    pub deferred_shed: u64,
    /// Replies by code (`"0"`, `"400"`, …, `"other"`).
    pub replies: std::collections::BTreeMap<String, u64>,
}

/// The stats command's reply data.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Stats {
    pub cores: Vec<Counters>,
    pub total: Counters,
}

/// A reading and when it was taken.
#[derive(Debug, Clone)]
pub struct Reading {
    pub at: Instant,
    pub stats: Stats,
}

fn per_second(now: u64, before: u64, seconds: f64) -> f64 {
    now.saturating_sub(before) as f64 / seconds
}

/// Bytes as B, KB, MB or GB (powers of 1000).
fn bytes(rate: f64) -> String {
    let units = [("GB", 1e9), ("MB", 1e6), ("KB", 1e3)];
    match units.iter().find(|(_, size)| rate >= *size) {
        Some((unit, size)) => format!("{:.1} {unit}", rate / size),
        None => format!("{rate:.0} B"),
    }
}

/// The screen for the change from `before` to `now`.
pub fn render(addr: &str, before: &Reading, now: &Reading) -> String {
    let seconds = now.at.saturating_duration_since(before.at).as_secs_f64().max(1e-9);
    let (b, n) = (&before.stats.total, &now.stats.total);
    let rate = |now: u64, before: u64| per_second(now, before, seconds);
    let mut s = String::new();
    let _ = writeln!(s, "ringcall top {addr}: {seconds:.1} s between readings");
    let errors: Vec<String> = n
        .replies
        .iter()
        .filter(|(code, _)| code.as_str() != "0")
        .map(|(code, &count)| (code, rate(count, b.replies.get(code).copied().unwrap_or(0))))
        .filter(|(_, r)| *r > 0.0)
        .map(|(code, r)| format!("{code}: {r:.0}/s"))
        .collect();
    let _ = writeln!(
        s,
        "  requests     {:>10.0}/s   errors: {}",
        rate(n.requests, b.requests),
        if errors.is_empty() { "none".to_owned() } else { errors.join(", ") }
    );
    let _ = writeln!(
        s,
        "  bytes        {}/s in, {}/s out",
        bytes(rate(n.bytes_in, b.bytes_in)),
        bytes(rate(n.bytes_out, b.bytes_out))
    );
    let _ = writeln!(
        s,
        "  connections  {} open, {:.0}/s accepted, {:.0}/s refused (503)",
        n.connections_open,
        rate(n.connections_total, b.connections_total),
        rate(n.rejected_connections, b.rejected_connections)
    );
    let _ = writeln!(
        s,
        "  per second   {:.0} backpressure pauses, {:.0} idle timeouts, {:.0} line timeouts, \
         {:.0} hello timeouts, {:.0} shed (503, deferred replies at the core's limit)",
        rate(n.backpressure_pauses, b.backpressure_pauses),
        rate(n.idle_timeouts, b.idle_timeouts),
        rate(n.line_timeouts, b.line_timeouts),
        rate(n.hello_timeouts, b.hello_timeouts),
        rate(n.deferred_shed, b.deferred_shed)
    );
    let _ = writeln!(s, "  core   requests/s   open");
    for (core, n) in now.stats.cores.iter().enumerate() {
        let b = before.stats.cores.get(core).cloned().unwrap_or_default();
        let _ =
            writeln!(s, "  {core:>4}   {:>10.0}   {:>4}", rate(n.requests, b.requests), n.connections_open);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn reading(at: Instant, requests: u64, errors: u64, open: u64, bytes_in: u64) -> Reading {
        let counters = Counters {
            connections_open: open,
            connections_total: open,
            requests,
            bytes_in,
            hello_timeouts: errors / 10,
            deferred_shed: errors,
            replies: [("0".to_owned(), requests - errors), ("404".to_owned(), errors)].into(),
            ..Counters::default()
        };
        Reading { at, stats: Stats { cores: vec![counters.clone()], total: counters } }
    }

    #[test]
    fn rates_are_the_differences_over_the_time_between_readings() {
        let t0 = Instant::now();
        let before = reading(t0, 1_000, 10, 3, 50_000);
        let now = reading(t0 + Duration::from_secs(2), 21_000, 30, 5, 2_550_000);
        let screen = render("127.0.0.1:8889", &before, &now);
        assert!(screen.contains("ringcall top 127.0.0.1:8889: 2.0 s between readings"), "{screen}");
        assert!(screen.contains("  requests          10000/s   errors: 404: 10/s\n"), "{screen}");
        assert!(screen.contains("  bytes        1.2 MB/s in, 0 B/s out\n"), "{screen}");
        assert!(screen.contains("  connections  5 open, 1/s accepted, 0/s refused (503)\n"), "{screen}");
        assert!(screen.contains("     0        10000      5\n"), "{screen}");
        assert!(screen.contains(", 1 hello timeouts, 10 shed (503, "), "{screen}");
    }
}

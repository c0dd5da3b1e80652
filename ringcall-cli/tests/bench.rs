//! The load generator against live servers (every backend): its counts match the server's,
//! and its reports render in every format.

#[macro_use]
mod common;

use std::time::Duration;

use common::start;
use ringcall::Backend;
use ringcall_cli::bench::{BenchConfig, StopAfter};

fn bench_totals_match_the_server_stats(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let config = BenchConfig {
        addr: server.local_addr(),
        connections: 4,
        pipeline: 8,
        stop: StopAfter::Count(3000),
        warmup: Duration::ZERO,
        rate: None,
        requests: vec![BenchConfig::echo_request(), b"{\"cmdid\":0}\n".to_vec()],
        threads: 2,
        cpus: Vec::new(),
        progress: false,
    };
    let report = ringcall_cli::bench::run(&config).unwrap();
    assert_eq!(report.requests, 3000);
    assert_eq!(report.replies_with(0), 3000);
    assert_eq!(report.errors, 0);
    assert_eq!(report.invalid_replies, 0);
    let stats = server.stats().total();
    assert_eq!(stats.requests, 3000);
    assert_eq!(stats.replies_with(0), 3000);
    assert_eq!(stats.bytes_in, report.bytes_sent);
    // The server counts sent bytes when the kernel reports the send done, which may trail
    // the client reading them: wait for the count to settle, then compare exactly.
    for _ in 0..500 {
        if server.stats().total().bytes_out == report.bytes_received {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(server.stats().total().bytes_out, report.bytes_received);
    let json = report.render(ringcall_cli::bench::OutputFormat::Json);
    let bytes = json.into_bytes();
    let parsed = serde_json::from_slice::<serde_json::Value>(&bytes).unwrap();
    assert_eq!(parsed["requests"], 3000);
    assert_eq!(parsed["codes"]["0"], 3000);
    assert_eq!(parsed["coordinated_omission_corrected"], false);
}

fn open_loop_bench_reports_corrected_latency(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let config = BenchConfig {
        addr: server.local_addr(),
        connections: 2,
        pipeline: 1,
        stop: StopAfter::Count(200),
        warmup: Duration::ZERO,
        rate: Some(2000.0),
        requests: vec![b"{\"cmdid\":0}\n".to_vec()],
        threads: 1,
        cpus: Vec::new(),
        progress: false,
    };
    let report = ringcall_cli::bench::run(&config).unwrap();
    assert_eq!(report.replies_with(0), 200);
    assert!(report.render(ringcall_cli::bench::OutputFormat::Text).contains("coordinated omission"));
    let csv = report.render(ringcall_cli::bench::OutputFormat::Csv);
    assert_eq!(csv.lines().count(), 2);
    assert!(csv.lines().nth(1).unwrap().contains(",200,"));
}

every_backend!(bench_totals_match_the_server_stats, open_loop_bench_reports_corrected_latency);

//! The load generator against live servers (every backend): its counts match the server's,
//! and its reports render in every format.

#[macro_use]
mod common;

use std::time::Duration;

use common::{Client, spawn_server, start, total_stat};
use ringcall::Backend;
use ringcall_cli::bench::{BenchConfig, StopAfter};

/// Connections spread over several servers, and each server's share is what it counted.
fn bench_over_several_servers_reports_each(backend: Backend) {
    let (Some(a), Some(b)) = (start(backend), start(backend)) else { return };
    let config = BenchConfig {
        addrs: vec![a.local_addr(), b.local_addr()],
        connections: 4,
        pipeline: 4,
        stop: StopAfter::Count(2000),
        warmup: Duration::ZERO,
        rate: None,
        requests: vec![BenchConfig::echo_request()],
        threads: 1,
        cpus: Vec::new(),
        progress: false,
    };
    let report = ringcall_cli::bench::run(&config).unwrap();
    assert_eq!(report.requests, 2000);
    assert_eq!(report.endpoints.len(), 2);
    for (endpoint, server) in report.endpoints.iter().zip([&a, &b]) {
        assert_eq!(endpoint.addr, server.local_addr().to_string());
        assert!(endpoint.requests > 0, "{endpoint:?}");
        assert_eq!(endpoint.requests, server.stats().total().requests);
    }
    assert!(
        report
            .render(ringcall_cli::bench::OutputFormat::Text)
            .contains(&format!("endpoint    {}:", a.local_addr()))
    );
}

fn bench_totals_match_the_server_stats(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let config = BenchConfig {
        addrs: vec![server.local_addr()],
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
    assert_eq!(report.unanswered.total(), 0);
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
        addrs: vec![server.local_addr()],
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

/// `ringcall bench` while the server shuts down (SIGTERM): the server answers what it read and
/// closes; the requests the bench had sent after that are counted as unanswered, by reason,
/// in the report, and the bench exits 1 saying so instead of 0. It ends when its connections
/// do, not when its 60 s are up.
fn bench_across_a_server_shutdown_counts_what_went_unanswered(backend: Backend) {
    let (mut server, addr) = spawn_server(backend, &[], None);
    let bench = std::process::Command::new(env!("CARGO_BIN_EXE_ringcall"))
        .args(["bench", "--addr", &addr.to_string(), "-c", "4", "-P", "16", "-d", "60", "--warmup", "0"])
        .args(["--cmdid", "0", "--output", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stats = Client::connect(addr);
    while total_stat(&mut stats, "requests") < 5000 {
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(stats);
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(server.id() as i32, libc::SIGTERM) }, 0);
    let out = bench.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "bench must fail when requests went unanswered");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("64 requests were sent and never answered"), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // Closed loop: every connection has its 16 requests in flight when the server's FIN comes.
    assert_eq!(report["unanswered"]["closed"], 64, "{report}");
    assert_eq!(report["unanswered"]["reset"], 0, "{report}");
    assert_eq!(report["unanswered"]["timed_out"], 0, "{report}");
    assert_eq!(report["errors"], 4, "{report}");
    assert!(report["duration_secs"].as_f64().unwrap() < 60.0, "{report}");
    assert!(server.wait().unwrap().success());
}

/// `--payload-bytes`: every request line is exactly that long, and is echoed back whole.
fn bench_with_sized_requests_sends_exactly_those_bytes(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringcall"))
        .args(["bench", "--addr", &server.local_addr().to_string(), "-c", "2", "-P", "4", "-n", "400"])
        .args(["--warmup", "0", "--payload-bytes", "16k", "--output", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["requests"], 400, "{report}");
    assert_eq!(report["codes"]["0"], 400, "{report}");
    assert_eq!(report["bytes_sent"], 400 * 16384, "{report}");
    assert_eq!(server.stats().total().bytes_in, 400 * 16384);
    assert!(report["bytes_received"].as_u64().unwrap() > 400 * 16_300, "{report}");
}

every_backend!(
    bench_across_a_server_shutdown_counts_what_went_unanswered,
    bench_with_sized_requests_sends_exactly_those_bytes,
    bench_totals_match_the_server_stats,
    open_loop_bench_reports_corrected_latency,
    bench_over_several_servers_reports_each
);

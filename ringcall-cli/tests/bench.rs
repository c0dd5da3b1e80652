//! The load generator against live servers (every backend): its counts match the server's,
//! and its reports render in every format.

#[macro_use]
mod common;

use std::time::Duration;

use common::{Client, spawn_server, start, total_stat};
use ringcall::Backend;
use ringcall_cli::bench::{BenchConfig, StopAfter};

/// A closed-loop run of `count` echo requests with no warm-up, on one load thread.
fn counted(addrs: Vec<std::net::SocketAddr>, connections: usize, pipeline: usize, count: u64) -> BenchConfig {
    BenchConfig {
        addrs,
        connections,
        pipeline,
        stop: StopAfter::Count(count),
        warmup: Duration::ZERO,
        rate: None,
        requests: vec![BenchConfig::echo_request()],
        threads: 1,
        cpus: Vec::new(),
        progress: false,
        connect: Default::default(),
    }
}

/// Connections spread over several servers, and each server's share is what it counted.
fn bench_over_several_servers_reports_each(backend: Backend) {
    let (Some(a), Some(b)) = (start(backend), start(backend)) else { return };
    let config = counted(vec![a.local_addr(), b.local_addr()], 4, 4, 2000);
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
        requests: vec![BenchConfig::echo_request(), b"{\"cmdid\":0}\n".to_vec()],
        threads: 2,
        ..counted(vec![server.local_addr()], 4, 8, 3000)
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
        rate: Some(2000.0),
        requests: vec![b"{\"cmdid\":0}\n".to_vec()],
        ..counted(vec![server.local_addr()], 2, 1, 200)
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

/// `--shape`: every realistic request shape is sent as it is and answered; the echo of each
/// holds the same params, escapes, numbers and non-ASCII text read back exactly.
fn bench_with_shaped_requests_gets_them_echoed(backend: Backend) {
    use ringcall::bench_support::Shape;
    let Some(server) = start(backend) else { return };
    let addr = server.local_addr().to_string();
    let mut client = Client::connect(server.local_addr());
    for shape in Shape::ALL {
        let line = shape.request();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringcall"))
            .args(["bench", "--addr", &addr, "-c", "2", "-P", "4", "-n", "200", "--warmup", "0"])
            .args(["--shape", shape.name(), "--output", "json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(report["codes"]["0"], 200, "{shape:?}: {report}");
        assert_eq!(report["bytes_sent"].as_u64(), Some(200 * line.len() as u64), "{shape:?}");
        let request: serde_json::Value = serde_json::from_slice(&line).unwrap();
        let reply: serde_json::Value =
            serde_json::from_str(&client.call(std::str::from_utf8(&line).unwrap())).unwrap();
        assert_eq!(reply["data"], request["params"], "{shape:?}");
    }
}

/// TLS through the CLI (`--tls-ca`), and `--reconnect-after`: every connection carries exactly
/// that many requests before it is replaced, each replacement a full handshake.
fn bench_speaks_tls_and_reconnects(backend: Backend) {
    let dir =
        std::env::temp_dir().join(format!("ringcall-bench-tls-{}-{}", backend.name(), std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
    let tls = ringcall::TlsConfig::from_pem_files(&cert, &key).unwrap();
    let Some(server) = common::start_with(backend, |b| b.tls(tls)) else { return };
    let bench = |extra: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ringcall"))
            .args(["bench", "--addr", &server.local_addr().to_string(), "--warmup", "0", "--output", "json"])
            .args(["--tls-ca", cert.to_str().unwrap(), "--tls-name", "localhost"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let report = bench(&["-c", "4", "-P", "8", "-n", "2000"]);
    assert_eq!(
        (report["requests"].as_u64(), report["codes"]["0"].as_u64()),
        (Some(2000), Some(2000)),
        "{report}"
    );
    assert_eq!((report["tls"].as_bool(), report["connections_opened"].as_u64()), (Some(true), Some(0)));
    let before = server.stats().total().connections_total;
    let report = bench(&["-c", "4", "-P", "1", "-n", "200", "--reconnect-after", "5"]);
    assert_eq!(
        (report["requests"].as_u64(), report["codes"]["0"].as_u64()),
        (Some(200), Some(200)),
        "{report}"
    );
    // A connection carries at most 5 requests, so the 200 took at least 40: the 4 opened
    // before measuring and at least 36 more. A connection is replaced only after carrying
    // all 5, so there are at most 40 replacements (the last ones may find nothing left).
    let opened = report["connections_opened"].as_u64().unwrap();
    assert!((36..=40).contains(&opened), "{report}");
    // The server saw them all: the 4 first, the replacements, and the reachability check.
    assert_eq!(server.stats().total().connections_total - before, 4 + opened + 1);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A server that asks for a token: the load presents it on every connection, and the
/// hellos are not counted as measured requests.
fn bench_presents_the_token(backend: Backend) {
    let token = ringcall::HelloToken::new("bench-token-0123456789abcdef").unwrap();
    let Some(server) = common::start_with(backend, |b| b.token(token.clone())) else { return };
    let config = BenchConfig {
        connect: ringcall_cli::bench::ConnectOptions { token: Some(token), ..Default::default() },
        ..counted(vec![server.local_addr()], 4, 4, 1000)
    };
    let report = ringcall_cli::bench::run(&config).unwrap();
    assert_eq!((report.requests, report.replies_with(0), report.errors), (1000, 1000, 0));
    assert_eq!(server.stats().total().requests, 1000 + 4);
}

every_backend!(
    bench_speaks_tls_and_reconnects,
    bench_presents_the_token,
    bench_across_a_server_shutdown_counts_what_went_unanswered,
    bench_with_sized_requests_sends_exactly_those_bytes,
    bench_with_shaped_requests_gets_them_echoed,
    bench_totals_match_the_server_stats,
    open_loop_bench_reports_corrected_latency,
    bench_over_several_servers_reports_each,
    bench_counts_no_warm_up_bytes_and_reports_transfer_rates
);

/// The warm-up's traffic is not counted, as its requests are not: bytes per request are the
/// request line's length whatever the warm-up (the requests in flight as measuring starts and
/// ends are a handful among thousands), and the transfer rates are the counts over the time.
fn bench_counts_no_warm_up_bytes_and_reports_transfer_rates(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let line = BenchConfig::echo_request();
    let config = BenchConfig {
        stop: StopAfter::Duration(Duration::from_millis(500)),
        warmup: Duration::from_millis(500),
        ..counted(vec![server.local_addr()], 2, 4, 0)
    };
    let report = ringcall_cli::bench::run(&config).unwrap();
    assert!(report.requests > 100, "{} requests", report.requests);
    let per_request = report.bytes_sent as f64 / report.requests as f64;
    let expected = line.len() as f64;
    assert!(
        (0.9 * expected..1.1 * expected).contains(&per_request),
        "{per_request} bytes sent per request, the request line is {expected}"
    );
    let secs = report.duration_secs;
    assert!(
        (report.bytes_sent_per_sec - report.bytes_sent as f64 / secs).abs()
            < 1e-6 * report.bytes_sent_per_sec
    );
    assert!(
        (report.bytes_received_per_sec - report.bytes_received as f64 / secs).abs()
            < 1e-6 * report.bytes_received_per_sec.max(1.0)
    );
    assert!(report.render(ringcall_cli::bench::OutputFormat::Text).contains("transfer    "));
}

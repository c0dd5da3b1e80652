//! The command-line tools end to end: `ringcall call` and a short `ringcall compare`.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use ringcall::{Backend, NoRoutes};

const RINGCALL: &str = env!("CARGO_BIN_EXE_ringcall");

#[test]
fn call_prints_replies_and_reads_ndjson_from_stdin() {
    let server = ringcall::Server::builder().addr("127.0.0.1:0").threads(1).pin_threads(false);
    let server = server.backend(Backend::Epoll).start(NoRoutes).unwrap();
    let addr = server.local_addr().to_string();
    let out = Command::new(RINGCALL).args(["call", "--addr", &addr, "0"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "\"pong\"\n");
    let out = Command::new(RINGCALL).args(["call", "--addr", &addr, "12345", "{}"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("server replied 404: unknown cmdid 12345"));
    let mut child = Command::new(RINGCALL)
        .args(["call", "--addr", &addr, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"{\"cmdid\":0,\"id\":1}\n\nnot json\n{\"cmdid\":0,\"id\":2}\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0], "{\"code\":0,\"id\":1,\"data\":\"pong\"}");
    assert!(lines[1].starts_with("{\"code\":400,"));
    assert_eq!(lines[2], "{\"code\":0,\"id\":2,\"data\":\"pong\"}");
}

#[test]
fn compare_runs_every_backend_and_writes_json_and_svg() {
    let dir = std::env::temp_dir().join(format!("ringcall-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("compare.json"), dir.join("compare.svg"));
    let cpus = ringcall_sys::allowed_cpus();
    let (server_cpu, client_cpu) = (cpus[0].to_string(), cpus[cpus.len() - 1].to_string());
    let out = Command::new(RINGCALL)
        .args([
            "compare",
            "--rounds",
            "1",
            "-d",
            "0.3",
            "--warmup",
            "0",
            "--workloads",
            "1x1,4x4+tls,2x1+tls/r2",
        ])
        .args(["--server-cpus", &server_cpu, "--client-cpus", &client_cpu])
        .args(["--json", json.to_str().unwrap(), "--svg", svg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    for backend in Backend::ALL {
        assert_eq!(table.matches(&format!("| {} |", backend.name())).count(), 3, "{table}");
    }
    assert!(table.contains("| 1.00x (1) |"), "epoll is its own baseline, over the one round: {table}");
    let mut bytes = std::fs::read(&json).unwrap();
    let parsed = ringcall::simd_json::to_owned_value(&mut bytes).unwrap();
    use ringcall::simd_json::prelude::*;
    assert_eq!(parsed.get("summary").and_then(|s| s.as_array()).map(Vec::len), Some(12));
    // The TLS workloads ran, each backend's second server serving them.
    for workload in ["| 4x4+tls |", "| 2x1+tls/r2 |"] {
        assert_eq!(table.matches(workload).count(), 4, "{table}");
    }
    let measurements = parsed.get("measurements").and_then(|s| s.as_array()).unwrap();
    assert!(measurements.iter().all(|m| m.get("requests_per_sec").and_then(|v| v.cast_f64()).unwrap() > 0.0));
    for m in measurements {
        let steal = m.get("steal_percent").and_then(|v| v.cast_f64()).expect("steal recorded per run");
        assert!((0.0..=100.0).contains(&steal), "{steal}");
        assert!(m.get("attempts").and_then(|v| v.as_u64()).expect("attempts recorded") >= 1);
        let busy = m.get("server_busy_percent").and_then(|v| v.cast_f64()).expect("busy recorded per run");
        assert!(busy > 0.0, "{busy}");
    }
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// `scripts/scaling_sweep.py` runs `compare` at each worker count and prints requests/s, CPU
/// per request and the linearity against one worker. This host has too few CPUs for more
/// than one worker beside its load: the sweep's correctness is what is tested, with the one
/// step that fits (and a realistic shape), not its numbers.
#[test]
fn the_scaling_sweep_runs_compare_per_worker_count_and_prints_linearity() {
    if Command::new("python3").arg("--version").output().is_err() {
        common::skip("RINGCALL_REQUIRE_PYTHON", "python3 is not installed");
        return;
    }
    let cpus = ringcall_sys::allowed_cpus();
    let (server_cpu, client_cpu) = (cpus[0].to_string(), cpus[cpus.len() - 1].to_string());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/scaling_sweep.py");
    let out = Command::new("python3")
        .args([script, "--binary", RINGCALL, "--rounds", "1", "--duration", "0.3"])
        .args(["--backends", "uring,epoll", "--workloads", "2x2,2x2@log1k"])
        .args(["--server-cpus", &server_cpu, "--client-cpus", &client_cpu])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert_eq!(rows.len(), 4, "{table}");
    for row in rows {
        let fields: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(fields[2], "1", "{row}");
        assert_eq!(fields.last(), Some(&"1.00"), "one worker is its own reference: {row}");
    }
    let overlapping = Command::new("python3")
        .args([script, "--binary", RINGCALL, "--server-cpus", "0", "--client-cpus", "0"])
        .output()
        .unwrap();
    assert!(!overlapping.status.success());
    assert!(String::from_utf8_lossy(&overlapping.stderr).contains("overlap"));
}

/// `serve` tells where it listens: the address alone on stdout and, with `--addr-file`, in
/// that file; the address answers.
#[test]
fn serve_prints_its_address_and_writes_the_addr_file() {
    use std::io::{BufRead, BufReader, Read};
    let dir = std::env::temp_dir().join(format!("ringcall-addr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("addr");
    let mut child = Command::new(RINGCALL)
        .args(["serve", "--addr", "127.0.0.1:0", "--threads", "1", "--no-pin", "--backend", "epoll"])
        .arg("--addr-file")
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr: std::net::SocketAddr = line.trim_end().parse().expect("an address alone on the first line");
    assert_ne!(addr.port(), 0, "the real port, not the 0 asked for");
    // The file is written before stdout, so it is whole by now.
    assert_eq!(std::fs::read_to_string(&file).unwrap(), line);
    let out = Command::new(RINGCALL).args(["call", "--addr", &addr.to_string(), "0"]).output().unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "\"pong\"\n");
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert!(child.wait().unwrap().success());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "", "nothing else is printed on stdout");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts `command`, a server that prints the address it listens on as its first line of
/// stdout, and reads that address.
fn spawn_printing_addr(command: &mut Command) -> (std::process::Child, std::net::SocketAddr) {
    use std::io::{BufRead, BufReader};
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim_end().parse().expect("an address alone on the first line");
    (child, addr)
}

/// Runs `ringcall ARGS` to its end; returns the exit code and stderr.
fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(RINGCALL).args(args).stdin(Stdio::null()).output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn bad_input_gets_one_error_in_the_users_words() {
    // A negative number is a value, not an unknown flag.
    let (code, err) = run(&["serve", "--max-line", "-5"]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("invalid value '-5' for '--max-line <MAX_LINE>': expected a whole number, 1 or more"),
        "{err}"
    );
    let (code, err) = run(&["serve", "--line-timeout", "0"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("expected seconds, more than 0"), "{err}");
    // Params that are not JSON say so, and what to write instead, on one line.
    let (code, err) = run(&["call", "--addr", "127.0.0.1:1", "10000", "notjson"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        err,
        "error: params must be a JSON object: \"notjson\" is not JSON (at byte 0: not a JSON document); \
         write an object such as '{\"name\":\"value\"}'\n"
    );
    // A name that does not resolve names what was given and the form expected.
    let (code, err) = run(&["serve", "--addr", "nosuchhost.invalid:1", "--backend", "epoll"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("error: cannot start the epoll server: cannot resolve listen address \"nosuchhost.invalid:1\" (expected HOST:PORT"), "{err}");
}

#[test]
fn a_port_in_use_names_the_backend_chosen_and_the_cause_once() {
    let server = ringcall::Server::builder().addr("127.0.0.1:0").threads(1).pin_threads(false);
    let server = server.backend(Backend::Epoll).start(NoRoutes).unwrap();
    let addr = server.local_addr().to_string();
    let (code, err) = run(&["serve", "--addr", &addr, "--backend", "auto", "--no-pin"]);
    assert_eq!(code, Some(1));
    let last = err.lines().last().unwrap();
    let chosen = Backend::Auto.resolve();
    assert!(
        last.starts_with(&format!("error: cannot start the {chosen} server: cannot listen on {addr}")),
        "{err}"
    );
    assert_eq!(last.matches("Address already in use").count(), 1, "{err}");
    assert!(last.contains("another process listens there"), "{err}");
    // It waited for the port before giving up, and said so.
    assert!(err.contains("address in use; waiting up to 2s"), "{err}");
}

#[test]
fn serve_takes_a_host_name_and_logs_without_colour_when_not_on_a_terminal() {
    use std::io::Read;
    let (mut child, addr) = spawn_printing_addr(
        Command::new(RINGCALL)
            .args(["serve", "--addr", "localhost:0", "--threads", "1", "--no-pin", "--backend", "epoll"])
            .stderr(Stdio::piped()),
    );
    assert!(addr.ip().is_loopback(), "localhost resolved to {addr}");
    let out = Command::new(RINGCALL)
        .args(["call", "--addr", &format!("localhost:{}", addr.port()), "0"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "\"pong\"\n");
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(log.contains("listen address resolved"), "{log}");
    assert!(log.contains("ringcall stopped"), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log that is not a terminal:\n{log}");
}

#[test]
fn top_shows_a_running_servers_rates_and_stops_after_count() {
    let server = ringcall::Server::builder().addr("127.0.0.1:0").threads(2).pin_threads(false);
    let server = server.backend(Backend::Epoll).start(NoRoutes).unwrap();
    let addr = server.local_addr();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut client = ringcall::client::Client::connect(&addr.to_string()).unwrap();
            let mut calls = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client.send(&ringcall::client::Call::new(0)).unwrap();
                calls += 1;
            }
            calls
        })
    };
    let out = Command::new(RINGCALL)
        .args(["top", "--addr", &addr.to_string(), "--interval", "0.3", "--count", "2"])
        .output()
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(load.join().unwrap() > 0);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    // Two screens, plain (stdout is not a terminal), each with the totals and both cores.
    assert_eq!(text.matches(&format!("ringcall top {addr}: ")).count(), 2, "{text}");
    assert!(!text.contains('\u{1b}'), "{text}");
    let rates: Vec<f64> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("requests"))
        .map(|rest| rest.trim_start().split('/').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(rates.len(), 2, "{text}");
    assert!(rates.iter().all(|&r| r > 0.0), "the load shows as requests/s: {text}");
    assert!(text.contains("     1   "), "a line per core: {text}");
}

#[test]
fn serve_and_call_speak_the_token_hello() {
    let dir = std::env::temp_dir().join(format!("ringcall-token-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "9c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f\n").unwrap();
    let wrong = dir.join("wrong");
    std::fs::write(&wrong, "0000000000000000000000000000000000\n").unwrap();
    let token_arg = token.to_str().unwrap();
    let (mut server, addr) = common::spawn_server(Backend::Epoll, &["--token-file", token_arg], None);
    let addr = addr.to_string();
    let call = |extra: &[&str]| {
        let out = Command::new(RINGCALL).args(["call", "--addr", &addr]).args(extra).output().unwrap();
        (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    assert_eq!(call(&["--token-file", token_arg, "0"]), (true, "\"pong\"\n".into(), String::new()));
    let (ok, _, err) = call(&["0"]);
    assert!(!ok && err.contains("401") && err.contains("only after its token"), "{err}");
    let (ok, _, err) = call(&["--token-file", wrong.to_str().unwrap(), "0"]);
    assert!(!ok && err.contains("the token is not this server's"), "{err}");
    // Several addresses go through the pool, which presents the token on each connection.
    let both = format!("{addr},{addr}");
    let out = Command::new(RINGCALL)
        .args(["call", "--addr", &both, "--token-file", token_arg, "10000", "{\"a\":1}"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "{\"a\":1}\n");
    // Request lines from stdin follow the hello, whose reply is not printed.
    let mut child = Command::new(RINGCALL)
        .args(["call", "--addr", &addr, "--token-file", token_arg, "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"{\"cmdid\":0,\"id\":1}\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "{\"code\":0,\"id\":1,\"data\":\"pong\"}\n");
    // A token file that is missing or too short stops the server at start-up, naming it.
    let short = dir.join("short");
    std::fs::write(&short, "abc").unwrap();
    let out = Command::new(RINGCALL)
        .args(["serve", "--addr", "127.0.0.1:0", "--token-file", short.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("short") && err.contains("openssl rand"), "{err}");
    server.kill().unwrap();
    server.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The transport baseline echoes every byte back, whatever the framing, and `compare
/// --baseline` measures it beside the backends, with each one's ratio to it.
#[test]
fn the_echo_baseline_echoes_bytes_and_compare_measures_it() {
    use std::io::Read;
    let (mut child, addr) = spawn_printing_addr(Command::new(RINGCALL).args([
        "echo-baseline",
        "--addr",
        "127.0.0.1:0",
        "--threads",
        "2",
        "--no-pin",
    ]));
    let mut streams: Vec<std::net::TcpStream> =
        (0..4).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    for (i, stream) in streams.iter_mut().enumerate() {
        stream.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let sent = payload[i..].to_vec();
        let sender = std::thread::spawn(move || writer.write_all(&sent).unwrap());
        let mut back = vec![0u8; payload.len() - i];
        stream.read_exact(&mut back).unwrap();
        sender.join().unwrap();
        assert!(back == payload[i..], "connection {i} got other bytes back");
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let cpus = ringcall_sys::allowed_cpus();
    let (server_cpu, client_cpu) = (cpus[0].to_string(), cpus[cpus.len() - 1].to_string());
    let out = Command::new(RINGCALL)
        .args(["compare", "--backends", "uring,epoll", "--baseline", "--workloads", "2x2@1k,2x2+tls"])
        .args(["--rounds", "1", "-d", "0.3", "--warmup", "0"])
        .args(["--server-cpus", &server_cpu, "--client-cpus", &client_cpu])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("| vs io_uring-echo |"), "{table}");
    // On the plain workload only: the baseline speaks no TLS.
    assert_eq!(table.matches("| io_uring-echo |").count(), 1, "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("| 2x2@1k | io_uring-echo |") && l.ends_with("| 1.00x |")),
        "{table}"
    );
    assert!(table.lines().any(|l| l.starts_with("| 2x2+tls | uring |") && l.ends_with("| – |")), "{table}");
}

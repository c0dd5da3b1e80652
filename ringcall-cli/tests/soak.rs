//! The soak: minutes of mixed valid and invalid traffic over reconnecting clients against
//! the real binary. No reply may be lost or mismatched, and the server's RSS must not grow
//! after the warm-up. Ignored by default (it takes minutes); run it with
//! `cargo test --release --test soak -- --ignored --nocapture`, optionally with
//! RINGCALL_SOAK_SECS (default 180) and RINGCALL_SOAK_BACKEND (default uring).

#[macro_use]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{Client, raise_nofile, spawn_server};
use ringcall::Backend;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A small deterministic generator, so a failing run can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

#[test]
#[ignore = "takes minutes; run explicitly"]
fn soak_mixed_traffic_over_reconnecting_clients() {
    raise_nofile();
    let secs: u64 = std::env::var("RINGCALL_SOAK_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(180);
    let backend: Backend = std::env::var("RINGCALL_SOAK_BACKEND")
        .ok()
        .map_or(Backend::Uring, |b| b.parse().expect("backend name"));
    let (mut child, addr) = spawn_server(backend, &[], None);
    let stop = Arc::new(AtomicBool::new(false));
    let (requests, connections) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let workers: Vec<_> = (0..8u64)
        .map(|seed| {
            let (stop, requests, connections) = (stop.clone(), requests.clone(), connections.clone());
            std::thread::spawn(move || {
                let mut rng = Lcg(seed + 1);
                while !stop.load(Ordering::Relaxed) {
                    let mut c = Client::connect(addr);
                    connections.fetch_add(1, Ordering::Relaxed);
                    for _ in 0..rng.next(50) + 1 {
                        let batch = rng.next(40) + 1;
                        let mut sent = String::new();
                        let mut expected = Vec::new();
                        for _ in 0..batch {
                            let id = rng.next(1 << 40);
                            match rng.next(6) {
                                0 => {
                                    sent.push_str("{\"cmdid\":10000,\"params\":[1]}\n");
                                    expected.push(
                                        "{\"code\":400,\"error\":\"params must be a JSON object\"}\n"
                                            .to_string(),
                                    );
                                }
                                1 => {
                                    sent.push_str(&format!("{{\"cmdid\":4242,\"id\":{id}}}\n"));
                                    expected.push(format!(
                                        "{{\"code\":404,\"id\":{id},\"error\":\"unknown cmdid 4242\"}}\n"
                                    ));
                                }
                                2 => {
                                    sent.push_str("{\"cmdid\":0,\"id\":\"s\"}\r\n");
                                    expected
                                        .push("{\"code\":0,\"id\":\"s\",\"data\":\"pong\"}\n".to_string());
                                }
                                _ => {
                                    let size = rng.next(2000) as usize;
                                    let body = "y".repeat(size);
                                    sent.push_str(&format!(
                                        "{{\"cmdid\":10000,\"id\":{id},\"params\":{{\"b\":\"{body}\"}}}}\n"
                                    ));
                                    expected.push(format!(
                                        "{{\"code\":0,\"id\":{id},\"data\":{{\"b\":\"{body}\"}}}}\n"
                                    ));
                                }
                            }
                        }
                        c.send(sent.as_bytes());
                        for want in &expected {
                            assert_eq!(&c.line(), want, "a lost or mismatched reply");
                        }
                        requests.fetch_add(batch, Ordering::Relaxed);
                    }
                    if rng.next(4) == 0 {
                        // Leave with half a line unsent.
                        c.send(b"{\"cmdid\":10000,\"par");
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    let warmup = Duration::from_secs((secs / 6).max(5));
    std::thread::sleep(warmup);
    let rss_after_warmup = rss_kib(child.id());
    let mut peak = rss_after_warmup;
    let mut samples = vec![rss_after_warmup];
    while started.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(1));
        let rss = rss_kib(child.id());
        peak = peak.max(rss);
        samples.push(rss);
    }
    let step = (samples.len() / 10).max(1);
    let trace: Vec<String> = samples.iter().step_by(step).map(u64::to_string).collect();
    eprintln!("server RSS KiB every {step} s after warm-up: {}", trace.join(" "));
    let rss_end = rss_kib(child.id());
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("a client saw a wrong reply");
    }
    let (requests, connections) = (requests.load(Ordering::Relaxed), connections.load(Ordering::Relaxed));
    eprintln!(
        "soak {backend}: {secs} s, {requests} requests over {connections} connections, no lost or mismatched reply; \
         server RSS {rss_after_warmup} KiB after warm-up, {rss_end} KiB at the end, {peak} KiB peak"
    );
    assert!(
        rss_end <= rss_after_warmup + rss_after_warmup / 10 + 1024,
        "RSS grew: {rss_after_warmup} -> {rss_end} KiB"
    );
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

//! A one-host hand-over: a new `ringcall serve --share-port` starts on the address while the
//! old one serves, and the old one is stopped with SIGTERM — under a storm of new connections
//! (one request each), pipelined load on persistent connections (`ringcall bench --notices`)
//! and steady calls through a pool. No connection attempt is refused or reset and no call
//! fails.
//!
//! Each test runs in a network namespace of its own (so it can set
//! `net.ipv4.tcp_migrate_req`, which moves the connections still queued on the old server's
//! listener to the new one's when it closes, without touching the host): it needs root.

#[macro_use]
mod common;

use common::{Client, Load, eventually, spawn_server};
use ringcall::Backend;
use ringcall::pool::{CallOptions, Pool, PoolConfig};

/// Runs `body` on a thread in a fresh network namespace with its loopback up and
/// `tcp_migrate_req` on; processes and threads it starts are in it too. `None`: this host
/// cannot (not root), which skips the test (or fails it where RINGCALL_REQUIRE_NETNS is set).
fn in_netns(body: impl FnOnce() + Send + 'static) -> Option<()> {
    let entered = std::thread::spawn(move || {
        // SAFETY: unshare(2) moves only this thread into a new network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        for command in
            [&["ip", "link", "set", "lo", "up"][..], &["sysctl", "-qw", "net.ipv4.tcp_migrate_req=1"]]
        {
            let status = std::process::Command::new(command[0]).args(&command[1..]).status()?;
            assert!(status.success(), "{command:?} failed in the test's namespace");
        }
        body();
        Ok(())
    });
    match entered.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)) {
        Ok(()) => Some(()),
        Err(e) => {
            common::skip(
                "RINGCALL_REQUIRE_NETNS",
                &format!("cannot make a network namespace ({e}): run as root"),
            );
            None
        }
    }
}

const ADDR: &str = "127.0.0.1:7001";

fn a_hand_over_refuses_no_connection_and_fails_no_call(backend: Backend) {
    in_netns(move || {
        let args = ["--threads", "1", "--addr", ADDR, "--share-port", "--drain-grace", "1"];
        let (old, _) = spawn_server(backend, &args, None);
        let pool = std::sync::Arc::new(Pool::with_endpoints(&[ADDR], PoolConfig::default()).unwrap());
        let load = Load::start(&pool, 4, CallOptions::default());
        let bench = |args: &[&str]| {
            std::process::Command::new(env!("CARGO_BIN_EXE_ringcall"))
                .args(["bench", "--addr", ADDR, "-d", "6", "--warmup", "0", "--output", "json"])
                .args(args)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spawn ringcall bench")
        };
        let storm = bench(&["-c", "4", "-P", "1", "--reconnect-after", "1"]);
        // Pipelined calls on persistent connections, moved to a new connection on a notice.
        let pipelined = bench(&["-c", "4", "-P", "16", "--notices"]);
        eventually("calls flowing to the old server", || load.calls() >= 500);
        // The new binary joins the port; then the old one drains and exits.
        let (mut new, _) = spawn_server(backend, &args, None);
        let mut old = old;
        common::sigterm(&old);
        assert!(old.wait().unwrap().success(), "the old server drained and exited cleanly");
        let after = load.calls();
        eventually("calls flowing to the new server", || load.calls() >= after + 2_000);
        let out = storm.wait_with_output().unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench's JSON report");
        let out = pipelined.wait_with_output().unwrap();
        let moved: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bench's JSON report");
        let (total, errors) = load.finish();
        eprintln!(
            "{backend}: storm {} new connections, {} failed; pipelined {} requests over {} connections, {} failed; \
             pool {total} calls, {} failed",
            report["requests"],
            report["errors"],
            moved["requests"],
            moved["connections_opened"],
            moved["errors"],
            errors.len()
        );
        assert!(moved["requests"].as_u64().unwrap() > 0, "{moved}");
        assert_eq!((&moved["errors"], &moved["invalid_replies"]), (&0.into(), &0.into()), "{moved}");
        assert_eq!(
            moved["unanswered"],
            serde_json::json!({"closed": 0, "reset": 0, "timed_out": 0, "other": 0}),
            "{moved}"
        );
        assert!(report["requests"].as_u64().unwrap() > 0, "{report}");
        assert_eq!(report["errors"], 0, "connection attempts refused or reset: {report}");
        assert_eq!(report["invalid_replies"], 0, "{report}");
        assert!(
            errors.is_empty(),
            "{} of {total} calls failed: {:?}",
            errors.len(),
            &errors[..errors.len().min(5)]
        );
        // The new server took over: it serves the port alone now.
        let mut client = Client::connect(ADDR.parse().unwrap());
        assert!(common::total_stat(&mut client, "connections_total") > 1);
        new.kill().unwrap();
        new.wait().unwrap();
    });
}

every_backend!(a_hand_over_refuses_no_connection_and_fails_no_call);

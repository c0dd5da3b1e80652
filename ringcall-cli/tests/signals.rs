//! The shipped binary under signals: SIGTERM while a client has requests in flight answers
//! every request sent before the signal, then exits 0; and it does so too when whoever read
//! its log has gone away (stderr is a closed pipe). Runs against every backend.

#[macro_use]
mod common;

use std::process::Child;
use std::time::{Duration, Instant};

use common::{Client, spawn_server, spawn_server_closing_log};
use ringcall::Backend;

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    // Failsafe only: the shutdown itself is bounded by the server's 10 s drain deadline.
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < give_up, "server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm_answers_requests_in_flight_then_exits_0(backend: Backend) {
    answers_what_was_sent_before_sigterm_then_exits_0(spawn_server(backend, &[], None));
}

fn sigterm_exits_0_when_the_log_reader_is_gone(backend: Backend) {
    // The shutdown logs into the closed pipe; neither that nor the replies may suffer for it.
    answers_what_was_sent_before_sigterm_then_exits_0(spawn_server_closing_log(backend));
}

/// One idle connection and one with 300 pipelined requests sent before SIGTERM: every one of
/// them is answered, both connections are closed, and the server exits 0. Nothing is sent after
/// the signal: the server may close an idle connection as soon as it sees the signal.
fn answers_what_was_sent_before_sigterm_then_exits_0((mut child, addr): (Child, std::net::SocketAddr)) {
    let mut idle = Client::connect(addr);
    assert_eq!(idle.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    let mut busy = Client::connect(addr);
    let mut batch = String::new();
    for i in 0..300 {
        batch.push_str(&format!("{{\"cmdid\":10000,\"id\":{i},\"params\":{{\"i\":{i}}}}}\n"));
    }
    busy.send(batch.as_bytes());
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    for i in 0..300 {
        assert_eq!(busy.line(), format!("{{\"code\":0,\"id\":{i},\"data\":{{\"i\":{i}}}}}\n"));
    }
    busy.expect_eof();
    idle.expect_eof();
    // Closing our side lets the server finish without waiting for its drain deadline.
    drop((busy, idle));
    let status = wait_exit(&mut child);
    assert!(status.success(), "exit status {status}");
}

every_backend!(sigterm_answers_requests_in_flight_then_exits_0, sigterm_exits_0_when_the_log_reader_is_gone);

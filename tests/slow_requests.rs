//! `slow_request` (`--slow-ms`) on every backend: a request whose handler takes at least the
//! threshold is logged at warn level with its cmdid, code, core and the peer's address;
//! fast ones are not. The log is captured by a subscriber of this test binary.

#[macro_use]
mod common;

use common::{Client, SLOW_HANDLER, start_with};
use ringcall::Backend;

fn slow_requests_are_logged_with_cmdid_code_and_peer(backend: Backend) {
    let log = common::captured_log(tracing::Level::WARN);
    let threshold = SLOW_HANDLER / 2;
    let Some(server) = start_with(backend, |b| b.slow_request(threshold)) else { return };
    let mut c = Client::connect(server.local_addr());
    let peer = c.stream().local_addr().unwrap();
    assert_eq!(c.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    assert_eq!(c.call("{\"cmdid\":9003,\"id\":1}\n"), "{\"code\":0,\"id\":1,\"data\":\"done\"}\n");
    drop(c);
    drop(server);
    let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    let mine: Vec<&str> = text.lines().filter(|l| l.contains(&format!("peer={peer}"))).collect();
    assert_eq!(mine.len(), 1, "one slow request from {peer}:\n{text}");
    let line = mine[0];
    assert!(line.contains(" WARN ") && line.contains("slow request"), "{line}");
    assert!(line.contains("cmdid=9003") && line.contains("code=0"), "{line}");
    assert!(line.contains("handler_time="), "{line}");
}

every_backend!(slow_requests_are_logged_with_cmdid_code_and_peer);

//! Debug logging on every backend: each request is logged with its cmdid, code and handler
//! time, inside a `connection{peer=…}` span that names the peer. The log is captured by a
//! subscriber of this test binary at debug level.

#[macro_use]
mod common;

use common::{Client, start};
use ringcall::Backend;

fn requests_are_logged_in_their_connections_span(backend: Backend) {
    let log = common::captured_log(tracing::Level::DEBUG);
    let Some(server) = start(backend) else { return };
    let mut c = Client::connect(server.local_addr());
    let peer = c.stream().local_addr().unwrap();
    assert_eq!(c.call("{\"cmdid\":10000,\"params\":{\"x\":1}}\n"), "{\"code\":0,\"data\":{\"x\":1}}\n");
    assert!(c.call("{\"cmdid\":9001}\n").starts_with("{\"code\":500,"));
    drop(c);
    drop(server);
    let text = String::from_utf8(log.lock().unwrap().clone()).unwrap();
    let span = format!("connection{{peer={peer}}}");
    let mine: Vec<&str> = text.lines().filter(|l| l.contains(&span) && l.contains(" request ")).collect();
    assert_eq!(mine.len(), 2, "two requests from {peer}, in its span:\n{text}");
    assert!(
        mine[0].contains("cmdid=10000") && mine[0].contains("code=0") && mine[0].contains("handler_time="),
        "{}",
        mine[0]
    );
    assert!(mine[1].contains("cmdid=9001") && mine[1].contains("code=500"), "{}", mine[1]);
}

every_backend!(requests_are_logged_in_their_connections_span);

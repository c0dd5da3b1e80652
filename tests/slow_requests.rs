//! `slow_request` (`--slow-ms`) on every backend: a request whose handler takes at least the
//! threshold is logged at warn level with its cmdid, code, core and the peer's address;
//! fast ones are not. The log is captured by a subscriber of this test binary.

#[macro_use]
mod common;

use std::sync::{Arc, Mutex, OnceLock};

use common::{Client, SLOW_HANDLER, start_with};
use ringcall::Backend;

/// Everything logged by this test binary, whatever thread logged it.
fn log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || Writer(sink.clone()))
            .init();
        log
    })
}

struct Writer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Writer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn slow_requests_are_logged_with_cmdid_code_and_peer(backend: Backend) {
    let log = log();
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

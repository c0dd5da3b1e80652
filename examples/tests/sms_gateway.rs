//! The SMS gateway example, live on every backend, against a real HTTP server started by the
//! test (HTTP/1.1 with keep-alive, on 127.0.0.1): sends are relayed and answered with the
//! provider's id; while a call hangs upstream the gateway answers everything else; a request's
//! deadline answers 504 while the provider still holds the call; provider errors are 502s.

#[macro_use]
#[path = "../../tests/common/mod.rs"]
mod common;
mod support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::Client;
use ringcall::Backend;
use support::Running;

/// What the fake provider has seen, and the gate that holds messages whose text is "hold".
#[derive(Default)]
struct Provider {
    state: Mutex<ProviderState>,
    changed: Condvar,
}

#[derive(Default)]
struct ProviderState {
    received: Vec<serde_json::Value>,
    holding: usize,
    released: bool,
}

impl Provider {
    /// Serves HTTP on a free port of 127.0.0.1; returns its send URL.
    fn start(self: &Arc<Self>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/send", listener.local_addr().unwrap());
        let provider = self.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let provider = provider.clone();
                std::thread::spawn(move || provider.serve(stream));
            }
        });
        url
    }

    /// One keep-alive connection: requests until the client closes it.
    fn serve(&self, stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut writer = stream;
        loop {
            let mut head = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            assert!(head.starts_with("POST /send HTTP/1.1"), "{head}");
            let sms: serde_json::Value = serde_json::from_slice(&body).unwrap();
            let (status, reply) = self.answer(sms);
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                reply.len()
            );
            if writer.write_all(response.as_bytes()).is_err() {
                return;
            }
        }
    }

    fn answer(&self, sms: serde_json::Value) -> (&'static str, String) {
        let mut state = self.state.lock().unwrap();
        state.received.push(sms.clone());
        let n = state.received.len();
        if sms["text"] == "hold" {
            state.holding += 1;
            self.changed.notify_all();
            while !state.released {
                state = self.changed.wait(state).unwrap();
            }
        }
        if sms["text"] == "fail" {
            return ("503 Service Unavailable", "{\"error\":\"carrier down\"}".to_owned());
        }
        ("200 OK", format!("{{\"id\":\"msg-{n}\"}}"))
    }

    fn wait_holding(&self, n: usize) {
        let mut state = self.state.lock().unwrap();
        while state.holding < n {
            state = self.changed.wait_timeout(state, Duration::from_secs(30)).unwrap().0;
        }
    }

    fn release(&self) {
        self.state.lock().unwrap().released = true;
        self.changed.notify_all();
    }
}

fn send(to: &str, text: &str) -> String {
    format!("{{\"cmdid\":5001,\"params\":{{\"to\":\"{to}\",\"text\":\"{text}\"}}}}\n")
}

fn relays_over_http_and_serves_on_while_calls_hang(backend: Backend) {
    if backend == Backend::Uring && Backend::Auto.resolve() != Backend::Uring {
        common::skip("RINGCALL_REQUIRE_ALL_BACKENDS", "io_uring is not available here");
        return;
    }
    let provider = Arc::new(Provider::default());
    let url = provider.start();
    let args = ["--addr", "127.0.0.1:0", "--threads", "2", "--upstream", &url, "--backend", backend.name()];
    let (_service, addr) = Running::start("sms_gateway", &args);
    let mut client = Client::connect(addr);
    assert_eq!(
        client.call(&send("+15551234567", "code 1234")),
        "{\"code\":0,\"data\":{\"id\":\"msg-1\",\"status\":200}}\n"
    );
    // Pipelined sends on one connection come back in order.
    client.send(send("+15551234567", "a").repeat(20).as_bytes());
    for _ in 0..20 {
        assert!(client.line().starts_with("{\"code\":0,\"data\":{\"id\":\"msg-"));
    }
    // The provider holds two calls...
    let mut held = Client::connect(addr);
    held.send(send("+15557654321", "hold").as_bytes());
    let mut timed = Client::connect(addr);
    timed.send(b"{\"cmdid\":5001,\"id\":7,\"timeout_ms\":200,\"params\":{\"to\":\"+15557654321\",\"text\":\"hold\"}}\n");
    provider.wait_holding(2);
    // ...and the gateway serves everything else meanwhile.
    assert_eq!(client.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    assert!(client.call(&send("+15551112222", "b")).starts_with("{\"code\":0,\"data\":{\"id\":\"msg-"));
    assert_eq!(
        timed.line(),
        "{\"code\":504,\"id\":7,\"error\":\"deadline of 200 ms passed before the handler answered\"}\n"
    );
    provider.release();
    assert!(held.line().starts_with("{\"code\":0,\"data\":{\"id\":\"msg-"));
    // What the provider and the caller get wrong.
    assert_eq!(
        client.call(&send("+15551234567", "fail")),
        "{\"code\":502,\"error\":\"SMS provider answered 503 Service Unavailable: {\\\"error\\\":\\\"carrier down\\\"}\"}\n"
    );
    assert_eq!(
        client.call(&send("12345", "x")),
        "{\"code\":400,\"error\":\"params.to: a phone number in E.164 form, e.g. +15551234567\"}\n"
    );
    let received = provider.state.lock().unwrap().received.clone();
    assert_eq!(received[0], serde_json::json!({"to": "+15551234567", "text": "code 1234"}));
    assert_eq!(received.len(), 1 + 20 + 2 + 1 + 1);
}

every_backend!(relays_over_http_and_serves_on_while_calls_hang);

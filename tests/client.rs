//! The client library against live servers (every backend), and the client's error paths against fake servers that misbehave on purpose.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use common::{start, start_with};
use ringcall::Backend;
use ringcall::client::{AsyncClient, Call, Client, ClientError};
use ringcall::simd_json::prelude::*;

fn blocking_client_calls_and_pipelines(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let mut client = Client::connect(&server.local_addr().to_string()).unwrap();
    let data = client.call(10000, &serde_json_like()).unwrap();
    assert_eq!(data.get("content").and_then(|v| v.as_str()), Some("Hello world!"));
    assert_eq!(client.send(&Call::new(0)).unwrap().data.as_str(), Some("pong"));
    let calls: Vec<Call> =
        (0..200).map(|i| Call::with_json(10000, &format!("{{\"i\":{i}}}")).unwrap()).collect();
    let replies = client.pipeline(&calls).unwrap();
    assert_eq!(replies.len(), 200);
    for (i, reply) in replies.iter().enumerate() {
        assert_eq!(reply.code, 0);
        assert_eq!(reply.data.get("i").and_then(|v| v.as_u64()), Some(i as u64));
    }
    // Error codes come back typed, and the connection stays usable.
    match client.call(31337, &serde_json_like()) {
        Err(ClientError::Server { code: 404, message }) => assert_eq!(message, "unknown cmdid 31337"),
        other => panic!("expected a 404, got {other:?}"),
    }
    match client.send(&Call::new(9001)).unwrap().into_result() {
        Err(ClientError::Server { code: 500, message }) => assert_eq!(message, "disk on fire"),
        other => panic!("expected a 500, got {other:?}"),
    }
    assert_eq!(client.send(&Call::new(0)).unwrap().code, 0);
}

fn serde_json_like() -> std::collections::BTreeMap<&'static str, &'static str> {
    [("content", "Hello world!")].into_iter().collect()
}

fn connection_closed_mid_batch_is_an_error(backend: Backend) {
    let Some(server) = start_with(backend, |b| b.max_line(256)) else { return };
    let mut client = Client::connect(&server.local_addr().to_string()).unwrap();
    let big = "x".repeat(1000);
    let calls =
        vec![Call::new(0), Call::with_json(10000, &format!("{{\"s\":\"{big}\"}}")).unwrap(), Call::new(0)];
    match client.pipeline(&calls) {
        Err(ClientError::Closed(_)) => {}
        other => panic!("expected the connection to close mid-batch, got {other:?}"),
    }
    // No silent resend: the client refuses until reconnected.
    assert!(matches!(client.send(&Call::new(0)), Err(ClientError::Broken)));
    client.reconnect().unwrap();
    assert_eq!(client.send(&Call::new(0)).unwrap().code, 0);
}

fn async_client_calls_and_pipelines(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let addr = server.local_addr().to_string();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = AsyncClient::connect(&addr).await.unwrap();
        assert_eq!(client.send(&Call::new(0)).await.unwrap().data.as_str(), Some("pong"));
        let calls: Vec<Call> =
            (0..50).map(|i| Call::with_json(10000, &format!("{{\"i\":{i}}}")).unwrap()).collect();
        let replies = client.pipeline(&calls).await.unwrap();
        assert!(
            replies
                .iter()
                .enumerate()
                .all(|(i, r)| r.data.get("i").and_then(|v| v.as_u64()) == Some(i as u64))
        );
        assert!(matches!(
            client.call(4242, &serde_json_like()).await,
            Err(ClientError::Server { code: 404, .. })
        ));
    });
}

every_backend!(
    blocking_client_calls_and_pipelines,
    connection_closed_mid_batch_is_an_error,
    async_client_calls_and_pipelines,
);

/// A fake server: runs `behave` on the first `connections` connections it accepts.
fn fake_server(connections: usize, behave: fn(std::net::TcpStream)) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(connections) {
            behave(stream.unwrap());
        }
    });
    addr
}

#[test]
fn a_silent_server_times_out_and_the_client_needs_a_reconnect() {
    let addr = fake_server(2, |mut stream| {
        let mut buf = [0u8; 1024];
        // Read the request, never answer, keep the connection open until the peer leaves.
        while stream.read(&mut buf).unwrap_or(0) > 0 {}
    });
    let mut client = Client::connect_timeout(&addr, Duration::from_millis(200)).unwrap();
    assert!(matches!(client.send(&Call::new(0)), Err(ClientError::Timeout(_))));
    assert!(matches!(client.send(&Call::new(0)), Err(ClientError::Broken)));
    client.reconnect().unwrap();
    assert!(matches!(client.send(&Call::new(0)), Err(ClientError::Timeout(_))));
}

#[test]
fn a_reply_cut_off_mid_line_is_reported() {
    let addr = fake_server(1, |mut stream| {
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf);
        let _ = stream.write_all(b"{\"code\":0,\"id\":1,\"da");
    });
    let mut client = Client::connect(&addr).unwrap();
    assert!(matches!(client.send(&Call::new(0)), Err(ClientError::Closed("in the middle of a reply"))));
}

#[test]
fn a_reply_to_another_request_is_rejected() {
    let addr = fake_server(1, |mut stream| {
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf);
        let _ = stream.write_all(b"{\"code\":0,\"id\":99,\"data\":null}\n");
    });
    let mut client = Client::connect(&addr).unwrap();
    assert!(matches!(client.send(&Call::new(0)), Err(ClientError::Protocol(_))));
}

#[test]
fn connecting_to_nothing_is_a_connect_error() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    assert!(matches!(Client::connect(&format!("127.0.0.1:{port}")), Err(ClientError::Connect { .. })));
}

//! The shared-token hello on every backend, against the real server: the right token opens a
//! connection (raw bytes, the blocking and async clients, the pool), anything else first is
//! answered 401 and closed without disturbing the other connections, and the refusals are
//! counted.

#[macro_use]
mod common;

use std::time::Duration;

use common::{Client, start_with, total_stat};
use ringcall::Backend;
use ringcall::HelloToken;
use ringcall::client::ClientError;
use ringcall::simd_json::prelude::*;

const TOKEN: &str = "5f0c7a1e9b2d4c68a3e1f7b9d2c4e6a8";

fn token() -> HelloToken {
    HelloToken::new(TOKEN).unwrap()
}

every_backend!(
    only_connections_that_present_the_token_are_served,
    the_clients_and_the_pool_present_the_token,
);

fn only_connections_that_present_the_token_are_served(backend: Backend) {
    let Some(server) = start_with(backend, |b| b.token(token())) else { return };
    let addr = server.local_addr();
    // Admitted, with the hello and a call in one write.
    let mut good = Client::connect(addr);
    good.send(
        format!("{{\"cmdid\":2,\"id\":1,\"params\":{{\"token\":\"{TOKEN}\"}}}}\n{{\"cmdid\":10000,\"id\":2,\"params\":{{\"x\":1}}}}\n")
            .as_bytes(),
    );
    assert_eq!(good.line(), "{\"code\":0,\"id\":1,\"data\":\"hello\"}\n");
    assert_eq!(good.line(), "{\"code\":0,\"id\":2,\"data\":{\"x\":1}}\n");

    // A call first: 401, and the connection is closed with nothing more said.
    let mut early = Client::connect(addr);
    early.send(b"{\"cmdid\":10000,\"id\":3,\"params\":{}}\n{\"cmdid\":0,\"id\":4}\n");
    let refused = early.line();
    assert!(
        refused.starts_with(
            "{\"code\":401,\"id\":3,\"error\":\"this server admits a connection only after its token"
        ),
        "{refused}"
    );
    early.expect_eof();

    // The wrong token.
    let mut wrong = Client::connect(addr);
    assert_eq!(
        wrong.call("{\"cmdid\":2,\"id\":5,\"params\":{\"token\":\"5f0c7a1e9b2d4c68a3e1f7b9d2c4e6a9\"}}\n"),
        "{\"code\":401,\"id\":5,\"error\":\"the token is not this server's\"}\n"
    );
    wrong.expect_eof();

    // Not JSON at all.
    let mut garbage = Client::connect(addr);
    garbage.send(b"GET / HTTP/1.1\r\n\r\n");
    assert!(garbage.line().starts_with("{\"code\":401,\"error\":"));
    garbage.expect_eof();

    // The admitted connection never noticed, and the refusals were counted.
    assert_eq!(good.call("{\"cmdid\":0,\"id\":6}\n"), "{\"code\":0,\"id\":6,\"data\":\"pong\"}\n");
    let replies = {
        let line = good.call("{\"cmdid\":1}\n");
        let mut bytes = line.into_bytes();
        let stats = ringcall::simd_json::to_owned_value(&mut bytes).unwrap();
        stats["data"]["total"]["replies"]["401"].as_u64().unwrap()
    };
    assert_eq!(replies, 3);
    // The hello, echo, ping and two stats calls, and the three refused first lines.
    assert_eq!(total_stat(&mut good, "requests"), 5 + 3);
}

fn the_clients_and_the_pool_present_the_token(backend: Backend) {
    let Some(server) = start_with(backend, |b| b.token(token())) else { return };
    let addr = server.local_addr().to_string();
    let timeout = Duration::from_secs(30);

    let mut client =
        ringcall::client::Client::connect_timeout(&addr, timeout).unwrap().with_token(token()).unwrap();
    assert_eq!(client.call(10000, &serde_json::json!({"k": "v"})).unwrap().encode(), "{\"k\":\"v\"}");
    // A reconnection presents it again.
    client.reconnect().unwrap();
    assert_eq!(client.call(0, &serde_json::json!({})).unwrap().encode(), "\"pong\"");
    let other = HelloToken::new("another-token-of-enough-bytes").unwrap();
    match ringcall::client::Client::connect_timeout(&addr, timeout).unwrap().with_token(other.clone()) {
        Err(ClientError::Server { code: 401, message }) => {
            assert_eq!(message, "the token is not this server's")
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    // Without a hello, the first call is refused.
    let mut bare = ringcall::client::Client::connect_timeout(&addr, timeout).unwrap();
    assert!(matches!(bare.call(0, &serde_json::json!({})), Err(ClientError::Server { code: 401, .. })));

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = ringcall::client::AsyncClient::connect_timeout(&addr, timeout)
            .await
            .unwrap()
            .with_token(token())
            .await
            .unwrap();
        assert_eq!(client.call(10000, &serde_json::json!({"a": 1})).await.unwrap().encode(), "{\"a\":1}");
        client.reconnect().await.unwrap();
        assert_eq!(client.call(0, &serde_json::json!({})).await.unwrap().encode(), "\"pong\"");
    });

    let config = ringcall::pool::PoolConfig { token: Some(token()), ..Default::default() };
    let pool = ringcall::pool::Pool::with_endpoints(&[&addr], config).unwrap();
    for i in 0..20 {
        let call = ringcall::client::Call::with_params(10000, &serde_json::json!({ "i": i })).unwrap();
        let reply = pool.call(&call, ringcall::pool::CallOptions::default()).unwrap();
        assert_eq!(reply.data.encode(), format!("{{\"i\":{i}}}"));
    }
    let config = ringcall::pool::PoolConfig {
        token: Some(other),
        timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    let pool = ringcall::pool::Pool::with_endpoints(&[&addr], config).unwrap();
    let err = pool.call(&ringcall::client::Call::new(0), ringcall::pool::CallOptions::default()).unwrap_err();
    assert!(err.to_string().contains("token"), "{err}");
}

//! An SMS gateway: each request calls an HTTP API (the SMS provider) with an async client, and
//! the core goes on answering other requests while those calls are in flight. A request's
//! `timeout_ms` bounds the whole call (past it the caller gets a 504 and the call is dropped);
//! `--upstream-timeout-ms` bounds calls that set none.
//!
//! ```sh
//! cargo run --release --example sms_gateway -- --addr 127.0.0.1:8894 --upstream http://127.0.0.1:9000/send
//! printf '{"cmdid":5001,"timeout_ms":2000,"params":{"to":"+15551234567","text":"your code is 1234"}}\n' | nc -q3 127.0.0.1 8894
//! ```
//!
//! - 5001 send `{"to": "+<digits>", "text": "<1 to 1600 chars>"}` → POSTs
//!   `{"to": …, "text": …}` as JSON to `--upstream` and answers `{"id": <the provider's
//!   id>, "status": <its HTTP status>}`; a provider error is a 502 saying what it answered.

use std::time::Duration;

use clap::Parser;
use ringcall::{Backend, Ctx, Deferred, HandlerError, HandlerResult, Request, Server, Service};
use serde::{Deserialize, Serialize};

#[derive(Parser)]
#[command(about = "An SMS gateway on ringcall: every request is an HTTP call upstream")]
struct Args {
    /// Address to listen on (port 0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8894")]
    addr: String,
    /// The provider's send endpoint (plain HTTP).
    #[arg(long)]
    upstream: reqwest::Url,
    /// Bound on a call when the request sets no `timeout_ms`.
    #[arg(long, default_value_t = 10_000)]
    upstream_timeout_ms: u64,
    /// I/O backend: auto, uring, tokio-uring, epoll or epoll-mt.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Worker threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

struct Gateway {
    upstream: reqwest::Url,
    timeout: Duration,
}

impl Service for Gateway {
    type Routes = GatewayRoutes;
    /// Each core's HTTP client, with its own pool of connections to the provider.
    type Local = reqwest::Client;

    fn local(&self, _core: usize) -> reqwest::Client {
        reqwest::Client::builder().timeout(self.timeout).build().expect("an HTTP client without TLS builds")
    }
}

#[derive(Deserialize, Serialize)]
struct Sms {
    to: String,
    text: String,
}

#[derive(Deserialize)]
struct Sent {
    id: String,
}

#[derive(Serialize)]
struct Receipt {
    id: String,
    status: u16,
}

/// 5001: validates on the core, calls the provider from an async task.
fn send(ctx: &Ctx<'_, Gateway>, request: &Request<'_, '_>, deferred: Deferred) -> HandlerResult {
    let sms: Sms = request.params()?;
    let digits = sms.to.strip_prefix('+').unwrap_or("");
    if digits.len() < 7 || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HandlerError::bad_request("params.to: a phone number in E.164 form, e.g. +15551234567"));
    }
    if sms.text.is_empty() || sms.text.chars().count() > 1600 {
        return Err(HandlerError::bad_request("params.text: 1 to 1600 characters"));
    }
    let client = ctx.local().clone();
    let url = ctx.service().upstream.clone();
    ctx.spawn(deferred, async move {
        let upstream = |e: reqwest::Error| {
            let code = if e.is_timeout() { 504 } else { 502 };
            HandlerError::with_code(code, format!("SMS provider: {e}"))
        };
        let response = client.post(url).json(&sms).send().await.map_err(upstream)?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(HandlerError::with_code(502, format!("SMS provider answered {status}: {body}")));
        }
        let Sent { id } = response.json().await.map_err(upstream)?;
        Ok(Receipt { id, status: status.as_u16() })
    });
    Ok(())
}

ringcall::routes! {
    GatewayRoutes for Gateway {
        5001 => send,
    }
}

fn main() -> anyhow::Result<()> {
    ringcall_examples::init_logs();
    let args = Args::parse();
    anyhow::ensure!(
        args.upstream.scheme() == "http",
        "--upstream must be an http:// URL (this build has no TLS)"
    );
    let gateway =
        Gateway { upstream: args.upstream, timeout: Duration::from_millis(args.upstream_timeout_ms) };
    let builder = Server::builder().addr(args.addr).backend(args.backend).threads(args.threads);
    ringcall_examples::serve(builder, gateway, "sms_gateway")
}

//! A small custom service on ringcall: a per-core counter and a greeting, in a few lines.
//!
//! Run it with `cargo run --release --example kv_service [ADDR]` (it prints the address it
//! listens on; SIGINT or SIGTERM drains it gracefully), then:
//! `printf '{"cmdid":2000,"params":{"name":"ops"}}\n{"cmdid":2001,"params":{"by":5}}\n' | nc -q1 127.0.0.1 8890`

use std::cell::Cell;

use ringcall::{Ctx, HandlerError, HandlerResult, Reply, Request, Server, Service};

/// The service: nothing shared; each core keeps its own counter.
struct KvService;

impl Service for KvService {
    type Routes = KvRoutes;
    // Per core, like everything in ringcall: no lock, no shared cache line.
    type Local = Cell<u64>;

    fn local(&self, _core: usize) -> Cell<u64> {
        Cell::new(0)
    }
}

/// 2000: `{"name": "..."}` → `{"greeting": "hello, ..."}`.
fn greet(request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    let name =
        request.param_str("name").ok_or_else(|| HandlerError::bad_request("params.name must be a string"))?;
    let mut object = reply.object();
    object.str("greeting", &format!("hello, {name}"));
    Ok(())
}

/// 2001: `{"by": n}` → this core's counter after adding n.
fn add(ctx: &Ctx<'_, KvService>, request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    let by = request.param_u64("by").unwrap_or(1);
    let counter = ctx.local();
    counter.set(counter.get().wrapping_add(by));
    reply.object().u64("core", ctx.core() as u64).u64("value", counter.get());
    Ok(())
}

ringcall::routes! {
    /// The service's command table, checked at compile time.
    KvRoutes for KvService {
        2000 => greet,
        2001 => add,
    }
}

fn main() -> Result<(), ringcall::ServerError> {
    // Logs to stderr (stdout carries the address), coloured only on a terminal.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // `kv_service [ADDR]`: 127.0.0.1:8890 unless told otherwise (port 0 picks a free one).
    let addr = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:8890".to_owned());
    // SIGINT/SIGTERM drain the server as `ringcall serve` does: stop accepting, answer every
    // request received, then return from wait().
    let server = Server::builder().addr(addr).start(KvService)?;
    println!("{}", server.local_addr());
    tracing::info!(addr = %server.local_addr(), "kv_service listening");
    server.wait()?;
    tracing::info!("kv_service stopped");
    Ok(())
}

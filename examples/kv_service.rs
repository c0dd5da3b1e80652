//! A small custom service on ringcall: a per-core counter and a greeting, in a few lines.
//!
//! Run it with `cargo run --release --example kv_service -- --addr 127.0.0.1:8890` (the
//! default; `--help` lists the flags). It prints the address it listens on; SIGINT or SIGTERM
//! drains it gracefully. Then:
//! `printf '{"cmdid":2000,"params":{"name":"ops"}}\n{"cmdid":2001,"params":{"by":5}}\n' | nc -q1 127.0.0.1 8890`

use std::cell::Cell;

use clap::Parser;
use ringcall::{Backend, Ctx, HandlerError, HandlerResult, Reply, Request, Server, Service};

#[derive(Parser)]
#[command(about = "A per-core counter and a greeting on ringcall")]
struct Args {
    /// Address to listen on (port 0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8890")]
    addr: String,
    /// I/O backend: auto, uring, tokio-uring, epoll or epoll-mt.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Worker threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

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

fn main() -> anyhow::Result<()> {
    ringcall_examples::init_logs();
    let args = Args::parse();
    // SIGINT/SIGTERM drain the server as `ringcall serve` does: stop accepting, answer every
    // request received, then return from wait().
    let builder = Server::builder().addr(args.addr).backend(args.backend).threads(args.threads);
    ringcall_examples::serve(builder, KvService, "kv_service")
}

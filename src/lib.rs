//! ringcall: a server framework and server for internal service-to-service calls over
//! persistent TCP, speaking newline-delimited JSON (protocol v1, compatible with tornado-TCP
//! clients).
//!
//! One thread per core, one io_uring ring per core, memchr framing over pooled buffers,
//! simd-json parsing each request in place, handlers in a static dispatch table.
//!
//! # Getting started
//!
//! ```no_run
//! use ringcall::{HandlerError, HandlerResult, Reply, Request, Server};
//!
//! fn greet(request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
//!     let name = request.param_str("name").ok_or(HandlerError::bad_request("params.name: string required"))?;
//!     reply.object().str("greeting", name);
//!     Ok(())
//! }
//!
//! ringcall::routes! {
//!     Greeter { 2000 => greet }
//! }
//!
//! fn main() -> Result<(), ringcall::ServerError> {
//!     let server = Server::builder().addr("127.0.0.1:8889").start(Greeter)?;
//!     server.wait()
//! }
//! ```
//!
//! # Layout
//!
//! - [`protocol`]: the sans-I/O core. [`protocol::frame`] splits lines with memchr,
//!   [`protocol::request`] reads the envelope off simd-json's tape, [`protocol::reply`]
//!   encodes replies, [`protocol::session`] turns received bytes into reply bytes, and
//!   [`protocol::connection`] holds every rule of a connection — backpressure, deadlines,
//!   FIN and linger, draining, the connection limit — as one state machine every backend
//!   drives; [`protocol::tls`] (TLS, mutual TLS, certificate reload) and [`protocol::acl`]
//!   (which client identity may call what) sit in it too.
//! - [`dispatch`]: services ([`Service`]: shared and per-core state), the [`Routes`] trait,
//!   the [`routes!`] macro (compile-time tables), the handler shapes and their [`Ctx`].
//! - [`protocol::deferred`]: replies answered later ([`Deferred`]), kept in request order.
//! - [`durable`]: durable appends with group commit ([`durable::AppendFile`]), on the ring on
//!   `uring`.
//! - [`exec`]: where async and blocking handler work runs (a tokio runtime, a bounded
//!   blocking pool).
//! - [`handlers`]: the built-in commands (ping, stats, echo); the processor answers the
//!   first two for every service, and any table can route echo.
//! - [`stats`]: per-core counters (and per command: replies by code, handler time, time in
//!   the server), merged on read.
//! - [`metrics`]: those counters as Prometheus metrics, and a `/metrics` endpoint on its own
//!   thread.
//! - [`server`]: configuration, the builder, start-up and shutdown fan-out.
//! - `signals`: graceful shutdown on SIGINT/SIGTERM for every server of the process (on by
//!   default, [`ServerBuilder::handle_signals`]).
//! - [`backend`]: the I/O drivers that turn the connection machine's answers into system
//!   calls: `uring` (native io_uring), `tokio_uring`, `epoll`, `epoll_mt` and the connection
//!   loop the epoll drivers share; [`backend::worker`], the contract between the server and a
//!   worker thread; [`backend::sys`], sockets and fds (socket2, rustix), affinity, limits.
//! - [`client`]: blocking and async clients with pipelining and id correlation.
//! - [`pool`]: a client pool over several servers (balancing, failover, safe retries,
//!   deadlines, endpoint discovery).
//! - `bench_support`: hooks the criterion benches use to time one stage alone (hidden).
//!
//! The `ringcall` command (`serve`, `call`, `bench`, `compare`) and its load generator live
//! in the `ringcall-cli` member of the workspace, not in this library; services written on it
//! as a user would are in the `ringcall-examples` member (`examples/`). Design notes live in
//! `docs/architecture.md`; the wire format in `docs/protocol.md`.

pub mod backend;
#[doc(hidden)]
pub mod bench_support;
pub mod client;
pub mod dispatch;
pub mod durable;
pub mod exec;
pub mod handlers;
pub mod metrics;
pub mod pool;
/// The sans-I/O core ([`ringcall_core`]).
pub use ringcall_core as protocol;
pub mod server;
mod signals;
pub use ringcall_core::stats;

// `LineBuf::target` is a `bytes::BufMut`.
pub use bytes;
pub use dispatch::{Ctx, Handler, NoRoutes, Routes, Service};
pub use protocol::{Deferred, Reply, Request};
pub use ringcall_core::{HandlerError, HandlerResult};
pub use rustls;
pub use server::{Backend, Server, ServerBuilder, ServerConfig, ServerError, ServerHandle, Stopper};
pub use simd_json;

/// The README's Rust examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme {}

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
//! Three crates, layered so the compiler keeps them apart:
//!
//! - [`ringcall_core`] (re-exported here in part): the sans-I/O core — framing, parsing,
//!   [`Request`], [`Reply`], [`Deferred`], the connection machine and the per-core engine.
//!   It has no runtime, no sockets and no clock, and it cannot name anything of this crate:
//!   it calls the service layer through its `Dispatch` trait.
//! - `ringcall-sys` (internal): the system calls the backends and the command-line tools share.
//! - `ringcall` (this crate), with two cargo features, both on by default:
//!   - `server`: the [`Server`] and its [`Backend`]s, services ([`Service`], [`routes!`],
//!     [`Ctx`], the handler shapes), where async and blocking work runs ([`ExecConfig`]),
//!     durable appends ([`durable`]), the built-in commands ([`handlers`]), Prometheus
//!     [`metrics`], graceful shutdown on signals. A program that only calls services leaves
//!     it out, and with it io_uring, tokio-uring and the metrics encoder.
//!   - `client`: the blocking and async clients ([`client`]) and the pool over several servers
//!     with discovery ([`pool`]). A server that never calls out leaves it out, and with it
//!     the DNS resolver.
//!
//! Public here is what a service author or a caller uses, each item at one path: the root
//! holds the server, services, requests and replies, TLS and limits; the modules `client`,
//! `pool`, `durable`, `handlers`, `metrics` and `stats` are namespaces of their own. The
//! backends, the dispatcher's internals and the executors are private. Hooks for the
//! criterion benches (`bench_support`) are hidden and not a stable API.
//!
//! The `ringcall` command (`serve`, `call`, `bench`, `compare`) and its load generator live
//! in the `ringcall-cli` member of the workspace, not in this library; services written on it
//! as a user would are in the `ringcall-examples` member (`examples/`). Design notes live in
//! `docs/architecture.md`; the wire format in `docs/protocol.md`.

#[cfg(feature = "server")]
mod backend;
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod bench_support;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
mod dispatch;
#[cfg(feature = "server")]
pub mod durable;
#[cfg(feature = "server")]
mod exec;
#[cfg(feature = "server")]
pub mod handlers;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "client")]
pub mod pool;
#[cfg(feature = "server")]
mod server;
#[cfg(feature = "server")]
mod signals;

pub use ringcall_core::stats;
pub use ringcall_core::{
    Abandoned, Acl, AclError, ArrayWriter, ClientTls, DEFAULT_DEFERRED_TIMEOUT, DEFAULT_HELLO_TIMEOUT,
    DEFAULT_LINE_TIMEOUT, DEFAULT_MAX_CONNECTIONS_PER_CORE, DEFAULT_MAX_DEFERRED,
    DEFAULT_MAX_DEFERRED_PER_CORE, DEFAULT_MAX_LINE, DEFAULT_MAX_PENDING_OUTPUT, Deferred, HandlerError,
    HandlerResult, HelloToken, Limits, ObjectWriter, Reply, Request, TlsConfig, TlsError, TokenError,
};

#[cfg(feature = "server")]
pub use backend::Backend;
#[cfg(feature = "server")]
pub use backend::worker::WorkerError;
#[cfg(feature = "server")]
pub use dispatch::{Ctx, Dispatcher, Handler, NoRoutes, RESERVED_BELOW, Routes, Service, shape};
#[cfg(feature = "server")]
pub use exec::{DEFAULT_BLOCKING_QUEUE, ExecConfig};
#[cfg(feature = "server")]
pub use server::{DEFAULT_ADDR, Server, ServerBuilder, ServerConfig, ServerError, ServerHandle, Stopper};

// Crates whose types are in this API: `LineBuf::target` is a `bytes::BufMut`, requests are
// simd-json values, TLS is rustls.
pub use bytes;
pub use rustls;
pub use simd_json;

/// What [`routes!`] expands to (not a stable API).
#[cfg(feature = "server")]
#[doc(hidden)]
pub mod __private {
    pub use crate::dispatch::{Ctx, Routes, Service, call_handler, check_cmdids};
    pub use ringcall_core::{HandlerResult, Request, Responder};
}

/// The README's Rust examples, compiled as doc tests so they stay true.
#[cfg(all(doctest, feature = "server", feature = "client"))]
#[doc = include_str!("../README.md")]
mod readme {}

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
//!     let server = Server::builder().addr("127.0.0.1:8889").start::<Greeter>()?;
//!     server.wait()
//! }
//! ```
//!
//! # Layout
//!
//! - [`protocol`]: the sans-I/O core. [`protocol::frame`] splits lines with memchr,
//!   [`protocol::request`] reads the envelope off simd-json's tape, [`protocol::reply`]
//!   encodes replies, [`protocol::session`] turns received bytes into reply bytes.
//! - [`dispatch`]: the [`Routes`] trait and the [`routes!`] macro (compile-time tables).
//! - [`handlers`]: the built-in commands (ping, stats, echo).
//! - [`stats`]: per-core counters, merged on read.
//! - [`server`]: configuration, the builder, start-up and shutdown fan-out.
//! - [`backend`]: the I/O drivers that move bytes for the core: `uring` (native io_uring),
//!   `tokio_uring`, `epoll`, `epoll_mt`, the connection loop the epoll drivers share, and the
//!   socket, affinity and limit helpers (`sys`).
//! - [`client`]: blocking and async clients with pipelining and id correlation.
//! - [`bench`](mod@bench): the load generator behind `ringcall bench`, and `ringcall compare`.
//! - `bench_support`: hooks the criterion benches use to time one stage alone (hidden).
//!
//! Design notes live in `docs/architecture.md`; the wire format in `docs/protocol.md`.

pub mod backend;
#[doc(hidden)]
pub mod bench_support;
pub mod client;
pub mod dispatch;
pub mod handlers;
pub mod protocol;
pub mod server;
pub mod stats;

pub use dispatch::{Handler, HandlerError, HandlerResult, NoRoutes, Routes};
pub use protocol::{Reply, Request};
pub use server::{Backend, Server, ServerBuilder, ServerConfig, ServerError, ServerHandle, Stopper};
pub use simd_json;

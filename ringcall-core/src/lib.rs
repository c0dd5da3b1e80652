//! ringcall's sans-I/O core: everything between the bytes a socket receives and the bytes it
//! sends, for one connection and for one core, with no runtime, no sockets and no clock —
//! every event carries `now`. Every backend of the `ringcall` server drives this same code,
//! and tests drive it directly, with a simulated clock.
//!
//! # Layout
//!
//! - Framing, parsing and encoding: lines are found with memchr ([`frame`]); the protocol v1
//!   envelope is read off simd-json's tape into a [`Request`]; replies are encoded with
//!   [`Reply`] (and [`HandlerError`] for errors).
//! - [`Processor`] (one per core) turns received bytes into reply bytes for a [`Session`]
//!   (one per connection), handing each request to a [`Dispatch`]: the trait the service
//!   layer implements. Replies a handler answers later ([`Deferred`]) keep their place in the
//!   connection's ordered [`Output`].
//! - [`Connection`]: every rule of one connection — backpressure, deadlines, FIN and
//!   linger, draining, TLS ([`TlsConfig`]) — as one state machine.
//! - [`Engine`]: every rule of one core — admission, hand-over, the connection table, its
//!   timers, accepting, shutdown — answering events with [`Action`]s (its module docs give
//!   the calling contract).
//! - Who may talk: [`Access`] (TLS and the token hello) and [`Acl`] (which client identity
//!   may call what).
//! - [`stats`]: the per-core counters the core bumps, merged on read.
//!
//! What is public is what a driver of the core (a backend) and the service layer use; the
//! `ringcall` crate re-exports what a service author needs.

mod access;
mod acl;
#[doc(hidden)]
pub mod bench;
mod connection;
mod deferred;
mod engine;
mod error;
pub mod frame;
mod output;
mod params;
mod reply;
mod request;
mod session;
pub mod stats;
mod tls;

#[cfg(test)]
mod testing;

pub use access::{Access, CAPABILITIES, HELLO, HelloToken, PING, TokenError};
pub use acl::{Acl, AclError};
pub use connection::{
    CloseReason, Connection, DEFAULT_DEFERRED_TIMEOUT, DEFAULT_HELLO_TIMEOUT, DEFAULT_LINE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS_PER_CORE, DEFAULT_MAX_DEFERRED, DEFAULT_MAX_DEFERRED_PER_CORE, DEFAULT_MAX_LINE,
    DEFAULT_MAX_PENDING_OUTPUT, Limits, State, Step,
};
pub use deferred::{Abandoned, Deferred, Mailbox};
pub use engine::{
    ACCEPT_BACKOFF, ACCEPT_ERROR_LOG_EVERY, Action, Decision, Engine, Handle, Interest, Listening, Phase,
};
pub use error::{HandlerError, HandlerResult};
pub use output::Output;
pub use reply::{ArrayWriter, ObjectWriter, Reply};
pub use request::{CoreContext, Request};
pub use session::{
    DIRECT_READ_MIN, Dispatch, Dispatched, Flow, LineBuf, PADDING, Processor, Responder, Session, json_error,
};
pub use tls::{ClientTls, TlsConfig, TlsError};

//! The sans-I/O core: who may talk ([`access`], [`tls`], [`acl`]), framing ([`frame`]), the
//! parsed request ([`request`]), reply encoding ([`reply`]), the per-core engine that turns
//! received bytes into reply bytes ([`session`]), deferred replies and their ordering
//! ([`deferred`]), and every rule of a connection ([`connection`]): backpressure, deadlines,
//! half-close, draining. No sockets, no runtime, no clock: every backend drives this same
//! code, and tests drive it directly.

pub mod access;
pub mod acl;
pub mod connection;
pub mod deferred;
pub mod engine;
pub mod frame;
mod params;
pub mod reply;
pub mod request;
pub mod session;
pub mod tls;

pub use access::{Access, HelloToken, TokenError};
pub use acl::{Acl, AclError};
pub use connection::{
    CloseReason, Connection, DEFAULT_LINE_TIMEOUT, DEFAULT_MAX_CONNECTIONS_PER_CORE, DEFAULT_MAX_DEFERRED,
    DEFAULT_MAX_LINE, DEFAULT_MAX_PENDING_OUTPUT, Limits, State, Step,
};
pub use deferred::{Deferred, Mailbox, Output};
pub use engine::{Action, Decision, Engine, Handle, Interest, Listening, Phase};
pub use reply::{ArrayWriter, ObjectWriter, Reply};
pub use request::{CoreContext, Request};
pub use session::{DIRECT_READ_MIN, Flow, LineBuf, PADDING, Processor, Responder, Session};
pub use tls::{ClientTls, TlsConfig, TlsError};

//! The sans-I/O protocol core: framing ([`frame`]), the parsed request ([`request`]), reply
//! encoding ([`reply`]) and the per-connection state machine ([`session`]) that turns
//! received bytes into reply bytes. No sockets, no runtime: every backend drives this same
//! code, and tests drive it directly.

pub mod frame;
pub mod reply;
pub mod request;
pub mod session;

pub use reply::{ArrayWriter, ObjectWriter, Reply};
pub use request::{CoreContext, Request};
pub use session::{
    DEFAULT_LINE_TIMEOUT, DEFAULT_MAX_CONNECTIONS_PER_CORE, DEFAULT_MAX_LINE, DEFAULT_MAX_PENDING_OUTPUT,
    Flow, Limits, PADDING, Processor, Session,
};

//! The built-in commands. `ping` (0), `stats` (1) and the token hello (2) are answered by every ringcall server
//! (cmdids below [`RESERVED_BELOW`](crate::RESERVED_BELOW) are reserved for them);
//! [`echo`] is the shipped server's cmdid 10000 (tornado-TCP's `TEST_CMDID`), and any table
//! can route it.

use crate::HandlerResult;
use crate::stats::{COUNTED_CODES, StatsSnapshot};
use ringcall_core::{ObjectWriter, Reply, Request};

/// cmdid of [`ping`].
pub const PING: u32 = ringcall_core::PING;
/// cmdid of [`stats`].
pub const STATS: u32 = 1;
/// cmdid of the token hello ([`HelloToken`](ringcall_core::HelloToken)): checked by the core
/// before a connection is admitted, answered `"hello"` afterwards and where no token is set.
pub const HELLO: u32 = ringcall_core::HELLO;
/// cmdid of [`echo`] in the shipped server.
pub const ECHO: u32 = 10000;

/// Runs the built-in command `cmdid`, if there is one.
pub(crate) fn call_builtin(cmdid: u32, request: &Request<'_, '_>, reply: Reply<'_>) -> Option<HandlerResult> {
    match cmdid {
        PING => Some(ping(request, reply)),
        STATS => Some(stats(request, reply)),
        HELLO => {
            reply.str("hello");
            Some(Ok(()))
        }
        _ => None,
    }
}

/// `0`: replies `"pong"`.
pub fn ping(_request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    reply.str("pong");
    Ok(())
}

/// `1`: per-core counters and their total.
pub fn stats(request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    let registry = request.context().stats();
    let mut object = reply.object();
    {
        let mut cores = object.array("cores");
        for (index, snapshot) in registry.per_core().enumerate() {
            let mut core = cores.object();
            core.u64("core", index as u64);
            write_snapshot(&mut core, &snapshot);
        }
    }
    write_snapshot(&mut object.object("total"), &registry.total());
    Ok(())
}

fn write_snapshot(object: &mut ObjectWriter<'_>, s: &StatsSnapshot) {
    object
        .u64("connections_open", s.connections_open)
        .u64("connections_total", s.connections_total)
        .u64("requests", s.requests)
        .u64("bytes_in", s.bytes_in)
        .u64("bytes_out", s.bytes_out)
        .u64("rejected_connections", s.rejected_connections)
        .u64("backpressure_pauses", s.backpressure_pauses)
        .u64("idle_timeouts", s.idle_timeouts)
        .u64("hello_timeouts", s.hello_timeouts)
        .u64("connections_retired", s.connections_retired)
        .u64("deferred_shed", s.deferred_shed)
        .u64("line_timeouts", s.line_timeouts)
        .u64("deferred", s.deferred)
        .u64("deferred_pending", s.deferred_pending)
        .u64("deferred_abandoned", s.deferred_abandoned)
        .u64("deadline_expired", s.deadline_expired)
        .u64("late_replies", s.late_replies);
    let mut replies = object.object("replies");
    let mut digits = itoa::Buffer::new();
    for (code, count) in COUNTED_CODES.iter().zip(s.replies) {
        replies.u64(digits.format(*code), count);
    }
    replies.u64("other", s.replies[COUNTED_CODES.len()]);
}

/// `10000`: replies with the request's `params`, byte for byte as the caller sent them.
pub fn echo(request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    reply.raw(request.params_json().as_bytes());
    Ok(())
}

//! Hooks for criterion benches (not a stable API): build a [`Request`] and a reply exactly the
//! way the core does, so one stage can be timed alone.

use simd_json::{Buffers, Tape};

use crate::reply::{begin_ok, end_ok};
use crate::request::{CoreContext, decode};
use crate::stats::StatsRegistry;
use crate::{Reply, Request};

/// Parses `line[..len]` (with padding after it) in place and runs `f` on the request, as the
/// request of core 0 of a one-core server.
///
/// # Panics
/// If the line is not a valid request.
pub fn with_request<T>(line: &mut [u8], len: usize, f: impl FnOnce(&Request<'_, '_>) -> T) -> T {
    let mut buffers = Buffers::new(len);
    let mut tape = Tape::null();
    simd_json::fill_tape_padded(line, len, &mut buffers, &mut tape).expect("valid JSON");
    let empty = Tape(vec![simd_json::Node::Object { len: 0, count: 0 }]);
    let context = CoreContext::new(0, StatsRegistry::new(1));
    let request =
        decode(&tape, &empty, &context, None).map_err(|r| r.error.to_string()).expect("valid request");
    f(&request)
}

/// [`with_request`] for any bytes: `None` when they are not JSON or not a request.
pub fn try_with_request<T>(line: &mut [u8], len: usize, f: impl FnOnce(&Request<'_, '_>) -> T) -> Option<T> {
    let mut buffers = Buffers::new(len);
    let mut tape = Tape::null();
    simd_json::fill_tape_padded(line, len, &mut buffers, &mut tape).ok()?;
    let empty = Tape(vec![simd_json::Node::Object { len: 0, count: 0 }]);
    let context = CoreContext::new(0, StatsRegistry::new(1));
    let request = decode(&tape, &empty, &context, None).ok()?;
    Some(f(&request))
}

/// A reply writer over `out`, as handlers get it.
pub fn reply(out: &mut Vec<u8>) -> Reply<'_> {
    Reply::new(out)
}

/// Encodes a whole success reply for `request` (envelope, id, the data `write` produces).
pub fn encode_ok(out: &mut Vec<u8>, request: &Request<'_, '_>, write: impl FnOnce(Reply<'_>)) {
    begin_ok(out, request.id());
    let data_start = out.len();
    write(Reply::new(out));
    end_ok(out, data_start);
}

//! Hooks for the criterion benches in `benches/` (not a stable API): build a [`Request`] and a
//! [`Reply`] exactly the way the protocol core does, so one stage can be timed alone.

use std::sync::Arc;

use simd_json::{Buffers, Tape};

use crate::dispatch::{Ctx, HandlerResult, Routes, Service};
use crate::protocol::reply::{begin_ok, end_ok};
use crate::protocol::request::{CoreContext, decode};
use crate::protocol::{Output, Reply, Request, Responder};
use crate::stats::StatsRegistry;

/// Parses `line[..len]` (with padding after it) in place and runs `f` on the request.
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

/// A service's table with one core's state, to time dispatch alone.
pub struct Dispatcher<S: Service> {
    service: Arc<S>,
    local: S::Local,
    context: CoreContext,
    out: Output,
}

impl<S: Service> Dispatcher<S> {
    /// Core 0 of `service`.
    pub fn new(service: S) -> Self {
        let local = service.local(0);
        Self {
            service: Arc::new(service),
            local,
            context: CoreContext::new(0, StatsRegistry::new(1)),
            out: Output::default(),
        }
    }

    /// Runs the table's handler for `request` (its reply replaces the last one).
    pub fn call(&mut self, cmdid: u32, request: &Request<'_, '_>) -> Option<HandlerResult> {
        self.out.clear_ready();
        let mut deferred = false;
        let stats = self.context.stats().core(0);
        let responder = Responder::new(&mut self.out, 0, stats, &mut deferred);
        let ctx = Ctx::new(&self.service, &self.local, &self.context);
        S::Routes::call(cmdid, &ctx, request, responder)
    }
}

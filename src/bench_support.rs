//! Hooks for the criterion benches in `benches/` (not a stable API): build a [`Request`] and a
//! reply exactly the way the protocol core does, so one stage can be timed alone.

use std::sync::Arc;

use crate::HandlerResult;
use crate::dispatch::{Ctx, Routes, Service, Services};
use crate::stats::StatsRegistry;
use ringcall_core::{CoreContext, Output, Request, Responder};

pub use ringcall_core::bench::{Shape, encode_ok, with_request};

pub use ringcall_core::bench::reply;

/// A service's table with one core's state, to time dispatch alone.
pub struct Dispatcher<S: Service> {
    service: Arc<S>,
    local: S::Local,
    context: CoreContext,
    services: Services,
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
            services: Services::standalone(1),
            out: Output::at(std::time::Instant::now()),
        }
    }

    /// Runs the table's handler for `request` (its reply replaces the last one).
    pub fn call(&mut self, cmdid: u32, request: &Request<'_, '_>) -> Option<HandlerResult> {
        self.out.clear_ready();
        let mut deferred = false;
        let stats = self.context.stats().core(0);
        let responder = Responder::new(&mut self.out, 0, stats, &mut deferred);
        let ctx = Ctx::new(&self.service, &self.local, &self.context, &self.services);
        S::Routes::call(cmdid, &ctx, request, responder)
    }
}

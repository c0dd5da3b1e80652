//! A dispatcher for the core's own tests: the built-in ping, an echo, and handlers that
//! answer later, without the service layer.

use std::cell::RefCell;

use crate::{Deferred, Dispatch, Dispatched, HandlerError, Request, Responder};

/// The echo's cmdid.
pub(crate) const ECHO: u32 = 10000;
/// Defers its reply; the handle waits in [`held`].
pub(crate) const LATER: u32 = 3000;
/// Defers its reply, then fails at once with a 400.
pub(crate) const DEFER_THEN_FAIL: u32 = 3001;

thread_local! {
    /// Handles of the replies deferred by [`LATER`], in request order.
    static HELD: RefCell<Vec<Deferred>> = const { RefCell::new(Vec::new()) };
}

/// The handles deferred so far on this thread, taken.
pub(crate) fn held() -> Vec<Deferred> {
    HELD.with(|held| std::mem::take(&mut *held.borrow_mut()))
}

/// Puts handles back, to be taken later.
pub(crate) fn hold(deferred: impl IntoIterator<Item = Deferred>) {
    HELD.with(|held| held.borrow_mut().extend(deferred));
}

/// Ping (0), echo ([`ECHO`]), [`LATER`] and [`DEFER_THEN_FAIL`].
pub(crate) struct TestDispatch;

impl Dispatch for TestDispatch {
    fn dispatch(&self, request: &Request<'_, '_>, responder: Responder<'_>, timed: bool) -> Dispatched {
        let started = timed.then(std::time::Instant::now);
        let result = match request.cmdid() {
            0 => {
                responder.reply().str("pong");
                Some(Ok(()))
            }
            ECHO => {
                responder.reply().value(request.params_value());
                Some(Ok(()))
            }
            LATER => {
                hold([responder.defer(request)]);
                Some(Ok(()))
            }
            DEFER_THEN_FAIL => {
                drop(responder.defer(request));
                Some(Err(HandlerError::bad_request("no such thing")))
            }
            _ => None,
        };
        Dispatched { result, ran: started.map(|at| (at, at.elapsed())) }
    }
}

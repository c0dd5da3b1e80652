//! Services and their static dispatch tables: the [`Service`] trait (a value with shared
//! state that makes per-core state on each worker), the [`Routes`] trait and the
//! [`routes!`](crate::routes) macro that implements it, the handler shapes a table accepts
//! ([`Handler`]) and the [`Ctx`] a handler sees.
//!
//! A table is a unit struct whose `call` is a `match` on the cmdid, so dispatch compiles to a
//! jump table or a few compares: no `Box<dyn>`, no `HashMap`, no allocation. The macro checks
//! the table at compile time: a duplicate cmdid, or one below [`RESERVED_BELOW`], fails the
//! build.
//!
//! A handler is a plain function of one of three shapes, picked by its signature:
//! - `fn(&Request, Reply) -> HandlerResult`: stateless, answers before it returns;
//! - `fn(&Ctx<S>, &Request, Reply) -> HandlerResult`: the same, with the service's shared and
//!   per-core state;
//! - `fn(&Ctx<S>, &Request, Deferred) -> HandlerResult`: answers later, from any thread or
//!   task, through the [`Deferred`] handle (which [`Ctx::spawn`] and [`Ctx::spawn_blocking`]
//!   complete for async and blocking work).

use std::cell::RefCell;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use crate::stats::StatsRegistry;
use crate::{HandlerError, HandlerResult};
use ringcall_core::{CoreContext, Deferred, Dispatch, Dispatched, Reply, Request, Responder};

/// cmdids below this are reserved for the built-in commands (ping, stats, …) that every
/// ringcall server answers itself.
pub const RESERVED_BELOW: u32 = 1000;

/// A service: the value a server is started with ([`ServerBuilder::start`]).
///
/// It holds what every core shares (configuration, clients, pools: `Send + Sync`), and makes
/// each worker's own state ([`local`](Self::local), called once on each worker thread, so it
/// needs neither `Send` nor a lock: use `Cell`/`RefCell` in it). Handlers reach both through
/// their [`Ctx`].
///
/// A table declared without `for` (`routes! { Name { … } }`) is itself a stateless service.
///
/// [`ServerBuilder::start`]: crate::ServerBuilder::start
pub trait Service: Send + Sync + Sized + 'static {
    /// The command table, declared with [`routes!`](crate::routes)` { Table for Self { … } }`.
    type Routes: Routes<Self>;
    /// Per-core state, made on each worker thread by [`local`](Self::local).
    type Local: 'static;

    /// Makes the state of worker `core` (0-based), on that worker's thread.
    fn local(&self, core: usize) -> Self::Local;
}

/// A compile-time dispatch table for the service `S`, normally written with
/// [`routes!`](crate::routes).
pub trait Routes<S: Service>: 'static {
    /// The cmdids this table answers, in declaration order.
    const CMDIDS: &'static [u32];

    /// Runs the handler for `cmdid`; `None` when the table has no such command.
    fn call(
        cmdid: u32,
        ctx: &Ctx<'_, S>,
        request: &Request<'_, '_>,
        responder: Responder<'_>,
    ) -> Option<HandlerResult>;
}

/// Where a core's handlers run their async, blocking and durable work.
#[derive(Debug)]
pub(crate) struct Services {
    exec: Arc<crate::exec::Executors>,
    /// On a backend that runs durable appends on its own ring: the files with appends to
    /// start. `None`: each file runs them on a thread of its own.
    durable_ring: Option<RefCell<Vec<Arc<crate::durable::Shared>>>>,
}

impl Services {
    /// Executors of their own, for `cores` cores (a server shares one set between its cores).
    pub(crate) fn standalone(cores: usize) -> Self {
        let exec = crate::exec::Executors::new(crate::exec::ExecConfig::default(), cores);
        Self { exec, durable_ring: None }
    }
}

/// A service's side of the core: the [`Dispatch`] a core's
/// [`Processor`](ringcall_core::Processor) hands each request to. It answers the built-in
/// commands (ping, stats, the hello) itself and the rest from the service's table, with this
/// core's state ([`Service::local`]); it times the handler when asked and turns a panic
/// into a 500.
pub struct Dispatcher<S: Service> {
    service: Arc<S>,
    local: S::Local,
    services: Services,
}

impl<S: Service> std::fmt::Debug for Dispatcher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

impl<S: Service> Dispatcher<S> {
    /// The dispatcher of core `core` of a server with `cores` cores: makes the core's state
    /// ([`Service::local`]) on the calling thread; async and blocking work runs on executors
    /// of its own.
    pub fn new(core: usize, cores: usize, service: Arc<S>) -> Self {
        let local = service.local(core);
        Self { service, local, services: Services::standalone(cores) }
    }

    /// Runs async and blocking work on `exec` (the server's).
    pub(crate) fn with_executors(mut self, exec: Arc<crate::exec::Executors>) -> Self {
        self.services.exec = exec;
        self
    }

    /// Durable appends run on the backend's ring, which takes the files to drive with
    /// [`take_durable_kicks`](Self::take_durable_kicks) after each batch of events.
    pub(crate) fn with_durable_ring(mut self) -> Self {
        self.services.durable_ring = Some(RefCell::new(Vec::new()));
        self
    }

    /// Moves the files with appends to start into `into`.
    pub(crate) fn take_durable_kicks(&self, into: &mut Vec<Arc<crate::durable::Shared>>) {
        if let Some(kicks) = &self.services.durable_ring {
            into.append(&mut kicks.borrow_mut());
        }
    }
}

impl<S: Service> Dispatch for Dispatcher<S> {
    #[inline]
    fn dispatch(&self, request: &Request<'_, '_>, responder: Responder<'_>, timed: bool) -> Dispatched {
        let cmdid = request.cmdid();
        let started = timed.then(Instant::now);
        let result = catch_unwind(AssertUnwindSafe(|| {
            if cmdid < RESERVED_BELOW {
                crate::handlers::call_builtin(cmdid, request, responder.reply())
            } else {
                let ctx = Ctx::new(&self.service, &self.local, request.context(), &self.services);
                S::Routes::call(cmdid, &ctx, request, responder)
            }
        }))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("non-string panic payload");
            tracing::error!(cmdid, core = request.context().core(), "handler panicked: {what}");
            Some(Err(HandlerError::internal(format!("handler for cmdid {cmdid} panicked"))))
        });
        Dispatched { result, ran: started.map(|at| (at, at.elapsed())) }
    }
}

/// What a handler sees besides its request: the service, this core's state, the core's
/// index and counters, and where to run async and blocking work.
pub struct Ctx<'a, S: Service> {
    service: &'a Arc<S>,
    local: &'a S::Local,
    core: &'a CoreContext,
    services: &'a Services,
}

impl<'a, S: Service> Ctx<'a, S> {
    pub(crate) fn new(
        service: &'a Arc<S>,
        local: &'a S::Local,
        core: &'a CoreContext,
        services: &'a Services,
    ) -> Self {
        Self { service, local, core, services }
    }

    /// The service value the server was started with (shared by every core).
    pub fn service(&self) -> &'a S {
        self.service
    }

    /// The service value as a shared handle, to move into async or blocking work.
    pub fn service_arc(&self) -> std::sync::Arc<S> {
        self.service.clone()
    }

    /// This core's state (made by [`Service::local`] on this worker thread).
    pub fn local(&self) -> &'a S::Local {
        self.local
    }

    /// Index of the core (worker thread) serving this request.
    pub fn core(&self) -> usize {
        self.core.core()
    }

    /// The counters of every core of this server.
    pub fn stats(&self) -> &'a StatsRegistry {
        self.core.stats()
    }

    /// Answers `deferred` with what `work` returns, run as a tokio task: on this core's own
    /// runtime on the tokio backends, on the server's async runtime on `uring` (see
    /// [`ExecConfig`](crate::ExecConfig)). The core goes on serving while it runs. If the request set
    /// `timeout_ms`, the task is dropped when it passes (the caller gets a 504); if nobody
    /// waits for the answer any more (the connection closed, or the core answered 503 because
    /// too many deferred replies were pending), it is dropped at once: an upstream call in it
    /// is cancelled, not left to run for a caller that is gone.
    pub fn spawn<T, F>(&self, deferred: Deferred, work: F)
    where
        T: serde::Serialize + Send + 'static,
        F: std::future::Future<Output = Result<T, HandlerError>> + Send + 'static,
    {
        let abandoned = deferred.abandoned();
        self.services.exec.async_handle().spawn(async move {
            let deadline = deferred.deadline();
            let work = async move {
                match deadline {
                    Some(at) => tokio::time::timeout_at(at.into(), work).await.ok(),
                    None => Some(work.await),
                }
            };
            tokio::select! {
                biased;
                // Nobody waits for the answer (the connection closed, or the core shed the
                // request): the work is dropped where it stands.
                () = abandoned => tracing::debug!(cmdid = deferred.cmdid(), "async work cancelled: its connection is gone"),
                done = work => match done {
                    Some(result) => deferred.finish(result),
                    None => deferred.expire(),
                },
            }
        });
    }

    /// Appends `bytes` to `file` and answers `deferred` with where they lie
    /// ([`Appended`](crate::durable::Appended)) once they are on disk: group-committed, on
    /// this core's ring on `uring`, on the file's own thread elsewhere (see
    /// [`durable`](crate::durable)). A failed write or sync answers 500.
    pub fn append(&self, file: &crate::durable::AppendFile, bytes: &[u8], deferred: Deferred) {
        match &self.services.durable_ring {
            Some(kicks) => {
                let shared = file.shared();
                let mut commit = crate::durable::lock(&shared.commit);
                commit.append(bytes, deferred);
                if !commit.busy() && !shared.queued.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    kicks.borrow_mut().push(shared.clone());
                }
            }
            None => file.append_threaded(bytes, deferred),
        }
    }

    /// Answers `deferred` with what `work` returns, run on the server's bounded blocking pool
    /// (CPU-heavy or blocking work: image processing, a synchronous library). When the
    /// pool's queue is full the request is answered 503 at once; when the request's
    /// `timeout_ms` passes before a thread takes the job, or its connection closes, the job is
    /// skipped. A panic in `work` answers 500.
    pub fn spawn_blocking<T, F>(&self, deferred: Deferred, work: F)
    where
        T: serde::Serialize + 'static,
        F: FnOnce() -> Result<T, HandlerError> + Send + 'static,
    {
        let work = Box::new(move |deferred: Deferred| {
            let cmdid = deferred.cmdid();
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
                Ok(result) => deferred.finish(result),
                Err(_) => {
                    tracing::error!(cmdid, "blocking work panicked");
                    deferred.error(HandlerError::internal(format!("handler for cmdid {cmdid} panicked")));
                }
            }
        });
        self.services.exec.run_blocking(crate::exec::Job { deferred, work });
    }
}

/// Marker types that tell the handler shapes apart (see [`Handler`]).
pub mod shape {
    /// `fn(&Request, Reply) -> HandlerResult`.
    #[derive(Debug)]
    pub struct Plain;
    /// `fn(&Ctx<S>, &Request, Reply) -> HandlerResult`.
    #[derive(Debug)]
    pub struct WithCtx;
    /// `fn(&Ctx<S>, &Request, Deferred) -> HandlerResult`.
    #[derive(Debug)]
    pub struct Deferring;
}

/// A function [`routes!`](crate::routes) can put in a table of service `S`; `Shape` is one
/// of the [`shape`] markers, inferred from the function's signature.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a handler `routes!` can call",
    label = "not one of the handler shapes",
    note = "a handler is one of: `fn(&Request, Reply) -> HandlerResult`, \
            `fn(&Ctx<S>, &Request, Reply) -> HandlerResult` (with the service's state), or \
            `fn(&Ctx<S>, &Request, Deferred) -> HandlerResult` (answering later)",
    note = "in a table declared `routes! {{ Table for MyService {{ … }} }}`, `S` is `MyService`; \
            in `routes! {{ Name {{ … }} }}`, `S` is `Name` itself"
)]
pub trait Handler<S: Service, Shape> {
    /// Runs the handler.
    fn call(&self, ctx: &Ctx<'_, S>, request: &Request<'_, '_>, responder: Responder<'_>) -> HandlerResult;
}

impl<S: Service, F> Handler<S, shape::Plain> for F
where
    F: Fn(&Request<'_, '_>, Reply<'_>) -> HandlerResult,
{
    #[inline]
    fn call(&self, _: &Ctx<'_, S>, request: &Request<'_, '_>, responder: Responder<'_>) -> HandlerResult {
        self(request, responder.reply())
    }
}

impl<S: Service, F> Handler<S, shape::WithCtx> for F
where
    F: Fn(&Ctx<'_, S>, &Request<'_, '_>, Reply<'_>) -> HandlerResult,
{
    #[inline]
    fn call(&self, ctx: &Ctx<'_, S>, request: &Request<'_, '_>, responder: Responder<'_>) -> HandlerResult {
        self(ctx, request, responder.reply())
    }
}

impl<S: Service, F> Handler<S, shape::Deferring> for F
where
    F: Fn(&Ctx<'_, S>, &Request<'_, '_>, Deferred) -> HandlerResult,
{
    #[inline]
    fn call(&self, ctx: &Ctx<'_, S>, request: &Request<'_, '_>, responder: Responder<'_>) -> HandlerResult {
        let deferred = responder.defer(request);
        self(ctx, request, deferred)
    }
}

/// Runs `handler` as the table's entry (what [`routes!`](crate::routes) expands to).
#[doc(hidden)]
#[inline(always)]
pub fn call_handler<S: Service, Shape, H: Handler<S, Shape>>(
    handler: H,
    ctx: &Ctx<'_, S>,
    request: &Request<'_, '_>,
    responder: Responder<'_>,
) -> HandlerResult {
    handler.call(ctx, request, responder)
}

/// A table with no commands: a server that answers only the built-ins.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRoutes;

impl Service for NoRoutes {
    type Routes = NoRoutes;
    type Local = ();

    fn local(&self, _: usize) {}
}

impl Routes<NoRoutes> for NoRoutes {
    const CMDIDS: &'static [u32] = &[];

    fn call(_: u32, _: &Ctx<'_, NoRoutes>, _: &Request<'_, '_>, _: Responder<'_>) -> Option<HandlerResult> {
        None
    }
}

/// Compile-time check behind [`routes!`](crate::routes): panics (a build error in a `const`)
/// on a duplicate or reserved cmdid.
pub const fn check_cmdids(cmdids: &[u32]) {
    let mut i = 0;
    while i < cmdids.len() {
        assert!(
            cmdids[i] >= RESERVED_BELOW,
            "routes!: cmdids below 1000 are reserved for ringcall's built-in commands"
        );
        let mut j = i + 1;
        while j < cmdids.len() {
            assert!(cmdids[i] != cmdids[j], "routes!: duplicate cmdid in the table");
            j += 1;
        }
        i += 1;
    }
}

/// Declares a static dispatch table: a unit struct implementing [`Routes`].
///
/// `routes! { Name { cmdid => handler, … } }` declares a stateless service: `Name` is both the
/// table and the [`Service`] a server starts with (`start(Name)`). Its handlers take
/// `(&Request, Reply)`, or `(&Ctx<Name>, &Request, Reply)`, or `(&Ctx<Name>, &Request,
/// Deferred)`.
///
/// ```
/// use ringcall::{HandlerResult, Reply, Request};
///
/// fn hello(_req: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
///     reply.str("hello");
///     Ok(())
/// }
///
/// ringcall::routes! {
///     /// My service's commands.
///     pub MyService {
///         2000 => hello,
///         10000 => ringcall::handlers::echo,
///     }
/// }
/// ```
///
/// `routes! { Table for MyService { … } }` declares the table of a service with state; the
/// service names it as its `Routes`:
///
/// ```
/// use std::cell::Cell;
/// use ringcall::{Ctx, HandlerResult, Reply, Request, Service};
///
/// struct Counter { step: u64 }
///
/// impl Service for Counter {
///     type Routes = CounterRoutes;
///     type Local = Cell<u64>;
///     fn local(&self, _core: usize) -> Cell<u64> { Cell::new(0) }
/// }
///
/// fn bump(ctx: &Ctx<'_, Counter>, _req: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
///     let n = ctx.local().get() + ctx.service().step;
///     ctx.local().set(n);
///     reply.u64(n);
///     Ok(())
/// }
///
/// ringcall::routes! { CounterRoutes for Counter { 2000 => bump } }
/// ```
///
/// A duplicate cmdid does not compile:
///
/// ```compile_fail
/// # use ringcall::{HandlerResult, Reply, Request};
/// # fn a(_: &Request<'_, '_>, _: Reply<'_>) -> HandlerResult { Ok(()) }
/// ringcall::routes! { Twice { 2000 => a, 2000 => a } }
/// ```
///
/// Nor does a cmdid in the reserved range below 1000:
///
/// ```compile_fail
/// # use ringcall::{HandlerResult, Reply, Request};
/// # fn a(_: &Request<'_, '_>, _: Reply<'_>) -> HandlerResult { Ok(()) }
/// ringcall::routes! { Reserved { 7 => a } }
/// ```
///
/// Nor does a function of no handler shape:
///
/// ```compile_fail
/// # use ringcall::{HandlerResult, Reply, Request};
/// fn wrong(_: &Request<'_, '_>) -> HandlerResult { Ok(()) }
/// ringcall::routes! { Wrong { 2000 => wrong } }
/// ```
#[macro_export]
macro_rules! routes {
    ($(#[$meta:meta])* $vis:vis $name:ident for $service:ty { $($cmdid:literal => $handler:path),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default)]
        $vis struct $name;

        $crate::routes!(@table $name, $service, $($cmdid => $handler),*);
    };
    ($(#[$meta:meta])* $vis:vis $name:ident { $($cmdid:literal => $handler:path),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default)]
        $vis struct $name;

        impl $crate::__private::Service for $name {
            type Routes = $name;
            type Local = ();

            fn local(&self, _core: usize) {}
        }

        $crate::routes!(@table $name, $name, $($cmdid => $handler),*);
    };
    (@table $name:ident, $service:ty, $($cmdid:literal => $handler:path),*) => {
        impl $crate::__private::Routes<$service> for $name {
            const CMDIDS: &'static [u32] = &[$($cmdid),*];

            #[inline]
            #[deny(unreachable_patterns)]
            fn call(
                cmdid: u32,
                ctx: &$crate::__private::Ctx<'_, $service>,
                request: &$crate::__private::Request<'_, '_>,
                responder: $crate::__private::Responder<'_>,
            ) -> ::core::option::Option<$crate::__private::HandlerResult> {
                match cmdid {
                    $($cmdid => ::core::option::Option::Some(
                        $crate::__private::call_handler($handler, ctx, request, responder)
                    ),)*
                    _ => ::core::option::Option::None,
                }
            }
        }

        const _: () = $crate::__private::check_cmdids(
            <$name as $crate::__private::Routes<$service>>::CMDIDS,
        );
    };
}

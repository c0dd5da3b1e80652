//! The per-core driver the tokio-based backends share (`epoll`, `epoll-mt`, `tokio-uring`):
//! it carries out the [`Engine`]'s actions with tokio's tools. One task accepts (and on the
//! stop signal takes in the backlog, stops, and waits for the connections to drain), one
//! task sleeps until the engine's next timeout, and each connection is a task of its
//! backend's that owns its [`Connection`](ringcall_core::Connection) and asks the engine
//! what to do after every event ([`Core::drive`]). A connection's task is woken through its
//! engine waker (a [`Notify`]) when the engine has something for it: a deadline, the drain
//! notice; on that wake-up it gives the connection the time (`on_timeout` acts only on
//! deadlines that passed).
//!
//! Where the engine lives is the backend's choice ([`CoreAccess`]): in the core's thread for
//! the current-thread runtimes, behind a lock for `epoll-mt`, whose tasks move between
//! threads (the lock is taken once per event, never held across an await).

use std::cell::RefCell;
use std::io;
use std::marker::PhantomData;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::balance::Balancer;
use super::worker::{WorkerError, WorkerSetup};
use super::{RECV_BUF_SIZE, sys};
use crate::dispatch::{Dispatcher, Service};
use crate::stats::StatsRegistry;
use ringcall_core::{
    Action, Connection, Decision, Engine, Handle, Interest, Limits, Listening, PADDING, Processor,
};

/// How the engine wakes a connection's task.
pub(crate) type Waker = Arc<Notify>;

/// The engine of a tokio-based core.
pub(crate) type CoreEngine = Engine<Waker>;

/// One core's protocol processor and its receive buffer.
pub(crate) struct CoreIo<S: Service> {
    pub processor: Processor<Dispatcher<S>>,
    pub buf: Box<[u8]>,
}

impl<S: Service> CoreIo<S> {
    pub(crate) fn new(
        core: usize,
        service: Arc<S>,
        exec: Arc<crate::exec::Executors>,
        access: ringcall_core::Access,
        stats: Arc<StatsRegistry>,
        limits: Limits,
    ) -> Self {
        Self {
            processor: Processor::new(
                core,
                Dispatcher::new(core, stats.cores(), service).with_executors(exec),
                stats,
                limits,
            )
            .with_access(access),
            buf: vec![0; RECV_BUF_SIZE + PADDING].into(),
        }
    }
}

/// How a task reaches the processor of the thread it runs on, and its core's engine.
pub(crate) trait CoreAccess<S: Service>: Clone + 'static {
    fn with<T>(&self, f: impl FnOnce(&mut CoreIo<S>) -> T) -> T;
    fn engine<T>(&self, f: impl FnOnce(&mut CoreEngine) -> T) -> T;
}

/// A core's processor and engine on a current-thread runtime, shared by its tasks.
pub(crate) struct LocalCore<S: Service> {
    io: Rc<RefCell<CoreIo<S>>>,
    engine: Rc<RefCell<CoreEngine>>,
}

impl<S: Service> LocalCore<S> {
    pub(crate) fn new(io: CoreIo<S>, engine: CoreEngine) -> Self {
        Self { io: Rc::new(RefCell::new(io)), engine: Rc::new(RefCell::new(engine)) }
    }
}

impl<S: Service> Clone for LocalCore<S> {
    fn clone(&self) -> Self {
        Self { io: self.io.clone(), engine: self.engine.clone() }
    }
}

impl<S: Service> CoreAccess<S> for LocalCore<S> {
    fn with<T>(&self, f: impl FnOnce(&mut CoreIo<S>) -> T) -> T {
        f(&mut self.io.borrow_mut())
    }

    fn engine<T>(&self, f: impl FnOnce(&mut CoreEngine) -> T) -> T {
        f(&mut self.engine.borrow_mut())
    }
}

/// A connected socket of a tokio-based backend.
pub(crate) trait Socket: Sized + 'static {
    fn fd(&self) -> BorrowedFd<'_>;
    /// Registers a descriptor (from the backlog, or another core) with this runtime.
    fn from_fd(fd: OwnedFd) -> io::Result<Self>;
    /// Takes the descriptor out of this runtime (to hand it to another core).
    fn into_fd(self) -> io::Result<OwnedFd>;
}

/// The listener of a tokio-based backend.
pub(crate) trait Listen: 'static {
    type Stream: Socket;
    fn fd(&self) -> BorrowedFd<'_>;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Stream>>;
}

/// What the core's tasks share besides the engine: how they wake each other.
#[derive(Default)]
struct Signals {
    /// The engine's next timeout moved earlier: the timer task sleeps again.
    timer_moved: Notify,
    /// The engine asks to accept again, or to stop accepting.
    accepting: Notify,
    /// A connection was released.
    released: Notify,
}

/// A core of a tokio-based backend: its engine and processors, and its tasks' signals.
pub(crate) struct Core<S: Service, A> {
    pub access: A,
    signals: Arc<Signals>,
    _service: PhantomData<fn() -> S>,
}

impl<S: Service, A: Clone> Clone for Core<S, A> {
    fn clone(&self) -> Self {
        Self { access: self.access.clone(), signals: self.signals.clone(), _service: PhantomData }
    }
}

impl<S: Service, A: CoreAccess<S>> Core<S, A> {
    /// Asks the engine what `conn` wants after an event (see [`Engine::drive`]).
    pub(crate) fn drive(
        &self,
        handle: Handle,
        conn: &mut Connection,
        now: Instant,
        unread: impl FnOnce() -> Option<usize>,
    ) -> Interest {
        // The processor, then the engine: the order `release` takes them in too.
        self.access
            .with(|io| self.update(|engine| engine.drive(handle, conn, &mut io.processor, now, unread)))
    }

    /// Runs `f` on the engine; if that moved its next timeout earlier (a connection's
    /// deadline, the accept back-off, the shutdown deadline), the timer task sleeps again.
    fn update<T>(&self, f: impl FnOnce(&mut CoreEngine) -> T) -> T {
        let (value, moved) = self.access.engine(|engine| {
            let value = f(engine);
            (value, engine.take_timer_moved())
        });
        if moved {
            self.signals.timer_moved.notify_one();
        }
        value
    }

    /// The engine woke the connection's task: a deadline may have passed.
    pub(crate) fn woken(&self, conn: &mut Connection, now: Instant) {
        self.access.with(|io| conn.on_timeout(now, io.processor.stats()));
    }

    /// The connection's task is done with its socket.
    pub(crate) fn release(&self, handle: Handle, conn: Connection) {
        self.access
            .with(|io| self.access.engine(|engine| engine.release(handle, conn, io.processor.stats())));
        self.signals.released.notify_waiters();
    }

    /// Wakes the tasks the engine's actions are for; the listener's own (accepting on or off,
    /// the backlog) are the accept task's, given to `listener`.
    fn run_actions(&self, mut listener: impl FnMut(Action)) {
        while let Some(action) = self.access.engine(CoreEngine::poll_action) {
            match action {
                Action::Timeout(handle) | Action::Drive(handle) => {
                    if let Some(waker) = self.access.engine(|engine| engine.waker(handle).cloned()) {
                        waker.notify_one();
                    }
                }
                Action::StartAccepting | Action::StopAccepting | Action::TakeBacklog => listener(action),
            }
        }
    }

    /// Decides on a connection and starts its task; `fd` gives its descriptor if it must be
    /// handed over (the stream is then dropped from this runtime).
    fn decide<St: Socket>(
        &self,
        decision: Decision,
        stream: St,
        balancer: Option<&Balancer>,
        spawn: &impl Fn(St, Handle, Waker, Self),
    ) {
        match decision {
            Decision::Serve(handle) => {
                let waker =
                    self.access.engine(|engine| engine.waker(handle).cloned()).expect("just admitted");
                spawn(stream, handle, waker, self.clone());
            }
            Decision::Refuse(line) => sys::refuse(stream.fd(), line),
            Decision::HandOver(target) => {
                let balancer = balancer.expect("a hand-over needs a balancer");
                // Handed over as a plain socket, out of this runtime.
                match stream.into_fd() {
                    Ok(fd) => {
                        if let Some(fd) = balancer.hand_over(target, fd) {
                            self.admit_fd(fd, balancer.into(), spawn);
                        }
                    }
                    Err(e) => tracing::debug!("cannot hand a connection over: {e}"),
                }
            }
        }
    }

    /// Serves a connection from another core or the backlog, or refuses it at the limit.
    fn admit_fd<St: Socket>(
        &self,
        fd: OwnedFd,
        balancer: Option<&Balancer>,
        spawn: &impl Fn(St, Handle, Waker, Self),
    ) {
        match St::from_fd(fd) {
            Ok(stream) => {
                let decision = self.access.with(|io| {
                    let stats = io.processor.stats();
                    self.access.engine(|engine| engine.admit(Instant::now(), stats, Waker::default))
                });
                self.decide(decision, stream, balancer, spawn);
            }
            Err(e) => tracing::debug!("cannot register a connection: {e}"),
        }
    }
}

/// Returns once `done` holds, asking again at each notification of `notify` (armed before
/// each ask, so a notification sent after `done` looked is not lost).
async fn until(notify: &Notify, mut done: impl FnMut() -> bool) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}

/// The body of a tokio-based worker: reports readiness, then runs three loops on one task
/// until the core has drained — accepting, the engine's timers, and the stop signal with
/// connections other cores hand over. `make_access` builds how tasks reach the core's
/// processors and its engine, `make_listener` registers the listener with the runtime; `spawn` starts a connection's task on the backend's runtime.
///
/// The accept loop's `accept` is never raced against anything (dropping a tokio-uring
/// operation does not cancel it, and would leak the descriptor it brings): to stop it, the
/// listener's read side is shut down, after the backlog was taken in.
pub(crate) async fn serve_worker<S, A, L>(
    setup: WorkerSetup,
    make_listener: impl FnOnce(OwnedFd) -> io::Result<L>,
    make_access: impl FnOnce(usize, Arc<StatsRegistry>, Limits, CoreEngine) -> A,
    spawn: impl Fn(L::Stream, Handle, Waker, Core<S, A>),
) where
    S: Service,
    A: CoreAccess<S>,
    L: Listen,
{
    let tls = setup.access.tls.is_some();
    let WorkerSetup { core: index, listener, config, stats, stop, ready, balancer, .. } = setup;
    let listener = match make_listener(listener) {
        Ok(listener) => listener,
        Err(source) => {
            let _ = ready.send(Err(WorkerError::Io { what: "cannot register the listener", source }));
            return;
        }
    };
    let mut engine = Engine::new(index, config.limits.max_connections_per_core, config.shutdown_timeout);
    if tls {
        engine.refuse_in_band();
    }
    let core: Core<S, A> = Core {
        access: make_access(index, stats, config.limits, engine),
        signals: Arc::new(Signals::default()),
        _service: PhantomData,
    };
    let handed = Arc::new(Notify::new());
    if let Some(balancer) = &balancer {
        let handed = handed.clone();
        balancer.serve(index, move || handed.notify_one());
    }
    let _ = ready.send(Ok(()));
    drop(ready);
    let balancer = balancer.as_deref();
    let spawn = &spawn;
    let listener = &listener;
    // The listener's actions: wake the accept loop (after a back-off), or take in the
    // backlog and stop it.
    let on_listener_action = |action: Action| match action {
        Action::StartAccepting => core.signals.accepting.notify_one(),
        Action::TakeBacklog => {
            // Connections the kernel already established may carry requests: serve them too.
            if sys::set_nonblocking(listener.fd()).is_ok() {
                sys::accept_backlog(listener.fd(), |fd| core.admit_fd::<L::Stream>(fd, None, spawn));
            }
            for fd in balancer.map(|b| b.stop(index)).unwrap_or_default() {
                core.admit_fd::<L::Stream>(fd, None, spawn);
            }
        }
        Action::StopAccepting => {
            // Ends the pending accept (with an error the accept loop takes for the end).
            sys::shutdown(listener.fd(), std::net::Shutdown::Read);
            core.signals.accepting.notify_one();
        }
        Action::Timeout(_) | Action::Drive(_) => {}
    };
    let accepting = async {
        loop {
            match core.access.engine(|engine| engine.listening()) {
                Listening::Accepting => {}
                Listening::BackingOff => {
                    core.signals.accepting.notified().await;
                    continue;
                }
                Listening::Stopping | Listening::Stopped => break,
            }
            match listener.accept().await {
                Ok(stream) => {
                    let target = balancer.map(|b| b.target(index));
                    let decision = core.access.with(|io| {
                        let stats = io.processor.stats();
                        core.access.engine(|engine| {
                            engine.on_accepted(Instant::now(), target, stats, Waker::default)
                        })
                    });
                    core.decide(decision, stream, balancer, spawn);
                }
                Err(e) => {
                    let listening = core.access.engine(|engine| engine.listening());
                    if listening == Listening::Accepting {
                        core.update(|engine| engine.on_accept_failed(Instant::now(), &e));
                    }
                }
            }
            core.run_actions(on_listener_action);
        }
        core.access.engine(CoreEngine::accept_stopped);
    };
    let mut stop = stop.subscribe();
    let control = async {
        loop {
            tokio::select! {
                // The guard `wait_for` returns is dropped inside, so this future stays Send.
                () = async { drop(stop.wait_for(|stopping| *stopping).await) } => {
                    core.update(|engine| engine.on_shutdown(Instant::now()));
                    core.run_actions(on_listener_action);
                    return;
                }
                () = handed.notified(), if balancer.is_some() => {
                    for fd in balancer.map(|b| b.take(index)).unwrap_or_default() {
                        core.admit_fd::<L::Stream>(fd, balancer, spawn);
                    }
                    core.run_actions(on_listener_action);
                }
            }
        }
    };
    let timers = async {
        loop {
            let moved = core.signals.timer_moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            match core.access.engine(|engine| engine.poll_timeout()) {
                Some(at) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at.into()) => {}
                        () = moved => continue,
                    }
                }
                None => {
                    moved.await;
                    continue;
                }
            }
            core.access.engine(|engine| engine.on_timeout(Instant::now()));
            core.run_actions(on_listener_action);
        }
    };
    let drained = until(&core.signals.released, || core.access.engine(|engine| engine.finished()));
    let until_drained = async {
        tokio::join!(accepting, control);
        // Every connection closes by its shutdown deadline at the latest; this is a backstop.
        let backstop = config.shutdown_timeout + Duration::from_secs(1);
        if tokio::time::timeout(backstop, drained).await.is_err() {
            let left = core.access.engine(|engine| engine.len());
            tracing::warn!(
                core = index,
                connections = left,
                "shutdown deadline passed with connections still open"
            );
        }
    };
    tokio::select! {
        () = until_drained => {}
        () = timers => {}
    }
}

//! Every per-core rule, for every backend: which connections a core takes (admission and the
//! 503 refusal, hand-over to a less loaded core), its table of connections with generations,
//! its timers, accepting and backing off after accept errors, and shutdown — taking in the
//! backlog, the drain notice, "may this connection send FIN yet", the deadline.
//!
//! The [`Engine`] performs no I/O and reads no clock, in the manner of quinn-proto's
//! `Endpoint`: it sits above the per-connection machine ([`Connection`]) and answers events
//! that carry `now` with [`Action`]s and per-connection [`Interest`]s that a backend turns
//! into system calls. The connections themselves are owned by the backend (a `uring` worker
//! keeps them beside their operations in flight, a tokio backend in their tasks); the engine
//! owns their handles and what the core knows of each. `W` is the backend's way of waking a
//! connection's task (`()` where one loop drives every connection).
//!
//! # Calling contract
//!
//! A driver (one per core, or per listener where tasks move between threads) calls:
//!
//! 1. On a connection from its listener, [`on_accepted`](Engine::on_accepted) with the core
//!    a balancer would hand it to; on one taken in from another core, from the backlog at
//!    shutdown, or handed back by a core that refused it, [`admit`](Engine::admit). The
//!    [`Decision`] says: serve it under a new [`Handle`] (open a [`Connection`] for it and
//!    [`drive`](Engine::drive) it), send it the refusal line and close it, or hand it over.
//!    A failed accept goes to [`on_accept_failed`](Engine::on_accept_failed).
//! 2. After feeding a connection an event (bytes received, bytes sent, the peer's FIN, an
//!    error, deferred answers), [`drive`](Engine::drive) it: the [`Interest`] says whether to
//!    read, to send, to shut the write side down, or to close. `drive` is also where a drain
//!    notice reaches a connection and its deadline enters the timer table. A driver that
//!    cannot count the kernel's unread bytes yet (completions still to handle) answers
//!    `None` and, once settled, drives what [`take_unsettled`](Engine::take_unsettled) lists.
//! 3. Before waiting, [`poll_timeout`](Engine::poll_timeout): wake no later than that. After
//!    waking at `now`, [`on_timeout`](Engine::on_timeout).
//! 4. On the server's stop signal, [`on_shutdown`](Engine::on_shutdown).
//! 5. After any of these, [`poll_action`](Engine::poll_action) until `None`, and carry each
//!    [`Action`] out: a connection's timer fired ([`on_conn_timeout`](Engine::on_conn_timeout)
//!    then `drive`), a connection to drive again, accepting on or off, the backlog to take in.
//!    When accepting has stopped (a cancel completed), [`accept_stopped`](Engine::accept_stopped).
//! 6. Once a connection's `Interest` said close and no operation on it is in flight,
//!    [`release`](Engine::release) it. The driver may return when [`finished`](Engine::finished).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use slab::Slab;

use super::connection::{CloseReason, Connection, Step};
use super::reply::TOO_MANY_CONNECTIONS;
use super::session::{Dispatch, Processor};
use crate::stats::CoreStats;

/// Pause before accepting again after an accept error such as EMFILE, so it cannot spin.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// While accept keeps failing (descriptors exhausted), at most one warning per this long.
pub const ACCEPT_ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// A connection of this engine: an index into its table and the generation of the entry,
/// so that an event for a connection that closed is never taken for the one that reused its
/// place (24 bits of generation fit a `uring` operation's `user_data`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Handle {
    index: u32,
    generation: u32,
}

impl Handle {
    /// Generations wrap within 24 bits.
    pub const GENERATION_BITS: u32 = 24;

    /// The place in the engine's table (dense: backends index their own tables with it).
    pub fn index(self) -> usize {
        self.index as usize
    }

    /// The generation of that place.
    pub fn generation(self) -> u32 {
        self.generation
    }

    /// The handle made of an index and a generation (as carried through a kernel operation).
    pub fn from_parts(index: usize, generation: u32) -> Self {
        Self { index: index as u32, generation }
    }
}

/// What to do with a socket the listener gave or another core handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Serve it under this handle.
    Serve(Handle),
    /// Send it this one reply line (a 503), then close it: the core is at its limit. (Empty
    /// on a TLS port whose places for in-band refusals are taken too: just close it.)
    Refuse(&'static [u8]),
    /// Hand it to this core, which holds fewer connections; if that core takes none, call
    /// [`Engine::admit`].
    HandOver(usize),
}

/// Where the core is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepting and serving.
    Serving,
    /// Shutting down: connections drain until `deadline`, then whatever is left is closed.
    Draining {
        /// When the last connections are closed.
        deadline: Instant,
    },
}

/// The listener's accepting, as the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listening {
    /// Accepting (a `uring` multishot accept is armed, a tokio accept loop runs).
    Accepting,
    /// An accept failed; accepting resumes at the `AcceptRetry` timer.
    BackingOff,
    /// Shutting down: the driver was told to stop and has not confirmed yet.
    Stopping,
    /// Not accepting any more.
    Stopped,
}

/// What the driver must do, from [`Engine::poll_action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The connection's deadline came: call [`Engine::on_conn_timeout`], then drive it.
    Timeout(Handle),
    /// Something outside the connection's own I/O changed it (the drain notice): drive it.
    Drive(Handle),
    /// Accept again (after a back-off).
    StartAccepting,
    /// Stop accepting; confirm with [`Engine::accept_stopped`] once no accept is pending.
    StopAccepting,
    /// Take in every connection the kernel already established on the listener (and those
    /// other cores handed over): they may carry requests owed a reply. Each goes through
    /// [`Engine::admit`].
    TakeBacklog,
}

/// What a connection asks of its driver, from [`Engine::drive`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interest {
    /// FIN, close, or nothing beyond reading and sending.
    pub step: Step,
    /// A read should be outstanding.
    pub read: bool,
    /// The rest of a long line should be read straight into its buffer
    /// ([`Connection::lend_line`]) rather than into pooled buffers.
    pub line_read: bool,
    /// Replies wait to be sent and no send is in flight.
    pub send: bool,
    /// The send is a TLS handshake's flight: send it now, not at the end of the turn.
    pub urgent: bool,
}

/// The per-core timers, one entry each (connections' deadlines live in their own queue).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CoreTimer {
    /// Accept again after a failure.
    AcceptRetry = 0,
    /// The shutdown deadline: log what it closes.
    ShutdownDeadline = 1,
}

impl CoreTimer {
    const ALL: [CoreTimer; 2] = [CoreTimer::AcceptRetry, CoreTimer::ShutdownDeadline];
}

/// An enum-indexed table of the core's timers.
#[derive(Debug, Default)]
struct TimerTable([Option<Instant>; CoreTimer::ALL.len()]);

impl TimerTable {
    fn set(&mut self, timer: CoreTimer, at: Instant) {
        self.0[timer as usize] = Some(at);
    }

    fn stop(&mut self, timer: CoreTimer) {
        self.0[timer as usize] = None;
    }

    fn next(&self) -> Option<Instant> {
        self.0.iter().flatten().min().copied()
    }

    /// Takes a timer due at `now`.
    fn pop_due(&mut self, now: Instant) -> Option<CoreTimer> {
        let timer = CoreTimer::ALL.into_iter().find(|&t| self.0[t as usize].is_some_and(|at| at <= now))?;
        self.stop(timer);
        Some(timer)
    }
}

/// What the core knows of one connection.
#[derive(Debug)]
struct Slot<W> {
    generation: u32,
    /// The deadline its entry in the timer queue has (an earlier one is pushed; a later one
    /// is found when the earlier fires, so a busy connection costs no timer work).
    scheduled: Option<Instant>,
    /// The drain notice reached it.
    notified: bool,
    /// Listed in `unsettled`.
    unsettled: bool,
    /// Whether it is a connection over the limit, served only to be told so.
    refusal: Refusal,
    waker: W,
}

/// Where a connection admitted only to be refused (on a TLS port) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// Served.
    None,
    /// The refusal is to be given to the connection at its first drive.
    Owed,
    /// The connection has its refusal: it sends it after the handshake, then closes.
    Given,
}

/// The log of accept failures: the first is logged at once, repeats at most every
/// [`ACCEPT_ERROR_LOG_EVERY`] with the number left unlogged, and the first success after
/// failures says accepting works again. Without it, exhausted descriptors would log a line
/// every [`ACCEPT_BACKOFF`].
#[derive(Debug)]
struct AcceptErrorLog {
    last_warned: Option<Instant>,
    unlogged: u64,
    failures: u64,
}

impl AcceptErrorLog {
    fn new() -> Self {
        Self { last_warned: None, unlogged: 0, failures: 0 }
    }

    /// Records a failed accept; returns whether it was logged.
    fn failed(&mut self, core: usize, err: &std::io::Error, now: Instant) -> bool {
        self.failures += 1;
        if self.last_warned.is_some_and(|at| now.saturating_duration_since(at) < ACCEPT_ERROR_LOG_EVERY) {
            self.unlogged += 1;
            return false;
        }
        tracing::warn!(
            core,
            unlogged_since_last_warning = self.unlogged,
            "accept failed: {err}; retrying every {ACCEPT_BACKOFF:?} (repeats are logged at most every \
             {ACCEPT_ERROR_LOG_EVERY:?}; EMFILE means the open-file limit is reached: raise `ulimit -n` \
             or lower --max-connections-per-core)"
        );
        self.last_warned = Some(now);
        self.unlogged = 0;
        true
    }

    fn succeeded(&mut self, core: usize) {
        if self.failures > 0 {
            tracing::info!(core, failures = self.failures, "accepting connections again");
            *self = Self::new();
        }
    }
}

/// One core's rules (see the module docs for the calling contract).
#[derive(Debug)]
pub struct Engine<W = ()> {
    core: usize,
    /// Connections served at once before new ones are refused.
    max_connections: usize,
    shutdown_timeout: Duration,
    slots: Slab<Slot<W>>,
    next_generation: u32,
    /// Connections' deadlines; stale entries are skipped when they fire.
    conn_timers: BinaryHeap<Reverse<(Instant, Handle)>>,
    timers: TimerTable,
    phase: Phase,
    listening: Listening,
    accept_errors: AcceptErrorLog,
    actions: VecDeque<Action>,
    /// Draining connections to drive again once the driver can count unread bytes.
    unsettled: Vec<Handle>,
    /// The next timeout moved earlier since the driver last asked.
    timer_moved: bool,
    /// Connections over the limit are refused inside their TLS session rather than with a
    /// plain-text line that a TLS client cannot read.
    refuse_in_band: bool,
    /// Connections in `slots` admitted only to be refused in band.
    refusing: usize,
}

impl<W> Engine<W> {
    /// The engine of core `core`: it serves at most `max_connections` at once (the per-core
    /// limit, times the cores that share one engine), and closes what is left
    /// `shutdown_timeout` after a shutdown begins. It starts [`Listening::Accepting`].
    pub fn new(core: usize, max_connections: usize, shutdown_timeout: Duration) -> Self {
        Self {
            core,
            max_connections,
            shutdown_timeout,
            slots: Slab::new(),
            next_generation: 0,
            conn_timers: BinaryHeap::new(),
            timers: TimerTable::default(),
            phase: Phase::Serving,
            listening: Listening::Accepting,
            accept_errors: AcceptErrorLog::new(),
            actions: VecDeque::new(),
            unsettled: Vec::new(),
            timer_moved: false,
            refuse_in_band: false,
            refusing: 0,
        }
    }

    /// On a TLS port: a connection over the limit is served just long enough to finish its
    /// handshake and read the 503 inside the session, then closed (a plain-text refusal line
    /// is garbage to a TLS client). Such connections take places of their own beyond the
    /// limit, at most an eighth of it plus 16; past those, the refusal is a plain close.
    pub fn refuse_in_band(&mut self) {
        self.refuse_in_band = true;
    }

    /// The core this engine serves.
    pub fn core(&self) -> usize {
        self.core
    }

    /// Connections open.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// No connection is open.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Where the core is in its life.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// The listener's accepting.
    pub fn listening(&self) -> Listening {
        self.listening
    }

    /// Whether `handle` names an open connection.
    pub fn contains(&self, handle: Handle) -> bool {
        self.slot(handle).is_some()
    }

    /// The waker of an open connection.
    pub fn waker(&self, handle: Handle) -> Option<&W> {
        self.slot(handle).map(|slot| &slot.waker)
    }

    fn slot(&self, handle: Handle) -> Option<&Slot<W>> {
        self.slots.get(handle.index()).filter(|slot| slot.generation == handle.generation)
    }

    fn slot_mut(&mut self, handle: Handle) -> Option<&mut Slot<W>> {
        self.slots.get_mut(handle.index()).filter(|slot| slot.generation == handle.generation)
    }

    /// A connection accepted on this core's listener at `now`; `target` is the core a
    /// balancer would serve it on (`None`: no balancing). Hand-over happens only while
    /// serving: a core shutting down keeps what it still accepts. `wake` is consulted only
    /// if the connection is served here.
    pub fn on_accepted(
        &mut self,
        now: Instant,
        target: Option<usize>,
        stats: &CoreStats,
        waker: impl FnOnce() -> W,
    ) -> Decision {
        self.accept_errors.succeeded(self.core);
        match target {
            Some(target) if target != self.core && self.phase == Phase::Serving => Decision::HandOver(target),
            _ => self.admit(now, stats, waker),
        }
    }

    /// A connection to serve here, whatever its origin (another core's hand-over, the
    /// backlog at shutdown, a hand-over that failed): serve it, or refuse it at the limit.
    /// A refusal is counted before it is answered, so whoever sees the reply sees the count.
    pub fn admit(&mut self, _now: Instant, stats: &CoreStats, waker: impl FnOnce() -> W) -> Decision {
        let mut refusal = Refusal::None;
        if self.slots.len() - self.refusing >= self.max_connections {
            stats.connection_rejected();
            tracing::debug!(
                core = self.core,
                open = self.slots.len(),
                "connection refused: core at its connection limit"
            );
            if !self.refuse_in_band {
                return Decision::Refuse(TOO_MANY_CONNECTIONS);
            }
            if self.refusing >= self.max_connections / 8 + 16 {
                return Decision::Refuse(b"");
            }
            self.refusing += 1;
            refusal = Refusal::Owed;
        }
        self.next_generation = self.next_generation.wrapping_add(1) & ((1 << Handle::GENERATION_BITS) - 1);
        let generation = self.next_generation;
        let index = self.slots.insert(Slot {
            generation,
            scheduled: None,
            notified: false,
            unsettled: false,
            refusal,
            waker: waker(),
        });
        Decision::Serve(Handle::from_parts(index, generation))
    }

    /// An accept failed at `now` (EMFILE, say): logged at most once per interval; accepting
    /// stops and resumes at the returned instant (an [`Action::StartAccepting`]).
    pub fn on_accept_failed(&mut self, now: Instant, err: &std::io::Error) -> Instant {
        self.accept_errors.failed(self.core, err, now);
        let retry = now + ACCEPT_BACKOFF;
        if self.listening == Listening::Accepting {
            self.listening = Listening::BackingOff;
            self.timers.set(CoreTimer::AcceptRetry, retry);
            self.timer_moved = true;
        }
        retry
    }

    /// The driver has no accept pending any more after [`Action::StopAccepting`].
    pub fn accept_stopped(&mut self) {
        if self.listening == Listening::Stopping {
            self.listening = Listening::Stopped;
        }
    }

    /// Asks what `conn` (served under `handle`) wants after an event, at `now`. Delivers the
    /// drain notice, keeps its deadline in the timer table, and decides whether a draining
    /// connection may send FIN: that needs the kernel to hold nothing unread for it,
    /// which `unread` counts (`None`: not countable yet, see
    /// [`take_unsettled`](Self::take_unsettled)). Requests the connection received while its
    /// output was full are read here with `processor`, once it has room again. A stale
    /// handle asks for nothing.
    pub fn drive<D: Dispatch>(
        &mut self,
        handle: Handle,
        conn: &mut Connection,
        processor: &mut Processor<D>,
        now: Instant,
        unread: impl FnOnce() -> Option<usize>,
    ) -> Interest {
        let phase = self.phase;
        let Some(slot) =
            self.slots.get_mut(handle.index()).filter(|slot| slot.generation == handle.generation)
        else {
            return Interest {
                step: Step::Close(CloseReason::Error),
                read: false,
                line_read: false,
                send: false,
                urgent: false,
            };
        };
        if slot.refusal == Refusal::Owed {
            slot.refusal = Refusal::Given;
            conn.refuse(TOO_MANY_CONNECTIONS);
        }
        if let (Phase::Draining { deadline }, false) = (phase, slot.notified) {
            slot.notified = true;
            conn.on_shutdown(now, deadline);
        }
        if conn.wants_replay() {
            conn.replay(processor, now);
        }
        let mut unsettled = false;
        let step = conn.poll(now, || match unread() {
            Some(n) => n,
            None => {
                unsettled = true;
                1
            }
        });
        if unsettled && !slot.unsettled {
            slot.unsettled = true;
            self.unsettled.push(handle);
        }
        let timer = conn.poll_timeout();
        if let Some(at) = timer
            && slot.scheduled.is_none_or(|scheduled| at < scheduled)
        {
            slot.scheduled = Some(at);
            let next = self.conn_timers.peek().map(|entry| entry.0.0);
            self.timer_moved |= next.is_none_or(|next| at < next);
            self.conn_timers.push(Reverse((at, handle)));
        }
        let send = conn.wants_send();
        Interest {
            step,
            read: conn.wants_read(),
            line_read: conn.wants_line_read(),
            send,
            urgent: send && conn.is_handshaking(),
        }
    }

    /// Draining connections that asked for a count of unread bytes the driver could not give
    /// (`None` from `unread`): once every completion so far is handled, drive each again.
    pub fn take_unsettled(&mut self, into: &mut Vec<Handle>) {
        for handle in self.unsettled.drain(..) {
            if let Some(slot) =
                self.slots.get_mut(handle.index()).filter(|s| s.generation == handle.generation)
            {
                slot.unsettled = false;
                into.push(handle);
            }
        }
    }

    /// Whether any connection waits for a settled count (see [`take_unsettled`](Self::take_unsettled)).
    pub fn has_unsettled(&self) -> bool {
        !self.unsettled.is_empty()
    }

    /// The next instant [`on_timeout`](Self::on_timeout) has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let conn = self.conn_timers.peek().map(|entry| entry.0.0);
        match (conn, self.timers.next()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether [`poll_timeout`](Self::poll_timeout) may have moved earlier since the last
    /// call: a driver whose timer waits apart from its connections (a task) wakes it to
    /// sleep again until the new time.
    pub fn take_timer_moved(&mut self) -> bool {
        std::mem::take(&mut self.timer_moved)
    }

    /// The clock reached `now`: due connection deadlines become [`Action::Timeout`]s (stale
    /// entries — a connection that closed, or whose deadline moved — are dropped), and due
    /// core timers act.
    pub fn on_timeout(&mut self, now: Instant) {
        while let Some(timer) = self.timers.pop_due(now) {
            match timer {
                CoreTimer::AcceptRetry => {
                    if self.listening == Listening::BackingOff {
                        self.listening = Listening::Accepting;
                        self.actions.push_back(Action::StartAccepting);
                    }
                }
                CoreTimer::ShutdownDeadline => {
                    if !self.slots.is_empty() {
                        tracing::warn!(
                            core = self.core,
                            connections = self.slots.len(),
                            "shutdown deadline passed: closing undrained connections"
                        );
                    }
                }
            }
        }
        while let Some(&Reverse((at, handle))) = self.conn_timers.peek() {
            if at > now {
                break;
            }
            self.conn_timers.pop();
            if let Some(slot) = self.slot_mut(handle)
                && slot.scheduled == Some(at)
            {
                slot.scheduled = None;
                self.actions.push_back(Action::Timeout(handle));
            }
        }
    }

    /// A connection's deadline came ([`Action::Timeout`]): the connection acts on it.
    pub fn on_conn_timeout(
        &mut self,
        handle: Handle,
        conn: &mut Connection,
        now: Instant,
        stats: &CoreStats,
    ) {
        if self.contains(handle) {
            conn.on_timeout(now, stats);
        }
    }

    /// The server is shutting down at `now`: take in the backlog, stop accepting, give every
    /// connection the drain notice, and close what is left at the deadline. Idempotent.
    pub fn on_shutdown(&mut self, now: Instant) {
        if self.phase != Phase::Serving {
            return;
        }
        let deadline = now + self.shutdown_timeout;
        self.phase = Phase::Draining { deadline };
        self.timers.set(CoreTimer::ShutdownDeadline, deadline);
        self.timers.stop(CoreTimer::AcceptRetry);
        self.timer_moved = true;
        // The backlog first: a listener that stops accepting may reset what it still holds.
        self.actions.push_back(Action::TakeBacklog);
        match self.listening {
            Listening::Accepting => {
                self.listening = Listening::Stopping;
                self.actions.push_back(Action::StopAccepting);
            }
            Listening::BackingOff => self.listening = Listening::Stopped,
            Listening::Stopping | Listening::Stopped => {}
        }
        tracing::info!(
            core = self.core,
            connections = self.slots.len(),
            timeout = ?self.shutdown_timeout,
            "shutting down: draining connections"
        );
        for (index, slot) in &self.slots {
            self.actions.push_back(Action::Drive(Handle::from_parts(index, slot.generation)));
        }
    }

    /// The next thing the driver must do.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// The driver released the connection's socket: it counts as closed (deferred replies
    /// still pending are abandoned) and its place is freed; returns its waker (`None` for a
    /// stale handle).
    pub fn release(&mut self, handle: Handle, conn: Connection, stats: &CoreStats) -> Option<W> {
        conn.finish(stats);
        self.slot(handle)?;
        let slot = self.slots.remove(handle.index());
        if slot.refusal != Refusal::None {
            self.refusing -= 1;
        }
        Some(slot.waker)
    }

    /// Shutting down, with no connection left and no accept pending: the driver may stop.
    pub fn finished(&self) -> bool {
        matches!(self.phase, Phase::Draining { .. })
            && self.slots.is_empty()
            && self.listening == Listening::Stopped
    }
}

#[cfg(test)]
mod tests;

//! Deferred replies: a handler that answers later holds a [`Deferred`] handle, which reserves
//! its reply's place in the connection's ordered output; the answer is encoded on whichever
//! thread completes the handle and handed to the connection's [`Mailbox`], which wakes the
//! backend driving that connection (a task waker on the tokio backends, the core's eventfd on
//! `uring`). The core then puts the reply in its place ([`Output`]): replies still leave in
//! request order, and the replies behind a pending one wait for it.
//!
//! Nothing here is touched by a request whose handler answers at once: a connection has no
//! mailbox until its first deferral, and the only cost on the synchronous path is one branch
//! on whether replies are waiting behind a deferred one.

use std::collections::VecDeque;
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use simd_json::tape::Value;

use super::reply::{Reply, begin_ok_raw, end_ok, write_error_raw, write_id};
use crate::error::{HandlerError, HandlerResult};
use crate::stats::CoreStats;

/// Where completed deferred replies of one connection wait for its core to take them.
pub struct Mailbox {
    inner: Mutex<Inbox>,
}

#[derive(Default)]
struct Inbox {
    done: Vec<Completed>,
    waker: Option<Waker>,
    /// The connection is gone: completions are dropped.
    closed: bool,
}

/// A reply line finished off the core, for slot `seq`.
#[derive(Debug)]
struct Completed {
    seq: u64,
    code: u16,
    line: Vec<u8>,
    kind: Kind,
}

/// What a completion is, for what the core does when its slot is already answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The handler's answer: late (and counted) if a 504 went first.
    Answer,
    /// The handle was dropped without an answer (the line is a 500); ignored if the slot was
    /// answered already.
    Dropped,
    /// The work saw the deadline pass (the line is a 504); ignored if the core sent its own.
    Expired,
}

impl fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mailbox").finish_non_exhaustive()
    }
}

impl Mailbox {
    fn new() -> Arc<Self> {
        Arc::new(Self { inner: Mutex::new(Inbox::default()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inbox> {
        // A panic while holding this lock cannot leave the inbox inconsistent (pushes and
        // takes only), so a poisoned lock is used as it is.
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// For a task that drives the connection: ready once completions wait; registers the
    /// task's waker otherwise.
    pub fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut inbox = self.lock();
        if !inbox.done.is_empty() {
            return Poll::Ready(());
        }
        if !inbox.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            inbox.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// For a driver that is not a task (`uring`): the waker to wake when completions arrive.
    pub fn set_waker(&self, waker: Waker) {
        self.lock().waker = Some(waker);
    }

    /// Whether a waker is registered.
    pub fn has_waker(&self) -> bool {
        self.lock().waker.is_some()
    }

    fn deliver(&self, completed: Completed) {
        let waker = {
            let mut inbox = self.lock();
            if inbox.closed {
                return;
            }
            inbox.done.push(completed);
            // Only the first completion of a batch wakes; the driver takes them all.
            if inbox.done.len() == 1 { inbox.waker.clone() } else { None }
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn take(&self, into: &mut Vec<Completed>) {
        std::mem::swap(&mut self.lock().done, into);
    }

    fn close(&self) {
        let mut inbox = self.lock();
        inbox.closed = true;
        inbox.done = Vec::new();
        inbox.waker = None;
    }
}

/// The handle of a reply a handler answers later, from any thread or task. Completing it
/// ([`reply`](Self::reply), [`ok`](Self::ok), [`error`](Self::error),
/// [`finish`](Self::finish)) encodes the reply where it is called and wakes the connection's
/// core, which sends it in its place in request order. A handle dropped without an answer
/// answers 500, so a caller never waits in silence.
///
/// If the connection has closed, or the request's deadline (`timeout_ms`) has passed and a
/// 504 was sent instead, the answer is dropped (and counted).
pub struct Deferred {
    mailbox: Option<Arc<Mailbox>>,
    seq: u64,
    cmdid: u32,
    /// `"id":…,` to echo, encoded once at deferral.
    id: Option<Box<[u8]>>,
    deadline: Option<Instant>,
    /// The request's `timeout_ms`, for the 504's message.
    timeout: Option<Duration>,
}

impl fmt::Debug for Deferred {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deferred")
            .field("cmdid", &self.cmdid)
            .field("seq", &self.seq)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Deferred {
    /// The cmdid of the request this handle answers.
    pub fn cmdid(&self) -> u32 {
        self.cmdid
    }

    /// When the request's deadline passes (`timeout_ms` after it was read), if it set one.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Time left at `now` before the deadline (`None`: no deadline; zero: passed).
    pub fn remaining_at(&self, now: Instant) -> Option<Duration> {
        self.deadline.map(|at| at.saturating_duration_since(now))
    }

    /// Whether the deadline has passed at `now`: the caller already got a 504, and work for
    /// this request can be skipped.
    pub fn expired_at(&self, now: Instant) -> bool {
        self.deadline.is_some_and(|at| at <= now)
    }

    /// Answers with the data `write` puts in the [`Reply`] (or its error).
    pub fn reply(mut self, write: impl FnOnce(Reply<'_>) -> HandlerResult) {
        let mut line = Vec::new();
        begin_ok_raw(&mut line, self.id.as_deref());
        let data_start = line.len();
        let code = match catch_unwind(AssertUnwindSafe(|| write(Reply::new(&mut line)))) {
            Ok(Ok(())) => {
                end_ok(&mut line, data_start);
                0
            }
            Ok(Err(e)) => {
                line.clear();
                write_error_raw(&mut line, e.code(), self.id.as_deref(), format_args!("{}", e.message()));
                e.code()
            }
            Err(_) => {
                tracing::error!(cmdid = self.cmdid, "deferred reply panicked while encoding");
                line.clear();
                let cmdid = self.cmdid;
                write_error_raw(
                    &mut line,
                    500,
                    self.id.as_deref(),
                    format_args!("handler for cmdid {cmdid} panicked"),
                );
                500
            }
        };
        self.send(code, line, Kind::Answer);
    }

    /// Answers with `value` as the reply's data.
    pub fn ok<T: serde::Serialize + ?Sized>(self, value: &T) {
        self.reply(|reply| reply.serialize(value));
    }

    /// Answers with an error reply.
    pub fn error(mut self, error: HandlerError) {
        let mut line = Vec::new();
        write_error_raw(&mut line, error.code(), self.id.as_deref(), format_args!("{}", error.message()));
        self.send(error.code(), line, Kind::Answer);
    }

    /// Answers with the value or the error.
    pub fn finish<T: serde::Serialize>(self, result: Result<T, HandlerError>) {
        match result {
            Ok(value) => self.ok(&value),
            Err(e) => self.error(e),
        }
    }

    /// The request's deadline passed before its work was done: the work is dropped, and the
    /// caller gets a 504 (from here or from its core, whichever is first).
    pub fn expire(mut self) {
        let mut line = Vec::new();
        write_deadline_error(&mut line, self.id.as_deref(), self.timeout.unwrap_or_default());
        self.send(504, line, Kind::Expired);
    }

    fn send(&mut self, code: u16, line: Vec<u8>, kind: Kind) {
        if let Some(mailbox) = self.mailbox.take() {
            mailbox.deliver(Completed { seq: self.seq, code, line, kind });
        }
    }
}

impl Drop for Deferred {
    fn drop(&mut self) {
        if self.mailbox.is_some() {
            let cmdid = self.cmdid;
            let mut line = Vec::new();
            write_error_raw(
                &mut line,
                500,
                self.id.as_deref(),
                format_args!("handler for cmdid {cmdid} dropped its reply without answering"),
            );
            self.send(500, line, Kind::Dropped);
        }
    }
}

/// The 504 of a request whose `timeout_ms` passed: the same words whoever notices first.
pub(crate) fn write_deadline_error(out: &mut Vec<u8>, id: Option<&[u8]>, timeout: Duration) {
    let ms = timeout.as_millis();
    write_error_raw(out, 504, id, format_args!("deadline of {ms} ms passed before the handler answered"));
}

/// A reply owed by a deferred handler, and the replies produced after it.
#[derive(Debug)]
struct Slot {
    answer: Answer,
    /// Replies produced after this one (until the next deferral), sent once it is.
    after: Vec<u8>,
    cmdid: u32,
    /// When the request was read: the batch's time in the server counts from it.
    arrived: Instant,
    deadline: Option<Instant>,
    /// `"id":…,` for the 504 the core may have to write itself.
    id: Option<Box<[u8]>>,
    /// Its time in the server is measured (metrics are on).
    timed: bool,
    /// `(cmdid, arrival)` of the replies in `after`, when they are timed.
    after_times: Vec<(u32, Instant)>,
}

impl Slot {
    /// Answers this pending slot with `line` and counts the reply; returns the line's length.
    fn settle(&mut self, code: u16, line: Vec<u8>, stats: &CoreStats) -> usize {
        stats.reply(code);
        stats.deferred_settled();
        if let Some(command) = stats.command(self.cmdid) {
            command.record(code, None);
        }
        let len = line.len();
        self.answer = Answer::Ready(line);
        len
    }
}

#[derive(Debug)]
enum Answer {
    Pending,
    Ready(Vec<u8>),
}

/// The deferred part of a connection's output, made at its first deferral.
#[derive(Debug)]
struct Deferrals {
    mailbox: Arc<Mailbox>,
    /// Slot of `queue[0]`.
    base_seq: u64,
    queue: VecDeque<Slot>,
    /// Slots still [`Answer::Pending`].
    pending: usize,
    /// Reply bytes held in the queue.
    held: usize,
    /// Reused buffer for taking completions out of the mailbox.
    /// (`held` counts answered lines and the `after` bytes of every slot but the last.)
    taken: Vec<Completed>,
}

/// A connection's replies in request order: `ready` can be sent now; behind the first reply
/// still owed by a deferred handler, later replies wait in its slot.
#[derive(Debug, Default)]
pub struct Output {
    ready: Vec<u8>,
    deferred: Option<Box<Deferrals>>,
    /// When the bytes being processed arrived (set by the connection before each receive).
    now: Option<Instant>,
    /// When the oldest reply in `ready` arrived.
    ready_since: Option<Instant>,
    /// While metrics are served: `(cmdid, arrival)` of each reply in `ready`, in order, for
    /// the per-command time in the server.
    ready_times: Vec<(u32, Instant)>,
    /// Room to give `ready` when the next reply is written into it empty (see
    /// [`expect_ready`](Self::expect_ready)); 0 for none.
    expected: usize,
}

impl Output {
    /// Where the next reply goes: behind the last deferred reply while one waits, else the
    /// bytes ready to send.
    #[inline]
    pub(crate) fn sink(&mut self) -> &mut Vec<u8> {
        match &mut self.deferred {
            Some(d) if !d.queue.is_empty() => &mut d.queue.back_mut().expect("non-empty").after,
            _ => {
                if self.expected != 0 {
                    let bytes = std::mem::take(&mut self.expected);
                    if self.ready.is_empty() && self.ready.capacity() < bytes {
                        self.ready.reserve(bytes);
                    }
                }
                &mut self.ready
            }
        }
    }

    /// The replies ready to send (for tests and callers that drive a [`Processor`]
    /// themselves).
    ///
    /// [`Processor`]: super::Processor
    pub fn ready_bytes(&self) -> &[u8] {
        &self.ready
    }

    /// Forgets the replies ready to send (keeping the buffer).
    pub fn clear_ready(&mut self) {
        self.ready.clear();
    }

    /// No bytes are ready to send.
    pub(crate) fn ready_capacity(&self) -> usize {
        self.ready.capacity()
    }

    pub(crate) fn ready_is_empty(&self) -> bool {
        self.ready.is_empty()
    }

    /// Swaps the ready bytes into `sending` (emptied by the caller), and their timings into
    /// `times` (emptied too), leaving the buffers for the next replies; returns when the
    /// oldest of them arrived.
    pub(crate) fn take_ready(
        &mut self,
        sending: &mut Vec<u8>,
        times: &mut Vec<(u32, Instant)>,
    ) -> Option<Instant> {
        std::mem::swap(&mut self.ready, sending);
        std::mem::swap(&mut self.ready_times, times);
        self.ready_since.take()
    }

    /// Notes the reply just written to the sink: a reply to `cmdid` whose request arrived at
    /// `arrived` (called only while metrics are served).
    pub(crate) fn note_time(&mut self, cmdid: u32, arrived: Instant) {
        match &mut self.deferred {
            Some(d) if !d.queue.is_empty() => {
                d.queue.back_mut().expect("non-empty").after_times.push((cmdid, arrived));
            }
            _ => self.ready_times.push((cmdid, arrived)),
        }
    }

    /// Frees the ready buffer if it grew past `keep` bytes of capacity (it is empty).
    /// A batch of about `bytes` is expected: when the next reply is written into an empty
    /// ready buffer smaller than that, the buffer gets the room at once instead of growing to
    /// it by doubling (a copy of everything so far per doubling). Nothing is allocated until
    /// a reply is written, so a connection that only receives part of a line holds nothing.
    pub(crate) fn expect_ready(&mut self, bytes: usize) {
        self.expected = bytes;
    }

    pub(crate) fn shrink_ready(&mut self, keep: usize) {
        if self.ready.capacity() > keep {
            self.ready = Vec::new();
        }
    }

    /// Bytes became ready at `now` and no older ones wait: the batch counts from `now`.
    pub(crate) fn mark_ready_since(&mut self, now: Instant) {
        if self.ready_since.is_none() && !self.ready.is_empty() {
            self.ready_since = Some(now);
        }
    }

    /// An output whose requests arrive at `now` (see [`set_now`](Self::set_now)).
    pub fn at(now: Instant) -> Self {
        let mut out = Self::default();
        out.set_now(now);
        out
    }

    /// The time of the receive whose requests are being handled: when their replies'
    /// deadlines and times in the server start. The connection sets it for each receive.
    pub fn set_now(&mut self, now: Instant) {
        self.now = Some(now);
    }

    /// The time of the receive being handled ([`set_now`](Self::set_now)).
    pub fn now(&self) -> Option<Instant> {
        self.now
    }

    /// Reserves the next reply's place for a handler that answers later (handlers get theirs
    /// through [`Responder::defer`](crate::Responder::defer)).
    ///
    /// # Panics
    /// If the time of the receive was never set ([`set_now`](Self::set_now)).
    pub fn defer(
        &mut self,
        cmdid: u32,
        id: Option<Value<'_, '_>>,
        timeout: Option<Duration>,
        stats: &CoreStats,
    ) -> Deferred {
        let arrived = self.now.expect("the time of the receive is set before its requests are handled");
        let deferrals = self.deferred.get_or_insert_with(|| {
            Box::new(Deferrals {
                mailbox: Mailbox::new(),
                base_seq: 0,
                queue: VecDeque::new(),
                pending: 0,
                held: 0,
                taken: Vec::new(),
            })
        });
        let id = id.map(|id| {
            let mut bytes = Vec::new();
            write_id(&mut bytes, Some(id));
            bytes.into_boxed_slice()
        });
        let seq = deferrals.base_seq + deferrals.queue.len() as u64;
        // Held bytes count every slot's `after` except the last one's, which is still
        // being written (see `len`).
        if let Some(last) = deferrals.queue.back() {
            deferrals.held += last.after.len();
        }
        let deadline = timeout.map(|t| arrived + t);
        deferrals.queue.push_back(Slot {
            answer: Answer::Pending,
            after: Vec::new(),
            cmdid,
            arrived,
            deadline,
            id: id.clone(),
            timed: stats.times_handlers(),
            after_times: Vec::new(),
        });
        deferrals.pending += 1;
        stats.deferred();
        Deferred { mailbox: Some(deferrals.mailbox.clone()), seq, cmdid, id, deadline, timeout }
    }

    /// Deferred replies not answered yet.
    pub fn pending(&self) -> usize {
        self.deferred.as_ref().map_or(0, |d| d.pending)
    }

    /// Reply bytes held: ready ones and those waiting behind a deferred reply.
    pub fn len(&self) -> usize {
        self.ready.len()
            + self.deferred.as_ref().map_or(0, |d| d.held + d.queue.back().map_or(0, |s| s.after.len()))
    }

    /// No reply bytes held (pending deferred replies aside).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The connection's mailbox, once it has deferred a reply.
    pub fn mailbox(&self) -> Option<&Arc<Mailbox>> {
        self.deferred.as_ref().map(|d| &d.mailbox)
    }

    /// The earliest deadline of a pending deferred reply.
    pub fn next_deadline(&self) -> Option<Instant> {
        let d = self.deferred.as_ref()?;
        if d.pending == 0 {
            return None;
        }
        d.queue.iter().filter(|s| matches!(s.answer, Answer::Pending)).filter_map(|s| s.deadline).min()
    }

    /// Takes the completions waiting in the mailbox into their slots, then moves every
    /// answered reply at the head (and what follows it) to the ready bytes. Returns whether
    /// anything became ready.
    pub fn take_completions(&mut self, stats: &CoreStats) -> bool {
        let Some(d) = self.deferred.as_deref_mut() else { return false };
        d.mailbox.take(&mut d.taken);
        let mut taken = std::mem::take(&mut d.taken);
        for Completed { seq, code, line, kind } in taken.drain(..) {
            let slot = seq.checked_sub(d.base_seq).and_then(|i| d.queue.get_mut(i as usize));
            match slot {
                Some(slot) if matches!(slot.answer, Answer::Pending) => {
                    if kind == Kind::Expired {
                        stats.deadline_expired();
                    }
                    if kind == Kind::Dropped {
                        let cmdid = slot.cmdid;
                        tracing::warn!(cmdid, "a deferred reply was dropped without an answer; replying 500");
                    }
                    d.pending -= 1;
                    d.held += slot.settle(code, line, stats);
                }
                // Its deadline passed first: the caller has its 504.
                _ if kind == Kind::Answer => stats.late_reply(),
                // A handle dropped after the handler's own error answered the slot, or work
                // that saw the deadline after the core did.
                _ => {}
            }
        }
        d.taken = taken;
        self.advance()
    }

    /// Answers the reply deferred last with `line` now (its handler returned an error).
    pub(crate) fn answer_last(&mut self, code: u16, line: Vec<u8>, stats: &CoreStats) {
        let Some(d) = self.deferred.as_deref_mut() else { return };
        let Some(slot) = d.queue.back_mut() else { return };
        if matches!(slot.answer, Answer::Pending) {
            d.pending -= 1;
            d.held += slot.settle(code, line, stats);
        }
        self.advance();
    }

    /// Answers 504 to every pending deferred reply whose deadline is at or before `now`.
    pub(crate) fn expire(&mut self, now: Instant, stats: &CoreStats) -> bool {
        let Some(d) = self.deferred.as_deref_mut() else { return false };
        if d.pending == 0 {
            return false;
        }
        for slot in d.queue.iter_mut() {
            if matches!(slot.answer, Answer::Pending) && slot.deadline.is_some_and(|at| at <= now) {
                let mut line = Vec::new();
                let timeout = slot.deadline.expect("checked").saturating_duration_since(slot.arrived);
                write_deadline_error(&mut line, slot.id.as_deref(), timeout);
                d.pending -= 1;
                stats.deadline_expired();
                d.held += slot.settle(504, line, stats);
            }
        }
        self.advance()
    }

    /// Moves answered replies at the head of the queue to `ready`.
    fn advance(&mut self) -> bool {
        let Some(d) = self.deferred.as_deref_mut() else { return false };
        let mut moved = false;
        while let Some(slot) = d.queue.front() {
            if matches!(slot.answer, Answer::Pending) {
                break;
            }
            let slot = d.queue.pop_front().expect("non-empty");
            d.base_seq += 1;
            let Answer::Ready(line) = slot.answer else { unreachable!("checked") };
            d.held -= line.len();
            if !d.queue.is_empty() {
                // Not the last slot: its `after` bytes were counted in `held`.
                d.held -= slot.after.len();
            }
            if self.ready_since.is_none() {
                self.ready_since = Some(slot.arrived);
            }
            self.ready.extend_from_slice(&line);
            self.ready.extend_from_slice(&slot.after);
            if slot.timed {
                self.ready_times.push((slot.cmdid, slot.arrived));
            }
            self.ready_times.extend_from_slice(&slot.after_times);
            moved = true;
        }
        moved
    }

    /// The connection is gone: later completions are dropped; the pending ones are counted
    /// as abandoned.
    pub(crate) fn close(&mut self, stats: &CoreStats) {
        if let Some(d) = self.deferred.take() {
            d.mailbox.close();
            for _ in 0..d.pending {
                stats.deferred_settled();
                stats.deferred_abandoned();
            }
        }
    }
}

//! A connection's replies in request order ([`Output`]): the bytes ready to send, and behind
//! the first reply still owed by a deferred handler, the slots of deferred replies with the
//! replies that wait behind each. Answers come back through the connection's [`Mailbox`]
//! and join the output in their place; a deadline answers 504 in place; a closed connection
//! abandons what is pending. Every connection's reply buffer, so its memory matters: a
//! quiet connection holds none.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use simd_json::tape::Value;

use super::deferred::{Completed, Deferred, Kind, Mailbox, write_deadline_error};
use super::reply::write_id;
use crate::stats::CoreStats;

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

/// Where the next reply will begin: its buffer (named by the deferral slots before it) and
/// its offset there.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReplyMark {
    slots: usize,
    at: usize,
}

/// Added to every reply of a connection the server is closing (docs/protocol.md).
const CLOSING: &[u8] = b"\"closing\":true,";

impl Output {
    /// Where the reply written next will begin.
    pub(crate) fn reply_mark(&mut self) -> ReplyMark {
        let slots = self.slots();
        ReplyMark { slots, at: self.sink().len() }
    }

    /// Adds `"closing":true` to the reply written since `mark`, if it was written there (not
    /// deferred): after its `{"code":N,`, which every reply begins with.
    pub(crate) fn mark_closing(&mut self, mark: ReplyMark) {
        if self.slots() != mark.slots {
            return;
        }
        let sink = self.sink();
        if let Some(comma) = sink.get(mark.at..).and_then(|reply| memchr::memchr(b',', reply)) {
            let at = mark.at + comma + 1;
            sink.splice(at..at, CLOSING.iter().copied());
        }
    }

    fn slots(&self) -> usize {
        self.deferred.as_ref().map_or(0, |d| d.queue.len())
    }

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

    /// Whether more than `bytes` reply bytes are held, or `deferred` deferred replies are
    /// pending: the limits past which a connection reads no more requests. Checked before
    /// every request line, so a connection that never deferred pays one comparison.
    #[inline(always)]
    pub(crate) fn full(&self, bytes: usize, deferred: usize) -> bool {
        match &self.deferred {
            None => self.ready.len() > bytes,
            Some(d) => self.len() > bytes || d.pending >= deferred,
        }
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

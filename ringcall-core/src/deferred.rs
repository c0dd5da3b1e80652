//! Deferred replies: a handler that answers later holds a [`Deferred`] handle, which reserves
//! its reply's place in the connection's ordered output; the answer is encoded on whichever
//! thread completes the handle and handed to the connection's [`Mailbox`], which wakes the
//! backend driving that connection (a task waker on the tokio backends, the core's eventfd on
//! `uring`). The core then puts the reply in its place ([`Output`](crate::Output)): replies still leave in
//! request order, and the replies behind a pending one wait for it.
//!
//! Nothing here is touched by a request whose handler answers at once: a connection has no
//! mailbox until its first deferral, and the only cost on the synchronous path is one branch
//! on whether replies are waiting behind a deferred one.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use super::reply::{Reply, begin_ok_raw, end_ok, write_error_raw};
use crate::error::{HandlerError, HandlerResult};

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
    /// Futures waiting for the connection to go ([`Abandoned`]), by their number.
    watchers: Vec<(u64, Waker)>,
    next_watcher: u64,
}

/// A reply line finished off the core, for slot `seq`.
#[derive(Debug)]
pub(crate) struct Completed {
    pub(crate) seq: u64,
    pub(crate) code: u16,
    pub(crate) line: Vec<u8>,
    pub(crate) kind: Kind,
}

/// What a completion is, for what the core does when its slot is already answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
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
    pub(crate) fn new() -> Arc<Self> {
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

    pub(crate) fn take(&self, into: &mut Vec<Completed>) {
        std::mem::swap(&mut self.lock().done, into);
    }

    pub(crate) fn close(&self) {
        let watchers = {
            let mut inbox = self.lock();
            inbox.closed = true;
            inbox.done = Vec::new();
            inbox.waker = None;
            std::mem::take(&mut inbox.watchers)
        };
        for (_, waker) in watchers {
            waker.wake();
        }
    }
}

/// Resolves once the connection of a [`Deferred`] reply has gone (see
/// [`Deferred::abandoned`]).
#[derive(Debug)]
pub struct Abandoned {
    mailbox: Option<Arc<Mailbox>>,
    /// Its number among the mailbox's watchers, once registered.
    watching: Option<u64>,
}

impl std::future::Future for Abandoned {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let Some(mailbox) = &this.mailbox else { return Poll::Ready(()) };
        let mut inbox = mailbox.lock();
        if inbox.closed {
            return Poll::Ready(());
        }
        match this.watching {
            Some(number) => {
                if let Some((_, waker)) = inbox.watchers.iter_mut().find(|(n, _)| *n == number)
                    && !waker.will_wake(cx.waker())
                {
                    *waker = cx.waker().clone();
                }
            }
            None => {
                let number = inbox.next_watcher;
                inbox.next_watcher += 1;
                inbox.watchers.push((number, cx.waker().clone()));
                this.watching = Some(number);
            }
        }
        Poll::Pending
    }
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        // Work that finished first takes its waker back, so a long-lived connection's
        // mailbox does not collect one per request.
        if let (Some(mailbox), Some(number)) = (&self.mailbox, self.watching) {
            mailbox.lock().watchers.retain(|(n, _)| *n != number);
        }
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
    pub(crate) mailbox: Option<Arc<Mailbox>>,
    pub(crate) seq: u64,
    pub(crate) cmdid: u32,
    /// `"id":…,` to echo, encoded once at deferral.
    pub(crate) id: Option<Box<[u8]>>,
    pub(crate) deadline: Option<Instant>,
    /// The request's `timeout_ms`, for the 504's message.
    pub(crate) timeout: Option<Duration>,
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

    /// Whether nobody waits for this reply any more: its connection has closed, or the core
    /// answered it already (503, because too many deferred replies were pending on it).
    /// Work for it can stop.
    pub fn is_abandoned(&self) -> bool {
        self.mailbox.as_ref().is_none_or(|mailbox| mailbox.lock().closed)
    }

    /// A future that resolves when this reply is [abandoned](Self::is_abandoned): async work
    /// for it races this and is dropped (cancelled) when it wins, as
    /// [`Ctx::spawn`](../ringcall/struct.Ctx.html#method.spawn) does.
    pub fn abandoned(&self) -> Abandoned {
        Abandoned { mailbox: self.mailbox.clone(), watching: None }
    }

    /// The reply was answered by the core already: the handle answers nothing.
    pub(crate) fn detach(mut self) -> Self {
        self.mailbox = None;
        self
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

//! Bytes in → bytes out for one connection: the [`Processor`] (one per core: parser buffers,
//! tape, dispatch) and the [`Session`] (one per connection: the carry buffer for a line that
//! straddles two receives, and whether the stream is still in sync).
//!
//! A line that lies inside one receive buffer is parsed where it lies: backends hand over
//! buffers with [`PADDING`] readable bytes past the data, which simd-json needs. A line that
//! straddles two receives is copied into the session's carry buffer; once that buffer has
//! room for a long line's rest, it is lent to the backend as a [`LineBuf`] so the rest is
//! read straight into it instead of being copied there piece by piece.

use std::sync::Arc;
use std::time::{Duration, Instant};

use simd_json::{Buffers, Tape};

use super::connection::Limits;
use super::deferred::Deferred;
use super::error::HandlerResult;
use super::frame::{content_len, find_newline, is_blank};
use super::output::Output;
use super::reply::{Reply, begin_ok, end_ok, write_error};
use super::request::{CoreContext, Rejected, Request, Sent, decode, parse_line};
use crate::stats::{CoreStats, StatsRegistry};

/// Readable bytes every receive buffer must have past its data (simd-json's SIMD reads).
pub const PADDING: usize = simd_json::INPUT_PADDING;

/// Carry buffers bigger than this are freed once their line is done, so a connection that
/// once sent a huge line does not keep its memory.
const CARRY_KEEP: usize = 64 << 10;

/// Room a carried line's buffer must have before a read straight into it is offered
/// ([`LineBuf`]): a pooled receive buffer's size. Below it, reading into the pool and copying
/// costs no more than a read of its own.
pub const DIRECT_READ_MIN: usize = 16 * 1024;

/// The buffer of a long unfinished line, lent to the backend so that its next read lands
/// right after the bytes already held, instead of in a pooled buffer and then copied there.
///
/// The read may write [`room`](Self::room) bytes at [`read_ptr`](Self::read_ptr) (the
/// parser's padding stays behind them); the buffer goes back to its connection with
/// [`Connection::on_line_recv`](super::Connection::on_line_recv) whatever the read did,
/// after [`filled`](Self::filled) if it brought bytes. The bytes live on the heap: the
/// pointer stays valid while the `LineBuf` is moved, for as long as it lives.
#[derive(Debug)]
pub struct LineBuf {
    buf: Vec<u8>,
    /// Where the read's bytes begin: the length of the line held before it.
    start: usize,
    /// How many bytes the read may bring: the buffer's room, less the parser's padding.
    room: usize,
}

impl LineBuf {
    /// How many bytes the read may bring.
    pub fn room(&self) -> usize {
        self.room
    }

    /// Where the read's bytes begin ([`read_ptr`](Self::read_ptr), for looking only).
    pub fn read_start(&self) -> *const u8 {
        self.buf.as_ptr().wrapping_add(self.start)
    }

    /// Where the read writes its bytes: [`room`](Self::room) of them from here, after the
    /// [`received`](Self::received) ones already written.
    pub fn read_ptr(&mut self) -> *mut u8 {
        let start = self.start;
        // Within the allocation: `start` is the length the buffer had when lent.
        self.buf.as_mut_ptr().wrapping_add(start)
    }

    /// The read wrote `n` bytes at [`read_ptr`](Self::read_ptr).
    ///
    /// # Safety
    /// `n` is at most [`room`](Self::room), and that many bytes at `read_ptr` were written.
    pub unsafe fn filled(&mut self, n: usize) {
        debug_assert!(n <= self.room);
        // SAFETY: within capacity, and the caller vouches the bytes were written.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        self.room -= n;
    }

    /// The room as a [`bytes::BufMut`], for readers that fill one (tokio's `try_read_buf`).
    pub fn target(&mut self) -> bytes::buf::Limit<&mut Vec<u8>> {
        let room = self.room();
        bytes::BufMut::limit(&mut self.buf, room)
    }

    /// Bytes the read brought.
    pub fn received(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// What the backend must do with the connection after feeding it bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep reading.
    Continue,
    /// Send what is in the output buffer, then close: the stream cannot be resynchronised
    /// (a line over the limit, a refused hello). The caller feeds this session nothing
    /// more: the [`Connection`](crate::Connection), which owns that rule
    /// ([`State::Desynced`](crate::State::Desynced)), discards what follows.
    Close,
}

/// Where [`Processor::lines`] stopped.
enum Rest {
    /// Every line was answered.
    None,
    /// An unfinished line begins here.
    Partial(usize),
    /// The output is full: the bytes from here wait in the backlog.
    Full(usize),
}

/// Per-connection protocol state.
#[derive(Debug, Default)]
pub struct Session {
    carry: Vec<u8>,
    /// The incomplete line held in `carry` began in the last receive.
    new_partial: bool,
    /// The peer's address, for the logs (set only when something logs it; boxed, since
    /// most connections never have one).
    peer: Option<Box<std::net::SocketAddr>>,
    /// The client's verified identity (mutual TLS), for handlers and the access policy.
    identity: Option<Arc<str>>,
    /// Length of the last line completed in the carry buffer: a new carried line gets that
    /// room up front (a stream of large lines then copies each once, not once per doubling).
    carry_hint: u32,
    /// What the peer presented and agreed to, and whether the server is closing.
    terms: Terms,
    /// Bytes received after the output reached its limits (`max_pending_output` reply bytes,
    /// or `max_deferred` pending replies), not read as requests yet: they are read, in order
    /// and before anything received later, once the peer has read its replies
    /// ([`Processor::replay`]). So no burst of small requests with large replies, however
    /// much of it one read brings, makes the output outgrow its limit.
    backlog: Vec<u8>,
}

impl Session {
    /// A fresh connection's state (allocates nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes of an incomplete line held until its `\n` arrives.
    pub fn pending_bytes(&self) -> usize {
        self.carry.len()
    }

    /// Bytes received and not read as requests yet because the output was full.
    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }

    /// Whether the connection presented the token, or none is asked for.
    pub fn greeted(&self) -> bool {
        self.terms.greeted
    }

    /// Whether the peer asked for notice lines ([`CAPABILITIES`](crate::CAPABILITIES)).
    pub fn wants_notices(&self) -> bool {
        self.terms.notices
    }

    /// The server is closing this connection: every reply written from now on carries
    /// `"closing":true` if the peer asked for notices.
    pub(crate) fn mark_closing(&mut self) {
        self.terms.closing = true
    }

    /// Bytes of the buffer holding incomplete lines, used or not.
    pub fn carry_capacity(&self) -> usize {
        self.carry.capacity()
    }

    /// Whether the incomplete line held began in the bytes of the last receive (rather than
    /// in an earlier one): its line timeout starts then.
    pub fn partial_line_is_new(&self) -> bool {
        self.new_partial
    }

    /// Names the peer in what this connection's requests log (slow requests, debug lines).
    pub fn set_peer(&mut self, peer: std::net::SocketAddr) {
        self.peer = Some(Box::new(peer));
    }

    /// The client's verified identity (from its TLS certificate), given to every request.
    pub fn set_identity(&mut self, identity: Arc<str>) {
        self.identity = Some(identity);
    }

    /// The client's verified identity, if it has one.
    pub fn identity(&self) -> Option<&str> {
        self.identity.as_deref()
    }

    /// Whether the unfinished line held has room for a read of its own ([`LineBuf`]).
    pub fn wants_line_read(&self) -> bool {
        self.backlog.is_empty()
            && !self.carry.is_empty()
            && self.carry.capacity() - self.carry.len() >= DIRECT_READ_MIN + PADDING
    }

    /// Lends the buffer of the unfinished line for a read straight into it, when it has room
    /// for one ([`wants_line_read`](Self::wants_line_read)).
    pub fn lend_line(&mut self) -> Option<LineBuf> {
        if !self.wants_line_read() {
            return None;
        }
        let start = self.carry.len();
        // Not bounded by where the line should end if it is as long as the last one: a read
        // that brings the next line's start too costs a move of that start, one that stops
        // short costs a receive of it into the pool and a copy from there, plus a switch
        // (bounded reads measured no better at 64 KiB lines, and slower at 1 MiB).
        let room = self.carry.capacity() - start - PADDING;
        Some(LineBuf { start, room, buf: std::mem::take(&mut self.carry) })
    }

    /// Takes back a lent line buffer without looking at what its read brought (the
    /// connection is not serving any more: those bytes are discarded).
    pub(crate) fn return_line(&mut self, line: LineBuf) {
        let LineBuf { mut buf, start, .. } = line;
        buf.truncate(start);
        self.carry = buf;
    }

    /// Every line ended: a large carry buffer is let go.
    fn release_large_carry(&mut self) {
        if self.carry.capacity() > CARRY_KEEP {
            self.carry = Vec::new();
        }
    }

    /// The peer closed its side: an unterminated last line is not a frame and is dropped.
    /// Returns how many bytes were dropped.
    pub fn finish(&mut self) -> usize {
        if !self.backlog.is_empty() {
            // Requests still to be read come first; their unterminated end goes at replay.
            return 0;
        }
        let dropped = self.carry.len();
        self.carry = Vec::new();
        dropped
    }
}

/// How a handler answers: now, into the connection's output ([`reply`](Self::reply)), or
/// later, through a [`Deferred`] handle that holds the reply's place
/// ([`defer`](Self::defer)). The service layer's handler shapes pick one.
pub struct Responder<'o> {
    out: &'o mut Output,
    /// Where the envelope of this reply began in the output's sink.
    start: usize,
    stats: &'o CoreStats,
    deferred: &'o mut bool,
    /// The deadline of a deferred reply whose request set none.
    deferred_timeout: Option<Duration>,
    /// At this many deferred replies pending on the core, a handler that defers gets its
    /// request answered 503 at once.
    max_deferred_per_core: usize,
}

impl<'o> Responder<'o> {
    /// A responder whose reply's envelope begins at `start` in `out`'s sink; `deferred` is
    /// set if the handler defers. (The [`Processor`] makes one for each request; this is for
    /// benches that time a handler alone.)
    pub fn new(out: &'o mut Output, start: usize, stats: &'o CoreStats, deferred: &'o mut bool) -> Self {
        Self { out, start, stats, deferred, deferred_timeout: None, max_deferred_per_core: usize::MAX }
    }

    /// Answers now: the reply's data goes straight into the connection's output.
    #[inline]
    pub fn reply(self) -> Reply<'o> {
        Reply::new(self.out.sink())
    }

    /// Answers later: reserves the reply's place in the connection's ordered output and
    /// returns the handle that completes it.
    ///
    /// When the core already has `max_deferred_per_core` deferred replies pending, the
    /// request is answered 503 at once instead, and the handle returned is
    /// [abandoned](Deferred::is_abandoned): what is done with it is ignored, and the work
    /// for it should not start.
    pub fn defer(self, request: &Request<'_, '_>) -> Deferred {
        self.out.sink().truncate(self.start);
        *self.deferred = true;
        let timeout = request.timeout().or(self.deferred_timeout);
        let pending = self.stats.deferred_pending();
        let deferred = self.out.defer(request.cmdid(), request.id(), timeout, self.stats);
        if pending < self.max_deferred_per_core as u64 {
            return deferred;
        }
        let mut line = Vec::new();
        super::reply::write_error_raw(
            &mut line,
            503,
            deferred.id.as_deref(),
            format_args!("overloaded: {pending} deferred replies are pending on this core; retry later"),
        );
        self.out.answer_last(503, line, self.stats);
        self.stats.deferred_shed();
        deferred.detach()
    }
}

/// The service layer, as the core calls it: what runs the handler of a request. The core
/// frames, parses and validates the request, checks the access policy, and encodes what the
/// handler's work ends in (its data, its error, a 404 for no handler, a 504 past the
/// request's deadline); the dispatcher picks the handler and runs it — and, since only it
/// knows what it runs, times it and catches its panics. (hyper's `proto::h1::Dispatch` plays
/// the same part between its connection machine and the user's service.)
pub trait Dispatch {
    /// Runs the handler of `request`'s cmdid, which answers through `responder` now or
    /// defers. With `timed`, measures when it started and how long it ran.
    fn dispatch(&self, request: &Request<'_, '_>, responder: Responder<'_>, timed: bool) -> Dispatched;
}

/// What a connection's peer presented and agreed to, and whether the server is closing it:
/// read and set as its lines are handled.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Terms {
    /// It may call commands: it presented the token, or none is asked for.
    greeted: bool,
    /// It asked for notice lines (`{"cmdid":3,"params":{"notices":true}}`).
    notices: bool,
    /// The server is closing it: replies carry `"closing":true` (with `notices`).
    closing: bool,
}

/// Answers the capabilities request (cmdid 3): takes the ones this server has that the peer
/// asked for (unknown names are ignored, so a client may ask for what a later server has)
/// and replies with every capability now on. A peer that asks for notices on a connection
/// already closing is told at once, after the reply. Returns the reply code.
fn negotiate(request: &Request<'_, '_>, terms: &mut Terms, out: &mut Vec<u8>, grace: Duration) -> u16 {
    #[derive(serde::Deserialize)]
    struct Asked {
        #[serde(default)]
        notices: Option<bool>,
    }
    match request.params::<Asked>() {
        Ok(asked) => {
            if let Some(notices) = asked.notices {
                terms.notices = notices;
            }
            begin_ok(out, request.id());
            let data_start = out.len();
            Reply::new(out).object().bool("notices", terms.notices);
            end_ok(out, data_start);
            if terms.closing && terms.notices {
                super::reply::write_closing_notice(out, grace);
            }
            0
        }
        Err(e) => {
            write_error(out, e.code(), request.id(), format_args!("{}", e.message()));
            e.code()
        }
    }
}

/// What [`Dispatch::dispatch`] did.
#[derive(Debug)]
pub struct Dispatched {
    /// The handler's result (a panic is a 500 error); `None`: no handler has the cmdid.
    pub result: Option<HandlerResult>,
    /// When timed: when the handler started, and how long it ran.
    pub ran: Option<(Instant, Duration)>,
}

/// One core's request processor: parser buffers, the reused tape, and the dispatcher `D`
/// (the service with this core's state).
pub struct Processor<D> {
    buffers: Buffers,
    tape: Tape<'static>,
    empty_params: Tape<'static>,
    context: CoreContext,
    limits: Arc<Limits>,
    scratch: Vec<u8>,
    /// The line as sent, when parsing it rewrites escaped strings (see [`parse_line`]).
    pristine: Vec<u8>,
    dispatch: D,
    access: super::access::Access,
}

impl<D: Dispatch> Processor<D> {
    /// The processor of core `core`, handing requests to `dispatch`, counting into `stats`.
    pub fn new(core: usize, dispatch: D, stats: Arc<StatsRegistry>, limits: Limits) -> Self {
        Self {
            buffers: Buffers::new(4096),
            tape: Tape(Vec::with_capacity(64)),
            empty_params: Tape(vec![simd_json::Node::Object { len: 0, count: 0 }]),
            context: CoreContext::new(core, stats),
            limits: Arc::new(limits),
            scratch: Vec::new(),
            pristine: Vec::new(),
            dispatch,
            access: super::access::Access::default(),
        }
    }

    /// Admits connections as `access` says: with TLS, every connection of this core starts a
    /// TLS session (see [`Connection::start_tls`](super::Connection::start_tls)); with a
    /// token, every connection's first line must be its hello.
    pub fn with_access(mut self, access: super::access::Access) -> Self {
        self.access = access;
        self
    }

    /// The TLS configuration, on a TLS port.
    pub fn tls(&self) -> Option<&super::tls::TlsConfig> {
        self.access.tls.as_ref()
    }

    /// A new connection of this core, accepted at `now`: its limits, its counters, and on a
    /// TLS port its TLS session.
    pub fn open_connection(&self, now: Instant) -> super::Connection {
        let mut conn = super::Connection::new(self.limits.clone(), now, self.stats());
        if let Some(tls) = self.tls() {
            conn.start_tls(tls);
        }
        if self.access.token.is_some() || self.access.tls.is_some() {
            conn.expect_admission(now);
        }
        conn
    }

    /// The dispatcher.
    pub fn dispatcher(&self) -> &D {
        &self.dispatch
    }

    /// This core's counters.
    pub fn stats(&self) -> &CoreStats {
        self.context.stats().core(self.context.core())
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        *self.limits
    }

    /// Feeds `buf[..len]`, just received on `session`'s connection, and appends every reply
    /// it completes to `out`, in request order.
    ///
    /// `buf` must extend at least [`PADDING`] bytes past `len`: those bytes are read (never
    /// kept) by the parser. Lines inside `buf` are parsed in place, which rewrites escaped
    /// strings inside them.
    pub fn on_recv(&mut self, session: &mut Session, buf: &mut [u8], len: usize, out: &mut Output) -> Flow {
        // Lent to the requests of this receive while the session's buffers are borrowed.
        let identity = session.identity.take();
        let flow = self.receive(session, buf, len, out, identity.as_deref());
        session.identity = identity;
        flow
    }

    fn receive(
        &mut self,
        session: &mut Session,
        buf: &mut [u8],
        len: usize,
        out: &mut Output,
        identity: Option<&str>,
    ) -> Flow {
        assert!(buf.len() >= len + PADDING, "receive buffers need PADDING bytes of slack");
        self.stats().bytes_in(len);
        if !session.backlog.is_empty() {
            // Behind requests not read yet (only a backend whose reads outrun a pause, a
            // multishot recv, gets here): kept in order after them.
            session.backlog.extend_from_slice(&buf[..len]);
            return Flow::Continue;
        }
        self.feed(session, buf, len, out, identity)
    }

    /// Whether the output has reached the connection's limits: no more requests are read
    /// until the peer has read enough replies (the connection pauses reading, see
    /// [`Session::backlog`]).
    #[inline(always)]
    fn output_full(&self, out: &Output) -> bool {
        out.full(self.limits.max_pending_output, self.limits.max_deferred)
    }

    /// Reads the requests of `session`'s backlog, once the output has room again: as a
    /// receive would, and stopping again at the limits. Bytes were counted on arrival.
    pub fn replay(&mut self, session: &mut Session, out: &mut Output) -> Flow {
        if session.backlog.is_empty() || self.output_full(out) {
            return Flow::Continue;
        }
        let mut buf = std::mem::take(&mut session.backlog);
        let len = buf.len();
        buf.resize(len + PADDING, 0);
        let identity = session.identity.take();
        let flow = self.feed(session, &mut buf, len, out, identity.as_deref());
        session.identity = identity;
        if session.backlog.is_empty() && flow == Flow::Continue && buf.capacity() <= CARRY_KEEP {
            buf.clear();
            session.backlog = buf;
        }
        flow
    }

    /// [`receive`](Self::receive) of bytes that go straight to the parser.
    fn feed(
        &mut self,
        session: &mut Session,
        buf: &mut [u8],
        len: usize,
        out: &mut Output,
        identity: Option<&str>,
    ) -> Flow {
        if !session.terms.greeted && self.access.token.is_none() {
            session.terms.greeted = true;
        }
        let max_line = self.limits.max_line;
        let mut pos = 0;
        if !session.carry.is_empty() {
            let Some(nl) = find_newline(&buf[..len]) else {
                return self.stash(session, &buf[..len], out);
            };
            if session.carry.len() + nl > max_line {
                return self.too_long(session, out);
            }
            let carry = &mut session.carry;
            carry.extend_from_slice(&buf[..nl]);
            let line_len = carry.len();
            session.carry_hint = u32::try_from(line_len).unwrap_or(u32::MAX);
            carry.resize(line_len + PADDING, 0);
            let peer = session.peer.as_deref().copied();
            let flow = self.handle_line(carry, line_len, out, peer, identity, &mut session.terms);
            // Kept while the next line is carried too (below), so a stream of long lines
            // does not grow the carry from nothing for each.
            carry.clear();
            if flow == Flow::Close {
                return self.refused(session);
            }
            pos = nl + 1;
        }
        match self.lines(session, buf, pos, len, out, identity) {
            Err(flow) => flow,
            Ok(Rest::Partial(partial)) => self.stash(session, &buf[partial..len], out),
            Ok(Rest::Full(rest)) => {
                session.backlog.extend_from_slice(&buf[rest..len]);
                Flow::Continue
            }
            Ok(Rest::None) => {
                session.release_large_carry();
                Flow::Continue
            }
        }
    }

    /// Answers every complete line of `buf[pos..len]` where it lies (`buf` extends
    /// [`PADDING`] bytes past `len`), until the output is full. `Err`: the stream ended (a
    /// line too long, a refused hello).
    // Inlined into both callers: out of line, every receive paid a call and its spills
    // (60 instructions per request on `request_path`'s `seed_x1`, callgrind).
    #[inline(always)]
    fn lines(
        &mut self,
        session: &mut Session,
        buf: &mut [u8],
        mut pos: usize,
        len: usize,
        out: &mut Output,
        identity: Option<&str>,
    ) -> Result<Rest, Flow> {
        while pos < len {
            if self.output_full(out) {
                return Ok(Rest::Full(pos));
            }
            match find_newline(&buf[pos..len]) {
                Some(nl) if nl > self.limits.max_line => return Err(self.too_long(session, out)),
                Some(nl) => {
                    let terms = &mut session.terms;
                    if self.handle_line(
                        &mut buf[pos..],
                        nl,
                        out,
                        session.peer.as_deref().copied(),
                        identity,
                        terms,
                    ) == Flow::Close
                    {
                        return Err(self.refused(session));
                    }
                    pos += nl + 1;
                }
                None => return Ok(Rest::Partial(pos)),
            }
        }
        Ok(Rest::None)
    }

    /// Feeds what a read straight into a lent line buffer brought ([`Session::lend_line`]),
    /// and takes the buffer back: the line goes on, or ends and is answered with every line
    /// after it; an unfinished last line moves to the buffer's front.
    pub fn on_line_recv(&mut self, session: &mut Session, line: LineBuf, out: &mut Output) -> Flow {
        let identity = session.identity.take();
        let flow = self.receive_line(session, line, out, identity.as_deref());
        session.identity = identity;
        flow
    }

    fn receive_line(
        &mut self,
        session: &mut Session,
        line: LineBuf,
        out: &mut Output,
        identity: Option<&str>,
    ) -> Flow {
        let LineBuf { mut buf, start, .. } = line;
        let total = buf.len();
        self.stats().bytes_in(total - start);
        let max_line = self.limits.max_line;
        let Some(nl) = find_newline(&buf[start..]) else {
            if total > max_line {
                return self.too_long(session, out);
            }
            session.new_partial = false;
            session.carry = buf;
            return Flow::Continue;
        };
        let line_len = start + nl;
        if line_len > max_line {
            return self.too_long(session, out);
        }
        session.carry_hint = u32::try_from(line_len).unwrap_or(u32::MAX);
        // Within the capacity the read left for it: no reallocation.
        buf.resize(total + PADDING, 0);
        let peer = session.peer.as_deref().copied();
        if self.handle_line(&mut buf, line_len, out, peer, identity, &mut session.terms) == Flow::Close {
            return self.refused(session);
        }
        match self.lines(session, &mut buf, line_len + 1, total, out, identity) {
            Err(flow) => flow,
            Ok(Rest::Full(rest)) => {
                session.backlog.extend_from_slice(&buf[rest..total]);
                buf.clear();
                session.carry = buf;
                session.release_large_carry();
                Flow::Continue
            }
            Ok(Rest::Partial(partial)) if total - partial > max_line => self.too_long(session, out),
            Ok(Rest::Partial(partial)) => {
                // The next line's start is usually short next to the buffer's room: moved
                // to the front, the buffer serves that line too.
                buf.copy_within(partial..total, 0);
                buf.truncate(total - partial);
                session.new_partial = true;
                session.carry = buf;
                Flow::Continue
            }
            Ok(Rest::None) => {
                buf.clear();
                session.carry = buf;
                session.release_large_carry();
                Flow::Continue
            }
        }
    }

    /// [`on_recv`](Self::on_recv) for bytes without padding: copies them into a padded
    /// scratch buffer first. For tests and callers that do not own their receive buffers.
    pub fn on_recv_copy(&mut self, session: &mut Session, data: &[u8], out: &mut Output) -> Flow {
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.clear();
        scratch.extend_from_slice(data);
        scratch.resize(data.len() + PADDING, 0);
        let flow = self.on_recv(session, &mut scratch, data.len(), out);
        self.scratch = scratch;
        flow
    }

    /// Feeds what one read of `source` yields (TLS plaintext), read straight into the padded
    /// scratch buffer: `Ok(None)` at its end.
    pub(crate) fn on_recv_from(
        &mut self,
        session: &mut Session,
        out: &mut Output,
        source: &mut impl std::io::Read,
    ) -> std::io::Result<Option<Flow>> {
        const CHUNK: usize = 16 * 1024;
        let mut scratch = std::mem::take(&mut self.scratch);
        // Grown once, never cleared: the padding's contents do not matter to the parser.
        if scratch.len() < CHUNK + PADDING {
            scratch.resize(CHUNK + PADDING, 0);
        }
        let result = match source.read(&mut scratch[..CHUNK]) {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(self.on_recv(session, &mut scratch, n, out))),
            Err(e) => Err(e),
        };
        self.scratch = scratch;
        result
    }

    fn stash(&mut self, session: &mut Session, rest: &[u8], out: &mut Output) -> Flow {
        if session.carry.len() + rest.len() > self.limits.max_line {
            return self.too_long(session, out);
        }
        session.new_partial = session.carry.is_empty();
        if session.new_partial {
            let expected = (session.carry_hint as usize).min(self.limits.max_line) + PADDING;
            session.carry.reserve(expected.max(rest.len()));
        }
        session.carry.extend_from_slice(rest);
        Flow::Continue
    }

    /// The hello was refused: nothing more is read from this connection.
    fn refused(&self, session: &mut Session) -> Flow {
        session.carry = Vec::new();
        session.backlog = Vec::new();
        Flow::Close
    }

    fn too_long(&mut self, session: &mut Session, out: &mut Output) -> Flow {
        session.carry = Vec::new();
        session.backlog = Vec::new();
        self.stats().request();
        self.stats().reply(413);
        let max_line = self.limits.max_line;
        write_error(out.sink(), 413, None, format_args!("request line longer than {max_line} bytes"));
        Flow::Close
    }

    /// Handles the line `buf[..len]` (without its `\n`); `buf[len..]` is padding. Before
    /// the connection is `greeted`, the line must be the token hello: `Flow::Close` when it
    /// is not.
    fn handle_line(
        &mut self,
        buf: &mut [u8],
        len: usize,
        out: &mut Output,
        peer: Option<std::net::SocketAddr>,
        identity: Option<&str>,
        terms: &mut Terms,
    ) -> Flow {
        let len = content_len(&buf[..len]);
        if is_blank(&buf[..len]) {
            return Flow::Continue;
        }
        self.stats().request();
        // Only a peer that asked for notices gets the mark: others see the bytes they always did.
        let reply_at = (terms.closing && terms.notices).then(|| out.reply_mark());
        let mut tape = std::mem::replace(&mut self.tape, Tape(Vec::new())).reset();
        let mut pristine = std::mem::take(&mut self.pristine);
        let (parsed, sent) = parse_line(buf, len, &mut self.buffers, &mut tape, &mut pristine);
        let mut flow = Flow::Continue;
        let code = if !terms.greeted {
            if self.greet(parsed.is_ok().then_some((&tape, sent)), out) {
                terms.greeted = true;
                Some(0)
            } else {
                let peer = peer.map(tracing::field::display);
                tracing::debug!(peer, "refused a connection that did not begin with the token hello");
                flow = Flow::Close;
                Some(401)
            }
        } else {
            match parsed {
                Ok(()) => self.dispatch(&tape, sent, out, peer, identity, terms),
                Err(e) => {
                    write_error(
                        out.sink(),
                        400,
                        None,
                        format_args!("invalid JSON at byte {}: {}", e.index(), json_error(&e)),
                    );
                    Some(400)
                }
            }
        };
        self.tape = tape.reset();
        self.pristine = pristine;
        if let Some(mark) = reply_at {
            out.mark_closing(mark);
        }
        if let Some(code) = code {
            self.stats().reply(code);
        }
        flow
    }

    /// Answers the first line (`tape`, if it parsed) of a connection that must present the
    /// token: `"hello"` and true when it is the hello with the right token, else a 401.
    fn greet(&self, tape: Option<(&Tape<'_>, Sent<'_>)>, out: &mut Output) -> bool {
        #[derive(serde::Deserialize)]
        struct Hello<'a> {
            token: &'a str,
        }
        let request =
            tape.and_then(|(tape, sent)| decode(tape, sent, &self.empty_params, &self.context, None).ok());
        let id = request.as_ref().and_then(Request::id);
        let hello = request.as_ref().filter(|r| r.cmdid() == super::access::HELLO);
        let sink = out.sink();
        let token = self.access.token.as_ref();
        match hello.map(|r| r.params::<Hello<'_>>()) {
            Some(Ok(hello)) if token.is_none_or(|t| t.matches(hello.token.as_bytes())) => {
                begin_ok(sink, id);
                let data_start = sink.len();
                Reply::new(sink).str("hello");
                end_ok(sink, data_start);
                true
            }
            Some(_) => {
                write_error(sink, 401, id, format_args!("the token is not this server's"));
                false
            }
            None => {
                write_error(
                    sink,
                    401,
                    id,
                    format_args!(
                        "this server admits a connection only after its token: send {{\"cmdid\":{},\"params\":{{\"token\":\"…\"}}}} first",
                        super::access::HELLO
                    ),
                );
                false
            }
        }
    }

    /// Validates the envelope, runs the handler, encodes the reply. Returns the reply code
    /// (`None` for a reply deferred: it is counted when it is answered).
    fn dispatch(
        &self,
        tape: &Tape<'_>,
        sent: Sent<'_>,
        out: &mut Output,
        peer: Option<std::net::SocketAddr>,
        identity: Option<&str>,
        terms: &mut Terms,
    ) -> Option<u16> {
        let request = match decode(tape, sent, &self.empty_params, &self.context, identity) {
            Ok(request) => request,
            Err(Rejected { error, id }) => {
                write_error(out.sink(), 400, id, format_args!("{error}"));
                return Some(400);
            }
        };
        if request.cmdid() == super::access::CAPABILITIES {
            return Some(negotiate(&request, terms, out.sink(), self.limits.drain_grace));
        }
        if let Some(code) = self.refused_by_acl(&request, out) {
            return Some(code);
        }
        let cmdid = request.cmdid();
        let sink = out.sink();
        let start = sink.len();
        begin_ok(sink, request.id());
        let data_start = sink.len();
        // Handlers are timed only when something reads the time (metrics served, a slow
        // request threshold, debug logging, a deadline): the cheapest requests lose a few
        // per cent to the per-command lookup and a tenth to the clock reads.
        let metrics = self.stats().times_handlers();
        let debug = tracing::enabled!(tracing::Level::DEBUG);
        let timed = metrics || debug || self.limits.slow_request.is_some() || request.timeout().is_some();
        let mut deferred = false;
        let responder = Responder {
            out: &mut *out,
            start,
            stats: self.stats(),
            deferred: &mut deferred,
            deferred_timeout: self.limits.deferred_timeout,
            max_deferred_per_core: self.limits.max_deferred_per_core,
        };
        let Dispatched { result, ran } = self.dispatch.dispatch(&request, responder, timed);
        if metrics
            && !deferred
            && let Some(arrived) = out.now()
        {
            // The reply's time in the server is observed when the send carrying it is done.
            out.note_time(cmdid, arrived);
        }
        let code = if deferred {
            self.answer_deferred_at_once(result, &request, out);
            None
        } else if self.past_deadline(&request, out.now(), ran) {
            let sink = out.sink();
            sink.truncate(start);
            let ms = request.timeout().unwrap_or_default().as_millis();
            write_error(
                sink,
                504,
                request.id(),
                format_args!("deadline of {ms} ms passed before the handler answered"),
            );
            self.stats().deadline_expired();
            Some(504)
        } else {
            Some(self.encode_outcome(result, &request, out.sink(), start, data_start))
        };
        if let Some((_, handler_time)) = ran {
            self.record(cmdid, code, handler_time, metrics, debug, peer);
        }
        code
    }

    /// With an access policy, a caller that may not call the request's cmdid gets a 403.
    fn refused_by_acl(&self, request: &Request<'_, '_>, out: &mut Output) -> Option<u16> {
        let acl = self.access.tls.as_ref().and_then(|t| t.acl.as_deref())?;
        let cmdid = request.cmdid();
        if acl.allows(request.identity(), cmdid) {
            return None;
        }
        let who = request.identity().unwrap_or("a caller without a client certificate");
        write_error(out.sink(), 403, request.id(), format_args!("{who} may not call cmdid {cmdid}"));
        Some(403)
    }

    /// A handler that deferred its reply: answered later through the handle, unless it
    /// returned an error at once — that is the answer, in the reply's place (the handle,
    /// dropped or not, is ignored once the place is answered).
    fn answer_deferred_at_once(
        &self,
        result: Option<HandlerResult>,
        request: &Request<'_, '_>,
        out: &mut Output,
    ) {
        if let Some(Ok(())) = result {
            return;
        }
        let mut line = Vec::new();
        let code = self.encode_outcome(result, request, &mut line, 0, 0);
        out.answer_last(code, line, self.stats());
    }

    /// Whether a handler that answered at once did so past its request's deadline: the
    /// caller has given up, and a 504 says so rather than an answer nobody waits for.
    fn past_deadline(
        &self,
        request: &Request<'_, '_>,
        arrived: Option<Instant>,
        ran: Option<(Instant, Duration)>,
    ) -> bool {
        match (request.timeout(), arrived, ran) {
            (Some(timeout), Some(arrived), Some((started, took))) => started + took >= arrived + timeout,
            _ => false,
        }
    }

    /// Counts a timed request for its command (when metrics are served) and logs it: at warn
    /// level past the slow-request threshold, at debug level otherwise.
    fn record(
        &self,
        cmdid: u32,
        code: Option<u16>,
        handler_time: Duration,
        metrics: bool,
        debug: bool,
        peer: Option<std::net::SocketAddr>,
    ) {
        if metrics
            && let Some(code) = code
            && let Some(command) = self.stats().command(cmdid)
        {
            command.record(code, Some(handler_time));
        }
        let core = self.context.core();
        let peer = peer.map(tracing::field::display);
        // A deferred reply's code is not known yet.
        let deferred = code.is_none();
        let code = code.unwrap_or_default();
        if self.limits.slow_request.is_some_and(|slow| handler_time >= slow) {
            tracing::warn!(cmdid, code, deferred, core, peer, ?handler_time, "slow request");
        } else if debug {
            tracing::debug!(cmdid, code, deferred, core, peer, ?handler_time, "request");
        }
    }

    /// Finishes the reply of a handler that ran (or the 404 of a cmdid none handles);
    /// returns its code.
    fn encode_outcome(
        &self,
        result: Option<HandlerResult>,
        request: &Request<'_, '_>,
        out: &mut Vec<u8>,
        start: usize,
        data_start: usize,
    ) -> u16 {
        let cmdid = request.cmdid();
        match result {
            Some(Ok(())) => {
                end_ok(out, data_start);
                0
            }
            Some(Err(e)) => {
                out.truncate(start);
                write_error(out, e.code(), request.id(), format_args!("{}", e.message()));
                e.code()
            }
            None => {
                out.truncate(start);
                write_error(out, 404, request.id(), format_args!("unknown cmdid {cmdid}"));
                404
            }
        }
    }
}

/// What is wrong with a line that is not JSON, in a reader's words (simd-json's error kinds
/// are identifiers such as `InvalidNumber`).
pub fn json_error(e: &simd_json::Error) -> &'static str {
    use simd_json::ErrorType as E;
    match e.error() {
        E::InvalidNumber | E::InvalidExponent | E::Overflow => {
            "a number that is malformed or out of range (numbers must fit a 64-bit integer or a double)"
        }
        E::InvalidUtf8 => "invalid UTF-8",
        E::InvalidEscape | E::InvalidUnicodeEscape | E::InvalidUnicodeCodepoint => {
            "an invalid escape in a string"
        }
        E::UnterminatedString => "an unterminated string",
        E::DepthLimitExceeded => "nesting deeper than 1024",
        E::KeyMustBeAString | E::ExpectedObjectKey => "an object key that is not a string",
        E::Eof | E::ExpectedMapEnd | E::ExpectedArrayContent | E::ExpectedObjectContent => {
            "the document ends early"
        }
        E::TrailingData => "more after the end of the document",
        _ => "not a JSON document",
    }
}

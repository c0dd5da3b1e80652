//! Every rule of a connection, for every backend: what to read, what to send, when to pause
//! reading, when to send FIN, when to close, and every deadline.
//!
//! A [`Connection`] is a sans-I/O state machine in the style of quinn-proto: a backend feeds
//! it events — bytes received ([`on_recv`](Connection::on_recv)), bytes sent
//! ([`on_sent`](Connection::on_sent)), the peer's end of file
//! ([`on_peer_closed`](Connection::on_peer_closed)), an I/O error
//! ([`on_error`](Connection::on_error)), a timer ([`on_timeout`](Connection::on_timeout)), a
//! server shutdown ([`on_shutdown`](Connection::on_shutdown)) — and asks what to do:
//! which bytes to send ([`start_send`](Connection::start_send)), whether to read
//! ([`wants_read`](Connection::wants_read)), whether to half-close or close
//! ([`poll`](Connection::poll)), and when to wake it next
//! ([`poll_timeout`](Connection::poll_timeout)). It never reads the clock: every event
//! carries `now`, so the rules are tested with a fake clock.
//!
//! The connection owns the protocol [`Session`], the replies not yet handed to the kernel,
//! the bytes the kernel is sending, and the counters it bumps. A backend keeps its socket,
//! its operations in flight and this machine — nothing else.

use std::mem;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::deferred::Mailbox;
use super::output::Output;
use super::session::Dispatch;
use super::session::{Flow, Processor, Session};
use crate::stats::CoreStats;

/// Default longest request line, in bytes, not counting the `\n`.
pub const DEFAULT_MAX_LINE: usize = 1 << 20;
/// Default connections per core.
pub const DEFAULT_MAX_CONNECTIONS_PER_CORE: usize = 16_384;
/// Default unsent reply bytes per connection before reading pauses.
pub const DEFAULT_MAX_PENDING_OUTPUT: usize = 1 << 20;
/// Default deferred replies one connection may have pending before reading from it pauses.
pub const DEFAULT_MAX_DEFERRED: usize = 1024;
/// Default time a deferred reply may take when its request set no `timeout_ms`.
pub const DEFAULT_DEFERRED_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`Limits::max_deferred_per_core`].
pub const DEFAULT_MAX_DEFERRED_PER_CORE: usize = 16 * 1024;

/// Default time a connection has to finish its TLS handshake and its token hello.
pub const DEFAULT_HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Default time a peer may take to finish a line it started.
pub const DEFAULT_LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// Output buffers that grew past this are freed once drained, so a connection that once
/// received a burst of replies does not keep their memory.
const OUT_KEEP: usize = 64 << 10;

/// The limits every connection of a server obeys, on every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line in bytes (excluding `\n`); longer gets 413 and a close.
    pub max_line: usize,
    /// Connections one core serves at once; beyond it a new connection gets a 503 reply line
    /// and is closed (the [`Engine`](super::Engine) admits).
    pub max_connections_per_core: usize,
    /// Unsent reply bytes one connection may hold; past it the server stops reading from that
    /// peer until it has read half of them (backpressure).
    pub max_pending_output: usize,
    /// Close connections that move no bytes for this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Close a connection that started a line and has not finished it within this long
    /// (slowloris), or that lingers after a 413 or a shutdown without closing its side.
    pub line_timeout: Duration,
    /// Log at warn level every request whose handler runs this long or longer, with its
    /// cmdid, code, core and peer (`None`: never).
    pub slow_request: Option<Duration>,
    /// Deferred replies one connection may have pending; at this many, reading from it
    /// pauses until half are answered (so a peer cannot pile up unbounded work).
    pub max_deferred: usize,
    /// The deadline of a deferred reply whose request set no `timeout_ms` (`None`: none):
    /// past it the caller gets a 504 in the reply's place, as with `timeout_ms`, so a handler
    /// that keeps its handle and never answers cannot hold that reply, and every later one on
    /// the connection, forever.
    pub deferred_timeout: Option<Duration>,
    /// How long a connection that must be admitted first — a TLS handshake, the token
    /// hello — has to finish that; past it, it is closed. Until then it holds a connection
    /// slot without being able to call anything, so this bounds how long peers that never
    /// finish can keep legitimate clients out.
    pub hello_timeout: Duration,
    /// Deferred replies one core may have pending, over all its connections; a handler that
    /// defers beyond it gets its request answered 503 at once (load is shed before memory,
    /// descriptors or an upstream run out).
    pub max_deferred_per_core: usize,
    /// How long a connection the server is closing keeps reading and answering after it was
    /// told so (if it asked for notices: a notice line, and `"closing":true` on its replies),
    /// before the server sends FIN: a client that acts on the notice moves its calls
    /// elsewhere meanwhile, and a request that crossed the notice is answered, not lost.
    /// Cut short when the peer closes first; bounded by the shutdown timeout.
    pub drain_grace: Duration,
    /// Close connections this old, through the same notice and grace as a shutdown, so
    /// persistent connections are recycled and rebalance onto new or restarted servers
    /// (`None`: never). Each connection's age is cut by up to a tenth, at random, so those
    /// opened together do not all reconnect at once.
    pub max_connection_age: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line: DEFAULT_MAX_LINE,
            max_connections_per_core: DEFAULT_MAX_CONNECTIONS_PER_CORE,
            max_pending_output: DEFAULT_MAX_PENDING_OUTPUT,
            idle_timeout: None,
            line_timeout: DEFAULT_LINE_TIMEOUT,
            slow_request: None,
            max_deferred: DEFAULT_MAX_DEFERRED,
            drain_grace: Duration::ZERO,
            max_connection_age: None,
            deferred_timeout: Some(DEFAULT_DEFERRED_TIMEOUT),
            hello_timeout: DEFAULT_HELLO_TIMEOUT,
            max_deferred_per_core: DEFAULT_MAX_DEFERRED_PER_CORE,
        }
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Reading requests and answering them.
    Serving,
    /// The server is shutting down: answer what has arrived, then send FIN.
    Draining,
    /// The peer sent FIN: send every reply owed, then close.
    PeerClosed,
    /// A line over the limit put the stream out of sync: send the replies owed (the last is
    /// the 413), then FIN; further input is discarded.
    Desynced,
    /// Admitted over the core's limit only to be refused inside its TLS session: finish the
    /// handshake, send the 503, then FIN; requests are discarded.
    Refusing,
    /// FIN was sent after the last reply; input is discarded until the peer closes, so unread
    /// input cannot turn the close into a reset that destroys replies in flight.
    Lingering {
        /// When FIN was sent.
        since: Instant,
    },
    /// Done: the backend releases the socket.
    Closed(CloseReason),
}

/// Why a connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer closed and every reply was sent.
    PeerClosed,
    /// We sent FIN after the last reply and the peer closed too.
    Finished,
    /// Nothing moved for `idle_timeout`.
    IdleTimeout,
    /// A started line, or the peer's close after our FIN, took longer than `line_timeout`.
    LineTimeout,
    /// The TLS handshake or the token hello was not done within `hello_timeout`.
    HelloTimeout,
    /// The server's shutdown deadline passed first.
    ShutdownDeadline,
    /// The socket failed.
    Error,
}

/// Whether requests are read from the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    Active,
    /// Backpressure: the peer holds more than `max_pending_output` unread reply bytes.
    Paused,
}

/// The send the kernel (or a write call) is working on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Send {
    Idle,
    /// `sending[sent..]` was handed out by [`Connection::start_send`].
    InFlight,
    /// The buffer itself was lent out (ownership-passing I/O) with this many bytes in it.
    Lent(usize),
}

/// What the backend must do with the socket, from [`Connection::poll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing beyond sending and reading as asked.
    Wait,
    /// Send FIN (`shutdown(SHUT_WR)`), keep reading: the machine now discards input until the
    /// peer closes.
    ShutdownWrite,
    /// Close the socket once no operation on it is in flight.
    Close(CloseReason),
}

/// One connection's state machine (see the module docs).
#[derive(Debug)]
pub struct Connection {
    state: State,
    reading: Reading,
    send: Send,
    session: Session,
    /// Replies produced and not yet handed to the kernel, in request order, with the places
    /// of deferred replies not answered yet.
    out: Output,
    /// The bytes handed to the kernel, of which `sent` are sent.
    sending: Vec<u8>,
    sent: usize,
    /// Plaintext bytes of the last batch taken for sending: the room the next one is given
    /// up front (within `max_pending_output`), so that large replies do not regrow the
    /// output from nothing after every batch, while a quiet connection still holds no buffer.
    last_batch: usize,
    /// When the oldest request answered in `sending` arrived (for `out`, the output keeps
    /// it): a batch's time in the server, observed when it is sent whole.
    sending_since: Option<Instant>,
    /// While metrics are served: the cmdid and arrival of each reply in `sending`.
    sending_times: Vec<(u32, Instant)>,
    /// The last time bytes moved either way.
    last_activity: Instant,
    /// Since when the peer owes the rest of a line it started.
    line_started: Option<Instant>,
    /// When the server's shutdown deadline closes this connection.
    drain_deadline: Option<Instant>,
    /// While draining: until when it keeps serving after the notice, before FIN.
    grace_until: Option<Instant>,
    /// While serving: when it is old enough to be closed ([`Limits::max_connection_age`]).
    retire_at: Option<Instant>,
    /// Until it is admitted (TLS handshake, token hello): when it is closed if not by then.
    admit_by: Option<Instant>,
    /// Shared by every connection of the server (one pointer here, not a copy each).
    limits: Arc<Limits>,
    /// `connection{peer=…}`, entered while this machine handles an event, so that what its
    /// requests log carries it; only while debug logging is on.
    span: Option<Box<tracing::Span>>,
    /// The TLS session, on a TLS port: bytes received are decrypted before framing, bytes
    /// sent are encrypted.
    tls: Option<Box<Tls>>,
}

/// A connection's TLS session and its reusable plaintext buffer.
#[derive(Debug)]
struct Tls {
    session: rustls::ServerConnection,
    /// The replies of a batch, taken out of the output to be encrypted.
    plain: Vec<u8>,
    /// `close_notify` was queued (before our FIN).
    closing: bool,
    /// Client certificates are required, and the identity is not read yet.
    identity_pending: bool,
}

impl Tls {
    /// Decrypts `received` and feeds the plaintext to the protocol session. Returns the
    /// flow and whether the peer closed the TLS session (`close_notify`); `Err` when the
    /// bytes are not TLS or the handshake failed.
    fn receive<D: Dispatch>(
        &mut self,
        mut received: &[u8],
        processor: &mut Processor<D>,
        session: &mut Session,
        out: &mut Output,
    ) -> Result<(Flow, bool), rustls::Error> {
        let mut flow = Flow::Continue;
        let mut peer_closed = false;
        while !received.is_empty() {
            if self.session.read_tls(&mut received).is_err() {
                break;
            }
            self.session.process_new_packets()?;
            if self.identity_pending && !self.session.is_handshaking() {
                self.identity_pending = false;
                if let Some(identity) = super::tls::client_identity(&self.session) {
                    session.set_identity(identity);
                }
            }
            loop {
                // Once the stream is out of sync nothing more is fed (the connection discards it).
                if flow == Flow::Close {
                    return Ok((flow, peer_closed));
                }
                match processor.on_recv_from(session, out, &mut self.session.reader()) {
                    Ok(Some(next)) => flow = next,
                    Ok(None) => {
                        peer_closed = true;
                        break;
                    }
                    // WouldBlock: no more plaintext until more records arrive.
                    Err(_) => break,
                }
            }
        }
        Ok((flow, peer_closed))
    }
}

impl Connection {
    /// A connection accepted at `now` (counted as opened; allocates nothing).
    pub fn new(limits: Arc<Limits>, now: Instant, stats: &CoreStats) -> Self {
        stats.connection_opened();
        Self {
            state: State::Serving,
            reading: Reading::Active,
            send: Send::Idle,
            session: Session::new(),
            out: Output::default(),
            sending: Vec::new(),
            sending_times: Vec::new(),
            sent: 0,
            last_batch: 0,
            sending_since: None,
            last_activity: now,
            line_started: None,
            drain_deadline: None,
            grace_until: None,
            retire_at: limits.max_connection_age.map(|age| now + jittered(age, now)),
            admit_by: None,
            limits,
            span: tracing::enabled!(tracing::Level::DEBUG)
                .then(|| Box::new(tracing::debug_span!("connection", peer = tracing::field::Empty))),
            tls: None,
        }
    }

    /// Makes this a TLS connection: what is received is decrypted, what is sent encrypted.
    pub fn start_tls(&mut self, config: &super::tls::TlsConfig) {
        match config.session() {
            Ok(session) => {
                self.tls = Some(Box::new(Tls {
                    session,
                    plain: Vec::new(),
                    closing: false,
                    identity_pending: config.mutual,
                }));
            }
            Err(e) => {
                tracing::warn!("cannot start a TLS session: {e}");
                self.state = State::Closed(CloseReason::Error);
            }
        }
    }

    /// The connection, accepted at `now`, must finish a TLS handshake or present the token
    /// before it may call anything: it is closed if that is not done within `hello_timeout`.
    pub fn expect_admission(&mut self, now: Instant) {
        self.admit_by = Some(now + self.limits.hello_timeout);
    }

    /// The core is full: this connection only gets `line` (the 503) once its TLS handshake
    /// is done, then FIN; what it sends is discarded ([`State::Refusing`]).
    pub fn refuse(&mut self, line: &[u8]) {
        if matches!(self.state, State::Closed(_)) {
            return;
        }
        self.out.sink().extend_from_slice(line);
        self.state = State::Refusing;
    }

    /// Whether the connection still has to finish its TLS handshake or its hello.
    fn admitting(&self) -> bool {
        self.admit_by.is_some() && (self.is_handshaking() || !self.session.greeted())
    }

    /// The backend released the socket: counts the connection as closed. Deferred replies
    /// still pending are abandoned: their answers will be dropped.
    pub fn finish(mut self, stats: &CoreStats) {
        self.out.close(stats);
        stats.connection_closed();
    }

    /// The connection's mailbox for deferred replies, once a handler has deferred one: a
    /// backend waits on it ([`Mailbox::poll_ready`] or [`Mailbox::set_waker`]) and calls
    /// [`on_deferred`](Self::on_deferred) when it is ready.
    pub fn mailbox(&self) -> Option<&std::sync::Arc<Mailbox>> {
        self.out.mailbox()
    }

    /// Deferred replies not answered yet.
    pub fn deferred_pending(&self) -> usize {
        self.out.pending()
    }

    /// Deferred replies were answered (the mailbox woke the backend) at `now`: they join the
    /// output in request order, with the replies that waited behind them. The idle clock
    /// starts again: the connection was not idle while it waited for them.
    pub fn on_deferred(&mut self, now: Instant, stats: &CoreStats) {
        let span = self.span.as_deref().cloned();
        let _entered = span.as_ref().map(tracing::Span::enter);
        if matches!(self.state, State::Closed(_)) {
            return;
        }
        if self.out.take_completions(stats) {
            self.last_activity = now;
        }
        self.resume_if_below();
    }

    /// Resumes reading once the connection holds at most half of `max_pending_output` and
    /// half of `max_deferred`.
    fn resume_if_below(&mut self) {
        if self.reading == Reading::Paused
            && self.held() <= self.limits.max_pending_output / 2
            && self.out.pending() <= self.limits.max_deferred / 2
        {
            self.reading = Reading::Active;
        }
    }

    /// Whether the logs would name this connection's peer (a slow-request threshold is set,
    /// or debug logging is on): only then is it worth a `getpeername` per connection.
    pub fn wants_peer(&self) -> bool {
        self.limits.slow_request.is_some() || tracing::enabled!(tracing::Level::DEBUG)
    }

    /// The peer's address, for the logs (see [`wants_peer`](Self::wants_peer)).
    pub fn set_peer(&mut self, peer: std::net::SocketAddr) {
        if let Some(span) = &self.span {
            span.record("peer", tracing::field::display(peer));
        }
        self.session.set_peer(peer);
    }

    /// Where the connection is.
    pub fn state(&self) -> State {
        self.state
    }

    /// Bytes of buffer this connection holds (its output, its send buffer, its partial line),
    /// used or not: what a quiet connection costs beyond its fixed size.
    pub fn buffered_capacity(&self) -> usize {
        let tls = self.tls.as_ref().map_or(0, |t| t.plain.capacity());
        self.out.ready_capacity() + self.sending.capacity() + self.session.carry_capacity() + tls
    }

    /// Reply bytes produced and not yet sent.
    pub fn unsent(&self) -> usize {
        let sending = match self.send {
            Send::Lent(len) => len,
            Send::Idle | Send::InFlight => self.sending.len(),
        };
        self.out.len() + sending - self.sent
    }

    /// Whether every reply owed was handed to the kernel and sent, deferred ones included.
    fn output_done(&self) -> bool {
        !self.send_in_flight()
            && self.unsent() == 0
            && self.out.pending() == 0
            && !self.tls.as_ref().is_some_and(|t| t.session.wants_write())
    }

    /// Reply bytes the connection holds in memory: those not yet handed to the kernel, and the
    /// whole batch of the send in flight (its buffer is freed only once all of it is sent).
    /// Backpressure counts these, so the limit bounds the memory, not only the unsent bytes.
    fn held(&self) -> usize {
        let sending = match self.send {
            Send::Lent(len) => len,
            Send::Idle | Send::InFlight => self.sending.len(),
        };
        self.out.len() + sending
    }

    /// How many more request bytes a read may bring before reading would pause, taking a
    /// reply to be about as long as its request (at least 1). A backend whose reads keep
    /// going until cancelled (a multishot recv) bounds them by this, so that reading stops
    /// near the limit, not however many reads later the cancel lands.
    pub fn read_budget(&self) -> usize {
        self.limits.max_pending_output.saturating_sub(self.held()).max(1)
    }

    /// Whether the backend should have a read outstanding. While it is false, nothing is
    /// read from the peer: its requests wait in the kernel and TCP's flow control stops it.
    pub fn wants_read(&self) -> bool {
        match self.state {
            State::Serving | State::Draining => self.reading == Reading::Active,
            // Discarding until the peer closes (a refused one: its handshake).
            State::Desynced | State::Refusing | State::Lingering { .. } => true,
            State::PeerClosed | State::Closed(_) => false,
        }
    }

    /// Whether replies wait to be sent and no send is in flight.
    pub fn wants_send(&self) -> bool {
        self.send == Send::Idle
            && !matches!(self.state, State::Closed(_))
            && (self.sent < self.sending.len()
                || !self.out.ready_is_empty()
                || self.tls.as_ref().is_some_and(|t| t.session.wants_write()))
    }

    /// Whether a TLS handshake is under way. Its flights cost the core a lot of CPU (key
    /// exchange, signatures): a backend that batches sends until the end of a turn sends a
    /// handshake's flight at once instead, or a turn of many handshakes holds back every
    /// peer until the last one is computed.
    pub fn is_handshaking(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.session.is_handshaking())
    }

    /// Whether a send (or a lent buffer) is still with the kernel.
    pub fn send_in_flight(&self) -> bool {
        self.send != Send::Idle
    }

    /// The bytes to send now, marked in flight until [`on_sent`](Self::on_sent); `None`
    /// while a send is in flight or nothing is owed. The slice stays valid and unchanged
    /// until then, so it can be handed to the kernel.
    pub fn start_send(&mut self) -> Option<&[u8]> {
        if !self.take_output() {
            return None;
        }
        self.send = Send::InFlight;
        Some(&self.sending[self.sent..])
    }

    /// For ownership-passing I/O: lends the send buffer (the bytes owed start at the returned
    /// offset). Give it back with [`on_sent_lent`](Self::on_sent_lent).
    pub fn lend_send(&mut self) -> Option<(Vec<u8>, usize)> {
        if !self.take_output() {
            return None;
        }
        let buf = mem::take(&mut self.sending);
        self.send = Send::Lent(buf.len());
        Some((buf, self.sent))
    }

    /// Makes `sending[sent..]` the next bytes owed; false when there are none or a send is in
    /// flight.
    fn take_output(&mut self) -> bool {
        if !self.wants_send() {
            return false;
        }
        if self.sent == self.sending.len() {
            // Everything handed out before is sent: the replies produced since go next.
            self.sending.clear();
            self.sent = 0;
            self.sending_times.clear();
            match &mut self.tls {
                None => {
                    self.sending_since = self.out.take_ready(&mut self.sending, &mut self.sending_times);
                    self.last_batch = self.sending.len();
                }
                Some(tls) => {
                    // The batch is encrypted into the send buffer; the plaintext buffer stays.
                    tls.plain.clear();
                    self.sending_since = self.out.take_ready(&mut tls.plain, &mut self.sending_times);
                    self.last_batch = tls.plain.len();
                    if !tls.plain.is_empty() {
                        use std::io::Write;
                        // Without a buffer limit, rustls takes everything.
                        let _ = tls.session.writer().write_all(&tls.plain);
                    }
                    while tls.session.wants_write() {
                        if tls.session.write_tls(&mut self.sending).is_err() {
                            break;
                        }
                    }
                    if tls.plain.capacity() > OUT_KEEP {
                        tls.plain = Vec::new();
                    }
                }
            }
        }
        // Plaintext written before the TLS handshake is done waits in the session: there may
        // be nothing to send yet.
        self.sent < self.sending.len()
    }

    /// The buffer lent by [`lend_send`](Self::lend_send) comes back with `n` more bytes sent.
    pub fn on_sent_lent(&mut self, buf: Vec<u8>, n: usize, now: Instant, stats: &CoreStats) {
        debug_assert!(matches!(self.send, Send::Lent(_)), "no buffer was lent");
        self.sending = buf;
        self.send = Send::InFlight;
        self.on_sent(n, now, stats);
    }

    /// The send started by [`start_send`](Self::start_send) wrote `n` bytes (0: none, e.g. the
    /// socket buffer was full). Resumes reading once the connection holds at most half of
    /// `max_pending_output` (so the batch in flight must be sent whole first).
    pub fn on_sent(&mut self, n: usize, now: Instant, stats: &CoreStats) {
        debug_assert!(self.send == Send::InFlight, "on_sent without a send in flight");
        self.send = Send::Idle;
        if n > 0 {
            stats.bytes_out(n);
            self.last_activity = now;
        }
        self.sent = (self.sent + n).min(self.sending.len());
        if self.sent == self.sending.len() {
            if let Some(since) = self.sending_since.take() {
                stats.batch_sent(now.saturating_duration_since(since));
            }
            for (cmdid, arrived) in self.sending_times.drain(..) {
                if let Some(command) = stats.command(cmdid) {
                    command.sent(now.saturating_duration_since(arrived));
                }
            }
            self.sending.clear();
            self.sent = 0;
            // Caught up: large buffers go, so a quiet connection holds none. Still busy (the
            // next batch is waiting in `out`): the emptied buffer is kept, to become `out`
            // when that batch is sent, so a stream of large replies does not grow a buffer
            // from nothing for every batch.
            if self.out.ready_is_empty() {
                if self.sending.capacity() > OUT_KEEP {
                    self.sending = Vec::new();
                }
                self.out.shrink_ready(OUT_KEEP);
            }
        }
        self.resume_if_below();
    }

    /// `buf[..len]` was received (`buf` extends [`super::PADDING`] bytes past `len`): every
    /// complete request in it is answered into the output. Pauses reading once the connection
    /// holds more than `max_pending_output` reply bytes.
    pub fn on_recv<D: Dispatch>(
        &mut self,
        processor: &mut Processor<D>,
        buf: &mut [u8],
        len: usize,
        now: Instant,
    ) {
        let span = self.span.as_deref().cloned();
        let _entered = span.as_ref().map(tracing::Span::enter);
        if self.state == State::Refusing {
            processor.stats().bytes_in(len);
            self.last_activity = now;
            self.handshake_only(&buf[..len]);
            return;
        }
        if !self.begin_receive(now) {
            processor.stats().bytes_in(len);
            return;
        }
        let flow = match &mut self.tls {
            None => processor.on_recv(&mut self.session, buf, len, &mut self.out),
            Some(tls) => match tls.receive(&buf[..len], processor, &mut self.session, &mut self.out) {
                Ok((flow, false)) => flow,
                Ok((flow, true)) => {
                    self.out.mark_ready_since(now);
                    if flow == Flow::Continue {
                        self.on_peer_closed(now);
                        return;
                    }
                    flow
                }
                Err(e) => {
                    // Not TLS (a plain-text client on a TLS port), or a failed handshake:
                    // common enough from scanners that it is not worth more than debug.
                    tracing::debug!("TLS failed, closing the connection: {e}");
                    self.state = State::Closed(CloseReason::Error);
                    return;
                }
            },
        };
        self.received(flow, now, processor.stats());
    }

    /// Whether requests received while the output was full wait to be read, and the output
    /// has room for their replies again: the driver calls [`replay`](Self::replay).
    pub fn wants_replay(&self) -> bool {
        self.reading == Reading::Active
            && self.session.backlog() > 0
            && matches!(self.state, State::Serving | State::Draining | State::PeerClosed)
    }

    /// Reads the requests received while the output was full (see
    /// [`wants_replay`](Self::wants_replay)), up to the limits again.
    pub fn replay<D: Dispatch>(&mut self, processor: &mut Processor<D>, now: Instant) {
        let span = self.span.as_deref().cloned();
        let _entered = span.as_ref().map(tracing::Span::enter);
        let peer_closed = self.state == State::PeerClosed;
        if peer_closed {
            // Answered as if still serving: these requests arrived before the FIN.
            self.state = State::Serving;
        }
        self.out.set_now(now);
        let flow = processor.replay(&mut self.session, &mut self.out);
        self.received(flow, now, processor.stats());
        if peer_closed && self.state == State::Serving {
            self.on_peer_closed(now);
        }
    }

    /// A refused connection's bytes: its TLS handshake goes on, anything else is discarded.
    fn handshake_only(&mut self, mut received: &[u8]) {
        let Some(tls) = &mut self.tls else { return };
        while !received.is_empty() {
            if tls.session.read_tls(&mut received).is_err() {
                break;
            }
            if tls.session.process_new_packets().is_err() {
                self.state = State::Closed(CloseReason::Error);
                return;
            }
            let mut discard = [0; 4096];
            while matches!(std::io::Read::read(&mut tls.session.reader(), &mut discard), Ok(1..)) {}
        }
    }

    /// Whether the unfinished line held should be read straight into its buffer
    /// ([`lend_line`](Self::lend_line)): a backend reading into pooled buffers switches.
    pub fn wants_line_read(&self) -> bool {
        self.may_lend_line() && self.session.wants_line_read()
    }

    /// Lends the buffer of a long unfinished line, for the next read to land in directly
    /// instead of in a pooled buffer and then copied ([`LineBuf`](super::LineBuf)); only on
    /// a plain (not TLS) connection that is reading. It comes back through
    /// [`on_line_recv`](Self::on_line_recv).
    pub fn lend_line(&mut self) -> Option<super::LineBuf> {
        if self.may_lend_line() { self.session.lend_line() } else { None }
    }

    fn may_lend_line(&self) -> bool {
        self.tls.is_none()
            && matches!(self.state, State::Serving | State::Draining)
            && self.reading == Reading::Active
    }

    /// A lent line buffer comes back with what its read brought (nothing, if it failed or
    /// met the peer's FIN: report those after this). Every request it completes is answered,
    /// as by [`on_recv`](Self::on_recv).
    pub fn on_line_recv<D: Dispatch>(
        &mut self,
        processor: &mut Processor<D>,
        line: super::LineBuf,
        now: Instant,
    ) {
        if line.received() == 0 {
            self.session.return_line(line);
            return;
        }
        let span = self.span.as_deref().cloned();
        let _entered = span.as_ref().map(tracing::Span::enter);
        if !self.begin_receive(now) {
            processor.stats().bytes_in(line.received());
            self.session.return_line(line);
            return;
        }
        let flow = processor.on_line_recv(&mut self.session, line, &mut self.out);
        self.received(flow, now, processor.stats());
    }

    /// Before received bytes are fed: false when they are to be discarded (the stream is out
    /// of sync, or the connection waits for the peer to close or has closed); else the output
    /// is readied for the replies.
    fn begin_receive(&mut self, now: Instant) -> bool {
        self.last_activity = now;
        if !matches!(self.state, State::Serving | State::Draining) {
            return false;
        }
        self.out.set_now(now);
        if self.last_batch > OUT_KEEP {
            self.out.expect_ready(self.last_batch.min(self.limits.max_pending_output));
        }
        true
    }

    /// After received bytes were fed: replies are ready, the line clock and backpressure
    /// follow what is held now.
    fn received(&mut self, flow: Flow, now: Instant, stats: &CoreStats) {
        self.out.mark_ready_since(now);
        if flow == Flow::Close {
            self.state = State::Desynced;
            self.line_started = None;
            return;
        }
        self.line_started = match self.session.pending_bytes() {
            0 => None,
            // The unfinished line began in these bytes: its clock starts now.
            _ if self.session.partial_line_is_new() => Some(now),
            _ => self.line_started.or(Some(now)),
        };
        if self.reading == Reading::Active
            && (self.held() > self.limits.max_pending_output
                || self.out.pending() >= self.limits.max_deferred)
        {
            self.reading = Reading::Paused;
            stats.backpressure_pause();
        }
    }

    /// The peer sent FIN (a read returned 0): an unterminated last line is dropped, the
    /// replies owed are sent, then the connection closes.
    pub fn on_peer_closed(&mut self, now: Instant) {
        let span = self.span.as_deref().cloned();
        let _entered = span.as_ref().map(tracing::Span::enter);
        self.last_activity = now;
        match self.state {
            State::Serving | State::Draining | State::Desynced => {
                let dropped = self.session.finish();
                if dropped > 0 {
                    tracing::debug!(dropped, "peer closed with an unterminated line");
                }
                self.line_started = None;
                self.state = State::PeerClosed;
            }
            State::Lingering { .. } => self.state = State::Closed(CloseReason::Finished),
            State::Refusing => self.state = State::Closed(CloseReason::PeerClosed),
            State::PeerClosed | State::Closed(_) => {}
        }
    }

    /// The socket failed: close at once, discarding what is unsent.
    pub fn on_error(&mut self) {
        if !matches!(self.state, State::Closed(_)) {
            self.state = State::Closed(CloseReason::Error);
        }
    }

    /// The server is shutting down at `now` and closes what is left at `deadline`: tell a
    /// peer that asked for notices (a notice line now, `"closing":true` on its replies from
    /// now on; a plain peer gets the bytes it always did), keep answering for
    /// [`Limits::drain_grace`], then FIN once every request that arrived is answered.
    pub fn on_shutdown(&mut self, now: Instant, deadline: Instant) {
        self.begin_closing(now, deadline);
        if !matches!(self.state, State::Closed(_)) {
            self.drain_deadline = Some(self.drain_deadline.map_or(deadline, |own| own.min(deadline)));
        }
    }

    /// A serving connection starts draining at `now`: the notice, the grace (ending by
    /// `deadline` at the latest), then FIN.
    fn begin_closing(&mut self, now: Instant, deadline: Instant) {
        if self.state != State::Serving {
            return;
        }
        self.state = State::Draining;
        self.retire_at = None;
        let grace = self.limits.drain_grace;
        self.grace_until = (!grace.is_zero()).then(|| (now + grace).min(deadline));
        self.session.mark_closing();
        if self.session.wants_notices() {
            super::reply::write_closing_notice(self.out.sink(), grace);
        }
    }

    /// The next instant [`on_timeout`](Self::on_timeout) has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let grace = self.grace_until.filter(|_| self.state == State::Draining);
        let retire = self.retire_at.filter(|_| self.state == State::Serving);
        [self.close_deadline(), self.out.next_deadline(), grace, retire].into_iter().flatten().min()
    }

    /// When one of the connection's own deadlines closes it.
    fn close_deadline(&self) -> Option<Instant> {
        let own = match self.state {
            State::Closed(_) => return None,
            State::Lingering { since } => Some(since + self.limits.line_timeout),
            // Refused: it has as long as a hello to take its 503.
            State::Refusing => self.admit_by.or(Some(self.last_activity + self.limits.line_timeout)),
            _ => match self.line_started {
                Some(since) => Some(since + self.limits.line_timeout),
                // A connection waiting for its own deferred replies is not idle.
                None if self.out.pending() > 0 => None,
                None => self.limits.idle_timeout.map(|idle| self.last_activity + idle),
            },
        };
        let admit = self.admit_by.filter(|_| self.admitting());
        [own, self.drain_deadline, admit].into_iter().flatten().min()
    }

    /// A timer fired at `now`: closes the connection if one of its deadlines has passed, and
    /// counts why.
    pub fn on_timeout(&mut self, now: Instant, stats: &CoreStats) {
        let span = self.span.as_deref().cloned();
        let _entered = span.as_ref().map(tracing::Span::enter);
        if matches!(self.state, State::Closed(_)) {
            return;
        }
        // Requests whose `timeout_ms` passed get their 504 in their place.
        if self.out.next_deadline().is_some_and(|at| at <= now) {
            self.out.expire(now, stats);
            self.resume_if_below();
        }
        // Old enough: drained like a shutdown, and closed at the latest a line timeout after
        // the grace if the peer keeps sending.
        if self.state == State::Serving && self.retire_at.is_some_and(|at| at <= now) {
            stats.connection_retired();
            let deadline = now + self.limits.drain_grace + self.limits.line_timeout;
            self.begin_closing(now, deadline);
            self.drain_deadline = Some(deadline);
        }
        if self.close_deadline().is_none_or(|at| at > now) {
            return;
        }
        let reason = if self.drain_deadline.is_some_and(|at| at <= now) {
            CloseReason::ShutdownDeadline
        } else if self.state == State::Refusing
            || (self.admitting() && self.admit_by.is_some_and(|at| at <= now))
        {
            stats.hello_timeout();
            CloseReason::HelloTimeout
        } else if matches!(self.state, State::Lingering { .. }) || self.line_started.is_some() {
            stats.line_timeout();
            CloseReason::LineTimeout
        } else {
            stats.idle_timeout();
            CloseReason::IdleTimeout
        };
        tracing::debug!(?reason, "closing a connection at its deadline");
        self.state = State::Closed(reason);
    }

    /// What the backend must do next with the socket. `unread` tells how many received
    /// bytes the kernel holds that were not read yet (`FIONREAD`); it is asked only while
    /// draining, where those bytes are requests still owed a reply.
    pub fn poll(&mut self, now: Instant, unread: impl FnOnce() -> usize) -> Step {
        if self.grace_until.is_some_and(|until| until <= now) {
            self.grace_until = None;
        }
        let output_done = self.output_done() && self.session.backlog() == 0;
        match self.state {
            State::Closed(reason) => Step::Close(reason),
            State::PeerClosed if output_done => {
                self.state = State::Closed(CloseReason::PeerClosed);
                Step::Close(CloseReason::PeerClosed)
            }
            State::Desynced if output_done => self.shutdown_write(now),
            State::Refusing if output_done && !self.is_handshaking() => self.shutdown_write(now),
            State::Draining if output_done && self.grace_until.is_none() && unread() == 0 => {
                self.shutdown_write(now)
            }
            _ => Step::Wait,
        }
    }

    fn shutdown_write(&mut self, now: Instant) -> Step {
        // TLS: close_notify goes out before the FIN (the next poll sends the FIN).
        if let Some(tls) = &mut self.tls
            && !tls.closing
        {
            tls.closing = true;
            tls.session.send_close_notify();
            return Step::Wait;
        }
        self.state = State::Lingering { since: now };
        Step::ShutdownWrite
    }
}

/// `age` less up to a tenth of it, picked by hashing `now` (the clock is the only varying
/// input the core has): connections opened together are not all recycled at once.
fn jittered(age: Duration, now: Instant) -> Duration {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    now.hash(&mut hasher);
    let per_mille = u32::try_from(hasher.finish() % 1000).unwrap_or(0);
    age - age / 10 * per_mille / 1000
}

/// Every rule, deterministically: the clock is `t0` plus offsets, never the real one.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::StatsRegistry;
    use std::sync::Arc;

    use crate::testing::{TestDispatch, held};

    const ECHO_LINE: &[u8] = b"{\"cmdid\":10000,\"params\":{\"x\":\"0123456789\"}}\n";
    const ECHO_REPLY: &[u8] = b"{\"code\":0,\"data\":{\"x\":\"0123456789\"}}\n";

    struct Fixture {
        stats: Arc<StatsRegistry>,
        processor: Processor<TestDispatch>,
        t0: Instant,
    }

    impl Fixture {
        fn new(limits: Limits) -> (Self, Connection) {
            let stats = StatsRegistry::new(1);
            let processor = Processor::new(0, TestDispatch, stats.clone(), limits);
            let t0 = Instant::now();
            let conn = Connection::new(Arc::new(limits), t0, stats.core(0));
            (Self { stats, processor, t0 }, conn)
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        fn recv(&mut self, conn: &mut Connection, bytes: &[u8], ms: u64) {
            let mut buf = bytes.to_vec();
            buf.resize(bytes.len() + super::super::PADDING, 0);
            let now = self.at(ms);
            conn.on_recv(&mut self.processor, &mut buf, bytes.len(), now);
        }

        /// Sends everything owed in one go, as a peer that reads at once would let it.
        fn send_all(&self, conn: &mut Connection, ms: u64) -> Vec<u8> {
            let mut wire = Vec::new();
            let now = self.at(ms);
            while let Some(bytes) = conn.start_send() {
                wire.extend_from_slice(bytes);
                let n = bytes.len();
                conn.on_sent(n, now, self.stats.core(0));
            }
            wire
        }

        fn total(&self) -> crate::stats::StatsSnapshot {
            self.stats.total()
        }
    }

    fn limits() -> Limits {
        Limits {
            max_line: 200,
            max_connections_per_core: 2,
            max_pending_output: 10 * ECHO_REPLY.len(),
            idle_timeout: Some(Duration::from_secs(60)),
            line_timeout: Duration::from_secs(5),
            slow_request: None,
            max_deferred: 4,
            deferred_timeout: None,
            hello_timeout: Duration::from_secs(10),
            max_deferred_per_core: 1000,
            drain_grace: Duration::ZERO,
            max_connection_age: None,
        }
    }

    #[test]
    fn replies_go_out_in_order_and_a_send_in_flight_holds_later_ones_back() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, &ECHO_LINE.repeat(2), 0);
        let first = conn.start_send().expect("replies owed").to_vec();
        assert_eq!(first, ECHO_REPLY.repeat(2));
        assert!(conn.start_send().is_none(), "one send in flight at a time");
        f.recv(&mut conn, b"{\"cmdid\":0}\n", 1);
        assert!(!conn.wants_send(), "later replies wait for the send in flight");
        // A partial send: the rest goes first, then what was produced since.
        conn.on_sent(5, f.at(2), f.stats.core(0));
        assert_eq!(conn.start_send().unwrap(), &first[5..]);
        conn.on_sent(first.len() - 5, f.at(3), f.stats.core(0));
        assert_eq!(f.send_all(&mut conn, 4), b"{\"code\":0,\"data\":\"pong\"}\n");
        assert_eq!(conn.unsent(), 0);
        assert_eq!(f.total().bytes_out, (first.len() + 25) as u64);
    }

    #[test]
    fn large_replies_get_their_room_at_once_and_a_quiet_connection_holds_no_buffer() {
        let limits = Limits { max_line: 1 << 20, max_pending_output: 4 << 20, ..limits() };
        let (mut f, mut conn) = Fixture::new(limits);
        let line = |n: usize| format!("{{\"cmdid\":10000,\"params\":{{\"s\":\"{}\"}}}}\n", "y".repeat(n));
        let big = line(300_000);
        f.recv(&mut conn, big.as_bytes(), 0);
        let reply_len = f.send_all(&mut conn, 1).len();
        assert!(reply_len > 300_000);
        assert_eq!(conn.buffered_capacity(), 0, "caught up: no buffer is kept");
        // Part of the next line: no reply yet, so no output room is taken either.
        let (head, tail) = big.as_bytes().split_at(1000);
        f.recv(&mut conn, head, 2);
        assert!(conn.buffered_capacity() < 2000 + super::super::PADDING, "{}", conn.buffered_capacity());
        // Its reply gets the last batch's room in one allocation: no doubling, no copies.
        f.recv(&mut conn, tail, 3);
        assert_eq!(conn.unsent(), reply_len);
        assert_eq!(conn.out.ready_capacity(), reply_len, "exactly the room of the last batch");
        assert_eq!(f.send_all(&mut conn, 4).len(), reply_len);
        // That line was carried: the next carried line gets its length up front.
        f.recv(&mut conn, head, 5);
        assert!(conn.session.carry_capacity() >= big.len(), "{}", conn.session.carry_capacity());
        f.recv(&mut conn, tail, 6);
        f.send_all(&mut conn, 7);
        // Small replies after large ones hold no large buffer once sent.
        f.recv(&mut conn, line(10).as_bytes(), 8);
        f.send_all(&mut conn, 9);
        assert_eq!(conn.buffered_capacity(), 0);
    }

    #[test]
    fn backpressure_pauses_past_max_pending_output_and_resumes_at_half() {
        let (mut f, mut conn) = Fixture::new(limits());
        // Exactly the limit: still reading.
        f.recv(&mut conn, &ECHO_LINE.repeat(10), 0);
        assert_eq!(conn.unsent(), limits().max_pending_output);
        assert!(conn.wants_read());
        // One more reply past it: paused, counted once.
        f.recv(&mut conn, ECHO_LINE, 1);
        assert!(!conn.wants_read());
        assert_eq!(f.total().backpressure_pauses, 1);
        // Bytes received while paused (a read in flight) wait, unread, behind those replies.
        f.recv(&mut conn, &ECHO_LINE.repeat(7), 2);
        assert_eq!(conn.unsent(), 11 * ECHO_REPLY.len());
        assert!(!conn.wants_replay());
        // The 11 replies go out as one batch; the peer reads 6: the batch's buffer is held
        // until it is all sent.
        let len = conn.start_send().unwrap().len();
        assert_eq!(len, 11 * ECHO_REPLY.len());
        conn.on_sent(6 * ECHO_REPLY.len(), f.at(4), f.stats.core(0));
        assert!(!conn.wants_read() && !conn.wants_replay());
        // The batch is done: nothing held, the waiting requests are read, and reading resumes.
        conn.start_send().unwrap();
        conn.on_sent(5 * ECHO_REPLY.len(), f.at(5), f.stats.core(0));
        assert!(conn.wants_replay());
        let now = f.at(5);
        conn.replay(&mut f.processor, now);
        assert_eq!(conn.unsent(), 7 * ECHO_REPLY.len());
        assert!(conn.wants_read() && !conn.wants_replay());
        assert_eq!(f.total().backpressure_pauses, 1);
        assert_eq!(f.total().requests, 18);
    }

    /// Sends and replays until nothing more moves; returns what went out.
    fn pump(f: &mut Fixture, conn: &mut Connection, ms: u64, most_held: &mut usize) -> Vec<u8> {
        let mut wire = Vec::new();
        loop {
            *most_held = (*most_held).max(conn.held());
            let sent = f.send_all(conn, ms);
            if conn.wants_replay() {
                let now = f.at(ms);
                conn.replay(&mut f.processor, now);
            } else if sent.is_empty() {
                return wire;
            }
            wire.extend_from_slice(&sent);
        }
    }

    #[test]
    fn small_requests_with_large_replies_never_hold_more_than_the_limit_and_one_reply() {
        // Replies about five times their requests' size, all in one receive.
        let big = format!("{{\"cmdid\":10000,\"params\":{{\"s\":\"{}\"}}}}", "y".repeat(200));
        let line = format!("{}\n", big);
        let limits = Limits { max_pending_output: 1000, max_line: 4096, ..limits() };
        let (mut f, mut conn) = Fixture::new(limits);
        let requests = 50;
        let mut input = Vec::new();
        for i in 0..requests {
            input.extend_from_slice(
                format!("{{\"cmdid\":10000,\"id\":{i},\"params\":{{\"s\":\"{}\"}}}}\n", "y".repeat(40))
                    .as_bytes(),
            );
        }
        f.recv(&mut conn, &input, 0);
        let reply_len = b"{\"code\":0,\"id\":10,\"data\":{\"s\":\"\"}}\n".len() + 40;
        assert!(conn.held() <= 1000 + reply_len, "{} held", conn.held());
        assert!(!conn.wants_read());
        let mut most_held = 0;
        let wire = pump(&mut f, &mut conn, 1, &mut most_held);
        assert!(most_held <= 1000 + reply_len, "{most_held} held at most");
        let expected: Vec<u8> = (0..requests)
            .flat_map(|i| {
                format!("{{\"code\":0,\"id\":{i},\"data\":{{\"s\":\"{}\"}}}}\n", "y".repeat(40)).into_bytes()
            })
            .collect();
        assert_eq!(String::from_utf8(wire).unwrap(), String::from_utf8(expected).unwrap());
        assert!(conn.wants_read());
        // A line that straddles the backlog's end is finished by the next receive.
        f.recv(&mut conn, &line.as_bytes()[..10], 2);
        f.recv(&mut conn, &line.as_bytes()[10..], 3);
        assert_eq!(
            f.send_all(&mut conn, 4),
            format!("{{\"code\":0,\"data\":{{\"s\":\"{}\"}}}}\n", "y".repeat(200)).into_bytes()
        );
    }

    #[test]
    fn the_cr_of_a_crlf_line_counts_toward_max_line_and_a_repeated_key_takes_its_last_value() {
        // max_line is 200: 199 bytes and `\r` fit, 200 and `\r` do not.
        let line = |len: usize| {
            let head = b"{\"cmdid\":0,\"x\":\"".len();
            format!("{{\"cmdid\":0,\"x\":\"{}\"}}\r\n", "a".repeat(len - head - 2)).into_bytes()
        };
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, &line(199), 0);
        assert_eq!(f.send_all(&mut conn, 0), b"{\"code\":0,\"data\":\"pong\"}\n");
        // The last `cmdid` is the one dispatched (an echo, not a ping).
        f.recv(&mut conn, b"{\"cmdid\":0,\"params\":{\"k\":1,\"k\":2},\"cmdid\":10000}\n", 0);
        assert_eq!(f.send_all(&mut conn, 0), b"{\"code\":0,\"data\":{\"k\":1,\"k\":2}}\n");
        f.recv(&mut conn, &line(200), 0);
        let wire = String::from_utf8(f.send_all(&mut conn, 0)).unwrap();
        assert!(wire.starts_with("{\"code\":413,"), "{wire}");
    }

    #[test]
    fn a_peer_that_closes_behind_a_backlog_gets_every_reply_before_the_close() {
        let limits = Limits { max_pending_output: 2 * ECHO_REPLY.len(), ..limits() };
        let (mut f, mut conn) = Fixture::new(limits);
        let mut input = ECHO_LINE.repeat(9);
        input.extend_from_slice(b"{\"cmdid\":0"); // unterminated: dropped at the end
        f.recv(&mut conn, &input, 0);
        conn.on_peer_closed(f.at(1));
        assert_eq!(conn.poll(f.at(1), || 0), Step::Wait);
        let mut most_held = 0;
        let wire = pump(&mut f, &mut conn, 2, &mut most_held);
        assert_eq!(wire, ECHO_REPLY.repeat(9));
        assert_eq!(conn.poll(f.at(2), || 0), Step::Close(CloseReason::PeerClosed));
    }

    #[test]
    fn a_batch_counts_its_time_in_the_server_from_its_oldest_request() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.stats.time_handlers();
        f.recv(&mut conn, ECHO_LINE, 0);
        f.recv(&mut conn, ECHO_LINE, 2);
        // Both replies go out as one batch, sent whole 7 ms after the first request came.
        conn.start_send().unwrap();
        conn.on_sent(ECHO_REPLY.len(), f.at(5), f.stats.core(0));
        assert_eq!(f.stats.core(0).batch_times().1.iter().sum::<u64>(), 0, "not sent whole yet");
        conn.start_send().unwrap();
        conn.on_sent(ECHO_REPLY.len(), f.at(7), f.stats.core(0));
        let (seconds, buckets) = f.stats.core(0).batch_times();
        assert_eq!(seconds, 0.007);
        // 7,000 µs is in the bucket up to 8,192 µs.
        assert_eq!(buckets[13], 1);
        assert_eq!(buckets.iter().sum::<u64>(), 1);
        // The next batch counts from its own first request.
        f.recv(&mut conn, ECHO_LINE, 100);
        f.send_all(&mut conn, 101);
        let (seconds, buckets) = f.stats.core(0).batch_times();
        assert!((seconds - 0.008).abs() < 1e-12, "{seconds}");
        assert_eq!(buckets[0], 0);
        assert_eq!(buckets[10], 1, "1 ms is in the bucket up to 1,024 µs");
    }

    #[test]
    fn the_read_budget_is_what_the_limit_leaves_of_the_replies_held() {
        let (mut f, mut conn) = Fixture::new(limits());
        let max = limits().max_pending_output;
        assert_eq!(conn.read_budget(), max);
        f.recv(&mut conn, &ECHO_LINE.repeat(4), 0);
        assert_eq!(conn.read_budget(), max - 4 * ECHO_REPLY.len());
        // A batch in flight still counts, whole, until it is all sent.
        conn.start_send().unwrap();
        conn.on_sent(ECHO_REPLY.len(), f.at(1), f.stats.core(0));
        assert_eq!(conn.read_budget(), max - 4 * ECHO_REPLY.len());
        conn.start_send().unwrap();
        conn.on_sent(3 * ECHO_REPLY.len(), f.at(2), f.stats.core(0));
        assert_eq!(conn.read_budget(), max);
        // Past the limit the budget is 1, never 0 (a byte limit of 0 means none).
        f.recv(&mut conn, &ECHO_LINE.repeat(11), 3);
        assert!(!conn.wants_read());
        assert_eq!(conn.read_budget(), 1);
    }

    #[test]
    fn reading_resumes_at_half_the_limit_held() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, &ECHO_LINE.repeat(11), 0);
        assert!(!conn.wants_read());
        conn.start_send().unwrap();
        // 5 replies answered while the batch is in flight: exactly half the limit once the
        // batch is sent.
        f.recv(&mut conn, &ECHO_LINE.repeat(5), 1);
        conn.on_sent(11 * ECHO_REPLY.len(), f.at(2), f.stats.core(0));
        assert!(conn.wants_read());
        assert_eq!(conn.unsent(), 5 * ECHO_REPLY.len());
    }

    #[test]
    fn idle_timeout_counts_from_the_last_bytes_moved_either_way() {
        let (mut f, mut conn) = Fixture::new(limits());
        assert_eq!(conn.poll_timeout(), Some(f.at(60_000)));
        f.recv(&mut conn, ECHO_LINE, 10_000);
        assert_eq!(conn.poll_timeout(), Some(f.at(70_000)));
        f.send_all(&mut conn, 20_000);
        assert_eq!(conn.poll_timeout(), Some(f.at(80_000)));
        conn.on_timeout(f.at(79_999), f.stats.core(0));
        assert_eq!(conn.state(), State::Serving, "not before its deadline");
        conn.on_timeout(f.at(80_000), f.stats.core(0));
        assert_eq!(conn.state(), State::Closed(CloseReason::IdleTimeout));
        assert_eq!(conn.poll(f.at(80_000), || 0), Step::Close(CloseReason::IdleTimeout));
        assert_eq!(f.total().idle_timeouts, 1);
        assert_eq!(f.total().line_timeouts, 0);
    }

    #[test]
    fn without_an_idle_timeout_a_silent_connection_has_no_deadline() {
        let (_f, conn) = Fixture::new(Limits { idle_timeout: None, ..limits() });
        assert_eq!(conn.poll_timeout(), None);
    }

    #[test]
    fn a_started_line_must_end_within_the_line_timeout() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, b"{\"cmdid\":", 1_000);
        assert_eq!(conn.poll_timeout(), Some(f.at(6_000)));
        // More bytes of the same line do not move the deadline (slowloris).
        f.recv(&mut conn, b"0", 4_000);
        assert_eq!(conn.poll_timeout(), Some(f.at(6_000)));
        // The line ends: back to the idle deadline.
        f.recv(&mut conn, b"}\n{\"cm", 5_000);
        assert_eq!(f.send_all(&mut conn, 5_000), b"{\"code\":0,\"data\":\"pong\"}\n");
        assert_eq!(conn.poll_timeout(), Some(f.at(10_000)), "a new line started at 5 s");
        conn.on_timeout(f.at(10_000), f.stats.core(0));
        assert_eq!(conn.state(), State::Closed(CloseReason::LineTimeout));
        assert_eq!(f.total().line_timeouts, 1);
    }

    #[test]
    fn a_line_over_the_limit_gets_413_then_fin_then_discards_until_the_peer_closes() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, b"{\"cmdid\":0}\n", 0);
        f.recv(&mut conn, &[b'x'; 201], 1);
        assert_eq!(conn.state(), State::Desynced);
        assert!(conn.wants_read(), "input is read and discarded");
        assert_eq!(conn.poll(f.at(1), || 0), Step::Wait, "replies are still owed");
        assert_eq!(
            f.send_all(&mut conn, 2),
            b"{\"code\":0,\"data\":\"pong\"}\n{\"code\":413,\"error\":\"request line longer than 200 bytes\"}\n"
        );
        assert_eq!(conn.poll(f.at(2), || 0), Step::ShutdownWrite);
        assert_eq!(conn.state(), State::Lingering { since: f.at(2) });
        f.recv(&mut conn, ECHO_LINE, 3);
        assert_eq!(conn.unsent(), 0, "nothing is answered after FIN");
        assert_eq!(conn.poll_timeout(), Some(f.at(5_002)));
        conn.on_peer_closed(f.at(4));
        assert_eq!(conn.poll(f.at(4), || 0), Step::Close(CloseReason::Finished));
    }

    #[test]
    fn a_peer_that_never_closes_after_our_fin_is_closed_at_the_line_timeout() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, &[b'x'; 201], 0);
        f.send_all(&mut conn, 0);
        assert_eq!(conn.poll(f.at(0), || 0), Step::ShutdownWrite);
        conn.on_timeout(f.at(5_000), f.stats.core(0));
        assert_eq!(conn.state(), State::Closed(CloseReason::LineTimeout));
    }

    #[test]
    fn the_peers_fin_drops_an_unterminated_line_and_closes_after_the_replies() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, b"{\"cmdid\":0}\n{\"cmdid\":0", 0);
        conn.on_peer_closed(f.at(1));
        assert_eq!(conn.state(), State::PeerClosed);
        assert!(!conn.wants_read());
        assert_eq!(conn.poll(f.at(1), || 0), Step::Wait);
        assert_eq!(f.send_all(&mut conn, 2), b"{\"code\":0,\"data\":\"pong\"}\n");
        assert_eq!(conn.poll(f.at(2), || 0), Step::Close(CloseReason::PeerClosed));
        conn.finish(f.stats.core(0));
        assert_eq!(f.total().connections_open, 0);
    }

    #[test]
    fn draining_answers_what_arrived_waits_for_unread_bytes_then_fins() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, ECHO_LINE, 0);
        conn.on_shutdown(f.at(0), f.at(10_000));
        assert_eq!(conn.state(), State::Draining);
        assert_eq!(conn.poll(f.at(1), || panic!("not asked while replies are owed")), Step::Wait);
        f.send_all(&mut conn, 1);
        // The kernel still holds a request: it is owed a reply.
        assert_eq!(conn.poll(f.at(1), || 40), Step::Wait);
        f.recv(&mut conn, ECHO_LINE, 2);
        assert_eq!(f.send_all(&mut conn, 2), ECHO_REPLY);
        assert_eq!(conn.poll(f.at(2), || 0), Step::ShutdownWrite);
        conn.on_peer_closed(f.at(3));
        assert_eq!(conn.poll(f.at(3), || 0), Step::Close(CloseReason::Finished));
    }

    const CLOSING_ECHO_REPLY: &[u8] = b"{\"code\":0,\"closing\":true,\"data\":{\"x\":\"0123456789\"}}\n";

    #[test]
    fn a_peer_that_asked_for_notices_is_told_then_served_through_the_grace_then_fin() {
        let grace = Duration::from_millis(500);
        let (mut f, mut conn) = Fixture::new(Limits { drain_grace: grace, ..limits() });
        f.recv(&mut conn, b"{\"cmdid\":3,\"id\":1,\"params\":{\"notices\":true,\"later\":1}}\n", 0);
        assert_eq!(f.send_all(&mut conn, 0), b"{\"code\":0,\"id\":1,\"data\":{\"notices\":true}}\n");
        conn.on_shutdown(f.at(10), f.at(10_000));
        // The notice goes out at once, on its own line.
        assert_eq!(f.send_all(&mut conn, 10), b"{\"notice\":\"closing\",\"grace_ms\":500}\n");
        // A request that crossed it is answered, marked; errors too.
        f.recv(&mut conn, ECHO_LINE, 100);
        assert_eq!(f.send_all(&mut conn, 100), CLOSING_ECHO_REPLY);
        f.recv(&mut conn, b"{\"cmdid\":77777}\n", 101);
        assert_eq!(
            f.send_all(&mut conn, 101),
            b"{\"code\":404,\"closing\":true,\"error\":\"unknown cmdid 77777\"}\n"
        );
        assert_eq!(conn.poll(f.at(200), || 0), Step::Wait, "FIN waits for the grace");
        assert!(conn.wants_read());
        assert_eq!(conn.poll_timeout(), Some(f.at(510)));
        assert_eq!(conn.poll(f.at(509), || 0), Step::Wait);
        conn.on_timeout(f.at(510), f.stats.core(0));
        assert_eq!(conn.state(), State::Draining);
        assert_eq!(conn.poll(f.at(510), || 0), Step::ShutdownWrite);
        conn.on_peer_closed(f.at(511));
        assert_eq!(conn.poll(f.at(511), || 0), Step::Close(CloseReason::Finished));
    }

    #[test]
    fn a_plain_peer_gets_the_same_bytes_through_a_drain_and_its_close_ends_the_grace() {
        let (mut f, mut conn) = Fixture::new(Limits { drain_grace: Duration::from_secs(5), ..limits() });
        f.recv(&mut conn, ECHO_LINE, 0);
        assert_eq!(f.send_all(&mut conn, 0), ECHO_REPLY);
        conn.on_shutdown(f.at(1), f.at(10_000));
        assert_eq!(f.send_all(&mut conn, 1), b"", "no line it did not ask for");
        // Answered through the grace, byte for byte as before the drain.
        f.recv(&mut conn, ECHO_LINE, 2);
        assert_eq!(f.send_all(&mut conn, 2), ECHO_REPLY);
        assert_eq!(conn.poll(f.at(2), || 0), Step::Wait);
        conn.on_peer_closed(f.at(3));
        assert_eq!(conn.poll(f.at(3), || 0), Step::Close(CloseReason::PeerClosed));
    }

    #[test]
    fn an_old_connection_is_told_drained_and_closed_like_at_a_shutdown() {
        let age = Duration::from_secs(10);
        let grace = Duration::from_secs(1);
        let limits =
            Limits { max_connection_age: Some(age), drain_grace: grace, idle_timeout: None, ..limits() };
        let (mut f, mut conn) = Fixture::new(limits);
        f.recv(&mut conn, b"{\"cmdid\":3,\"params\":{\"notices\":true}}\n", 0);
        f.send_all(&mut conn, 0);
        // Its age, less at most a tenth.
        let retire = conn.poll_timeout().expect("an age");
        assert!(retire >= f.at(9_000) && retire <= f.at(10_000), "{:?}", retire - f.t0);
        conn.on_timeout(retire - Duration::from_millis(1), f.stats.core(0));
        assert_eq!(conn.state(), State::Serving);
        conn.on_timeout(retire, f.stats.core(0));
        assert_eq!(conn.state(), State::Draining);
        assert_eq!(f.total().connections_retired, 1);
        let since = (retire - f.t0).as_millis() as u64;
        assert_eq!(f.send_all(&mut conn, since), b"{\"notice\":\"closing\",\"grace_ms\":1000}\n");
        f.recv(&mut conn, ECHO_LINE, since + 10);
        assert_eq!(f.send_all(&mut conn, since + 10), CLOSING_ECHO_REPLY);
        assert_eq!(conn.poll(f.at(since + 10), || 0), Step::Wait);
        assert_eq!(conn.poll_timeout(), Some(retire + grace));
        assert_eq!(conn.poll(retire + grace, || 0), Step::ShutdownWrite);
        conn.on_peer_closed(retire + grace);
        assert_eq!(conn.poll(retire + grace, || 0), Step::Close(CloseReason::Finished));
    }

    #[test]
    fn a_peer_that_keeps_sending_past_its_age_and_grace_is_closed_a_line_timeout_later() {
        let limits =
            Limits { max_connection_age: Some(Duration::from_secs(10)), idle_timeout: None, ..limits() };
        let (mut f, mut conn) = Fixture::new(limits);
        let retire = conn.poll_timeout().expect("an age");
        conn.on_timeout(retire, f.stats.core(0));
        let since = (retire - f.t0).as_millis() as u64;
        f.recv(&mut conn, ECHO_LINE, since);
        f.send_all(&mut conn, since);
        // More keeps arriving: no FIN while requests are unread, then the deadline.
        assert_eq!(conn.poll(f.at(since), || 40), Step::Wait);
        assert_eq!(conn.poll_timeout(), Some(retire + limits.line_timeout));
        conn.on_timeout(retire + limits.line_timeout, f.stats.core(0));
        assert_eq!(conn.state(), State::Closed(CloseReason::ShutdownDeadline));
    }

    #[test]
    fn a_peer_that_asks_for_notices_while_draining_is_told_at_once() {
        let (mut f, mut conn) = Fixture::new(Limits { drain_grace: Duration::from_secs(1), ..limits() });
        conn.on_shutdown(f.at(0), f.at(10_000));
        f.recv(&mut conn, b"{\"cmdid\":3,\"params\":{\"notices\":true}}\n", 1);
        assert_eq!(
            f.send_all(&mut conn, 1),
            b"{\"code\":0,\"data\":{\"notices\":true}}\n{\"notice\":\"closing\",\"grace_ms\":1000}\n"
        );
    }

    #[test]
    fn asking_for_notices_takes_only_a_boolean_and_can_be_undone() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, b"{\"cmdid\":3,\"params\":{\"notices\":\"yes\"}}\n", 0);
        let reply = String::from_utf8(f.send_all(&mut conn, 0)).unwrap();
        assert!(reply.starts_with("{\"code\":400,\"error\":\"params.notices: invalid type"), "{reply}");
        f.recv(&mut conn, b"{\"cmdid\":3,\"params\":{\"notices\":true}}\n{\"cmdid\":3,\"params\":{\"notices\":false}}\n{\"cmdid\":3}\n", 1);
        assert_eq!(
            f.send_all(&mut conn, 1),
            b"{\"code\":0,\"data\":{\"notices\":true}}\n{\"code\":0,\"data\":{\"notices\":false}}\n{\"code\":0,\"data\":{\"notices\":false}}\n"
        );
        conn.on_shutdown(f.at(2), f.at(10_000));
        assert_eq!(f.send_all(&mut conn, 2), b"");
    }

    #[test]
    fn the_shutdown_deadline_closes_whatever_is_left() {
        let (mut f, mut conn) = Fixture::new(Limits { idle_timeout: None, ..limits() });
        f.recv(&mut conn, ECHO_LINE, 0);
        conn.start_send().unwrap(); // the peer never reads it
        conn.on_shutdown(f.at(0), f.at(10_000));
        assert_eq!(conn.poll_timeout(), Some(f.at(10_000)));
        conn.on_timeout(f.at(9_999), f.stats.core(0));
        assert_eq!(conn.state(), State::Draining);
        conn.on_timeout(f.at(10_000), f.stats.core(0));
        assert_eq!(conn.state(), State::Closed(CloseReason::ShutdownDeadline));
        assert!(!conn.wants_send() && !conn.wants_read());
        let counted = f.total();
        assert_eq!((counted.idle_timeouts, counted.line_timeouts), (0, 0));
    }

    #[test]
    fn an_error_closes_at_once_and_discards_what_is_unsent() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, ECHO_LINE, 0);
        conn.on_error();
        assert!(conn.start_send().is_none());
        assert_eq!(conn.poll(f.at(0), || 0), Step::Close(CloseReason::Error));
        assert_eq!(conn.poll_timeout(), None);
    }

    #[test]
    fn a_lent_send_buffer_counts_as_unsent_until_it_comes_back() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, ECHO_LINE, 0);
        let (buf, offset) = conn.lend_send().unwrap();
        assert_eq!((&buf[offset..], conn.unsent()), (ECHO_REPLY, ECHO_REPLY.len()));
        assert!(conn.lend_send().is_none() && conn.send_in_flight());
        conn.on_sent_lent(buf, 10, f.at(1), f.stats.core(0));
        let (buf, offset) = conn.lend_send().unwrap();
        assert_eq!(&buf[offset..], &ECHO_REPLY[10..]);
        conn.on_sent_lent(buf, ECHO_REPLY.len() - 10, f.at(2), f.stats.core(0));
        assert_eq!(conn.unsent(), 0);
    }

    const LATER_LINE: &[u8] = b"{\"cmdid\":3000,\"id\":7}\n";
    const PONG: &[u8] = b"{\"code\":0,\"data\":\"pong\"}\n";

    #[test]
    fn a_deferred_reply_holds_later_replies_back_and_all_leave_in_request_order() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(
            &mut conn,
            &[b"{\"cmdid\":0}\n", LATER_LINE, b"{\"cmdid\":0}\n", LATER_LINE, ECHO_LINE].concat(),
            0,
        );
        let [first, second] = <[crate::Deferred; 2]>::try_from(held()).expect("two deferred");
        // Only what came before the first deferred reply can go.
        assert_eq!(f.send_all(&mut conn, 1), PONG);
        assert_eq!(conn.deferred_pending(), 2);
        assert_eq!(f.total().deferred_pending, 2);
        // The second answers first: it waits for the first.
        second.ok(&"b");
        conn.on_deferred(f.t0, f.stats.core(0));
        assert_eq!(f.send_all(&mut conn, 2), b"");
        first.ok(&"a");
        conn.on_deferred(f.t0, f.stats.core(0));
        assert_eq!(
            f.send_all(&mut conn, 3),
            [
                &b"{\"code\":0,\"id\":7,\"data\":\"a\"}\n"[..],
                PONG,
                b"{\"code\":0,\"id\":7,\"data\":\"b\"}\n",
                ECHO_REPLY
            ]
            .concat()
        );
        let total = f.total();
        assert_eq!((total.deferred, total.deferred_pending, total.replies_with(0)), (2, 0, 5));
        // With nothing pending, replies go straight out again.
        f.recv(&mut conn, ECHO_LINE, 4);
        assert_eq!(f.send_all(&mut conn, 4), ECHO_REPLY);
    }

    #[test]
    fn a_deadline_answers_504_in_place_and_the_late_answer_is_dropped_and_counted() {
        let (mut f, mut conn) = Fixture::new(Limits { idle_timeout: None, ..limits() });
        f.recv(&mut conn, b"{\"cmdid\":3000,\"id\":1,\"timeout_ms\":250}\n{\"cmdid\":0}\n", 1_000);
        let late = held().pop().expect("deferred");
        assert_eq!(late.deadline(), Some(f.at(1_250)));
        assert_eq!(conn.poll_timeout(), Some(f.at(1_250)));
        conn.on_timeout(f.at(1_249), f.stats.core(0));
        assert_eq!(f.send_all(&mut conn, 1_249), b"", "not before its deadline");
        conn.on_timeout(f.at(1_250), f.stats.core(0));
        assert_eq!(conn.state(), State::Serving, "a request's deadline does not close the connection");
        assert_eq!(
            f.send_all(&mut conn, 1_250),
            [&b"{\"code\":504,\"id\":1,\"error\":\"deadline of 250 ms passed before the handler answered\"}\n"[..], PONG]
                .concat()
        );
        assert_eq!(conn.poll_timeout(), None);
        late.ok(&"too late");
        conn.on_deferred(f.t0, f.stats.core(0));
        assert_eq!(f.send_all(&mut conn, 2_000), b"");
        let total = f.total();
        assert_eq!((total.deadline_expired, total.late_replies, total.replies_with(504)), (1, 1, 1));
    }

    #[test]
    fn a_deferred_reply_without_timeout_ms_gets_the_servers_default_deadline() {
        let limits =
            Limits { idle_timeout: None, deferred_timeout: Some(Duration::from_secs(10)), ..limits() };
        let (mut f, mut conn) = Fixture::new(limits);
        // One without `timeout_ms` (the default applies) and one with its own, shorter.
        f.recv(&mut conn, b"{\"cmdid\":3000,\"id\":1}\n{\"cmdid\":3000,\"id\":2,\"timeout_ms\":50}\n", 1_000);
        let held = held();
        assert_eq!(held[0].deadline(), Some(f.at(11_000)));
        assert_eq!(held[1].deadline(), Some(f.at(1_050)), "a request's own deadline wins");
        assert_eq!(conn.poll_timeout(), Some(f.at(1_050)));
        conn.on_timeout(f.at(1_050), f.stats.core(0));
        // The first holds the second's 504 back; at its own deadline both leave, in order.
        assert_eq!(f.send_all(&mut conn, 1_050), b"");
        assert_eq!(conn.poll_timeout(), Some(f.at(11_000)));
        conn.on_timeout(f.at(11_000), f.stats.core(0));
        assert_eq!(
            f.send_all(&mut conn, 11_000),
            [
                &b"{\"code\":504,\"id\":1,\"error\":\"deadline of 10000 ms passed before the handler answered\"}\n"[..],
                b"{\"code\":504,\"id\":2,\"error\":\"deadline of 50 ms passed before the handler answered\"}\n",
            ]
            .concat()
        );
        assert_eq!(f.total().deadline_expired, 2);
        drop(held);
    }

    #[test]
    fn a_dropped_handle_answers_500_and_an_error_returned_at_once_answers_in_place() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, &[LATER_LINE, b"{\"cmdid\":3001,\"id\":2}\n", b"{\"cmdid\":0}\n"].concat(), 0);
        drop(held());
        conn.on_deferred(f.t0, f.stats.core(0));
        assert_eq!(
            String::from_utf8(f.send_all(&mut conn, 1)).unwrap(),
            "{\"code\":500,\"id\":7,\"error\":\"handler for cmdid 3000 dropped its reply without answering\"}\n\
             {\"code\":400,\"id\":2,\"error\":\"no such thing\"}\n\
             {\"code\":0,\"data\":\"pong\"}\n"
        );
        let total = f.total();
        assert_eq!((total.deferred_pending, total.late_replies), (0, 0));
        assert_eq!((total.replies_with(500), total.replies_with(400), total.replies_with(0)), (1, 1, 1));
    }

    #[test]
    fn a_peer_that_closes_still_gets_its_deferred_replies_before_the_close() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, LATER_LINE, 0);
        conn.on_peer_closed(f.at(1));
        assert_eq!(conn.poll(f.at(1), || 0), Step::Wait, "a reply is still owed");
        held().pop().unwrap().ok(&1);
        conn.on_deferred(f.t0, f.stats.core(0));
        assert_eq!(f.send_all(&mut conn, 2), b"{\"code\":0,\"id\":7,\"data\":1}\n");
        assert_eq!(conn.poll(f.at(2), || 0), Step::Close(CloseReason::PeerClosed));
    }

    #[test]
    fn a_closed_connection_abandons_its_deferred_replies_and_drops_their_answers() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, &LATER_LINE.repeat(2), 0);
        let handles = held();
        let mailbox = conn.mailbox().expect("a mailbox").clone();
        conn.on_error();
        conn.finish(f.stats.core(0));
        for handle in handles {
            handle.ok(&"nobody listens");
        }
        assert!(!mailbox.has_waker());
        let total = f.total();
        assert_eq!((total.deferred_abandoned, total.deferred_pending, total.replies_with(0)), (2, 0, 0));
    }

    #[test]
    fn no_more_deferred_replies_than_the_limit_however_many_requests_one_read_brings() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, &LATER_LINE.repeat(20), 0);
        assert_eq!(conn.deferred_pending(), 4);
        assert!(!conn.wants_read() && !conn.wants_replay());
        let mut answered = 0;
        while answered < 20 {
            for handle in held() {
                handle.ok(&answered);
                answered += 1;
            }
            conn.on_deferred(f.t0, f.stats.core(0));
            f.send_all(&mut conn, 1);
            if conn.wants_replay() {
                let now = f.at(1);
                conn.replay(&mut f.processor, now);
            }
            assert!(conn.deferred_pending() <= 4);
        }
        assert_eq!(f.total().deferred, 20);
    }

    #[test]
    fn a_connection_waiting_for_its_deferred_reply_is_not_idle() {
        let (mut f, mut conn) =
            Fixture::new(Limits { idle_timeout: Some(Duration::from_secs(2)), ..limits() });
        f.recv(&mut conn, LATER_LINE, 0);
        assert_eq!(conn.poll_timeout(), None, "no idle deadline while a reply is owed");
        conn.on_timeout(f.at(4000), f.stats.core(0));
        assert!(!matches!(conn.state(), State::Closed(_)));
        held().pop().unwrap().ok(&1);
        conn.on_deferred(f.t0, f.stats.core(0));
        assert_eq!(f.send_all(&mut conn, 4000), b"{\"code\":0,\"id\":7,\"data\":1}\n");
        // Answered and sent: idle again from the send.
        assert_eq!(conn.poll_timeout(), Some(f.at(6000)));
    }

    fn hello_fixture() -> (Fixture, Connection) {
        let stats = StatsRegistry::new(1);
        let access = crate::access::Access {
            tls: None,
            token: Some(crate::access::HelloToken::new("0123456789abcdef").unwrap()),
        };
        let processor = Processor::new(0, TestDispatch, stats.clone(), limits()).with_access(access);
        let t0 = Instant::now();
        let conn = processor.open_connection(t0);
        (Fixture { stats, processor, t0 }, conn)
    }

    #[test]
    fn a_connection_that_never_sends_its_hello_is_closed_at_the_hello_timeout() {
        let (mut f, mut conn) = hello_fixture();
        assert_eq!(conn.poll_timeout(), Some(f.at(10_000)));
        // Bytes that are not a finished hello do not move the deadline.
        f.recv(&mut conn, b"{\"cmdid\":2,", 9_000);
        assert_eq!(conn.poll_timeout(), Some(f.at(10_000)));
        conn.on_timeout(f.at(10_000), f.stats.core(0));
        assert_eq!(conn.state(), State::Closed(CloseReason::HelloTimeout));
        assert_eq!(f.total().hello_timeouts, 1);
    }

    #[test]
    fn after_its_hello_a_connection_has_no_hello_deadline() {
        let (mut f, mut conn) = hello_fixture();
        f.recv(&mut conn, b"{\"cmdid\":2,\"params\":{\"token\":\"0123456789abcdef\"}}\n", 1);
        assert_eq!(f.send_all(&mut conn, 1), b"{\"code\":0,\"data\":\"hello\"}\n");
        // Only the idle timeout is left.
        assert_eq!(conn.poll_timeout(), Some(f.at(60_001)));
        conn.on_timeout(f.at(10_000), f.stats.core(0));
        assert_eq!(conn.state(), State::Serving);
    }

    #[test]
    fn past_the_cores_deferred_limit_a_request_is_answered_503_and_its_handle_abandoned() {
        let limits = Limits { max_deferred: 100, max_deferred_per_core: 3, ..limits() };
        let (mut f, mut conn) = Fixture::new(limits);
        let mut other = Connection::new(Arc::new(limits), f.t0, f.stats.core(0));
        f.recv(&mut conn, &LATER_LINE.repeat(2), 0);
        f.recv(&mut other, &LATER_LINE.repeat(3), 0);
        let handles = held();
        let abandoned: Vec<bool> = handles.iter().map(crate::Deferred::is_abandoned).collect();
        assert_eq!(abandoned, [false, false, false, true, true]);
        assert_eq!(conn.deferred_pending() + other.deferred_pending(), 3);
        // The shed requests' 503s wait behind the pending one, in request order.
        for handle in handles {
            handle.ok(&"done");
        }
        conn.on_deferred(f.t0, f.stats.core(0));
        other.on_deferred(f.t0, f.stats.core(0));
        let wire = String::from_utf8(f.send_all(&mut other, 1)).unwrap();
        let codes: Vec<&str> = wire.lines().map(|l| &l[..11]).collect();
        assert_eq!(codes, ["{\"code\":0,\"", "{\"code\":503", "{\"code\":503"], "{wire}");
        assert!(wire.contains("overloaded"), "{wire}");
        assert_eq!(f.total().deferred_shed, 2);
    }

    #[test]
    fn an_abandoned_future_resolves_when_its_connection_closes() {
        use std::future::Future;
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, LATER_LINE, 0);
        let handle = held().pop().unwrap();
        let mut gone = std::pin::pin!(handle.abandoned());
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(gone.as_mut().poll(&mut cx).is_pending());
        assert!(!handle.is_abandoned());
        conn.on_error();
        conn.finish(f.stats.core(0));
        assert!(handle.is_abandoned());
        assert!(gone.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn reading_pauses_at_max_deferred_pending_and_resumes_at_half() {
        let (mut f, mut conn) = Fixture::new(limits());
        f.recv(&mut conn, &LATER_LINE.repeat(3), 0);
        assert!(conn.wants_read());
        f.recv(&mut conn, LATER_LINE, 1);
        assert!(!conn.wants_read(), "4 pending is the limit");
        assert_eq!(f.total().backpressure_pauses, 1);
        let mut handles = held().into_iter();
        handles.next().unwrap().ok(&0);
        conn.on_deferred(f.t0, f.stats.core(0));
        assert!(!conn.wants_read(), "3 pending is above half");
        handles.next().unwrap().ok(&1);
        conn.on_deferred(f.t0, f.stats.core(0));
        assert!(conn.wants_read(), "2 pending is half");
    }

    #[test]
    fn each_command_counts_its_replies_time_in_the_server_once_sent() {
        let stats = StatsRegistry::with_commands(1, &[0, 10000, 3000]);
        stats.time_handlers();
        let mut f = Fixture {
            processor: Processor::new(0, TestDispatch, stats.clone(), limits()),
            stats,
            t0: Instant::now(),
        };
        let mut conn = Connection::new(Arc::new(limits()), f.t0, f.stats.core(0));
        // An echo at 0 ms, a deferred reply and a ping at 2 ms.
        f.recv(&mut conn, ECHO_LINE, 0);
        f.recv(&mut conn, &[LATER_LINE, b"{\"cmdid\":0}\n"].concat(), 2);
        f.send_all(&mut conn, 5);
        let in_server = |cmdid| {
            let c = f.stats.commands().into_iter().find(|c| c.cmdid == cmdid).unwrap();
            (c.in_server_buckets.iter().sum::<u64>(), c.in_server_seconds)
        };
        assert_eq!(in_server(10000), (1, 0.005), "sent whole at 5 ms");
        assert_eq!(in_server(0).0, 0, "the ping waits behind the deferred reply");
        held().pop().unwrap().ok(&"done");
        conn.on_deferred(f.t0, f.stats.core(0));
        f.send_all(&mut conn, 10);
        assert_eq!(in_server(3000), (1, 0.008));
        assert_eq!(in_server(0), (1, 0.008));
    }
}

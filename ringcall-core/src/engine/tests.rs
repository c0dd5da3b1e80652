//! The engine under a simulated driver: no sockets, no threads, no real clock. [`Sim`] plays
//! the backend and the peers in the manner of quinn-proto's test `Pair`: it owns the
//! connections, a listener backlog and each peer's bytes in the "kernel", carries out the
//! engine's actions, and moves its own clock to the engine's next timeout. Scenario tests
//! pin each per-core rule; a model-based property test drives random interleavings and
//! checks what every peer received against the replies it was owed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::stats::StatsRegistry;
use crate::{Limits, PADDING, Processor};

use crate::testing::{TestDispatch, held, hold};

const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);

fn limits() -> Limits {
    Limits {
        max_line: 4096,
        max_connections_per_core: 3,
        max_pending_output: 4096,
        idle_timeout: None,
        line_timeout: Duration::from_secs(5),
        slow_request: None,
        max_deferred: 8,
        deferred_timeout: None,
        hello_timeout: Duration::from_secs(10),
        max_deferred_per_core: 1000,
        drain_grace: Duration::ZERO,
        max_connection_age: None,
    }
}

/// An echo request and the reply it is owed.
fn echo(n: u64) -> (Vec<u8>, Vec<u8>) {
    (
        format!("{{\"cmdid\":10000,\"params\":{{\"n\":{n},\"s\":\"caf\\u00e9 {n}\"}}}}\n").into_bytes(),
        format!("{{\"code\":0,\"data\":{{\"n\":{n},\"s\":\"café {n}\"}}}}\n").into_bytes(),
    )
}

/// A request answered later (see [`Sim::answer`]) and the reply it is owed.
fn deferred(n: u64) -> (Vec<u8>, Vec<u8>) {
    (
        format!("{{\"cmdid\":3000,\"id\":{n}}}\n").into_bytes(),
        format!("{{\"code\":0,\"id\":{n},\"data\":\"later\"}}\n").into_bytes(),
    )
}

/// One simulated peer and the server's connection to it.
struct Peer {
    handle: Handle,
    /// `None` once the driver released it.
    conn: Option<Connection>,
    /// Bytes the peer sent that the kernel holds, not read by the server yet.
    kernel: Vec<u8>,
    /// The peer closed its side (after `kernel`).
    fin: bool,
    /// What the peer received.
    wire: Vec<u8>,
    /// The reply owed for each request line the peer sent before the server's FIN, in order.
    owed_lines: Vec<Vec<u8>>,
    /// A partial line the peer has started sending.
    partial: bool,
    /// The server sent FIN.
    server_fin: bool,
    /// Why it closed, once it did.
    closed: Option<CloseReason>,
    /// What the engine said last.
    interest: Option<Interest>,
}

/// A simulated backend with its peers.
struct Sim {
    engine: Engine<u64>,
    processor: Processor<TestDispatch>,
    stats: Arc<StatsRegistry>,
    t0: Instant,
    now: Instant,
    peers: Vec<Peer>,
    /// Connections waiting in the listener's backlog: the peer index each will be.
    backlog: Vec<usize>,
    /// Whether the driver has an accept pending (the engine said to accept).
    accepting: bool,
    /// Refused connections: the bytes each received.
    refused: Vec<Vec<u8>>,
    /// Handles the engine handed to another core.
    handed_over: Vec<usize>,
    /// Whether the driver counts unread bytes at once (`false`: only when settled).
    counts_at_once: bool,
    /// Requests sent so far (each is numbered).
    next_request: u64,
}

impl Sim {
    fn new(limits: Limits) -> Self {
        let stats = StatsRegistry::new(2);
        let t0 = Instant::now();
        Self {
            engine: Engine::new(0, limits.max_connections_per_core, SHUTDOWN_TIMEOUT),
            processor: Processor::new(0, TestDispatch, stats.clone(), limits),
            stats,
            t0,
            now: t0,
            peers: Vec::new(),
            backlog: Vec::new(),
            accepting: true,
            refused: Vec::new(),
            handed_over: Vec::new(),
            counts_at_once: true,
            next_request: 0,
        }
    }

    fn ms(&self) -> u128 {
        self.now.duration_since(self.t0).as_millis()
    }

    fn peer(&self, handle: Handle) -> usize {
        self.peers.iter().position(|p| p.handle == handle && p.conn.is_some()).expect("a live peer")
    }

    /// A peer connects; the listener hands it over at once if the driver is accepting, else
    /// it waits in the backlog. `target`: the core a balancer would pick. Returns the peer's
    /// index, or `None` if it was refused or handed over.
    fn connect(&mut self, target: Option<usize>) -> Option<usize> {
        if !self.accepting {
            self.backlog.push(usize::MAX);
            return None;
        }
        let peers = self.peers.len() as u64;
        let decision = self.engine.on_accepted(self.now, target, self.stats.core(0), || peers);
        self.decided(decision)
    }

    fn decided(&mut self, decision: Decision) -> Option<usize> {
        match decision {
            Decision::Serve(handle) => {
                assert_eq!(self.engine.waker(handle), Some(&(self.peers.len() as u64)));
                let conn = self.processor.open_connection(self.now);
                self.peers.push(Peer {
                    handle,
                    conn: Some(conn),
                    kernel: Vec::new(),
                    fin: false,
                    wire: Vec::new(),
                    owed_lines: Vec::new(),
                    partial: false,
                    server_fin: false,
                    closed: None,
                    interest: None,
                });
                let index = self.peers.len() - 1;
                self.drive(index, true);
                Some(index)
            }
            Decision::Refuse(line) => {
                self.refused.push(line.to_vec());
                None
            }
            Decision::HandOver(core) => {
                self.handed_over.push(core);
                None
            }
        }
    }

    /// The driver's `drive`: asks the engine and acts on the answer.
    fn drive(&mut self, index: usize, settled: bool) {
        let counts_at_once = self.counts_at_once;
        let now = self.now;
        let peer = &mut self.peers[index];
        let Some(conn) = peer.conn.as_mut() else { return };
        // The peer's FIN is not a byte: FIONREAD does not count it.
        let unread = peer.kernel.len();
        let interest = self.engine.drive(peer.handle, conn, &mut self.processor, now, || {
            (settled || counts_at_once).then_some(unread)
        });
        peer.interest = Some(interest);
        match interest.step {
            Step::Wait => {}
            Step::ShutdownWrite => {
                assert!(!peer.server_fin, "one FIN");
                peer.server_fin = true;
            }
            Step::Close(reason) => {
                // Nothing is in flight in this driver between calls: release at once.
                peer.closed = Some(reason);
                let conn = peer.conn.take().expect("open");
                let waker = self.engine.release(peer.handle, conn, self.stats.core(0));
                assert_eq!(waker, Some(index as u64), "the waker given at admission comes back");
            }
        }
    }

    /// The peer sends `bytes` (they wait in the kernel).
    fn peer_sends(&mut self, index: usize, bytes: &[u8], owed: Option<Vec<u8>>) {
        let peer = &mut self.peers[index];
        if peer.fin || peer.closed.is_some() {
            return;
        }
        peer.kernel.extend_from_slice(bytes);
        // A reply is owed only for a line that reached the server before its FIN.
        if let Some(owed) = owed
            && !peer.server_fin
        {
            peer.owed_lines.push(owed);
        }
    }

    /// The peer sends a whole request (an echo, or a deferred one), possibly as two writes.
    fn request(&mut self, index: usize, deferred_request: bool) {
        if self.peers[index].partial || self.peers[index].server_fin {
            return;
        }
        self.next_request += 1;
        let (line, reply) =
            if deferred_request { deferred(self.next_request) } else { echo(self.next_request) };
        self.peer_sends(index, &line, Some(reply));
    }

    /// The server reads up to `n` bytes of what the kernel holds for peer `index`.
    fn read(&mut self, index: usize, n: usize) {
        let now = self.now;
        let peer = &mut self.peers[index];
        let Some(conn) = peer.conn.as_mut() else { return };
        if !conn.wants_read() {
            return;
        }
        if peer.kernel.is_empty() {
            if peer.fin {
                conn.on_peer_closed(now);
                self.drive(index, false);
            }
            return;
        }
        let n = n.clamp(1, peer.kernel.len());
        let mut buf: Vec<u8> = peer.kernel.drain(..n).collect();
        buf.resize(n + PADDING, 0);
        conn.on_recv(&mut self.processor, &mut buf, n, now);
        self.drive(index, false);
    }

    /// The server sends what peer `index` is owed; the kernel takes at most `n` bytes.
    fn send(&mut self, index: usize, n: usize) {
        let now = self.now;
        let peer = &mut self.peers[index];
        let Some(conn) = peer.conn.as_mut() else { return };
        let Some(bytes) = conn.start_send() else { return };
        let n = n.min(bytes.len());
        peer.wire.extend_from_slice(&bytes[..n]);
        conn.on_sent(n, now, self.stats.core(0));
        self.drive(index, false);
    }

    /// Answers held deferred replies, the `pick`-th first (any order).
    fn answer(&mut self, pick: usize) {
        let mut held = held();
        if held.is_empty() {
            return;
        }
        let deferred = held.remove(pick % held.len());
        hold(held);
        deferred.ok(&"later");
        // The mailbox woke the driver: every connection takes its answers in.
        for index in 0..self.peers.len() {
            if let Some(conn) = self.peers[index].conn.as_mut() {
                conn.on_deferred(self.now, self.stats.core(0));
                self.drive(index, false);
            }
        }
    }

    /// The listener's backlog is taken in (at shutdown), or a balancer's inbox.
    fn take_backlog(&mut self) {
        for _ in std::mem::take(&mut self.backlog) {
            let peers = self.peers.len() as u64;
            let decision = self.engine.admit(self.now, self.stats.core(0), || peers);
            self.decided(decision);
        }
    }

    /// Carries out the engine's actions, as a driver does after each event.
    fn run_actions(&mut self) {
        while let Some(action) = self.engine.poll_action() {
            match action {
                Action::Timeout(handle) => {
                    let index = self.peer(handle);
                    let conn = self.peers[index].conn.as_mut().expect("live");
                    self.engine.on_conn_timeout(handle, conn, self.now, self.stats.core(0));
                    self.drive(index, false);
                }
                Action::Drive(handle) => {
                    let index = self.peer(handle);
                    self.drive(index, false);
                }
                Action::StartAccepting => self.accepting = true,
                Action::StopAccepting => {
                    self.accepting = false;
                    self.engine.accept_stopped();
                }
                Action::TakeBacklog => self.take_backlog(),
            }
        }
    }

    /// The end of a driver's turn: connections that asked for a settled count get one.
    fn settle(&mut self) {
        let mut handles = Vec::new();
        self.engine.take_unsettled(&mut handles);
        for handle in handles {
            let index = self.peer(handle);
            self.drive(index, true);
        }
    }

    fn shutdown(&mut self) {
        self.engine.on_shutdown(self.now);
        self.run_actions();
        self.settle();
    }

    /// Moves the clock to the engine's next timeout, if it is within `limit`, and fires it.
    /// Returns whether it did.
    fn step_timeout(&mut self, limit: Duration) -> bool {
        let Some(at) = self.engine.poll_timeout() else { return false };
        if at > self.now + limit {
            return false;
        }
        self.now = self.now.max(at);
        self.engine.on_timeout(self.now);
        self.run_actions();
        self.settle();
        if let Some(next) = self.engine.poll_timeout() {
            assert!(next > self.now, "the next wake-up is never in the past ({} ms)", self.ms());
        }
        true
    }

    fn advance(&mut self, by: Duration) {
        let until = self.now + by;
        while self.step_timeout(until.saturating_duration_since(self.now)) {}
        self.now = until;
    }

    fn open(&self) -> usize {
        self.peers.iter().filter(|p| p.conn.is_some()).count()
    }
}

#[test]
fn admission_at_the_limit_refuses_with_a_503_and_counts_it() {
    let mut sim = Sim::new(limits());
    for _ in 0..3 {
        assert!(sim.connect(None).is_some());
    }
    assert_eq!(sim.connect(None), None, "the fourth is over the limit of three");
    assert_eq!(sim.refused, [crate::reply::TOO_MANY_CONNECTIONS.to_vec()]);
    assert_eq!(sim.stats.total().rejected_connections, 1);
    assert_eq!(sim.stats.total().replies_with(503), 1);
    // A place frees: the next is served, in the freed place with a new generation.
    let first = sim.peers[0].handle;
    sim.peers[0].fin = true;
    sim.read(0, 1);
    assert_eq!(sim.peers[0].closed, Some(CloseReason::PeerClosed));
    let index = sim.connect(None).expect("served again");
    let reused = sim.peers[index].handle;
    assert_eq!(reused.index(), first.index());
    assert_ne!(reused, first);
    assert!(!sim.engine.contains(first) && sim.engine.waker(first).is_none());
}

#[test]
fn on_a_tls_port_a_connection_over_the_limit_is_served_its_refusal_in_band_beside_the_limit() {
    let mut sim = Sim::new(limits());
    sim.engine.refuse_in_band();
    for _ in 0..3 {
        assert!(sim.connect(None).is_some());
    }
    // Over the limit: served (in a place beyond the limit), with only the 503 to send.
    let over = sim.connect(None).expect("served to be refused in band");
    assert!(sim.refused.is_empty());
    assert_eq!(sim.stats.total().rejected_connections, 1);
    let conn = sim.peers[over].conn.as_ref().expect("open");
    assert_eq!(conn.state(), crate::State::Refusing);
    assert_eq!(conn.unsent(), crate::reply::TOO_MANY_CONNECTIONS.len());
    // At most an eighth of the limit (three: none) plus 16 such places; then a plain close.
    for _ in 1..16 {
        assert!(sim.connect(None).is_some());
    }
    assert_eq!(sim.connect(None), None);
    assert_eq!(sim.refused, [Vec::<u8>::new()]);
    // A refused connection's place is not one of the three: when it goes, the core is
    // still full for served ones.
    sim.peers[over].fin = true;
    sim.read(over, 1);
    assert!(sim.peers[over].closed.is_some());
    let again = sim.connect(None).expect("a place for a refusal again");
    assert_eq!(sim.peers[again].conn.as_ref().unwrap().state(), crate::State::Refusing);
}

#[test]
fn a_connection_goes_to_the_core_a_balancer_picks_only_while_serving() {
    let mut sim = Sim::new(limits());
    assert_eq!(sim.connect(Some(1)), None);
    assert_eq!(sim.handed_over, [1]);
    assert!(sim.connect(Some(0)).is_some(), "this core's own");
    assert!(sim.connect(None).is_some(), "no balancer");
    // A hand-over that failed comes back through admission.
    let peers = sim.peers.len() as u64;
    let back = sim.engine.admit(sim.now, sim.stats.core(0), || peers);
    assert!(matches!(back, Decision::Serve(_)));
    sim.decided(back);
    // Shutting down, a core keeps what it still accepts.
    sim.peers[0].fin = true;
    sim.read(0, 1);
    sim.shutdown();
    sim.accepting = true;
    assert!(sim.connect(Some(1)).is_some());
    assert_eq!(sim.handed_over, [1]);
}

#[test]
fn shutdown_takes_in_the_backlog_answers_what_arrived_and_waits_for_unread_bytes() {
    let mut sim = Sim::new(limits());
    let a = sim.connect(None).unwrap();
    sim.request(a, false);
    // Stop accepting, as while backing off: the next connection waits in the backlog.
    sim.accepting = false;
    sim.connect(None);
    sim.shutdown();
    assert_eq!(sim.engine.listening(), Listening::Stopped);
    assert_eq!(sim.open(), 2, "the backlog was taken in");
    let b = 1;
    assert!(matches!(sim.engine.phase(), Phase::Draining { .. }));
    // The request of `a` waits unread in the kernel: no FIN before it is answered.
    assert!(!sim.peers[a].server_fin);
    sim.read(a, 7);
    sim.read(a, 1000);
    sim.send(a, 1000);
    sim.settle();
    assert!(sim.peers[a].server_fin, "answered, nothing unread: FIN");
    // Read after the shutdown began, by a peer that did not ask for notices: as ever.
    assert_eq!(sim.peers[a].wire, echo(1).1);
    // `b`, from the backlog, had sent nothing: it gets its FIN at once.
    assert!(sim.peers[b].server_fin);
    // The peers close; the core has drained.
    for index in [a, b] {
        sim.peers[index].fin = true;
        sim.read(index, 1);
        assert_eq!(sim.peers[index].closed, Some(CloseReason::Finished));
    }
    assert!(sim.engine.finished());
}

#[test]
fn a_driver_that_cannot_count_unread_bytes_yet_is_asked_again_when_settled() {
    let mut sim = Sim::new(limits());
    sim.counts_at_once = false;
    let a = sim.connect(None).unwrap();
    sim.engine.on_shutdown(sim.now);
    while let Some(action) = sim.engine.poll_action() {
        if let Action::Drive(handle) = action {
            let index = sim.peer(handle);
            sim.drive(index, false);
        }
    }
    assert!(!sim.peers[a].server_fin, "no FIN on an unsettled count");
    assert!(sim.engine.has_unsettled());
    sim.settle();
    assert!(sim.peers[a].server_fin);
    assert!(!sim.engine.has_unsettled());
}

#[test]
fn the_shutdown_deadline_closes_what_is_left_and_the_core_finishes() {
    let mut sim = Sim::new(limits());
    let a = sim.connect(None).unwrap();
    let b = sim.connect(None).unwrap();
    // `a` owes a deferred reply that never comes; `b` started a line it never ends.
    sim.request(a, true);
    sim.read(a, 1000);
    sim.peer_sends(b, b"{\"cmdid\":", None);
    sim.read(b, 1000);
    sim.shutdown();
    sim.advance(SHUTDOWN_TIMEOUT / 2);
    assert_eq!(sim.open(), 1, "the started line timed out first (5 s)");
    assert_eq!(sim.peers[b].closed, Some(CloseReason::LineTimeout));
    sim.advance(SHUTDOWN_TIMEOUT);
    assert_eq!(sim.peers[a].closed, Some(CloseReason::ShutdownDeadline));
    assert!(sim.engine.finished());
    assert_eq!(sim.engine.poll_timeout(), None, "nothing left to wake for");
    held();
}

#[test]
fn a_stale_timer_never_reaches_the_connection_that_reused_the_place() {
    let mut sim = Sim::new(Limits { idle_timeout: Some(Duration::from_secs(60)), ..limits() });
    let a = sim.connect(None).unwrap();
    let old = sim.peers[a].handle;
    // `a` closes before its idle deadline; a new connection takes its place later.
    sim.advance(Duration::from_secs(1));
    sim.peers[a].fin = true;
    sim.read(a, 1);
    sim.advance(Duration::from_secs(30));
    let b = sim.connect(None).unwrap();
    assert_eq!(sim.peers[b].handle.index(), old.index());
    // The old entry (at 60 s) fires and finds another generation: nothing happens to `b`.
    sim.advance(Duration::from_secs(35));
    assert_eq!(sim.peers[b].closed, None);
    // `b`'s own deadline (31 s + 60 s) closes it.
    sim.advance(Duration::from_secs(30));
    assert_eq!(sim.peers[b].closed, Some(CloseReason::IdleTimeout));
}

#[test]
fn a_busy_connection_costs_no_timer_work_per_request() {
    let mut sim = Sim::new(Limits { idle_timeout: Some(Duration::from_secs(60)), ..limits() });
    let a = sim.connect(None).unwrap();
    let entries = sim.engine.conn_timers.len();
    for _ in 0..1000 {
        sim.now += Duration::from_millis(1);
        sim.request(a, false);
        sim.read(a, 10_000);
        sim.send(a, 10_000);
    }
    assert_eq!(sim.engine.conn_timers.len(), entries, "the deadline only moved later");
    assert_eq!(sim.peers[a].wire, sim.peers[a].owed_lines.concat());
}

#[test]
fn accept_failures_back_off_and_resume_at_the_retry_timer() {
    let mut sim = Sim::new(limits());
    let err = std::io::Error::from_raw_os_error(libc::EMFILE);
    let retry = sim.engine.on_accept_failed(sim.now, &err);
    assert_eq!(retry, sim.now + ACCEPT_BACKOFF);
    assert_eq!(sim.engine.listening(), Listening::BackingOff);
    assert!(sim.engine.take_timer_moved());
    assert_eq!(sim.engine.poll_timeout(), Some(retry));
    sim.accepting = false;
    sim.advance(ACCEPT_BACKOFF);
    assert!(sim.accepting, "StartAccepting at the retry");
    assert_eq!(sim.engine.listening(), Listening::Accepting);
    // Shutting down while backing off: stopped at once, the retry forgotten.
    sim.engine.on_accept_failed(sim.now, &err);
    sim.shutdown();
    assert_eq!(sim.engine.listening(), Listening::Stopped);
    assert_eq!(sim.engine.poll_timeout(), Some(sim.now + SHUTDOWN_TIMEOUT));
}

#[test]
fn accept_failures_are_logged_once_per_interval_and_recovery_resets() {
    let mut log = AcceptErrorLog::new();
    let err = std::io::Error::from_raw_os_error(libc::EMFILE);
    let start = Instant::now();
    assert!(log.failed(0, &err, start), "the first failure is logged");
    for i in 1..100 {
        assert!(!log.failed(0, &err, start + ACCEPT_BACKOFF * i), "repeats within the interval are not");
    }
    assert_eq!(log.unlogged, 99);
    assert!(log.failed(0, &err, start + ACCEPT_ERROR_LOG_EVERY), "one per interval");
    assert_eq!(log.unlogged, 0);
    log.succeeded(0);
    assert!(log.failed(0, &err, start + ACCEPT_ERROR_LOG_EVERY), "a new episode is logged at once");
}

/// One step of a random interleaving.
#[derive(Debug, Clone)]
enum Op {
    Connect,
    /// Peer `p % open` sends an echo request, or a deferred one.
    Request {
        p: usize,
        deferred: bool,
    },
    /// The server reads up to `n` bytes from peer `p`.
    Read {
        p: usize,
        n: usize,
    },
    /// The server sends, the kernel taking up to `n` bytes.
    Send {
        p: usize,
        n: usize,
    },
    /// Peer `p` closes its side.
    PeerClose {
        p: usize,
    },
    /// A held deferred reply is answered.
    Answer {
        pick: usize,
    },
    /// Time passes.
    Advance {
        ms: u64,
    },
    Shutdown,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Connect),
        4 => (0..8usize, proptest::bool::weighted(0.25)).prop_map(|(p, deferred)| Op::Request { p, deferred }),
        4 => (0..8usize, 1..200usize).prop_map(|(p, n)| Op::Read { p, n }),
        4 => (0..8usize, 0..200usize).prop_map(|(p, n)| Op::Send { p, n }),
        1 => (0..8usize).prop_map(|p| Op::PeerClose { p }),
        2 => (0..8usize).prop_map(|pick| Op::Answer { pick }),
        1 => (0..3000u64).prop_map(|ms| Op::Advance { ms }),
        1 => Just(Op::Shutdown),
    ]
}

impl Sim {
    fn live(&self, p: usize) -> Option<usize> {
        let live: Vec<usize> = (0..self.peers.len()).filter(|&i| self.peers[i].closed.is_none()).collect();
        (!live.is_empty()).then(|| live[p % live.len()])
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Connect => {
                self.connect(None);
            }
            Op::Request { p, deferred } => {
                if let Some(i) = self.live(p) {
                    self.request(i, deferred);
                }
            }
            Op::Read { p, n } => {
                if let Some(i) = self.live(p) {
                    self.read(i, n);
                }
            }
            Op::Send { p, n } => {
                if let Some(i) = self.live(p) {
                    self.send(i, n);
                }
            }
            Op::PeerClose { p } => {
                if let Some(i) = self.live(p) {
                    self.peers[i].fin = true;
                }
            }
            Op::Answer { pick } => self.answer(pick),
            Op::Advance { ms } => self.advance(Duration::from_millis(ms)),
            Op::Shutdown => self.shutdown(),
        }
        self.settle();
    }

    /// Lets everything finish: every deferred reply answered, every byte read and sent,
    /// every peer closed, time run out.
    fn quiesce(&mut self) {
        for _ in 0..10_000 {
            self.answer(0);
            for i in 0..self.peers.len() {
                self.peers[i].fin = true;
                self.send(i, usize::MAX);
                self.read(i, usize::MAX);
            }
            self.settle();
            if self.open() == 0 {
                break;
            }
            if self
                .peers
                .iter()
                .all(|p| p.conn.as_ref().is_none_or(|c| !c.wants_send() && p.kernel.is_empty()))
            {
                self.advance(Duration::from_secs(1));
            }
        }
        assert_eq!(self.open(), 0, "every connection closed");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Whatever the interleaving of received bytes in any splits, partial sends, peers
    /// closing, deferred answers in any order, time and shutdown: each peer receives exactly
    /// the replies it is owed, in request order — all of them unless a limit (a deadline,
    /// a timeout) closed the connection, and then a prefix of them; and the engine never
    /// asks to be woken in the past (asserted at every timeout). With or without a drain
    /// grace and a connection age.
    #[test]
    fn every_peer_gets_exactly_its_replies_in_order(
        ops in proptest::collection::vec(op(), 1..120),
        split in any::<bool>(),
        grace in any::<bool>(),
        aged in any::<bool>(),
    ) {
        held();
        // With a drain grace, draining connections keep reading and answering through it;
        // with an age, connections retire through the same drain while the core serves.
        let drain_grace = if grace { Duration::from_millis(300) } else { Duration::ZERO };
        let max_connection_age = aged.then_some(Duration::from_secs(2));
        let mut sim = Sim::new(Limits { drain_grace, max_connection_age, ..limits() });
        sim.counts_at_once = split;
        sim.connect(None);
        for op in &ops {
            sim.apply(op);
        }
        sim.quiesce();
        held();
        for (i, peer) in sim.peers.iter().enumerate() {
            let owed = peer.owed_lines.concat();
            // Peers that did not ask for notices get byte for byte what they always got.
            let wire = &peer.wire;
            match peer.closed {
                Some(CloseReason::PeerClosed | CloseReason::Finished) => {
                    prop_assert!(*wire == owed, "peer {} got {:?}, owed {:?}", i,
                        String::from_utf8_lossy(&peer.wire), String::from_utf8_lossy(&owed));
                }
                Some(CloseReason::ShutdownDeadline | CloseReason::LineTimeout | CloseReason::IdleTimeout) => {
                    prop_assert!(owed.starts_with(wire), "peer {} got {:?}, not a prefix of {:?}", i,
                        String::from_utf8_lossy(&peer.wire), String::from_utf8_lossy(&owed));
                }
                other => prop_assert!(false, "peer {} closed with {:?}", i, other),
            }
        }
        prop_assert!(sim.engine.is_empty());
    }
}

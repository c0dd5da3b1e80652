//! Operation sequences against the per-core engine and its connection machines, as a driver
//! would deliver them: peers connect, send bytes (also while asked not to: a read in flight;
//! also straight into a long line's lent buffer), read some of their replies (also from a lent
//! send buffer), close, fail; time passes; handlers answer deferred replies
//! late, with errors, or drop them; peers ask for notices; connections reach their age; the
//! server shuts down (with a drain grace). Checked against a model: nothing
//! panics; a peer receives only whole reply lines, each a JSON object with a code, never more
//! replies than complete lines it sent, and never anything after its connection closed; a
//! connection holds at most its output limit plus one reply and at most `max_deferred`
//! deferred replies, the core at most `max_deferred_per_core`; every connection closes by
//! the shutdown deadline.

#![no_main]

mod common;

use std::cell::RefCell;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ringcall_core::{
    Action, Connection, Decision, Deferred, Dispatch, Dispatched, Engine, Handle, HandlerError, Limits,
    Processor, Request, Responder, Step,
};

use common::{Peer, receive, replies, small_limits};

thread_local! {
    static HELD: RefCell<Vec<Deferred>> = const { RefCell::new(Vec::new()) };
}

/// Ping, echo, a handler that defers (3000) and one that defers then fails (3001).
struct Handlers;

impl Dispatch for Handlers {
    fn dispatch(&self, request: &Request<'_, '_>, responder: Responder<'_>, _timed: bool) -> Dispatched {
        let result = match request.cmdid() {
            0 => {
                responder.reply().str("pong");
                Some(Ok(()))
            }
            10000 => {
                responder.reply().value(request.params_value());
                Some(Ok(()))
            }
            3000 => {
                let deferred = responder.defer(request);
                HELD.with(|held| held.borrow_mut().push(deferred));
                Some(Ok(()))
            }
            3001 => {
                drop(responder.defer(request));
                Some(Err(HandlerError::bad_request("refused")))
            }
            _ => None,
        };
        Dispatched { result, ran: None }
    }
}

#[derive(Arbitrary, Debug)]
enum Op<'a> {
    Connect,
    Send {
        peer: u8,
        bytes: &'a [u8],
        in_flight: bool,
    },
    /// A few canned requests, so that sequences reach deferral without guessing JSON.
    Requests {
        peer: u8,
        which: u8,
        count: u8,
    },
    Read {
        peer: u8,
        bytes: u16,
    },
    /// The rest of a long line read straight into its lent buffer (as `uring` and
    /// `tokio-uring` do), bringing `bytes` (cut to the room lent).
    LineRead {
        peer: u8,
        bytes: &'a [u8],
        /// Then the end of the echo request `LongLine` began.
        end: bool,
    },
    /// The start of an echo request of `kib` KiB, left unfinished: long enough for its rest
    /// to be read into a lent buffer.
    LongLine {
        peer: u8,
        kib: u8,
    },
    /// The send buffer lent to the kernel (ownership-passing I/O), `bytes` of it sent.
    LentRead {
        peer: u8,
        bytes: u16,
    },
    PeerClose {
        peer: u8,
    },
    Fail {
        peer: u8,
    },
    Wait {
        ms: u16,
    },
    Answer {
        index: u8,
        how: u8,
    },
    Shutdown,
}

const CANNED: [&[u8]; 6] = [
    b"{\"cmdid\":3000,\"id\":1}\n",
    b"{\"cmdid\":3000,\"timeout_ms\":50}\n",
    b"{\"cmdid\":3001}\n",
    b"{\"cmdid\":10000,\"params\":{\"s\":\"caf\\u00e9\",\"n\":[1,2.5,true,null]}}\n",
    b"{\"cmdid\":0}\r\n",
    b"{\"cmdid\":3,\"params\":{\"notices\":true}}\n",
];

struct Conn {
    handle: Handle,
    conn: Option<Connection>,
    peer: Peer,
    /// Complete lines sent (an upper bound on the replies owed).
    lines: usize,
    sent_fin: bool,
}

struct Sim {
    engine: Engine<()>,
    processor: Processor<Handlers>,
    limits: Limits,
    conns: Vec<Conn>,
    now: Instant,
}

impl Sim {
    fn drive(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let Some(conn) = c.conn.as_mut() else { return };
        let interest = self.engine.drive(c.handle, conn, &mut self.processor, self.now, || Some(0));
        match interest.step {
            Step::Wait => {}
            Step::ShutdownWrite => c.peer.fin = true,
            Step::Close(_) => {
                let conn = c.conn.take().expect("open");
                self.engine.release(c.handle, conn, self.processor.stats());
                c.peer.closed = true;
            }
        }
        if let Some(conn) = c.conn.as_ref() {
            assert!(
                conn.deferred_pending() <= self.limits.max_deferred,
                "{} deferred replies pending on one connection",
                conn.deferred_pending()
            );
        }
        let pending = self.processor.stats().deferred_pending();
        assert!(
            pending <= self.limits.max_deferred_per_core as u64,
            "{pending} deferred replies on the core"
        );
    }

    fn actions(&mut self) {
        while let Some(action) = self.engine.poll_action() {
            match action {
                Action::Timeout(handle) | Action::Drive(handle) => {
                    let Some(i) = self.conns.iter().position(|c| c.handle == handle && c.conn.is_some())
                    else {
                        continue;
                    };
                    if matches!(action, Action::Timeout(_)) {
                        let conn = self.conns[i].conn.as_mut().expect("open");
                        self.engine.on_conn_timeout(handle, conn, self.now, self.processor.stats());
                    }
                    self.drive(i);
                }
                Action::StopAccepting => self.engine.accept_stopped(),
                Action::StartAccepting | Action::TakeBacklog => {}
            }
        }
    }

    fn pick(&self, peer: u8) -> Option<usize> {
        let open: Vec<usize> = (0..self.conns.len()).filter(|&i| self.conns[i].conn.is_some()).collect();
        (!open.is_empty()).then(|| open[usize::from(peer) % open.len()])
    }

    fn send(&mut self, i: usize, bytes: &[u8], in_flight: bool) {
        let c = &mut self.conns[i];
        let conn = c.conn.as_mut().expect("open");
        if c.sent_fin || !(conn.wants_read() || in_flight) {
            return;
        }
        c.lines += bytes.iter().filter(|&&b| b == b'\n').count();
        receive(conn, &mut self.processor, bytes, self.now);
        let reply_max = 600;
        assert!(
            conn.unsent() <= self.limits.max_pending_output + self.limits.max_line + reply_max,
            "{} bytes held",
            conn.unsent()
        );
        self.drive(i);
    }

    fn read(&mut self, i: usize, n: usize) {
        let c = &mut self.conns[i];
        let conn = c.conn.as_mut().expect("open");
        common::send(conn, &mut c.peer, n, self.now, self.processor.stats());
        self.drive(i);
    }

    fn line_read(&mut self, i: usize, bytes: &[u8]) {
        let c = &mut self.conns[i];
        let conn = c.conn.as_mut().expect("open");
        if c.sent_fin || !conn.wants_read() {
            return;
        }
        let Some(mut line) = conn.lend_line() else { return };
        let n = bytes.len().min(line.room());
        // SAFETY: `n` is within the room lent, and that many bytes are written at its pointer.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), line.read_ptr(), n);
            line.filled(n);
        }
        c.lines += bytes[..n].iter().filter(|&&b| b == b'\n').count();
        conn.on_line_recv(&mut self.processor, line, self.now);
        self.drive(i);
    }

    fn lent_read(&mut self, i: usize, n: usize) {
        let c = &mut self.conns[i];
        let conn = c.conn.as_mut().expect("open");
        if let Some((buf, offset)) = conn.lend_send() {
            let n = n.min(buf.len() - offset);
            c.peer.wire.extend_from_slice(&buf[offset..offset + n]);
            conn.on_sent_lent(buf, n, self.now, self.processor.stats());
        }
        self.drive(i);
    }

    fn complete_deferred(&mut self) {
        // The mailboxes' wakers are not set in this driver: every open connection takes what
        // was delivered.
        for i in 0..self.conns.len() {
            if let Some(conn) = self.conns[i].conn.as_mut() {
                conn.on_deferred(self.now, self.processor.stats());
                self.drive(i);
            }
        }
    }

    fn wait(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        if self.engine.poll_timeout().is_some_and(|at| at <= self.now) {
            self.engine.on_timeout(self.now);
        }
        self.actions();
    }
}

fuzz_target!(|ops: Vec<Op<'_>>| {
    // Lines up to 256 KiB, so a long one's rest is read into a lent buffer.
    let limits = Limits { max_line: 256 << 10, ..small_limits(2048) };
    let now = Instant::now();
    let mut sim = Sim {
        engine: Engine::new(0, 3, Duration::from_secs(10)),
        processor: Processor::new(0, Handlers, ringcall_core::stats::StatsRegistry::new(1), limits),
        limits,
        conns: Vec::new(),
        now,
    };
    let mut refused = 0;
    for op in ops.iter().take(256) {
        match *op {
            Op::Connect => match sim.engine.on_accepted(sim.now, None, sim.processor.stats(), || ()) {
                Decision::Serve(handle) => {
                    let conn = sim.processor.open_connection(sim.now);
                    sim.conns.push(Conn {
                        handle,
                        conn: Some(conn),
                        peer: Peer::default(),
                        lines: 0,
                        sent_fin: false,
                    });
                    let last = sim.conns.len() - 1;
                    sim.drive(last);
                }
                Decision::Refuse(_) => refused += 1,
                Decision::HandOver(_) => unreachable!("no balancer"),
            },
            Op::Send { peer, bytes, in_flight } => {
                if let Some(i) = sim.pick(peer) {
                    sim.send(i, bytes, in_flight);
                }
            }
            Op::Requests { peer, which, count } => {
                if let Some(i) = sim.pick(peer) {
                    let bytes = CANNED[usize::from(which) % CANNED.len()].repeat(usize::from(count % 16) + 1);
                    sim.send(i, &bytes, false);
                }
            }
            Op::Read { peer, bytes } => {
                if let Some(i) = sim.pick(peer) {
                    sim.read(i, usize::from(bytes));
                }
            }
            Op::LineRead { peer, bytes, end } => {
                if let Some(i) = sim.pick(peer) {
                    let mut read = bytes.to_vec();
                    if end {
                        read.extend_from_slice(b"\"}}\n");
                    }
                    sim.line_read(i, &read);
                }
            }
            Op::LongLine { peer, kib } => {
                if let Some(i) = sim.pick(peer) {
                    let mut line = b"{\"cmdid\":10000,\"params\":{\"s\":\"".to_vec();
                    line.resize(line.len() + usize::from(kib) * 1024, b'a');
                    sim.send(i, &line, false);
                }
            }
            Op::LentRead { peer, bytes } => {
                if let Some(i) = sim.pick(peer) {
                    sim.lent_read(i, usize::from(bytes));
                }
            }
            Op::PeerClose { peer } => {
                if let Some(i) = sim.pick(peer) {
                    let c = &mut sim.conns[i];
                    if !c.sent_fin {
                        c.sent_fin = true;
                        c.conn.as_mut().expect("open").on_peer_closed(sim.now);
                        sim.drive(i);
                    }
                }
            }
            Op::Fail { peer } => {
                if let Some(i) = sim.pick(peer) {
                    sim.conns[i].conn.as_mut().expect("open").on_error();
                    sim.drive(i);
                }
            }
            Op::Wait { ms } => sim.wait(u64::from(ms)),
            Op::Answer { index, how } => {
                let taken = HELD.with(|held| {
                    let mut held = held.borrow_mut();
                    (!held.is_empty()).then(|| {
                        let at = usize::from(index) % held.len();
                        held.remove(at)
                    })
                });
                if let Some(deferred) = taken {
                    match how % 4 {
                        0 => deferred.ok(&"later"),
                        1 => deferred.error(HandlerError::unavailable("upstream down")),
                        2 => deferred.expire(),
                        _ => drop(deferred),
                    }
                    sim.complete_deferred();
                }
            }
            Op::Shutdown => {
                sim.engine.on_shutdown(sim.now);
                sim.actions();
            }
        }
        for c in &sim.conns {
            if c.peer.closed {
                continue;
            }
            // Whatever arrived so far is whole lines plus at most one line being sent.
            let complete = c.peer.wire.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
            let got = replies(&c.peer.wire[..complete]);
            assert!(got.len() <= c.lines + 1, "{} replies for {} lines", got.len(), c.lines);
        }
    }
    let _ = refused;
    // Shut down; every peer reads everything; the deadline closes what is left.
    sim.engine.on_shutdown(sim.now);
    sim.actions();
    for i in 0..sim.conns.len() {
        if sim.conns[i].conn.is_some() {
            sim.read(i, usize::MAX);
        }
    }
    HELD.with(|held| held.borrow_mut().clear());
    sim.complete_deferred();
    for _ in 0..4 {
        sim.wait(10_000);
        for i in 0..sim.conns.len() {
            if sim.conns[i].conn.is_some() {
                sim.read(i, usize::MAX);
            }
        }
    }
    sim.wait(30_000);
    for c in &sim.conns {
        assert!(c.conn.is_none(), "a connection outlived the shutdown deadline");
        let got = replies(&c.peer.wire[..c.peer.wire.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1)]);
        assert!(got.len() <= c.lines + 1);
    }
    assert!(sim.engine.finished() || sim.engine.is_empty());
});

//! Bytes in, replies out, through the real dispatcher (built-ins, echo, typed params): the
//! input arrives in pieces the fuzzer chooses, the peer reads when the fuzzer says, and the
//! output limit is small, so the backlog of requests held while the peer does not read is
//! exercised too. Invariants: nothing panics; every reply is a JSON object with a code; one
//! reply per complete non-blank line, in order; the pieces and the reads change nothing.

#![no_main]

mod common;

use std::time::Instant;

use libfuzzer_sys::fuzz_target;

use common::{Peer, normalized, owed, processor, pump, receive, replies, send, small_limits};

/// Four bytes of control, then the bytes the peer sends (so that seeds are request text
/// behind a short header).
#[derive(Debug)]
struct Input<'a> {
    bytes: &'a [u8],
    /// Where the input is cut into receives.
    cuts: Vec<u16>,
    /// After each receive: how many bytes the peer reads (0: none).
    reads: Vec<u16>,
    /// Keep feeding while the machine asks not to read (a multishot recv in flight).
    ignore_pause: bool,
    /// The output limit, from 1 to 4 KiB.
    output_limit: u16,
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Option<Self> {
        let (&[limit, flags, seed_a, seed_b], bytes) = data.split_first_chunk::<4>()?;
        // A small generator, seeded by the header, picks cut points and read sizes.
        let mut state = u32::from(seed_a) << 8 | u32::from(seed_b) | 1;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let pieces = bytes.len().min(64);
        let cuts = (0..pieces).map(|_| (next() % (bytes.len() as u32 + 1)) as u16).collect();
        let reads = (0..pieces).map(|_| if next() % 3 == 0 { 0 } else { (next() % 2048) as u16 }).collect();
        Some(Self { bytes, cuts, reads, ignore_pause: flags & 1 == 1, output_limit: u16::from(limit) * 16 })
    }
}

fn run(input: &Input<'_>, pieces: bool) -> Vec<u8> {
    let limits = small_limits(usize::from(input.output_limit % 4096) + 1);
    let mut processor = processor(limits);
    // The dispatcher times handlers with the real clock and answers 504 when one ran past
    // its request's `timeout_ms` from its arrival: with arrivals a day ahead of the real
    // clock no handler is ever late, so how long a run takes cannot change its replies.
    let now = Instant::now() + std::time::Duration::from_secs(86_400);
    let mut conn = processor.open_connection(now);
    let mut peer = Peer::default();
    let mut cuts: Vec<usize> = if pieces {
        input.cuts.iter().map(|&c| usize::from(c) % (input.bytes.len() + 1)).collect()
    } else {
        Vec::new()
    };
    cuts.push(input.bytes.len());
    cuts.sort_unstable();
    let mut start = 0;
    for (i, &end) in cuts.iter().enumerate() {
        if end == start {
            continue;
        }
        if !conn.wants_read() && !(pieces && input.ignore_pause) {
            // The peer must read before more of its bytes are taken.
            pump(&mut conn, &mut processor, &mut peer, now);
        }
        if common::closed(&conn) {
            break;
        }
        receive(&mut conn, &mut processor, &input.bytes[start..end], now);
        start = end;
        if pieces && let Some(&read) = input.reads.get(i) {
            send(&mut conn, &mut peer, usize::from(read), now, processor.stats());
            if conn.wants_replay() {
                conn.replay(&mut processor, now);
            }
        }
        assert!(
            conn.deferred_pending() <= limits.max_deferred,
            "{} deferred replies pending",
            conn.deferred_pending()
        );
    }
    if !common::closed(&conn) {
        conn.on_peer_closed(now);
    }
    for _ in 0..input.bytes.len() + 2 {
        pump(&mut conn, &mut processor, &mut peer, now);
        if peer.closed || peer.fin {
            break;
        }
    }
    assert!(peer.closed || peer.fin, "the connection neither closed nor sent FIN after the peer's FIN");
    peer.wire
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::new(data) else { return };
    let whole = run(&input, false);
    let split = run(&input, true);
    let whole = replies(&whole);
    let split = replies(&split);
    assert_eq!(whole.len(), owed(input.bytes, 512), "replies for {:?}", String::from_utf8_lossy(input.bytes));
    let whole: Vec<_> = whole.into_iter().map(normalized).collect();
    let split: Vec<_> = split.into_iter().map(normalized).collect();
    assert_eq!(whole, split, "the pieces changed the replies");
});

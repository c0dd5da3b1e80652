//! Hooks for criterion benches (not a stable API): build a [`Request`] and a reply exactly the
//! way the core does, so one stage can be timed alone.

use simd_json::{Buffers, Tape};

use crate::reply::{begin_ok, end_ok};
use crate::request::{CoreContext, decode, parse_line};
use crate::stats::StatsRegistry;
use crate::{Reply, Request};

/// Parses `line[..len]` (with padding after it) in place and runs `f` on the request, as the
/// request of core 0 of a one-core server.
///
/// # Panics
/// If the line is not a valid request.
pub fn with_request<T>(line: &mut [u8], len: usize, f: impl FnOnce(&Request<'_, '_>) -> T) -> T {
    let mut buffers = Buffers::new(len);
    let mut tape = Tape::null();
    let mut pristine = Vec::new();
    let (parsed, sent) = parse_line(line, len, &mut buffers, &mut tape, &mut pristine);
    parsed.expect("valid JSON");
    let empty = Tape(vec![simd_json::Node::Object { len: 0, count: 0 }]);
    let context = CoreContext::new(0, StatsRegistry::new(1));
    let request =
        decode(&tape, sent, &empty, &context, None).map_err(|r| r.error.to_string()).expect("valid request");
    f(&request)
}

/// [`with_request`] for any bytes: `None` when they are not JSON or not a request.
pub fn try_with_request<T>(line: &mut [u8], len: usize, f: impl FnOnce(&Request<'_, '_>) -> T) -> Option<T> {
    let mut buffers = Buffers::new(len);
    let mut tape = Tape::null();
    let mut pristine = Vec::new();
    let (parsed, sent) = parse_line(line, len, &mut buffers, &mut tape, &mut pristine);
    parsed.ok()?;
    let empty = Tape(vec![simd_json::Node::Object { len: 0, count: 0 }]);
    let context = CoreContext::new(0, StatsRegistry::new(1));
    let request = decode(&tape, sent, &empty, &context, None).ok()?;
    Some(f(&request))
}

/// A reply writer over `out`, as handlers get it.
pub fn reply(out: &mut Vec<u8>) -> Reply<'_> {
    Reply::new(out)
}

/// Encodes a whole success reply for `request` (envelope, id, the data `write` produces).
pub fn encode_ok(out: &mut Vec<u8>, request: &Request<'_, '_>, write: impl FnOnce(Reply<'_>)) {
    begin_ok(out, request.id());
    let data_start = out.len();
    write(Reply::new(out));
    end_ok(out, data_start);
}

/// Request lines shaped as callers really send them, for every measuring tool (`ringcall
/// bench --shape`, `ringcall compare` workloads `@log1k`, the criterion benches): the same
/// bytes everywhere. All are echo requests (cmdid 10000), so a server answers each with its
/// `params` re-encoded. docs/benchmarks.md says how they were made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// The tornado-TCP seed's echo request, as its Python client sends it: 80 bytes.
    Seed,
    /// A log record of 1 KiB as a Python caller sends it: `json.dumps` of a nested dict with
    /// its default `ensure_ascii=True` (every non-ASCII character a `\uXXXX` escape, a pair
    /// for emoji) and separators (`", "`, `": "`), with numbers, booleans, `null`, arrays of
    /// short strings, and quotes, tabs and newlines inside the message.
    Log1k,
    /// An image of 16 KiB for a thumbnail service: a base64 blob with a few numeric fields.
    Blob16k,
    /// The same at 64 KiB.
    Blob64k,
}

impl Shape {
    /// Every shape, smallest first.
    pub const ALL: [Shape; 4] = [Shape::Seed, Shape::Log1k, Shape::Blob16k, Shape::Blob64k];

    /// Its name on command lines: `seed`, `log1k`, `blob16k`, `blob64k`.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Seed => "seed",
            Shape::Log1k => "log1k",
            Shape::Blob16k => "blob16k",
            Shape::Blob64k => "blob64k",
        }
    }

    /// The shape of a name.
    pub fn from_name(name: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The request line, with its `\n`.
    pub fn request(self) -> Vec<u8> {
        match self {
            Shape::Seed => {
                b"{\"cmdid\": 10000, \"timestamp\": 1437300000, \"params\": {\"content\": \"Hello world!\"}}\n"
                    .to_vec()
            }
            Shape::Log1k => log_record(1024),
            Shape::Blob16k => blob(16 << 10),
            Shape::Blob64k => blob(64 << 10),
        }
    }
}

/// A small deterministic generator (xorshift), so every tool sends the same bytes.
struct Bytes(u64);

impl Bytes {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// A log record line of exactly `len` bytes (its message is cut or extended to fit).
fn log_record(len: usize) -> Vec<u8> {
    // What json.dumps writes for the dict, message aside (ensure_ascii: "Zürich" is
    // "Z\u00fcrich", "東京" is "\u6771\u4eac", an emoji a surrogate pair).
    let head = concat!(
        r#"{"cmdid": 10000, "timestamp": 1437300000, "id": 48213, "params": {"#,
        r#""ts": 1437300000.125, "level": "warning", "service": "checkout", "host": "web-03.eu-west-1", "#,
        r#""pid": 31337, "thread": "worker-7", "logger": "payments.gateway", "#,
        r#""user": {"id": 90210, "name": "Ren\u00e9e M\u00fcller-\u00d8stergaard", "locale": "de_CH", "#,
        r#""roles": ["buyer", "beta", "support"], "verified": true, "manager": null}, "#,
        r#""http": {"method": "POST", "path": "/api/v2/orders/7731/pay", "status": 502, "#,
        r#""latency_ms": 1834.27, "bytes": 5120, "retried": false}, "#,
        r#""geo": {"city": "Z\u00fcrich", "office": "\u6771\u4eac", "lat": 47.3769, "lon": 8.5417}, "#,
        r#""tags": ["payments", "timeout", "upstream", "eu", "p1"], "#,
        r#""trace": {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7", "sampled": true}, "#,
        r#""attempts": [120, 250.5, 500, 1000, -1], "#,
    );
    let tail = "\"}}\n";
    let body = concat!(
        r#"upstream \"acquirer-2\" timed out after 1834 ms\n\tat pay(order=7731, amount=249.90 CHF)"#,
        r#"\n\tcaller said: \u00abnochmals versuchen?\u00bb \ud83d\ude00 \u2014 see runbook \"PAY-17\""#,
        r#"\n\tstate: {\"attempt\": 3, \"backoff\": 0.5} "#,
    );
    let mut line = Vec::with_capacity(len);
    line.extend_from_slice(head.as_bytes());
    line.extend_from_slice(br#""msg": ""#);
    let room = len.saturating_sub(line.len() + tail.len());
    // Repeat the message's pieces to fill, cutting only at a piece boundary, then pad with
    // plain words (never inside an escape).
    let pieces: Vec<&str> = body.split_inclusive(' ').collect();
    let mut msg = String::new();
    'fill: loop {
        for piece in &pieces {
            if msg.len() + piece.len() > room {
                break 'fill;
            }
            msg.push_str(piece);
        }
    }
    while msg.len() < room {
        msg.push('.');
    }
    line.extend_from_slice(msg.as_bytes());
    line.extend_from_slice(tail.as_bytes());
    line
}

/// An image upload line of exactly `len` bytes: base64 of random bytes, and a few fields.
fn blob(len: usize) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let head = br#"{"cmdid": 10000, "timestamp": 1437300000, "params": {"width": 1920, "height": 1080, "quality": 0.85, "format": "jpeg", "image": ""#;
    let tail = b"\"}}\n";
    let room = len - head.len() - tail.len();
    let mut line = Vec::with_capacity(len);
    line.extend_from_slice(head);
    let mut random = Bytes(0x9e37_79b9_7f4a_7c15);
    // Whole base64 quads of random bytes; the last quad padded with `=` as an encoder does.
    let quads = room / 4;
    for i in 0..quads {
        let word = random.next();
        let last = i + 1 == quads;
        for (k, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            // The last quad encodes two bytes, padded with `=` as an encoder does.
            line.push(if last && k == 3 { b'=' } else { ALPHABET[((word >> shift) & 63) as usize] });
        }
    }
    // The bytes left over (fewer than a quad) are spaces after the string's end would change
    // the shape: they go in the width's place instead, as digits of a longer number.
    let extra = room - quads * 4;
    line.extend_from_slice(tail);
    if extra > 0 {
        let width = b"\"width\": ";
        let at = line.windows(width.len()).position(|w| w == width).expect("the width") + width.len();
        for _ in 0..extra {
            line.insert(at, b'1');
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::Shape;

    #[test]
    fn every_shape_is_a_valid_request_of_its_size_and_the_log_record_is_python_shaped() {
        for shape in Shape::ALL {
            let mut line = shape.request();
            let expected = match shape {
                // 80 bytes and its `\n`.
                Shape::Seed => 81,
                Shape::Log1k => 1024,
                Shape::Blob16k => 16 << 10,
                Shape::Blob64k => 64 << 10,
            };
            assert_eq!(line.len(), expected, "{shape:?}");
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(Shape::from_name(shape.name()), Some(shape));
            let len = line.len() - 1;
            line.resize(len + crate::PADDING, 0);
            let cmdid = crate::bench::try_with_request(&mut line, len, |r| r.cmdid());
            assert_eq!(cmdid, Some(10000), "{shape:?} is a valid echo request");
        }
        let log = String::from_utf8(Shape::Log1k.request()).unwrap();
        assert!(log.is_ascii(), "ensure_ascii: non-ASCII text is escaped");
        for needle in [r"\u00fc", r"\ud83d\ude00", r#"\""#, r"\t", r"\n", "true", "null", "1834.27", ", "] {
            assert!(log.contains(needle), "{needle} in {log}");
        }
    }
}

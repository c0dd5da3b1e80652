//! The parsed request: the envelope fields of protocol v1 read off simd-json's tape, with
//! `params` left on the tape for the handler (strings borrow the receive buffer: zero copy),
//! and the line as it was sent, so a handler that only stores or forwards `params` can have
//! its JSON text verbatim ([`Request::params_json`]) instead of re-encoding the tape.
//!
//! Calling contract: [`parse_line`] parses a line in place and keeps what [`decode`] needs to
//! find `params` in the sent bytes — simd-json unescapes strings where they lie, so a line
//! with a backslash is copied first; the tape's strings point into the line where they were
//! (simd-json 0.19's in-place strings), which is how `params` is found without a second scan.

use std::cell::OnceCell;
use std::fmt;

use simd_json::ValueType;
use simd_json::prelude::*;
use simd_json::tape::{Tape, Value};

use crate::stats::StatsRegistry;

/// What a handler can see of the core it runs on.
#[derive(Debug)]
pub struct CoreContext {
    core: usize,
    stats: std::sync::Arc<StatsRegistry>,
}

impl CoreContext {
    /// The context of core `core`, whose counters are in `stats`.
    pub fn new(core: usize, stats: std::sync::Arc<StatsRegistry>) -> Self {
        Self { core, stats }
    }

    /// Index of the core (worker thread) serving this request.
    pub fn core(&self) -> usize {
        self.core
    }

    /// The counters of every core of this server.
    pub fn stats(&self) -> &StatsRegistry {
        &self.stats
    }
}

/// A parsed request, borrowed from the connection's receive buffer.
///
/// `'t` is the parse tape, `'i` the input bytes the strings point into.
pub struct Request<'t, 'i> {
    cmdid: u32,
    timestamp: Option<i64>,
    timeout: Option<std::time::Duration>,
    params: Value<'t, 'i>,
    id: Option<Value<'t, 'i>>,
    context: &'t CoreContext,
    identity: Option<&'t str>,
    sent: Sent<'t>,
    raw: RawParams,
    /// `params` re-encoded, only where the sent bytes could not be used (see [`RawParams`]).
    encoded: OnceCell<Box<str>>,
}

/// The request line as the caller sent it: `text` has the same offsets as the parsed line,
/// whose first byte is at address `base`.
#[derive(Clone, Copy)]
pub(crate) struct Sent<'t> {
    text: &'t [u8],
    base: usize,
}

impl<'t> Sent<'t> {
    /// Offset in the line of the string the tape holds at address `at`, if it points into
    /// the line (just past a quote).
    fn offset_of(&self, at: usize) -> Option<usize> {
        let at = at.checked_sub(self.base)?;
        (at > 0 && self.text.get(at - 1) == Some(&b'"')).then_some(at)
    }
}

/// Where the `params` member in effect lies in the sent line: the addresses of its key's
/// tape string and of the next key's (0: none follows), checked when used — where they do
/// not point into the line, `params` is re-encoded off the tape instead.
#[derive(Clone, Copy)]
enum RawParams {
    /// No `params`, or `null`: `{}`.
    Absent,
    At {
        key: usize,
        next: usize,
    },
}

impl<'t, 'i> Request<'t, 'i> {
    /// The command id.
    pub fn cmdid(&self) -> u32 {
        self.cmdid
    }

    /// The request's `timestamp`, when it sent one.
    pub fn timestamp(&self) -> Option<i64> {
        self.timestamp
    }

    /// The request's `timeout_ms`, when it sent one: how long after the server read the
    /// request the caller still wants an answer. Past it the reply is a 504.
    pub fn timeout(&self) -> Option<std::time::Duration> {
        self.timeout
    }

    /// Deserializes `params` into `T`, borrowing strings from the request where `T` does
    /// (`&str` fields: zero copy, unless the string had escapes).
    ///
    /// # Errors
    /// A 400 [`HandlerError`](crate::error::HandlerError) naming the field and what was wrong, e.g.
    /// `params.user.age: invalid type: string "x", expected u32`.
    pub fn params<T: serde::Deserialize<'i>>(&self) -> Result<T, crate::error::HandlerError> {
        super::params::from_value(self.params)
    }

    /// The request's `id`, when it sent one (a number or a string).
    pub fn id(&self) -> Option<Value<'t, 'i>> {
        self.id
    }

    /// The `params` object as parsed (an empty object when the request had none).
    pub fn params_value(&self) -> Value<'t, 'i> {
        self.params
    }

    /// The JSON text of `params` exactly as the caller sent it — whitespace, escapes and
    /// number spellings included — validated by the parser but not re-encoded: what a
    /// handler that stores or forwards the params writes (`reply.raw(request.params_json()
    /// .as_bytes())`), at the cost of a few bytes' look-up. `{}` when the request had no
    /// `params` (or `null`). It never holds a newline, so it fits in a reply line.
    pub fn params_json(&self) -> &str {
        let RawParams::At { key, next } = self.raw else {
            return "{}";
        };
        if let Some(span) = self.sent.offset_of(key).and_then(|key| {
            let next = if next == 0 { Some(None) } else { self.sent.offset_of(next).map(Some) };
            params_span(self.sent.text, key, next?)
        }) {
            // SAFETY: a request exists only for a line the parser accepted, which it checked
            // is UTF-8 as sent (before unescaping; `text` is those bytes), and the span begins
            // with `{` and ends with `}`: ASCII, so it is whole characters.
            return unsafe { std::str::from_utf8_unchecked(&self.sent.text[span]) };
        }
        self.encoded.get_or_init(|| {
            let mut out = Vec::new();
            super::reply::write_value(&mut out, self.params);
            String::from_utf8(out).unwrap_or_default().into_boxed_str()
        })
    }

    /// `params[key]`, if present.
    pub fn param(&self, key: &str) -> Option<Value<'t, 'i>> {
        self.params.get(key)
    }

    /// `params[key]` as a string, if it is one.
    pub fn param_str(&self, key: &str) -> Option<&'i str> {
        self.param(key).and_then(|v| v.into_string())
    }

    /// `params[key]` as an unsigned integer, if it is one.
    pub fn param_u64(&self, key: &str) -> Option<u64> {
        self.param(key).and_then(|v| v.as_u64())
    }

    /// `params[key]` as a signed integer, if it is one.
    pub fn param_i64(&self, key: &str) -> Option<i64> {
        self.param(key).and_then(|v| v.as_i64())
    }

    /// `params[key]` as a float, if it is a number.
    pub fn param_f64(&self, key: &str) -> Option<f64> {
        self.param(key).and_then(|v| v.cast_f64())
    }

    /// `params[key]` as a bool, if it is one.
    pub fn param_bool(&self, key: &str) -> Option<bool> {
        self.param(key).and_then(|v| v.as_bool())
    }

    /// The caller's verified identity: with mutual TLS, the first DNS name in its client
    /// certificate's subject alternative names (`None` without mutual TLS).
    pub fn identity(&self) -> Option<&'t str> {
        self.identity
    }

    /// The core this request runs on, and the server's counters.
    pub fn context(&self) -> &'t CoreContext {
        self.context
    }
}

/// Why a well-formed JSON document is not a valid request. Displayed as the 400 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EnvelopeError {
    NotAnObject,
    MissingCmdid,
    BadCmdid,
    BadTimestamp,
    BadTimeout,
    BadParams,
    BadId,
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAnObject => "request must be a JSON object",
            Self::MissingCmdid => "missing cmdid",
            Self::BadCmdid => "cmdid must be an integer from 0 to 4294967295",
            Self::BadTimestamp => "timestamp must be an integer",
            Self::BadTimeout => "timeout_ms must be a non-negative integer (milliseconds)",
            Self::BadParams => "params must be a JSON object",
            Self::BadId => "id must be a number or a string",
        })
    }
}

/// A request that failed envelope validation, with the id to echo if it had a usable one.
pub(crate) struct Rejected<'t, 'i> {
    pub error: EnvelopeError,
    pub id: Option<Value<'t, 'i>>,
}

/// Reads the protocol v1 envelope off a parsed document.
///
/// `empty_params` is a tape holding `{}`, used when the request has no `params`.
pub(crate) fn decode<'t, 'i>(
    tape: &'t Tape<'i>,
    sent: Sent<'t>,
    empty_params: &'t Tape<'static>,
    context: &'t CoreContext,
    identity: Option<&'t str>,
) -> Result<Request<'t, 'i>, Rejected<'t, 'i>> {
    let root = tape.as_value();
    let reject = |error, id| Err(Rejected { error, id });
    let Some(object) = root.as_object() else {
        return reject(EnvelopeError::NotAnObject, None);
    };
    let (mut cmdid, mut timestamp, mut timeout, mut params, mut id) = (None, None, None, None, None);
    let mut raw = RawParams::Absent;
    // Set after the `params` member in effect, until the next key is seen.
    let mut awaiting_next = false;
    let mut first_error = None;
    for (key, value) in object.iter() {
        if awaiting_next {
            awaiting_next = false;
            if let RawParams::At { next, .. } = &mut raw {
                *next = key.as_ptr() as usize;
            }
        }
        let outcome = match key {
            "cmdid" => read_cmdid(value).map(|c| cmdid = Some(c)),
            "timestamp" => value.as_i64().map(|t| timestamp = Some(t)).ok_or(EnvelopeError::BadTimestamp),
            "timeout_ms" => value
                .as_u64()
                .map(|ms| timeout = Some(std::time::Duration::from_millis(ms)))
                .ok_or(EnvelopeError::BadTimeout),
            "params" => match value.as_object() {
                Some(_) => {
                    params = Some(value);
                    raw = RawParams::At { key: key.as_ptr() as usize, next: 0 };
                    awaiting_next = true;
                    Ok(())
                }
                None if value.is_null() => Ok(()),
                None => Err(EnvelopeError::BadParams),
            },
            "id" => match value.value_type() {
                ValueType::String | ValueType::I64 | ValueType::U64 | ValueType::F64 => {
                    id = Some(value);
                    Ok(())
                }
                _ => Err(EnvelopeError::BadId),
            },
            _ => Ok(()),
        };
        if let Err(e) = outcome {
            first_error.get_or_insert(e);
        }
    }
    if let Some(error) = first_error {
        return reject(error, id);
    }
    let Some(cmdid) = cmdid else {
        return reject(EnvelopeError::MissingCmdid, id);
    };
    Ok(Request {
        cmdid,
        timestamp,
        timeout,
        params: params.unwrap_or_else(|| empty_params.as_value()),
        id,
        context,
        identity,
        sent,
        raw,
        encoded: OnceCell::new(),
    })
}

/// Parses `buf[..len]` (padding after it) in place into `tape`, and returns the line as it
/// was sent for [`decode`]: `buf` itself when the line has no backslash (the parser rewrites
/// only escaped strings), else a copy made in `pristine` before parsing.
pub(crate) fn parse_line<'b>(
    buf: &'b mut [u8],
    len: usize,
    buffers: &mut simd_json::Buffers,
    tape: &mut Tape<'b>,
    pristine: &'b mut Vec<u8>,
) -> (simd_json::Result<()>, Sent<'b>) {
    let escaped = has_backslash(buf, len);
    if escaped {
        pristine.clear();
        pristine.extend_from_slice(&buf[..len]);
    }
    let base = buf.as_mut_ptr();
    let whole = buf.len();
    // SAFETY: `whole` bytes from `base` are `buf`, borrowed mutably for 'b; the parser gets
    // them through this one reborrow and its strings (the tape's, shared) stay borrowed from it.
    let parsed = simd_json::fill_tape_padded(
        unsafe { std::slice::from_raw_parts_mut(base, whole) },
        len,
        buffers,
        tape,
    );
    let text: &'b [u8] = if escaped {
        pristine
    } else {
        // SAFETY: the parser has returned and writes nothing more; from here on the line is
        // only read, through this view and the tape's strings alike (shared borrows of the
        // same bytes, all for 'b, while `buf`'s borrow is held).
        unsafe { std::slice::from_raw_parts(base, len) }
    };
    (parsed, Sent { text, base: base as usize })
}

/// The span of the `params` value in the sent line `text`, from the offsets of its key's
/// first byte and of the next key's (none when it is the last member). Only whitespace,
/// the key's closing quote, `:` and `,` lie between those and the value: a look at a few
/// bytes, not a scan of the value. `None` if the bytes are not as expected.
fn params_span(text: &[u8], key: usize, next: Option<usize>) -> Option<std::ops::Range<usize>> {
    let spelled_plainly = text.get(key..key + 7).is_some_and(|k| k == b"params\"");
    let after_key = if spelled_plainly {
        key + 7
    } else {
        // The key was spelled with escapes (`"par\u0061ms"`).
        closing_quote(text, key)? + 1
    };
    let colon = skip_ws(text, after_key);
    (text.get(colon) == Some(&b':')).then_some(())?;
    let start = skip_ws(text, colon + 1);
    (text.get(start) == Some(&b'{')).then_some(())?;
    let end = match next {
        Some(next) => {
            let quote = next.checked_sub(1)?;
            let comma = skip_ws_back(text, quote).checked_sub(1)?;
            (text.get(comma) == Some(&b',')).then_some(())?;
            skip_ws_back(text, comma)
        }
        None => {
            let brace = skip_ws_back(text, text.len()).checked_sub(1)?;
            (text.get(brace) == Some(&b'}')).then_some(())?;
            skip_ws_back(text, brace)
        }
    };
    (end > start && text.get(end - 1) == Some(&b'}')).then_some(start..end)
}

/// Whether `buf[..len]` holds a backslash; `buf` has [`simd_json::INPUT_PADDING`] bytes
/// past `len`. A short line is tested sixteen bytes at a time in place (SSE2, baseline on
/// x86-64), cheaper than memchr's set-up; a long one with memchr.
#[inline(always)]
fn has_backslash(buf: &[u8], len: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if len < 512 && buf.len() >= len + 16 {
        use std::arch::x86_64::{__m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_set1_epi8};
        let mut at = 0;
        while at < len {
            // SAFETY: SSE2 is baseline on x86-64; `at < len` and `buf` has 16 bytes past
            // `len`, so the unaligned 16-byte load is inside `buf`.
            let hits = unsafe {
                let block = _mm_loadu_si128(buf.as_ptr().add(at).cast::<__m128i>());
                _mm_movemask_epi8(_mm_cmpeq_epi8(block, _mm_set1_epi8(b'\\' as i8))) as u32
            };
            // Bytes past `len` (the padding) do not count.
            let valid = if len - at >= 16 { u32::MAX } else { (1 << (len - at)) - 1 };
            if hits & valid != 0 {
                return true;
            }
            at += 16;
        }
        return false;
    }
    memchr::memchr(b'\\', &buf[..len]).is_some()
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// The first offset from `at` that is not whitespace.
fn skip_ws(text: &[u8], mut at: usize) -> usize {
    while text.get(at).is_some_and(|&b| is_ws(b)) {
        at += 1;
    }
    at
}

/// The offset just past the last byte before `at` that is not whitespace.
fn skip_ws_back(text: &[u8], mut at: usize) -> usize {
    while at > 0 && text.get(at - 1).is_some_and(|&b| is_ws(b)) {
        at -= 1;
    }
    at
}

/// The offset of the quote closing the string whose contents start at `from`.
fn closing_quote(text: &[u8], mut from: usize) -> Option<usize> {
    loop {
        let at = from + memchr::memchr2(b'"', b'\\', text.get(from..)?)?;
        if text[at] == b'"' {
            return Some(at);
        }
        from = at + 2;
    }
}

fn read_cmdid(value: Value<'_, '_>) -> Result<u32, EnvelopeError> {
    value.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or(EnvelopeError::BadCmdid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::StatsRegistry;
    use proptest::prelude::*;

    /// `params_json` of `line`, parsed the way the processor parses it.
    fn params_json_of(line: &str) -> String {
        let mut buf = line.as_bytes().to_vec();
        let len = buf.len();
        buf.resize(len + simd_json::INPUT_PADDING, 0);
        crate::bench::with_request(&mut buf, len, |r| r.params_json().to_owned())
    }

    #[test]
    fn params_json_is_the_sent_text() {
        let cases = [
            (r#"{"cmdid":1,"params":{"a":1}}"#, r#"{"a":1}"#),
            (r#"{"params":{"a":1},"cmdid":1}"#, r#"{"a":1}"#),
            (r#"{"cmdid":1,"params":{"a":1},"id":"x"}"#, r#"{"a":1}"#),
            (
                "{\"cmdid\": 1, \"params\" :\t{ \"a\" : [1, 2.50, \"Z\\u00fcrich \\\"q\\\"\"] } ,\r \"id\": 3}  ",
                "{ \"a\" : [1, 2.50, \"Z\\u00fcrich \\\"q\\\"\"] }",
            ),
            (r#"{"cmdid":1,"params":{"a":"}\",{"},"id":1}"#, r#"{"a":"}\",{"}"#),
            (r#"{"cmdid":1,"par\u0061ms":{"x":"\\"}}"#, r#"{"x":"\\"}"#),
            (r#"{"cmdid":1,"params":{}}"#, "{}"),
            (r#"{"cmdid":1}"#, "{}"),
            (r#"{"cmdid":1,"params":null}"#, "{}"),
            // The member in effect is the last object one, as for `params_value`.
            (r#"{"params":{"a":1},"cmdid":1,"params":{"b":2}}"#, r#"{"b":2}"#),
            (r#"{"params":{"a":1},"params":null,"cmdid":1}"#, r#"{"a":1}"#),
            (r#"{"cmdid":1,"params":{"a":{"b":[{}]}},"params":null}"#, r#"{"a":{"b":[{}]}}"#),
        ];
        for (line, want) in cases {
            assert_eq!(params_json_of(line), want, "{line}");
        }
    }

    #[test]
    fn params_json_is_re_encoded_where_the_tape_does_not_point_into_the_line() {
        let line = br#"{"cmdid":1,"params": {"a": [1, 2.5, "x"]}}"#;
        let mut buf = line.to_vec();
        let len = buf.len();
        buf.resize(len + simd_json::INPUT_PADDING, 0);
        let mut tape = Tape::null();
        simd_json::fill_tape_padded(&mut buf, len, &mut simd_json::Buffers::new(len), &mut tape).unwrap();
        let empty = Tape(vec![simd_json::Node::Object { len: 0, count: 0 }]);
        let context = CoreContext::new(0, StatsRegistry::new(1));
        let elsewhere = Sent { text: line, base: 0 };
        let request = decode(&tape, elsewhere, &empty, &context, None).ok().unwrap();
        assert_eq!(request.params_json(), r#"{"a":[1,2.5,"x"]}"#);
    }

    #[test]
    fn a_backslash_is_found_anywhere_in_the_line_and_not_in_the_padding() {
        for len in [0, 1, 15, 16, 17, 40, 511, 512, 2000] {
            let mut buf = vec![b'a'; len + simd_json::INPUT_PADDING];
            buf[len..].fill(b'\\');
            assert!(!has_backslash(&buf, len), "len {len}: the padding counted");
            for at in (0..len).filter(|at| at % 7 == 0 || *at + 1 == len || at % 16 == 15) {
                buf[at] = b'\\';
                assert!(has_backslash(&buf, len), "len {len}: missed at {at}");
                buf[at] = b'a';
            }
        }
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            (-1e9f64..1e9).prop_map(serde_json::Value::from),
            "[a-z\"\\\\\t\u{e9}\u{6771}}{,:]{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::btree_map("[a-z\"}]{0,6}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Wherever `params` sits among the other members, and however it is spaced or
        /// escaped, its sent text comes back.
        #[test]
        fn params_json_round_trips(
            params in prop::collection::btree_map("[a-z\"]{0,6}", json_value(), 0..6),
            position in 0usize..3,
            ascii in any::<bool>(),
            space in prop::sample::select(vec!["", " ", "\t", " \r "]),
        ) {
            let params = serde_json::Value::Object(params.into_iter().collect());
            let mut text = serde_json::to_string(&params).unwrap();
            if ascii {
                // As Python's json.dumps sends it: every non-ASCII character a \u escape.
                text = text.chars().map(|c| if c.is_ascii() { c.to_string() } else {
                    let mut units = [0u16; 2];
                    c.encode_utf16(&mut units).iter().map(|u| format!("\\u{u:04x}")).collect()
                }).collect();
            }
            let member = format!("\"params\"{space}:{space}{text}");
            let mut members = vec!["\"cmdid\":7".to_owned(), format!("\"id\":{space}\"a\\\"b\"")];
            members.insert(position.min(members.len()), member);
            let line = format!("{{{space}{}{space}}}", members.join(&format!("{space},{space}")));
            let got = params_json_of(&line);
            prop_assert_eq!(&got, &text);
            // And it is the member another parser finds in the line.
            let whole: serde_json::Value = serde_json::from_str(&line).unwrap();
            prop_assert_eq!(serde_json::from_str::<serde_json::Value>(&got).unwrap(), whole["params"].clone());
        }
    }
}

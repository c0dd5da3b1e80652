//! Reply encoding: the `{"code":…}` envelope, JSON string escaping, and the [`Reply`] writer
//! handlers use to put their `data` value straight into the connection's output buffer.
//!
//! Nothing here allocates except the growth of the output buffer itself, which is reused for
//! the life of the connection.

use std::fmt;

use simd_json::ValueType;
use simd_json::prelude::*;
use simd_json::tape::Value;

use crate::error::HandlerError;

/// The reply line a connection gets when its core is at `max_connections_per_core`, just
/// before it is closed.
pub(crate) const TOO_MANY_CONNECTIONS: &[u8] =
    b"{\"code\":503,\"error\":\"too many connections on this core; retry later\"}\n";

/// Writes `s` as the contents of a JSON string (without the surrounding quotes).
///
/// Most strings need no escaping: sixteen bytes at a time (SSE2, on x86-64) or eight (a word,
/// elsewhere) are tested for a quote, a backslash or a control character at once, and a clean
/// string is copied whole. Only a string that has one is walked byte by byte.
pub(crate) fn escape_into(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    if is_clean(bytes) {
        out.extend_from_slice(bytes);
        return;
    }
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if needs_escape(b) {
            out.extend_from_slice(&bytes[start..i]);
            write_escape(out, b);
            start = i + 1;
        }
    }
    out.extend_from_slice(&bytes[start..]);
}

/// Whether no byte of `bytes` needs escaping.
fn is_clean(bytes: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if bytes.len() >= 16 {
        return sse2::is_clean(bytes);
    }
    match bytes.len() {
        0..8 => !bytes.iter().any(|&b| needs_escape(b)),
        // Whole words, then the last eight bytes (overlapping the last whole word unless the
        // length is a multiple of 8): plain loads, never a copy into a stack buffer.
        len => {
            bytes.chunks_exact(8).all(|word| !word_needs_escape(word_at(word)))
                && !word_needs_escape(word_at(&bytes[len - 8..]))
        }
    }
}

/// The escape test sixteen bytes at a time. SSE2 is part of every x86-64 CPU: no detection.
#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_max_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };

    /// Whether no byte of `bytes` (at least 16 long) is a quote, a backslash or below 0x20:
    /// whole blocks, then the last sixteen bytes (overlapping, as the word version does).
    pub(super) fn is_clean(bytes: &[u8]) -> bool {
        debug_assert!(bytes.len() >= 16);
        let block_needs_escape = |block: &[u8]| {
            // SAFETY: SSE2 is baseline on x86-64; `block` has at least 16 readable bytes and
            // the load is unaligned.
            unsafe {
                let v = _mm_loadu_si128(block.as_ptr().cast::<__m128i>());
                // Unsigned b < 0x20 exactly when max(b, 0x1f) == 0x1f.
                let below = _mm_set1_epi8(0x1f);
                let control = _mm_cmpeq_epi8(_mm_max_epu8(v, below), below);
                let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
                let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
                _mm_movemask_epi8(_mm_or_si128(control, _mm_or_si128(quote, backslash))) != 0
            }
        };
        bytes.chunks_exact(16).all(|block| !block_needs_escape(block))
            && !block_needs_escape(&bytes[bytes.len() - 16..])
    }
}

/// The first eight bytes of `bytes` as one little-endian word.
fn word_at(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes[..8].try_into().expect("eight bytes"))
}

const fn needs_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// Whether any byte of `word` needs escaping (exact: no false positives or negatives).
const fn word_needs_escape(word: u64) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    const fn has_zero_byte(x: u64) -> u64 {
        x.wrapping_sub(ONES) & !x & HIGH
    }
    let control = word.wrapping_sub(ONES * 0x20) & !word & HIGH;
    let quote = has_zero_byte(word ^ (ONES * b'"' as u64));
    let backslash = has_zero_byte(word ^ (ONES * b'\\' as u64));
    control | quote | backslash != 0
}

fn write_escape(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        _ => {
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 15) as usize]])
        }
    }
}

/// Writes a parsed JSON value (compact), straight off the tape.
pub(crate) fn write_value(out: &mut Vec<u8>, v: Value<'_, '_>) {
    match v.value_type() {
        ValueType::String => write_str(out, v.as_str().unwrap_or_default()),
        ValueType::Object => {
            out.push(b'{');
            for (i, (key, value)) in v.as_object().into_iter().flat_map(|o| o.iter()).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(out, key);
                out.push(b':');
                write_value(out, value);
            }
            out.push(b'}');
        }
        ValueType::Array => {
            out.push(b'[');
            for (i, value) in v.as_array().into_iter().flat_map(|a| a.iter()).enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, value);
            }
            out.push(b']');
        }
        ValueType::U64 => {
            out.extend_from_slice(itoa::Buffer::new().format(v.as_u64().unwrap_or(0)).as_bytes())
        }
        ValueType::I64 => {
            out.extend_from_slice(itoa::Buffer::new().format(v.as_i64().unwrap_or(0)).as_bytes())
        }
        ValueType::F64 => write_f64(out, v.as_f64().unwrap_or(f64::NAN)),
        ValueType::Bool => out.extend_from_slice(if v.as_bool() == Some(true) { b"true" } else { b"false" }),
        _ => out.extend_from_slice(b"null"),
    }
}

/// A `fmt::Write` sink that JSON-escapes everything written to it, so error messages built
/// with `write!` land in a JSON string without a temporary `String`.
struct EscapingWriter<'a>(&'a mut Vec<u8>);

impl fmt::Write for EscapingWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        escape_into(self.0, s);
        Ok(())
    }
}

/// Writes an `"id":…,` member echoing the request's id, if it had one.
pub(crate) fn write_id(out: &mut Vec<u8>, id: Option<Value<'_, '_>>) {
    if let Some(id) = id {
        out.extend_from_slice(b"\"id\":");
        write_value(out, id);
        out.push(b',');
    }
}

/// Starts a success reply: `{"code":0,"id":…,"data":`. The handler's value follows.
pub(crate) fn begin_ok(out: &mut Vec<u8>, id: Option<Value<'_, '_>>) {
    out.extend_from_slice(b"{\"code\":0,");
    write_id(out, id);
    out.extend_from_slice(b"\"data\":");
}

/// [`begin_ok`] with the id already encoded by [`write_id`].
pub(crate) fn begin_ok_raw(out: &mut Vec<u8>, id: Option<&[u8]>) {
    out.extend_from_slice(b"{\"code\":0,");
    out.extend_from_slice(id.unwrap_or_default());
    out.extend_from_slice(b"\"data\":");
}

/// Ends a success reply started with [`begin_ok`]; `data_start` is where the value began, so a
/// handler that wrote nothing gets `null`.
pub(crate) fn end_ok(out: &mut Vec<u8>, data_start: usize) {
    if out.len() == data_start {
        out.extend_from_slice(b"null");
    }
    out.extend_from_slice(b"}\n");
}

/// Writes the notice line a connection that asked for notices gets when the server begins
/// closing it: `{"notice":"closing","grace_ms":N}\n` (no `code`: it answers no request).
pub(crate) fn write_closing_notice(out: &mut Vec<u8>, grace: std::time::Duration) {
    out.extend_from_slice(b"{\"notice\":\"closing\",\"grace_ms\":");
    let ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    out.extend_from_slice(itoa::Buffer::new().format(ms).as_bytes());
    out.extend_from_slice(b"}\n");
}

/// Writes a whole error reply line: `{"code":N,"id":…,"error":"message"}\n`.
pub(crate) fn write_error(
    out: &mut Vec<u8>,
    code: u16,
    id: Option<Value<'_, '_>>,
    message: fmt::Arguments<'_>,
) {
    out.extend_from_slice(b"{\"code\":");
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(digits.format(code).as_bytes());
    out.push(b',');
    write_id(out, id);
    out.extend_from_slice(b"\"error\":\"");
    let _ = fmt::write(&mut EscapingWriter(out), message);
    out.extend_from_slice(b"\"}\n");
}

/// [`write_error`] with the id already encoded by [`write_id`].
pub(crate) fn write_error_raw(out: &mut Vec<u8>, code: u16, id: Option<&[u8]>, message: fmt::Arguments<'_>) {
    out.extend_from_slice(b"{\"code\":");
    let mut digits = itoa::Buffer::new();
    out.extend_from_slice(digits.format(code).as_bytes());
    out.push(b',');
    out.extend_from_slice(id.unwrap_or_default());
    out.extend_from_slice(b"\"error\":\"");
    let _ = fmt::write(&mut EscapingWriter(out), message);
    out.extend_from_slice(b"\"}\n");
}

/// Where a handler writes the `data` of its success reply: exactly one JSON value, written
/// straight into the connection's output buffer. Writing nothing replies `"data":null`.
///
/// Every method consumes the writer, so a handler cannot write two values by mistake.
pub struct Reply<'o> {
    out: &'o mut Vec<u8>,
}

impl<'o> Reply<'o> {
    pub(crate) fn new(out: &'o mut Vec<u8>) -> Self {
        Self { out }
    }

    /// Writes bytes that already are one valid JSON value (the caller vouches for them).
    pub fn raw(self, json: &[u8]) {
        self.out.extend_from_slice(json);
    }

    /// Writes a JSON string.
    pub fn str(self, s: &str) {
        write_str(self.out, s);
    }

    /// Writes an unsigned integer.
    pub fn u64(self, n: u64) {
        self.out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    /// Writes a signed integer.
    pub fn i64(self, n: i64) {
        self.out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    }

    /// Writes a float; non-finite values become `null`, as JSON has no NaN or infinity.
    pub fn f64(self, x: f64) {
        write_f64(self.out, x);
    }

    /// Writes `true` or `false`.
    pub fn bool(self, b: bool) {
        self.out.extend_from_slice(if b { b"true" } else { b"false" });
    }

    /// Writes a parsed JSON value, e.g. part of the request (this is how echo works).
    pub fn value(self, v: Value<'_, '_>) {
        write_value(self.out, v);
    }

    /// Serializes any `serde::Serialize` value.
    ///
    /// # Errors
    /// Fails when the value cannot be represented as JSON (e.g. a map with non-string keys).
    pub fn serialize<T: serde::Serialize + ?Sized>(self, v: &T) -> Result<(), HandlerError> {
        simd_json::to_writer(&mut *self.out, v)
            .map_err(|e| HandlerError::internal(format!("reply serialization failed: {e}")))
    }

    /// Starts a JSON object; members are added with the [`ObjectWriter`] methods and the
    /// object is closed when the writer is dropped.
    pub fn object(self) -> ObjectWriter<'o> {
        ObjectWriter::open(self.out)
    }
}

fn write_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    escape_into(out, s);
    out.push(b'"');
}

fn write_f64(out: &mut Vec<u8>, x: f64) {
    if x.is_finite() {
        out.extend_from_slice(ryu::Buffer::new().format_finite(x).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}

/// Writes the members of a JSON object; the closing `}` is written on drop.
pub struct ObjectWriter<'o> {
    out: &'o mut Vec<u8>,
    empty: bool,
}

impl<'o> ObjectWriter<'o> {
    fn open(out: &'o mut Vec<u8>) -> Self {
        out.push(b'{');
        Self { out, empty: true }
    }

    fn key(&mut self, key: &str) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        write_str(self.out, key);
        self.out.push(b':');
        self.out
    }

    /// Adds `"key": n`.
    pub fn u64(&mut self, key: &str, n: u64) -> &mut Self {
        let out = self.key(key);
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        self
    }

    /// Adds `"key": n`.
    pub fn i64(&mut self, key: &str, n: i64) -> &mut Self {
        let out = self.key(key);
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        self
    }

    /// Adds `"key": x` (`null` when not finite).
    pub fn f64(&mut self, key: &str, x: f64) -> &mut Self {
        let out = self.key(key);
        write_f64(out, x);
        self
    }

    /// Adds `"key": true|false`.
    pub fn bool(&mut self, key: &str, b: bool) -> &mut Self {
        let out = self.key(key);
        out.extend_from_slice(if b { b"true" } else { b"false" });
        self
    }

    /// Adds `"key": "s"`.
    pub fn str(&mut self, key: &str, s: &str) -> &mut Self {
        let out = self.key(key);
        write_str(out, s);
        self
    }

    /// Adds `"key": <parsed value>`.
    pub fn value(&mut self, key: &str, v: Value<'_, '_>) -> &mut Self {
        let out = self.key(key);
        write_value(out, v);
        self
    }

    /// Adds `"key": <json>`; the caller vouches that `json` is one valid JSON value.
    pub fn raw(&mut self, key: &str, json: &[u8]) -> &mut Self {
        let out = self.key(key);
        out.extend_from_slice(json);
        self
    }

    /// Adds `"key": {…}` and returns the writer of the nested object.
    pub fn object(&mut self, key: &str) -> ObjectWriter<'_> {
        let out = self.key(key);
        ObjectWriter::open(out)
    }

    /// Adds `"key": [ … ]` and returns the writer of the array.
    pub fn array(&mut self, key: &str) -> ArrayWriter<'_> {
        let out = self.key(key);
        ArrayWriter::open(out)
    }
}

impl Drop for ObjectWriter<'_> {
    fn drop(&mut self) {
        self.out.push(b'}');
    }
}

/// Writes the elements of a JSON array; the closing `]` is written on drop.
pub struct ArrayWriter<'o> {
    out: &'o mut Vec<u8>,
    empty: bool,
}

impl<'o> ArrayWriter<'o> {
    fn open(out: &'o mut Vec<u8>) -> Self {
        out.push(b'[');
        Self { out, empty: true }
    }

    fn next(&mut self) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out
    }

    /// Appends an object element and returns its writer.
    pub fn object(&mut self) -> ObjectWriter<'_> {
        let out = self.next();
        ObjectWriter::open(out)
    }

    /// Appends an unsigned integer element.
    pub fn u64(&mut self, n: u64) -> &mut Self {
        let out = self.next();
        out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
        self
    }
}

impl Drop for ArrayWriter<'_> {
    fn drop(&mut self) {
        self.out.push(b']');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_control_characters_quotes_and_backslashes() {
        let mut out = Vec::new();
        escape_into(&mut out, "a\"b\\c\nd\u{1}é");
        assert_eq!(out, b"a\\\"b\\\\c\\nd\\u0001\xc3\xa9");
    }

    proptest::proptest! {
        #[test]
        fn escaped_strings_parse_back_to_themselves(s in "(?s).{0,80}", prefix in 0usize..17) {
            // Shift the string against the 8- and 16-byte blocks so every position is tested.
            let s = format!("{}{s}", "x".repeat(prefix));
            let mut out = vec![b'"'];
            escape_into(&mut out, &s);
            out.push(b'"');
            let back: String = serde_json::from_slice(&out).expect("valid JSON string");
            proptest::prop_assert_eq!(back, s);
        }
    }

    #[test]
    fn every_position_of_every_word_is_checked() {
        for len in 1..=56 {
            for pos in 0..len {
                for special in ['"', '\\', '\n', '\u{1}', '\u{1f}', '\u{7f}', 'é'] {
                    let mut s: Vec<char> = vec!['a'; len];
                    s[pos] = special;
                    let s: String = s.into_iter().collect();
                    let mut out = vec![b'"'];
                    escape_into(&mut out, &s);
                    out.push(b'"');
                    let back: String = serde_json::from_slice(&out).expect("valid JSON string");
                    assert_eq!(back, s);
                }
            }
        }
    }

    #[test]
    fn values_are_written_back_compact_and_equal() {
        for doc in [
            r#"{"a":[1,-2,3.5,1e300,18446744073709551615,-9223372036854775808],"b":{"c":null,"d":true,"e":false}}"#,
            r#"["\u0000\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00tail", {}, [], "", 0, -0.0]"#,
            r#""just-a-string""#,
            "42",
            "null",
        ] {
            let mut input = doc.as_bytes().to_vec();
            let tape = simd_json::to_tape(&mut input).expect("valid JSON");
            let mut out = Vec::new();
            write_value(&mut out, tape.as_value());
            let expected: serde_json::Value = serde_json::from_str(doc).unwrap();
            let written: serde_json::Value = serde_json::from_slice(&out).expect("writes valid JSON");
            assert_eq!(written, expected, "{}", String::from_utf8_lossy(&out));
            assert!(!out.contains(&b' '), "compact output: {}", String::from_utf8_lossy(&out));
        }
    }

    #[test]
    fn error_reply_escapes_its_message() {
        let mut out = Vec::new();
        write_error(&mut out, 400, None, format_args!("bad \"{}\"", "x"));
        assert_eq!(out, b"{\"code\":400,\"error\":\"bad \\\"x\\\"\"}\n");
    }

    #[test]
    fn object_writer_nests_and_closes() {
        let mut out = Vec::new();
        {
            let mut o = Reply::new(&mut out).object();
            o.u64("a", 1).str("b", "x");
            o.array("c").u64(1).u64(2);
            o.object("d").bool("e", true);
        }
        assert_eq!(out, br#"{"a":1,"b":"x","c":[1,2],"d":{"e":true}}"#);
    }
}

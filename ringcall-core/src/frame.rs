//! Line framing: a frame is one JSON document followed by `\n`; a `\r` before the `\n` is
//! tolerated. Delimiters are found with memchr (SIMD) over the receive buffer in place.

/// The offset of the next `\n` in `bytes`.
#[inline]
pub fn find_newline(bytes: &[u8]) -> Option<usize> {
    memchr::memchr(b'\n', bytes)
}

/// The length of `line` (which excludes its `\n`) without a trailing `\r`.
#[inline]
pub fn content_len(line: &[u8]) -> usize {
    match line.last() {
        Some(b'\r') => line.len() - 1,
        _ => line.len(),
    }
}

/// True for a line with nothing but whitespace: such lines are skipped, not answered.
#[inline]
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// Splits `bytes` into complete lines with memchr, yielding each line's range without its
/// `\n`. Whatever follows the last `\n` is an incomplete frame and is not yielded.
pub fn lines(bytes: &[u8]) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
    let mut pos = 0;
    std::iter::from_fn(move || {
        let nl = find_newline(&bytes[pos..])?;
        let line = pos..pos + nl;
        pos += nl + 1;
        Some(line)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_complete_lines_and_leaves_the_tail() {
        let bytes = b"a\nbc\r\n\npartial";
        let ranges: Vec<_> = lines(bytes).collect();
        assert_eq!(ranges, vec![0..1, 2..5, 6..6]);
        assert_eq!(content_len(&bytes[2..5]), 2);
        assert!(is_blank(&bytes[6..6]));
        assert!(is_blank(b" \t\r"));
        assert!(!is_blank(b" {}"));
    }
}

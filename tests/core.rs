//! Tests of the sans-I/O protocol core, without sockets: however a byte stream is split into
//! reads, the replies are the same bytes; arbitrary input never panics and always ends in
//! replies or a clean close.

use proptest::prelude::*;
use std::sync::Arc;

use ringcall::Dispatcher;
use ringcall::stats::StatsRegistry;
use ringcall::{HandlerError, HandlerResult, Reply, Request};
use ringcall_core::{Flow, Limits, Output, Processor, Session};

fn fail(_: &Request<'_, '_>, _: Reply<'_>) -> HandlerResult {
    Err(HandlerError::bad_request("no"))
}

ringcall::routes! {
    CoreRoutes {
        10000 => ringcall::handlers::echo,
        2000 => fail,
    }
}

const MAX_LINE: usize = 300;

fn processor() -> Processor<Dispatcher<CoreRoutes>> {
    Processor::new(
        0,
        Dispatcher::new(0, 1, Arc::new(CoreRoutes)),
        StatsRegistry::new(1),
        Limits { max_line: MAX_LINE, ..Limits::default() },
    )
}

/// Feeds `stream` split at `cuts` (sorted offsets) and returns the output and the last flow.
fn run(stream: &[u8], cuts: &[usize]) -> (Vec<u8>, Flow) {
    run_with(processor(), stream, cuts)
}

fn run_with(mut p: Processor<Dispatcher<CoreRoutes>>, stream: &[u8], cuts: &[usize]) -> (Vec<u8>, Flow) {
    let mut session = Session::new();
    let mut out = Output::at(std::time::Instant::now());
    let mut flow = Flow::Continue;
    let mut start = 0;
    for &cut in cuts.iter().chain(std::iter::once(&stream.len())) {
        let cut = cut.clamp(start, stream.len());
        flow = p.on_recv_copy(&mut session, &stream[start..cut], &mut out);
        start = cut;
        if flow == Flow::Close {
            break;
        }
    }
    (out.ready_bytes().to_vec(), flow)
}

const SAMPLES: &[&str] = &[
    "{\"cmdid\": 10000, \"timestamp\": 1437300000, \"params\": {\"content\": \"Hello world!\"}}\n",
    "{\"cmdid\":0,\"id\":1}\n",
    "{\"cmdid\":10000,\"id\":\"x\",\"params\":{\"esc\":\"a\\\"b\\\\c\\n\\u00e9\",\"n\":[1,2.5,-3,true,null]}}\r\n",
    "{\"cmdid\":2000}\n",
    "{\"cmdid\":77777}\n",
    "not json\n",
    "[]\n",
    "\n",
    "\r\n",
    "{\"cmdid\":\"1\"}\n",
    "{\"cmdid\":10000,\"params\":{\"deep\":[[[[[[[[[[{}]]]]]]]]]]}}\n",
];

fn sample_stream() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(0..SAMPLES.len(), 1..40)
        .prop_map(|picks| picks.iter().flat_map(|&i| SAMPLES[i].bytes()).collect())
}

#[test]
fn one_byte_at_a_time_matches_one_read() {
    let stream: Vec<u8> = SAMPLES.iter().flat_map(|s| s.bytes()).collect();
    let (whole, flow) = run(&stream, &[]);
    assert_eq!(flow, Flow::Continue);
    let cuts: Vec<usize> = (1..stream.len()).collect();
    assert_eq!(run(&stream, &cuts).0, whole);
    let replies = whole.iter().filter(|&&b| b == b'\n').count();
    // Every non-blank line gets exactly one reply.
    assert_eq!(replies, SAMPLES.len() - 2);
}

#[test]
fn replies_are_the_expected_bytes() {
    let (out, _) = run(SAMPLES[2].as_bytes(), &[]);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "{\"code\":0,\"id\":\"x\",\"data\":{\"esc\":\"a\\\"b\\\\c\\n\\u00e9\",\"n\":[1,2.5,-3,true,null]}}\n"
    );
    // The echo writes params as sent: spacing, escapes and number spellings kept.
    let (out, _) = run(b"{\"cmdid\":10000,\"params\": { \"x\" : [1.50, 1e3, \"\\u00e9\"] }}\n", &[]);
    assert_eq!(out, b"{\"code\":0,\"data\":{ \"x\" : [1.50, 1e3, \"\\u00e9\"] }}\n");
    let (out, _) = run(b"{\"cmdid\":2000,\"id\":3}\n", &[]);
    assert_eq!(out, b"{\"code\":400,\"id\":3,\"error\":\"no\"}\n");
}

const TOKEN: &str = "0123456789abcdef-token";

fn guarded() -> Processor<Dispatcher<CoreRoutes>> {
    let token = ringcall::HelloToken::new(TOKEN).unwrap();
    processor().with_access(ringcall_core::Access { tls: None, token: Some(token) })
}

#[test]
fn the_token_hello_admits_a_connection_whatever_the_split() {
    let hello = format!("{{\"cmdid\":2,\"id\":1,\"params\":{{\"token\":\"{TOKEN}\"}}}}\n");
    let stream = format!("{hello}{{\"cmdid\":10000,\"id\":2,\"params\":{{\"a\":1}}}}\n{hello}");
    let (whole, flow) = run_with(guarded(), stream.as_bytes(), &[]);
    assert_eq!(flow, Flow::Continue);
    assert_eq!(
        String::from_utf8(whole.clone()).unwrap(),
        "{\"code\":0,\"id\":1,\"data\":\"hello\"}\n{\"code\":0,\"id\":2,\"data\":{\"a\":1}}\n{\"code\":0,\"id\":1,\"data\":\"hello\"}\n"
    );
    let cuts: Vec<usize> = (1..stream.len()).collect();
    assert_eq!(run_with(guarded(), stream.as_bytes(), &cuts), (whole.clone(), Flow::Continue));
    // Without a token set, the hello is answered all the same.
    assert_eq!(run(stream.as_bytes(), &[]).0, whole);
}

#[test]
fn anything_but_the_right_token_first_is_refused_and_closes() {
    let refused_first = "this server admits a connection only after its token: send {\\\"cmdid\\\":2,\\\"params\\\":{\\\"token\\\":\\\"…\\\"}} first";
    let cases = [
        // A command before the hello: refused, and the hello after it is never read.
        (
            format!("{{\"cmdid\":10000,\"id\":5}}\n{{\"cmdid\":2,\"params\":{{\"token\":\"{TOKEN}\"}}}}\n"),
            format!("{{\"code\":401,\"id\":5,\"error\":\"{refused_first}\"}}\n"),
        ),
        (
            "{\"cmdid\":2,\"id\":7,\"params\":{\"token\":\"0123456789abcdef-tokeN\"}}\n{\"cmdid\":0}\n"
                .to_owned(),
            "{\"code\":401,\"id\":7,\"error\":\"the token is not this server's\"}\n".to_owned(),
        ),
        (
            "{\"cmdid\":2,\"id\":8,\"params\":{\"token\":17}}\n".to_owned(),
            "{\"code\":401,\"id\":8,\"error\":\"the token is not this server's\"}\n".to_owned(),
        ),
        ("not json\n{\"cmdid\":0}\n".to_owned(), format!("{{\"code\":401,\"error\":\"{refused_first}\"}}\n")),
    ];
    for (stream, expected) in cases {
        let (out, flow) = run_with(guarded(), stream.as_bytes(), &[]);
        assert_eq!((String::from_utf8(out).unwrap(), flow), (expected.clone(), Flow::Close), "{stream}");
        let cuts: Vec<usize> = (1..stream.len()).collect();
        let (out, flow) = run_with(guarded(), stream.as_bytes(), &cuts);
        assert_eq!((String::from_utf8(out).unwrap(), flow), (expected, Flow::Close), "{stream}");
    }
}

#[test]
fn over_long_lines_close_the_stream_whatever_the_split() {
    let mut stream = SAMPLES[1].as_bytes().to_vec();
    stream.extend(std::iter::repeat_n(b'x', MAX_LINE * 3));
    stream.extend_from_slice(b"\n{\"cmdid\":0}\n");
    let (whole, flow) = run(&stream, &[]);
    assert_eq!(flow, Flow::Close);
    assert_eq!(
        String::from_utf8(whole.clone()).unwrap(),
        format!(
            "{{\"code\":0,\"id\":1,\"data\":\"pong\"}}\n{{\"code\":413,\"error\":\"request line longer than {MAX_LINE} bytes\"}}\n"
        )
    );
    let cuts: Vec<usize> = (7..stream.len()).step_by(7).collect();
    assert_eq!(run(&stream, &cuts), (whole, Flow::Close));
}

#[test]
fn a_deeply_nested_document_is_rejected_not_overflowed() {
    let depth = 100_000;
    let mut line = "{\"cmdid\":10000,\"params\":{\"a\":".to_string();
    line.push_str(&"[".repeat(depth));
    line.push_str(&"]".repeat(depth));
    line.push_str("}}\n");
    let mut p = Processor::new(
        0,
        Dispatcher::new(0, 1, Arc::new(CoreRoutes)),
        StatsRegistry::new(1),
        Limits { max_line: 1 << 20, ..Limits::default() },
    );
    let mut out = Output::at(std::time::Instant::now());
    assert_eq!(p.on_recv_copy(&mut Session::new(), line.as_bytes(), &mut out), Flow::Continue);
    let out = out.ready_bytes();
    assert!(out.starts_with(b"{\"code\":400,\"error\":\"invalid JSON"), "{}", String::from_utf8_lossy(out));
}

#[test]
fn an_unterminated_last_line_is_dropped_at_eof() {
    let mut p = processor();
    let mut session = Session::new();
    let mut out = Output::at(std::time::Instant::now());
    p.on_recv_copy(&mut session, b"{\"cmdid\":0}\n{\"cmd", &mut out);
    assert_eq!(out.ready_bytes(), b"{\"code\":0,\"data\":\"pong\"}\n");
    assert_eq!(session.pending_bytes(), 5);
    assert_eq!(session.finish(), 5);
}

#[test]
fn stats_count_requests_and_replies_by_code() {
    let stats = StatsRegistry::new(1);
    let mut p =
        Processor::new(0, Dispatcher::new(0, 1, Arc::new(CoreRoutes)), stats.clone(), Limits::default());
    let mut out = Output::at(std::time::Instant::now());
    p.on_recv_copy(&mut Session::new(), b"{\"cmdid\":0}\nx\n{\"cmdid\":5000}\n\n", &mut out);
    let total = stats.total();
    assert_eq!(total.requests, 3);
    assert_eq!((total.replies_with(0), total.replies_with(400), total.replies_with(404)), (1, 1, 1));
    assert_eq!(total.bytes_in, 30);
}

/// Feeds `stream` as a backend that reads straight into lent line buffers does: reads of
/// `sizes` bytes in turn (cycled), each into the lent buffer of the unfinished line when the
/// session lends one, else copied in as from a pooled buffer. Returns the output, the last
/// flow and how many reads went into a lent buffer.
fn run_lending(
    mut p: Processor<Dispatcher<CoreRoutes>>,
    stream: &[u8],
    sizes: &[usize],
) -> (Vec<u8>, Flow, usize) {
    use ringcall::bytes::BufMut;
    let mut session = Session::new();
    let mut out = Output::at(std::time::Instant::now());
    let (mut flow, mut pos, mut direct) = (Flow::Continue, 0, 0);
    for &size in sizes.iter().cycle() {
        if pos == stream.len() || flow == Flow::Close {
            break;
        }
        let size = size.max(1).min(stream.len() - pos);
        flow = match session.lend_line() {
            Some(mut line) => {
                assert!(line.room() >= ringcall_core::DIRECT_READ_MIN);
                let n = size.min(line.room());
                line.target().put_slice(&stream[pos..pos + n]);
                assert_eq!(line.received(), n);
                pos += n;
                direct += 1;
                p.on_line_recv(&mut session, line, &mut out)
            }
            None => {
                let flow = p.on_recv_copy(&mut session, &stream[pos..pos + size], &mut out);
                pos += size;
                flow
            }
        };
    }
    (out.ready_bytes().to_vec(), flow, direct)
}

/// A processor whose lines may be long enough to be lent.
fn long_line_processor(max_line: usize) -> Processor<Dispatcher<CoreRoutes>> {
    Processor::new(
        0,
        Dispatcher::new(0, 1, Arc::new(CoreRoutes)),
        StatsRegistry::new(1),
        Limits { max_line, ..Limits::default() },
    )
}

fn long_line(id: usize, len: usize) -> String {
    let line = format!("{{\"cmdid\":10000,\"id\":{id},\"params\":{{\"s\":\"\"}}}}\n");
    let fill: String = (0..len.saturating_sub(line.len())).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    format!("{{\"cmdid\":10000,\"id\":{id},\"params\":{{\"s\":\"{fill}\"}}}}\n")
}

#[test]
fn long_lines_read_into_their_own_buffer_give_the_same_replies() {
    // Long lines of several sizes with short ones and escapes between them.
    let mut stream = String::new();
    for (i, len) in [40_000, 70_000, 70_000, 20_000, 150_000, 33_000].into_iter().enumerate() {
        stream.push_str(&long_line(i, len));
        stream.push_str(SAMPLES[i % SAMPLES.len()]);
    }
    let stream = stream.as_bytes();
    let (whole, whole_flow) = run_with(long_line_processor(1 << 20), stream, &[]);
    assert_eq!(whole.iter().filter(|&&b| b == b'\n').count(), 12);
    for sizes in [&[16_384][..], &[5_000, 60_000, 1], &[100_000], &[16_384, 7, 90_000, 3_000]] {
        let (out, flow, direct) = run_lending(long_line_processor(1 << 20), stream, sizes);
        assert!(direct > 0, "reads of {sizes:?}: no line buffer was lent");
        assert_eq!((flow, out.len()), (whole_flow, whole.len()), "reads of {sizes:?}");
        assert!(out == whole, "reads of {sizes:?}: different replies");
    }
}

#[test]
fn a_lent_line_buffer_still_enforces_the_line_limit() {
    let max_line = 100_000;
    // Unterminated: detected while the line is still arriving.
    let (out, flow, direct) =
        run_lending(long_line_processor(max_line), &vec![b'x'; 400_000], &[16_384, 50_000]);
    assert!(direct > 0);
    assert_eq!(flow, Flow::Close);
    assert_eq!(
        out,
        format!("{{\"code\":413,\"error\":\"request line longer than {max_line} bytes\"}}\n").as_bytes()
    );
    // Terminated in the lent buffer, one byte over, after a line that fits.
    let mut stream = long_line(1, max_line + 1).into_bytes();
    stream.extend_from_slice(long_line(2, max_line + 2).as_bytes());
    stream.extend_from_slice(b"{\"cmdid\":0}\n");
    let (out, flow, direct) =
        run_lending(long_line_processor(max_line), &stream, &[16_384, 90_000, 16_384, 200_000]);
    assert!(direct > 0);
    assert_eq!(flow, Flow::Close);
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{:?}", &text[..200.min(text.len())]);
    assert!(lines[0].starts_with("{\"code\":0,\"id\":1,"));
    assert_eq!(lines[1], format!("{{\"code\":413,\"error\":\"request line longer than {max_line} bytes\"}}"));
}

proptest! {
    #[test]
    fn lent_line_buffers_give_the_replies_of_one_read(
        lens in prop::collection::vec(prop_oneof![20usize..200, 16_000usize..90_000], 1..8),
        sizes in prop::collection::vec(1usize..120_000, 1..10),
    ) {
        let stream: String = lens.iter().enumerate().map(|(i, &len)| long_line(i, len)).collect();
        let (whole, _) = run_with(long_line_processor(1 << 20), stream.as_bytes(), &[]);
        let (out, _, _) = run_lending(long_line_processor(1 << 20), stream.as_bytes(), &sizes);
        prop_assert!(out == whole);
    }

    #[test]
    fn any_split_gives_identical_output(stream in sample_stream(), mut cuts in prop::collection::vec(0usize..4000, 0..30)) {
        cuts.sort_unstable();
        let whole = run(&stream, &[]);
        prop_assert_eq!(run(&stream, &cuts), whole);
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_end_in_replies_or_a_clean_close(
        chunks in prop::collection::vec(prop::collection::vec(prop_oneof![any::<u8>(), Just(b'\n'), Just(b'{'), Just(b'"')], 0..200), 0..20)
    ) {
        let stream: Vec<u8> = chunks.concat();
        let mut cuts = Vec::new();
        let mut at = 0;
        for chunk in &chunks {
            at += chunk.len();
            cuts.push(at);
        }
        let (out, flow) = run(&stream, &cuts);
        let text = String::from_utf8(out).expect("replies are UTF-8");
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        for line in &lines {
            prop_assert!(line.ends_with('\n'));
            prop_assert!(line.starts_with("{\"code\":"), "reply line: {}", line);
            let mut bytes = line.as_bytes().to_vec();
            prop_assert!(ringcall::simd_json::to_tape(&mut bytes).is_ok(), "reply is valid JSON: {}", line);
        }
        if flow == Flow::Close {
            prop_assert!(lines.last().is_some_and(|l| l.starts_with("{\"code\":413")), "last reply before a close is 413");
        }
    }
}

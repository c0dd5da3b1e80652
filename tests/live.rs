//! Live-server tests: each body runs against every backend (see `every_backend!` at the
//! bottom), on a real server listening on 127.0.0.1:0, asserting on the bytes that come back.

#[macro_use]
mod common;

use std::io::Write;
use std::thread;

use common::{Client, start, start_with, total_stat};
use ringcall::Backend;

fn ping_echo_and_stats(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let mut c = Client::connect(server.local_addr());
    assert_eq!(c.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    assert_eq!(
        c.call("{\"cmdid\":10000,\"params\":{\"a\":[1,2.5,\"x\",null,true,{}]}}\n"),
        "{\"code\":0,\"data\":{\"a\":[1,2.5,\"x\",null,true,{}]}}\n"
    );
    assert_eq!(c.call("{\"cmdid\":10000}\n"), "{\"code\":0,\"data\":{}}\n");
    assert_eq!(total_stat(&mut c, "requests"), 4);
    assert_eq!(total_stat(&mut c, "connections_open"), 1);
}

/// tornado-TCP's Client/Request.py sends `json.dumps(...) + "\n"`, with Python's spaces.
fn tornado_client_request_bytes(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let mut c = Client::connect(server.local_addr());
    let request =
        "{\"cmdid\": 10000, \"timestamp\": 1437300000, \"params\": {\"content\": \"Hello world!\"}}\n";
    // The echo's data is params as sent, Python's spacing included.
    assert_eq!(c.call(request), "{\"code\":0,\"data\":{\"content\": \"Hello world!\"}}\n");
}

fn ids_are_echoed(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let mut c = Client::connect(server.local_addr());
    assert_eq!(c.call("{\"cmdid\":0,\"id\":42}\n"), "{\"code\":0,\"id\":42,\"data\":\"pong\"}\n");
    assert_eq!(
        c.call("{\"id\":\"a\\\"b\",\"cmdid\":0}\n"),
        "{\"code\":0,\"id\":\"a\\\"b\",\"data\":\"pong\"}\n"
    );
    assert_eq!(c.call("{\"cmdid\":0,\"id\":-1.5}\n"), "{\"code\":0,\"id\":-1.5,\"data\":\"pong\"}\n");
    assert_eq!(
        c.call("{\"cmdid\":4242,\"id\":7}\n"),
        "{\"code\":404,\"id\":7,\"error\":\"unknown cmdid 4242\"}\n"
    );
}

fn pipelined_requests_in_one_write_come_back_in_order(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let mut c = Client::connect(server.local_addr());
    let mut batch = String::new();
    for i in 0..500 {
        batch.push_str(&format!("{{\"cmdid\":10000,\"id\":{i},\"params\":{{\"n\":{i}}}}}\n"));
    }
    c.send(batch.as_bytes());
    for i in 0..500 {
        assert_eq!(c.line(), format!("{{\"code\":0,\"id\":{i},\"data\":{{\"n\":{i}}}}}\n"));
    }
}

fn bad_requests_get_errors_and_the_connection_survives(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let mut c = Client::connect(server.local_addr());
    let cases: &[(&str, &str)] = &[
        ("[1,2,3]\n", "{\"code\":400,\"error\":\"request must be a JSON object\"}\n"),
        ("{\"params\":{}}\n", "{\"code\":400,\"error\":\"missing cmdid\"}\n"),
        (
            "{\"cmdid\":\"10000\"}\n",
            "{\"code\":400,\"error\":\"cmdid must be an integer from 0 to 4294967295\"}\n",
        ),
        (
            "{\"cmdid\":4294967296}\n",
            "{\"code\":400,\"error\":\"cmdid must be an integer from 0 to 4294967295\"}\n",
        ),
        ("{\"cmdid\":-1}\n", "{\"code\":400,\"error\":\"cmdid must be an integer from 0 to 4294967295\"}\n"),
        ("{\"cmdid\":10000,\"params\":[1]}\n", "{\"code\":400,\"error\":\"params must be a JSON object\"}\n"),
        (
            "{\"cmdid\":0,\"timestamp\":\"now\"}\n",
            "{\"code\":400,\"error\":\"timestamp must be an integer\"}\n",
        ),
        ("{\"cmdid\":0,\"id\":[1]}\n", "{\"code\":400,\"error\":\"id must be a number or a string\"}\n"),
        (
            "{\"cmdid\":\"x\",\"id\":9}\n",
            "{\"code\":400,\"id\":9,\"error\":\"cmdid must be an integer from 0 to 4294967295\"}\n",
        ),
        ("{\"cmdid\":31337}\n", "{\"code\":404,\"error\":\"unknown cmdid 31337\"}\n"),
        ("{\"cmdid\":9001}\n", "{\"code\":500,\"error\":\"disk on fire\"}\n"),
        (
            "{\"cmdid\":9002,\"id\":1}\n",
            "{\"code\":500,\"id\":1,\"error\":\"handler for cmdid 9002 panicked\"}\n",
        ),
    ];
    for (request, expected) in cases {
        assert_eq!(&c.call(request), expected, "reply to {request:?}");
        assert_eq!(c.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n", "after {request:?}");
    }
    for garbage in [
        "{\"cmdid\":0\n",
        "hello world\n",
        "\u{0}\u{1}\u{2}\n",
        "{\"cmdid\":0,\"params\":{\"s\":\"\u{ff}\"}}}\n",
    ] {
        let reply = c.call(garbage);
        assert!(
            reply.starts_with("{\"code\":400,\"error\":\"invalid JSON at byte "),
            "reply to {garbage:?}: {reply}"
        );
        assert!(reply.ends_with("\"}\n"), "reply to {garbage:?}: {reply}");
        assert_eq!(c.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    }
    // Invalid UTF-8 inside a string is invalid JSON.
    c.send(b"{\"cmdid\":10000,\"params\":{\"s\":\"\xff\xfe\"}}\n");
    assert!(c.line().starts_with("{\"code\":400,\"error\":\"invalid JSON at byte "));
    // A cmdid beyond u32 that JSON numbers still hold gets the cmdid message; one beyond
    // what a 64-bit integer or a double holds is not a number the parser can read at all.
    assert_eq!(
        c.call("{\"cmdid\":4294967296}\n"),
        "{\"code\":400,\"error\":\"cmdid must be an integer from 0 to 4294967295\"}\n"
    );
    for huge in ["18446744073709551616", "1e400"] {
        let reply = c.call(&format!("{{\"cmdid\":{huge}}}\n"));
        assert!(
            reply.starts_with("{\"code\":400,\"error\":\"invalid JSON at byte ")
                && reply.ends_with(
                    ": a number that is malformed or out of range (numbers must fit a 64-bit integer \
                     or a double)\"}\n"
                ),
            "reply to cmdid {huge}: {reply}"
        );
    }
    // Blank lines are not requests; CRLF endings are fine.
    c.send(b"\n\r\n   \n{\"cmdid\":0}\r\n");
    assert_eq!(c.line(), "{\"code\":0,\"data\":\"pong\"}\n");
    // A fresh connection never noticed any of it.
    let mut fresh = Client::connect(server.local_addr());
    assert_eq!(fresh.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
}

fn over_long_line_gets_413_then_close(backend: Backend) {
    let Some(server) = start_with(backend, |b| b.max_line(1024)) else {
        return;
    };
    // Without a newline: the limit is detected while the line is still arriving.
    let mut c = Client::connect(server.local_addr());
    assert_eq!(c.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    c.send(&vec![b'x'; 256 * 1024]);
    assert_eq!(c.line(), "{\"code\":413,\"error\":\"request line longer than 1024 bytes\"}\n");
    c.shutdown_write();
    c.expect_eof();
    // With a newline, in one read.
    let mut c = Client::connect(server.local_addr());
    let mut line = format!("{{\"cmdid\":10000,\"params\":{{\"s\":\"{}\"}}}}\n", "y".repeat(2000));
    line.push_str("{\"cmdid\":0}\n");
    c.send(line.as_bytes());
    assert_eq!(c.line(), "{\"code\":413,\"error\":\"request line longer than 1024 bytes\"}\n");
    c.expect_eof();
    // Exactly at the limit is fine.
    let mut c = Client::connect(server.local_addr());
    let padding = 1024 - "{\"cmdid\":10000,\"params\":{\"s\":\"\"}}".len();
    let line = format!("{{\"cmdid\":10000,\"params\":{{\"s\":\"{}\"}}}}\n", "z".repeat(padding));
    assert_eq!(line.len(), 1025);
    assert_eq!(c.call(&line), format!("{{\"code\":0,\"data\":{{\"s\":\"{}\"}}}}\n", "z".repeat(padding)));
}

fn line_split_across_many_writes(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let mut c = Client::connect(server.local_addr());
    let request =
        b"{\"cmdid\": 10000, \"id\": 5, \"params\": {\"content\": \"one byte at a time\"}}\n{\"cmdid\":0}\n";
    for byte in request {
        c.stream().write_all(std::slice::from_ref(byte)).unwrap();
    }
    assert_eq!(c.line(), "{\"code\":0,\"id\":5,\"data\":{\"content\": \"one byte at a time\"}}\n");
    assert_eq!(c.line(), "{\"code\":0,\"data\":\"pong\"}\n");
    // A line bigger than one receive buffer, straddling many of them.
    let big = "b".repeat(100_000);
    let reply = c.call(&format!("{{\"cmdid\":10000,\"params\":{{\"big\":\"{big}\"}}}}\n"));
    assert_eq!(reply, format!("{{\"code\":0,\"data\":{{\"big\":\"{big}\"}}}}\n"));
}

fn echo_line(id: usize, len: usize) -> (String, String) {
    let fill: String = (0..len).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    (
        format!("{{\"cmdid\":10000,\"id\":{id},\"params\":{{\"s\":\"{fill}\"}}}}\n"),
        format!("{{\"code\":0,\"id\":{id},\"data\":{{\"s\":\"{fill}\"}}}}\n"),
    )
}

/// Long lines are read into their own buffer once it has room (the rest of the line, and
/// whatever follows it in the same read): a pipelined stream of long and short lines, written
/// in pieces of every size, comes back byte for byte.
fn long_lines_pipelined_in_pieces_come_back_whole(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let mut c = Client::connect(server.local_addr());
    let lens = [70_000, 20, 300_000, 64_000, 64_000, 64_000, 5, 17_000, 1_000_000, 40_000, 64_000];
    let lines: Vec<(String, String)> = lens.iter().enumerate().map(|(id, &len)| echo_line(id, len)).collect();
    let stream: Vec<u8> = lines.iter().flat_map(|(request, _)| request.bytes()).collect();
    let mut writer = c.stream().try_clone().unwrap();
    // Written from another thread: the replies must be read while the requests go out.
    let writing = thread::spawn(move || {
        let mut pos = 0;
        for size in [7_000, 70_000, 300, 16_384, 123_457, 1].into_iter().cycle() {
            if pos == stream.len() {
                break;
            }
            let end = (pos + size).min(stream.len());
            writer.write_all(&stream[pos..end]).unwrap();
            pos = end;
        }
    });
    for (id, (_, reply)) in lines.iter().enumerate() {
        let got = c.line();
        assert!(got == *reply, "reply {id}: {} bytes, expected {}", got.len(), reply.len());
    }
    writing.join().unwrap();
    assert_eq!(c.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
}

/// The line limit and the line timeout hold while a long line is read into its own buffer.
fn a_long_line_in_its_own_buffer_keeps_the_limits(backend: Backend) {
    let Some(server) =
        start_with(backend, |b| b.max_line(200_000).line_timeout(std::time::Duration::from_secs(1)))
    else {
        return;
    };
    let addr = server.local_addr();
    // A first long line makes the next one expected long: its buffer is lent at once.
    let (request, reply) = echo_line(1, 150_000);
    let mut c = Client::connect(addr);
    assert!(c.call(&request) == reply);
    c.send(&vec![b'x'; 600_000]);
    assert_eq!(c.line(), "{\"code\":413,\"error\":\"request line longer than 200000 bytes\"}\n");
    c.shutdown_write();
    c.expect_eof();
    // Half a long line, then silence: the line timeout closes the connection.
    let mut c = Client::connect(addr);
    assert!(c.call(&request) == reply);
    c.send(&request.as_bytes()[..100_000]);
    c.expect_eof();
    let mut c = Client::connect(addr);
    assert!(c.call(&request) == reply);
}

fn hundred_concurrent_connections(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let addr = server.local_addr();
    let clients: Vec<Client> = (0..100).map(|_| Client::connect(addr)).collect();
    let workers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            thread::spawn(move || {
                for j in 0..20 {
                    let reply =
                        c.call(&format!("{{\"cmdid\":10000,\"id\":{j},\"params\":{{\"client\":{i}}}}}\n"));
                    assert_eq!(reply, format!("{{\"code\":0,\"id\":{j},\"data\":{{\"client\":{i}}}}}\n"));
                }
                c
            })
        })
        .collect();
    let mut clients: Vec<Client> = workers.into_iter().map(|w| w.join().expect("client thread")).collect();
    assert_eq!(total_stat(&mut clients[0], "connections_open"), 100);
    assert_eq!(total_stat(&mut clients[0], "requests"), 100 * 20 + 2);
}

fn half_close_after_a_pipeline_gets_every_reply(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let mut c = Client::connect(server.local_addr());
    let mut batch = String::new();
    for i in 0..1000 {
        batch.push_str(&format!("{{\"cmdid\":0,\"id\":{i}}}\n"));
    }
    batch.push_str("{\"cmdid\":0,\"id\":\"unterminated\"");
    c.send(batch.as_bytes());
    c.shutdown_write();
    for i in 0..1000 {
        assert_eq!(c.line(), format!("{{\"code\":0,\"id\":{i},\"data\":\"pong\"}}\n"));
    }
    c.expect_eof();
}

fn graceful_stop_answers_what_was_sent(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let mut c = Client::connect(server.local_addr());
    assert_eq!(c.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    let mut batch = String::new();
    for i in 0..200 {
        batch.push_str(&format!("{{\"cmdid\":0,\"id\":{i}}}\n"));
    }
    c.send(batch.as_bytes());
    // Every line sent before the stop must be answered, however the race falls.
    server.stop();
    for i in 0..200 {
        assert_eq!(c.line(), format!("{{\"code\":0,\"id\":{i},\"data\":\"pong\"}}\n"));
    }
    c.shutdown_write();
    c.expect_eof();
    server.wait().expect("clean exit");
}

/// At shutdown a connection with nothing owed gets FIN, and the server keeps its side open
/// (discarding what arrives) until the peer closes: a peer that writes after the FIN gets no
/// reset that could destroy replies it has not read yet.
fn shutdown_sends_fin_and_waits_for_the_peer_to_close(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let mut c = Client::connect(server.local_addr());
    assert_eq!(c.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
    server.stop();
    c.expect_eof();
    assert_eq!(server.stats().total().connections_open, 1, "the server closed before the peer");
    // Past the FIN: discarded, not answered, no reset.
    c.send(b"{\"cmdid\":0}\n");
    c.shutdown_write();
    c.expect_eof();
    server.wait().expect("clean exit");
}

/// A second server on the port of a live one waits the bind retry out, then fails naming
/// the port in use (it must not join the first one's SO_REUSEPORT group); the first one goes
/// on serving.
fn a_port_held_by_a_live_server_is_refused(backend: Backend) {
    let Some(server) = start(backend) else { return };
    let addr = server.local_addr();
    let second = ringcall::Server::builder()
        .addr(addr.to_string())
        .backend(backend)
        .threads(1)
        .pin_threads(false)
        .handle_signals(false)
        .start(common::TestRoutes);
    match second {
        Err(ringcall::ServerError::Listen { addr: refused, source, hint }) => {
            assert_eq!(refused, addr);
            assert_eq!(source.raw_os_error(), Some(libc::EADDRINUSE));
            assert!(hint.contains("another process listens there"), "{hint}");
        }
        Err(e) => panic!("expected the port in use, got {e}"),
        Ok(_) => panic!("a second server bound {addr}"),
    }
    let mut c = Client::connect(addr);
    assert_eq!(c.call("{\"cmdid\":0}\n"), "{\"code\":0,\"data\":\"pong\"}\n");
}

every_backend!(
    ping_echo_and_stats,
    tornado_client_request_bytes,
    ids_are_echoed,
    pipelined_requests_in_one_write_come_back_in_order,
    bad_requests_get_errors_and_the_connection_survives,
    over_long_line_gets_413_then_close,
    line_split_across_many_writes,
    long_lines_pipelined_in_pieces_come_back_whole,
    a_long_line_in_its_own_buffer_keeps_the_limits,
    hundred_concurrent_connections,
    half_close_after_a_pipeline_gets_every_reply,
    graceful_stop_answers_what_was_sent,
    shutdown_sends_fin_and_waits_for_the_peer_to_close,
    a_port_held_by_a_live_server_is_refused,
);

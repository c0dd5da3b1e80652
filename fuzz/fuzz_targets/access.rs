//! The access policy file and identity checks, and the token hello: a policy either parses
//! or is refused with a message, and an identity check never panics; a connection to a
//! server with a token is answered only `hello` (then anything) or one 401 and closed,
//! whatever its first bytes, in whatever pieces.

#![no_main]

mod common;

use std::time::Instant;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use ringcall_core::{Access, Acl, HelloToken};

use common::{Peer, pump, receive, replies};

const TOKEN: &str = "0123456789abcdef0123456789abcdef";

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    policy: &'a str,
    identities: Vec<&'a str>,
    cmdids: Vec<u32>,
    presented: &'a [u8],
    bytes: &'a [u8],
    cut: u16,
}

fuzz_target!(|input: Input<'_>| {
    if let Ok(acl) = Acl::parse(input.policy) {
        for identity in input.identities.iter().take(8) {
            for &cmdid in input.cmdids.iter().take(8) {
                let _ = acl.allows(Some(identity), cmdid);
                let _ = acl.allows(None, cmdid);
            }
        }
    }
    let token = HelloToken::new(TOKEN).expect("a valid token");
    assert_eq!(token.matches(input.presented), input.presented == TOKEN.as_bytes());

    let access = Access { tls: None, token: Some(token) };
    let mut processor = common::processor(common::small_limits(1 << 20)).with_access(access);
    let now = Instant::now();
    let mut conn = processor.open_connection(now);
    let mut peer = Peer::default();
    let cut = usize::from(input.cut) % (input.bytes.len() + 1);
    for piece in [&input.bytes[..cut], &input.bytes[cut..]] {
        if !piece.is_empty() && conn.wants_read() {
            receive(&mut conn, &mut processor, piece, now);
        }
    }
    conn.on_peer_closed(now);
    pump(&mut conn, &mut processor, &mut peer, now);
    let got = replies(&peer.wire);
    if let Some(first) = got.first() {
        if first["code"] == 0 {
            assert_eq!(first["data"], "hello", "a call answered before the hello: {first}");
            let hello = input.bytes.split(|&b| b == b'\n').find(|l| !l.iter().all(u8::is_ascii_whitespace));
            let hello = hello.expect("a first line");
            let value: serde_json::Value = serde_json::from_slice(hello).expect("the hello is JSON");
            assert_eq!(value["cmdid"].as_f64(), Some(2.0));
            assert_eq!(value["params"]["token"], TOKEN);
        } else {
            // Refused (401), or a first line over the limit (413): the only reply.
            assert!(first["code"] == 401 || first["code"] == 413, "{first}");
            assert_eq!(got.len(), 1, "more than the refusal before the hello");
        }
    }
});

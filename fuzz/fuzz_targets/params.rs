//! Typed params off the tape, and reply encoding: a request line whose params deserialize
//! into a struct of every field kind; its params re-encoded from the tape must be JSON that
//! serde_json reads back to the same value (numbers aside, compared as written by the
//! encoder: re-encoding is a fixed point), and a typed struct serialized into a reply must
//! read back too. The params as sent (`params_json`) must be one line of JSON meaning what
//! the tape means: as a request again, it re-encodes to the same bytes.

#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use ringcall_core::PADDING;

use common::Order;

fuzz_target!(|line: &[u8]| {
    if line.len() > 64 * 1024 {
        return;
    }
    let mut buf = line.to_vec();
    buf.resize(line.len() + PADDING, 0);
    let mut first = Vec::new();
    let (mut sent, mut data) = (String::new(), Vec::new());
    let parsed = ringcall_core::bench::try_with_request(&mut buf, line.len(), |request| {
        sent = request.params_json().to_owned();
        ringcall_core::bench::reply(&mut data).value(request.params_value());
        // Typed params: an error is a 400 with a message, never a panic.
        if let Ok(order) = request.params::<Order<'_>>() {
            let mut out = Vec::new();
            ringcall_core::bench::reply(&mut out).serialize(&order).expect("a typed value serializes");
            serde_json::from_slice::<serde_json::Value>(&out).expect("a typed reply is JSON");
        }
        ringcall_core::bench::encode_ok(&mut first, request, |reply| reply.value(request.params_value()));
    });
    if parsed.is_none() {
        return;
    }
    let reply: serde_json::Value = serde_json::from_slice(&first)
        .unwrap_or_else(|e| panic!("reply is not JSON ({e}): {:?}", String::from_utf8_lossy(&first)));
    assert_eq!(reply["code"], 0);
    // The encoder's output, as a request again, encodes to the same bytes.
    let again = format!("{{\"cmdid\":10000,\"params\":{}}}", serde_json::to_string(&reply["data"]).unwrap());
    let mut buf = again.clone().into_bytes();
    let len = buf.len();
    buf.resize(len + PADDING, 0);
    let mut second = Vec::new();
    ringcall_core::bench::try_with_request(&mut buf, len, |request| {
        ringcall_core::bench::encode_ok(&mut second, request, |reply| reply.value(request.params_value()));
    })
    .expect("the encoder's output is a valid request");
    let second: serde_json::Value = serde_json::from_slice(&second).expect("JSON");
    assert_eq!(second["data"], reply["data"], "re-encoding changed the value");

    // Framed lines hold no newline, so neither does what is cut from them.
    assert!(line.contains(&b'\n') || !sent.contains('\n'), "params as sent hold a newline: {sent:?}");
    let mut buf = format!("{{\"cmdid\":10000,\"params\":{sent}}}").into_bytes();
    let len = buf.len();
    buf.resize(len + PADDING, 0);
    let mut third = Vec::new();
    ringcall_core::bench::try_with_request(&mut buf, len, |request| {
        ringcall_core::bench::reply(&mut third).value(request.params_value());
    })
    .unwrap_or_else(|| panic!("params as sent are not a valid params object: {sent:?}"));
    assert_eq!(third, data, "params as sent mean something else than the tape: {sent:?}");
});

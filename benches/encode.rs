//! Reply encoding: the echo reply for the seed's request (`{"code":0,"data":{…}}\n`), with and
//! without an `id` to echo, and for requests of 1 KiB and 64 KiB (the string is checked for
//! characters to escape, then copied), written into a reused output buffer; and the echo of
//! each realistic request shape (`encode/shape_*`: a log record, base64 images; see
//! `ringcall::bench_support::Shape`).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ringcall::bench_support::{Shape, encode_ok, with_request};
use ringcall_core::PADDING;

fn bench(c: &mut Criterion, name: &str, request: &str) {
    bench_bytes(c, name, request.as_bytes());
}

fn bench_bytes(c: &mut Criterion, name: &str, request: &[u8]) {
    let mut line = request.to_vec();
    let len = line.len();
    line.resize(len + PADDING, 0);
    let mut out = Vec::with_capacity(256);
    with_request(&mut line, len, |request| {
        c.bench_function(name, |b| {
            b.iter(|| {
                out.clear();
                encode_ok(&mut out, request, |reply| reply.value(request.params_value()));
                black_box(out.len())
            })
        });
    });
}

fn encode(c: &mut Criterion) {
    bench(
        c,
        "encode/echo_seed",
        "{\"cmdid\": 10000, \"timestamp\": 1437300000, \"params\": {\"content\": \"Hello world!\"}}",
    );
    bench(
        c,
        "encode/echo_seed_with_id",
        "{\"cmdid\": 10000, \"id\": 123456, \"params\": {\"content\": \"Hello world!\"}}",
    );
    for (name, bytes) in [("encode/echo_1k", 1 << 10), ("encode/echo_64k", 64 << 10)] {
        let content = "x".repeat(bytes - 60);
        bench(c, name, &format!("{{\"cmdid\":10000,\"id\":7,\"params\":{{\"content\":\"{content}\"}}}}"));
    }
    for shape in Shape::ALL {
        let mut request = shape.request();
        request.pop();
        bench_bytes(c, &format!("encode/shape_{}", shape.name()), &request);
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = encode
}
criterion_main!(benches);

//! Request parsing at the real message sizes: the core's in-place simd-json path (padded
//! buffer, reused `Buffers` and `Tape`) against simd-json's `to_borrowed_value` (which copies
//! into its own padded buffer and builds a value tree) and serde_json's `from_slice` into a
//! borrowed value. simd-json mutates its input, so each iteration gets a fresh copy
//! (`iter_batched_ref`, copy not timed).

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringline::protocol::PADDING;
use ringline::simd_json::{self, Buffers, Tape};

const SEED: &str =
    "{\"cmdid\": 10000, \"timestamp\": 1437300000, \"params\": {\"content\": \"Hello world!\"}}";

fn request_of(size: usize) -> String {
    if size <= SEED.len() {
        return SEED.to_owned();
    }
    let filler = "a".repeat(size - 80);
    format!(
        "{{\"cmdid\":10000,\"timestamp\":1437300000,\"params\":{{\"content\":\"{filler}\",\"n\":[1,2,3]}}}}"
    )
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for (name, size) in [("seed-80B", 0), ("1KiB", 1024), ("64KiB", 64 * 1024)] {
        let request = request_of(size);
        let len = request.len();
        group.throughput(Throughput::Bytes(len as u64));
        let mut padded = request.clone().into_bytes();
        padded.resize(len + PADDING, 0);

        let mut buffers = Buffers::new(len);
        let mut tape = Tape::null();
        group.bench_with_input(BenchmarkId::new("in_place_tape", name), &padded, |b, padded| {
            b.iter_batched_ref(
                || padded.clone(),
                |input| {
                    let mut t = std::mem::replace(&mut tape, Tape::null()).reset();
                    simd_json::fill_tape_padded(input, len, &mut buffers, &mut t).unwrap();
                    black_box(t.0.len());
                    tape = t.reset();
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_with_input(BenchmarkId::new("to_borrowed_value", name), &request, |b, request| {
            b.iter_batched_ref(
                || request.clone().into_bytes(),
                |input| {
                    black_box(simd_json::to_borrowed_value(input).unwrap());
                },
                BatchSize::SmallInput,
            )
        });
        group.bench_with_input(BenchmarkId::new("serde_json", name), &request, |b, request| {
            b.iter(|| black_box(serde_json::from_str::<serde_json::Value>(black_box(request)).unwrap()))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = parse
}
criterion_main!(benches);

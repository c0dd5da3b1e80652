//! Request parsing at the real message sizes: the core's in-place simd-json path (padded
//! buffer, reused `Buffers` and `Tape`) against simd-json's `to_borrowed_value` (which copies
//! into its own padded buffer and builds a value tree) and serde_json's `from_slice` into a
//! value.
//!
//! simd-json mutates its input, so every iteration of every parser first copies the request
//! into one reused buffer, inside the timed routine: the copy stands for the kernel's copy
//! into the receive buffer and leaves the bytes in cache as a receive does, and all three
//! parsers pay it alike. (Fresh clones made outside the timing, as `iter_batched` does, would
//! be evicted by the time a 64 KiB one is parsed, timing cache misses only simd-json paid.)

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringcall::simd_json::{self, Buffers, Tape};
use ringcall_core::PADDING;

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

/// The core's path: `padded[..len]` parsed in place into a reused tape, with reused buffers.
fn bench_in_place(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    padded: &[u8],
    len: usize,
) {
    let mut buffers = Buffers::new(len);
    let mut tape = Tape::null();
    let mut input = padded.to_vec();
    group.bench_function(BenchmarkId::new("in_place_tape", name), |b| {
        b.iter(|| {
            input.copy_from_slice(black_box(padded));
            let mut t = std::mem::replace(&mut tape, Tape::null()).reset();
            simd_json::fill_tape_padded(&mut input, len, &mut buffers, &mut t).unwrap();
            black_box(t.0.len());
            tape = t.reset();
        })
    });
}

fn parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    for (name, size) in [("seed-80B", 0), ("1KiB", 1024), ("64KiB", 64 * 1024)] {
        let request = request_of(size);
        let len = request.len();
        group.throughput(Throughput::Bytes(len as u64));
        let mut padded = request.clone().into_bytes();
        padded.resize(len + PADDING, 0);

        bench_in_place(&mut group, name, &padded, len);
        let mut input = request.clone().into_bytes();
        group.bench_function(BenchmarkId::new("to_borrowed_value", name), |b| {
            b.iter(|| {
                input.copy_from_slice(black_box(request.as_bytes()));
                black_box(simd_json::to_borrowed_value(&mut input).unwrap());
            })
        });
        let mut input = request.clone().into_bytes();
        group.bench_function(BenchmarkId::new("serde_json", name), |b| {
            b.iter(|| {
                input.copy_from_slice(black_box(request.as_bytes()));
                black_box(serde_json::from_slice::<serde_json::Value>(&input).unwrap())
            })
        });
    }
    group.finish();
}

/// The realistic shapes: the core's in-place tape against serde_json's value tree and its
/// envelope with `params` left raw (validated, not built: `RawValue`).
fn parse_shapes(c: &mut Criterion) {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Envelope<'a> {
        cmdid: u32,
        #[serde(borrow)]
        params: &'a serde_json::value::RawValue,
    }
    let mut group = c.benchmark_group("parse_shapes");
    for shape in ringcall::bench_support::Shape::ALL {
        let mut request = shape.request();
        request.pop();
        let len = request.len();
        group.throughput(Throughput::Bytes(len as u64));
        let mut padded = request.clone();
        padded.resize(len + PADDING, 0);
        bench_in_place(&mut group, shape.name(), &padded, len);
        group.bench_function(BenchmarkId::new("serde_json_value", shape.name()), |b| {
            b.iter(|| black_box(serde_json::from_slice::<serde_json::Value>(black_box(&request)).unwrap()))
        });
        group.bench_function(BenchmarkId::new("serde_json_raw_params", shape.name()), |b| {
            b.iter(|| {
                black_box(
                    serde_json::from_slice::<Envelope<'_>>(black_box(&request)).unwrap().params.get().len(),
                )
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = parse, parse_shapes
}
criterion_main!(benches);

//! Line framing: memchr over a pooled (padded) buffer against a naive byte loop, for 80 B,
//! 1 KiB and 64 KiB lines. Throughput is bytes scanned.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringcall_core::{PADDING, frame};

/// A 256 KiB receive buffer (plus padding) filled with lines of `line_len` bytes.
fn buffer(line_len: usize) -> Vec<u8> {
    let total = 256 * 1024;
    let mut buf = Vec::with_capacity(total + PADDING);
    while buf.len() + line_len <= total {
        buf.extend(std::iter::repeat_n(b'x', line_len - 1));
        buf.push(b'\n');
    }
    buf.resize(buf.len() + PADDING, 0);
    buf
}

fn naive_lines(bytes: &[u8]) -> usize {
    let mut count = 0;
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' {
            count += black_box(i - start);
            start = i + 1;
        }
    }
    count
}

fn memchr_lines(bytes: &[u8]) -> usize {
    frame::lines(bytes).map(|line| black_box(line.len())).sum()
}

fn framing(c: &mut Criterion) {
    let mut group = c.benchmark_group("framing");
    for (name, line_len) in [("80B", 80), ("1KiB", 1024), ("64KiB", 64 * 1024)] {
        let buf = buffer(line_len);
        let data = &buf[..buf.len() - PADDING];
        group.throughput(Throughput::Bytes(data.len() as u64));
        assert_eq!(naive_lines(data), memchr_lines(data));
        group.bench_with_input(BenchmarkId::new("memchr", name), data, |b, d| {
            b.iter(|| memchr_lines(black_box(d)))
        });
        group.bench_with_input(BenchmarkId::new("naive", name), data, |b, d| {
            b.iter(|| naive_lines(black_box(d)))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = framing
}
criterion_main!(benches);

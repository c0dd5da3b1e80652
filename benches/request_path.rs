//! One whole request through the protocol core — frame + parse + dispatch + encode — for the
//! seed's echo request, alone and 16 pipelined in one receive buffer, and the same with
//! per-command metrics on (a lookup and two clock reads per request). Throughput is in
//! requests, so criterion reports the time per request.
//!
//! `request_sizes` sends one echo request of 1 KiB to 1 MiB through the core: in one receive
//! buffer, and arriving in 16 KiB reads, either each copied into the line's carry buffer
//! (`pieces_pooled`, as every backend did before lending) or, once the carry buffer has room,
//! read straight into it (`pieces_lent`, [`ringcall_core::LineBuf`]). Throughput is bytes.
//!
//! `request_shapes` sends each realistic request shape (a log record as Python writes it,
//! base64 images; `ringcall::bench_support::Shape`) through the whole path.
//!
//! Each iteration first copies the request bytes into one reused receive buffer, inside the
//! timed routine: that stands for the kernel's copy into the server's receive buffer, and it
//! leaves the bytes in cache as a real receive does. (A batch of fresh clones made outside
//! the timing, as `iter_batched` does, would be evicted by the time each is parsed and time
//! cache misses the server never has.)

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;

use ringcall::Dispatcher;
use ringcall::stats::StatsRegistry;
use ringcall_core::{Limits, Output, PADDING, Processor, Session};

const SEED: &[u8] =
    b"{\"cmdid\": 10000, \"timestamp\": 1437300000, \"params\": {\"content\": \"Hello world!\"}}\n";

ringcall::routes! {
    Shipped { 10000 => ringcall::handlers::echo }
}

/// The processor of core 0 of a one-core server routing the shipped echo, counting into
/// `stats`.
fn processor(stats: std::sync::Arc<StatsRegistry>, limits: Limits) -> Processor<Dispatcher<Shipped>> {
    Processor::new(0, Dispatcher::new(0, 1, Arc::new(Shipped)), stats, limits)
}

fn request_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_path");
    // `metrics`: per-command counts and handler times on, as while metrics are served.
    for (pipelined, metrics) in [(1usize, false), (16, false), (1, true), (16, true)] {
        let received = SEED.repeat(pipelined);
        let len = received.len();
        let mut buf = vec![0; len + PADDING];
        let stats = StatsRegistry::with_commands(1, &[0, 1, 10000]);
        if metrics {
            stats.time_handlers();
        }
        let mut processor = processor(stats, Limits::default());
        let mut session = Session::new();
        let mut out = Output::at(std::time::Instant::now());
        group.throughput(Throughput::Elements(pipelined as u64));
        let name = if metrics { format!("seed_x{pipelined}_metrics") } else { format!("seed_x{pipelined}") };
        group.bench_function(name, |b| {
            b.iter(|| {
                buf[..len].copy_from_slice(black_box(&received));
                out.clear_ready();
                processor.on_recv(&mut session, &mut buf, len, &mut out);
                black_box(out.ready_bytes().len())
            })
        });
    }
    group.finish();
}

fn echo_request(bytes: usize) -> Vec<u8> {
    let envelope = "{\"cmdid\":10000,\"params\":{\"s\":\"\"}}\n".len();
    format!("{{\"cmdid\":10000,\"params\":{{\"s\":\"{}\"}}}}\n", "a".repeat(bytes - envelope)).into_bytes()
}

fn request_sizes(c: &mut Criterion) {
    use ringcall::bytes::BufMut;
    const READ: usize = 16 * 1024;
    let mut group = c.benchmark_group("request_sizes");
    for (name, bytes) in [("1KiB", 1 << 10), ("16KiB", 16 << 10), ("64KiB", 64 << 10), ("1MiB", 1 << 20)] {
        let request = echo_request(bytes);
        let len = request.len();
        let mut processor =
            processor(StatsRegistry::new(1), Limits { max_line: 2 << 20, ..Limits::default() });
        let mut session = Session::new();
        let mut out = Output::at(std::time::Instant::now());
        group.throughput(Throughput::Bytes(len as u64));
        let mut whole = vec![0; len + PADDING];
        group.bench_function(format!("{name}/one_read"), |b| {
            b.iter(|| {
                whole[..len].copy_from_slice(black_box(&request));
                out.clear_ready();
                processor.on_recv(&mut session, &mut whole, len, &mut out);
                black_box(out.ready_bytes().len())
            })
        });
        if len <= READ {
            continue;
        }
        let mut pooled = vec![0; READ + PADDING];
        for lend in [false, true] {
            let case = if lend { "pieces_lent" } else { "pieces_pooled" };
            group.bench_function(format!("{name}/{case}"), |b| {
                b.iter(|| {
                    out.clear_ready();
                    for piece in black_box(&request).chunks(READ) {
                        // Asked only when lending: a lent buffer must come back.
                        let line = if lend { session.lend_line() } else { None };
                        match line {
                            Some(mut line) => {
                                line.target().put_slice(piece);
                                processor.on_line_recv(&mut session, line, &mut out);
                            }
                            None => {
                                pooled[..piece.len()].copy_from_slice(piece);
                                processor.on_recv(&mut session, &mut pooled, piece.len(), &mut out);
                            }
                        }
                    }
                    assert_eq!(session.pending_bytes(), 0);
                    black_box(out.ready_bytes().len())
                })
            });
        }
    }
    group.finish();
}

/// Each realistic request shape (`ringcall::bench_support::Shape`) through the whole path,
/// 16 pipelined in one receive buffer (64 KiB blobs: 4), per request.
fn request_shapes(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_shapes");
    for shape in ringcall::bench_support::Shape::ALL {
        let line = shape.request();
        let pipelined = if line.len() > 32 << 10 { 4 } else { 16 };
        let received = line.repeat(pipelined);
        let len = received.len();
        let mut buf = vec![0; len + PADDING];
        let mut processor =
            processor(StatsRegistry::new(1), Limits { max_pending_output: 4 << 20, ..Limits::default() });
        let mut session = Session::new();
        let mut out = Output::at(std::time::Instant::now());
        group.throughput(Throughput::Elements(pipelined as u64));
        group.bench_function(shape.name(), |b| {
            b.iter(|| {
                buf[..len].copy_from_slice(black_box(&received));
                out.clear_ready();
                processor.on_recv(&mut session, &mut buf, len, &mut out);
                black_box(out.ready_bytes().len())
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = request_path, request_sizes, request_shapes
}
criterion_main!(benches);

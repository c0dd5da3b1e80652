//! One whole request through the protocol core — frame + parse + dispatch + encode — for the
//! seed's echo request, alone and 16 pipelined in one receive buffer, and the same with
//! per-command metrics on (a lookup and two clock reads per request). Throughput is in
//! requests, so criterion reports the time per request.
//!
//! Each iteration first copies the request bytes into one reused receive buffer, inside the
//! timed routine: that stands for the kernel's copy into the server's receive buffer, and it
//! leaves the bytes in cache as a real receive does. (A batch of fresh clones made outside
//! the timing, as `iter_batched` does, would be evicted by the time each is parsed and time
//! cache misses the server never has.)

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;

use ringcall::protocol::{Limits, Output, PADDING, Processor, Session};
use ringcall::stats::StatsRegistry;

const SEED: &[u8] =
    b"{\"cmdid\": 10000, \"timestamp\": 1437300000, \"params\": {\"content\": \"Hello world!\"}}\n";

ringcall::routes! {
    Shipped { 10000 => ringcall::handlers::echo }
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
        let mut processor = Processor::new(0, Arc::new(Shipped), stats, Limits::default());
        let mut session = Session::new();
        let mut out = Output::default();
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

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = request_path
}
criterion_main!(benches);

//! One whole request through the protocol core — frame + parse + dispatch + encode — for the
//! seed's echo request, alone and 16 pipelined in one receive buffer. Throughput is in
//! requests, so criterion reports the time per request.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ringline::protocol::{Limits, PADDING, Processor, Session};
use ringline::stats::StatsRegistry;

const SEED: &[u8] =
    b"{\"cmdid\": 10000, \"timestamp\": 1437300000, \"params\": {\"content\": \"Hello world!\"}}\n";

ringline::routes! {
    Shipped { 10000 => ringline::handlers::echo }
}

fn request_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_path");
    for pipelined in [1usize, 16] {
        let mut buf = SEED.repeat(pipelined);
        let len = buf.len();
        buf.resize(len + PADDING, 0);
        let mut processor = Processor::<Shipped>::new(0, StatsRegistry::new(1), Limits::default());
        let mut session = Session::new();
        let mut out = Vec::with_capacity(4096);
        group.throughput(Throughput::Elements(pipelined as u64));
        group.bench_function(format!("seed_x{pipelined}"), |b| {
            b.iter_batched_ref(
                || buf.clone(),
                |input| {
                    out.clear();
                    processor.on_recv(&mut session, input, len, &mut out);
                    black_box(out.len())
                },
                BatchSize::SmallInput,
            )
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

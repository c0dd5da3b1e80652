//! Dispatch: the static `routes!` table (a `match`) against a `HashMap<u32, Box<dyn Handler>>`
//! with 4, 64 and 1024 routes, looking up the last route of each table. The tables are in
//! `support/dispatch_tables.rs`: for N in 4, 64, 1024, `ringcall::routes! { TableN { … } }`
//! with cmdids `1000 + 7 * i` for i in 0..N, each routed to `answer` (written out by a
//! one-off script, since `routes!` takes literal cmdids).

use std::collections::HashMap;
use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use ringcall::bench_support::{Dispatcher, reply, with_request};
use ringcall::{HandlerResult, Reply, Request, Routes, Service};
use ringcall_core::PADDING;

fn answer(request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    reply.u64(u64::from(request.cmdid()));
    Ok(())
}

include!("support/dispatch_tables.rs");

trait DynHandler {
    fn call(&self, request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult;
}

struct Answer;

impl DynHandler for Answer {
    fn call(&self, request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
        answer(request, reply)
    }
}

fn bench_table<R: Service<Routes = R> + Routes<R> + Default>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    n: usize,
) {
    let cmdid = R::CMDIDS[n - 1];
    let mut table = Dispatcher::new(R::default());
    let mut line = format!("{{\"cmdid\":{cmdid}}}").into_bytes();
    let len = line.len();
    line.resize(len + PADDING, 0);
    let map: HashMap<u32, Box<dyn DynHandler>> =
        R::CMDIDS.iter().map(|&id| (id, Box::new(Answer) as Box<dyn DynHandler>)).collect();
    let mut out = Vec::with_capacity(64);
    with_request(&mut line, len, |request| {
        c.bench_function(BenchmarkId::new("static_table", n), |b| {
            b.iter(|| black_box(table.call(black_box(request.cmdid()), request)))
        });
        c.bench_function(BenchmarkId::new("hashmap_box_dyn", n), |b| {
            b.iter(|| {
                out.clear();
                let handler = map.get(&black_box(request.cmdid())).expect("routed");
                black_box(handler.call(request, reply(&mut out)))
            })
        });
    });
}

fn dispatch(c: &mut Criterion) {
    let mut group = c.benchmark_group("dispatch");
    bench_table::<Table4>(&mut group, 4);
    bench_table::<Table64>(&mut group, 64);
    bench_table::<Table1024>(&mut group, 1024);
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(3));
    targets = dispatch
}
criterion_main!(benches);

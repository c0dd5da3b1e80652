//! A loopback round trip through a live server per backend, with 1 and 16 requests in flight
//! on one connection (`iter_custom`: criterion cannot drive the servers' runtimes, so each
//! sample times a batch of round trips itself). The server runs on its own thread, the client
//! on criterion's; on a 2-core host they share the machine with nothing else of ours.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use ringcall::{Backend, NoRoutes, Server};

const PING: &[u8] = b"{\"cmdid\":0}\n";

fn roundtrip(c: &mut Criterion) {
    let mut group = c.benchmark_group("roundtrip");
    for backend in Backend::ALL {
        let server = match Server::builder().addr("127.0.0.1:0").threads(1).backend(backend).start(NoRoutes) {
            Ok(server) => server,
            Err(e) => {
                eprintln!("SKIPPED roundtrip/{backend}: {e}");
                continue;
            }
        };
        let stream = TcpStream::connect(server.local_addr()).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        for in_flight in [1usize, 16] {
            let batch = PING.repeat(in_flight);
            group.throughput(Throughput::Elements(in_flight as u64));
            group.bench_function(BenchmarkId::new(backend.name(), format!("{in_flight}_in_flight")), |b| {
                b.iter_custom(|iters| {
                    let started = Instant::now();
                    for _ in 0..iters {
                        writer.write_all(&batch).unwrap();
                        for _ in 0..in_flight {
                            line.clear();
                            reader.read_line(&mut line).unwrap();
                        }
                    }
                    started.elapsed()
                })
            });
        }
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = roundtrip
}
criterion_main!(benches);

//! Long-lived connections are spread evenly over the cores on every backend that runs a
//! listener per core, whatever the kernel's `SO_REUSEPORT` hash picked: each connection is
//! admitted (a ping answered) before the next is made, so the cores' counts are exact.

#[macro_use]
mod common;

use common::{Client, start_with};
use ringcall::Backend;
use ringcall::simd_json::prelude::*;

every_backend!(connections_are_spread_evenly_over_the_cores);

/// Open connections per core, from the stats command.
fn open_per_core(client: &mut Client) -> Vec<u64> {
    let mut line = client.call("{\"cmdid\":1}\n").into_bytes();
    let stats = ringcall::simd_json::to_owned_value(&mut line).unwrap();
    let cores = stats["data"]["cores"].as_array().unwrap();
    cores.iter().map(|c| c["connections_open"].as_u64().unwrap()).collect()
}

fn connections_are_spread_evenly_over_the_cores(backend: Backend) {
    let Some(server) = start_with(backend, |b| b.threads(2)) else { return };
    let mut clients = Vec::new();
    for (i, total) in (1..=64u64).enumerate() {
        let mut client = Client::connect(server.local_addr());
        assert_eq!(
            client.call(&format!("{{\"cmdid\":0,\"id\":{i}}}\n")),
            format!("{{\"code\":0,\"id\":{i},\"data\":\"pong\"}}\n")
        );
        clients.push(client);
        let open = open_per_core(&mut clients[0]);
        assert_eq!(open.iter().sum::<u64>(), total, "{open:?}");
        // epoll-mt runs one runtime behind one listener: its tasks move between threads,
        // and what a core counts is where a connection happened to open.
        if backend != Backend::EpollMt {
            assert!(open[0].abs_diff(open[1]) <= 1, "after {total} connections: {open:?}");
        }
    }
    // Every connection still answers, on whichever core it was handed to.
    for (i, client) in clients.iter_mut().enumerate() {
        let echo = format!("{{\"cmdid\":10000,\"id\":{i},\"params\":{{\"n\":{i}}}}}\n");
        assert_eq!(client.call(&echo), format!("{{\"code\":0,\"id\":{i},\"data\":{{\"n\":{i}}}}}\n"));
    }
    drop(clients);
}

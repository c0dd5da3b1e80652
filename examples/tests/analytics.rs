//! The analytics example, live on every backend: events counted on two cores from many
//! connections are all in the merged read; unknown events are refused with the known ones.

#[macro_use]
#[path = "../../tests/common/mod.rs"]
mod common;
mod support;

use common::Client;
use ringcall::Backend;
use support::Running;

fn counts_from_every_core_merge_in_one_read(backend: Backend) {
    if backend == Backend::Uring && Backend::Auto.resolve() != Backend::Uring {
        common::skip("RINGCALL_REQUIRE_ALL_BACKENDS", "io_uring is not available here");
        return;
    }
    let args = [
        "--addr",
        "127.0.0.1:0",
        "--threads",
        "2",
        "--events",
        "signup,purchase",
        "--backend",
        backend.name(),
    ];
    let (_service, addr) = Running::start("analytics", &args);
    // Enough connections that both cores serve some (SO_REUSEPORT spreads them).
    let mut clients: Vec<Client> = (0..8).map(|_| Client::connect(addr)).collect();
    for (c, client) in clients.iter_mut().enumerate() {
        let batch: String = (0..50)
            .map(|i| {
                format!(
                    "{{\"cmdid\":3001,\"params\":{{\"event\":\"purchase\",\"amount\":{}}}}}\n",
                    c * 100 + i
                )
            })
            .chain(std::iter::once("{\"cmdid\":3001,\"params\":{\"event\":\"signup\"}}\n".to_owned()))
            .collect();
        client.send(batch.as_bytes());
    }
    for client in &mut clients {
        for _ in 0..51 {
            assert!(client.line().starts_with("{\"code\":0,\"data\":{\"count\":"));
        }
    }
    let amount: usize = (0..8).flat_map(|c| (0..50).map(move |i| c * 100 + i)).sum();
    assert_eq!(
        clients[0].call("{\"cmdid\":3002}\n"),
        format!(
            "{{\"code\":0,\"data\":{{\"signup\":{{\"count\":8,\"amount\":0}},\"purchase\":{{\"count\":400,\"amount\":{amount}}}}}}}\n"
        )
    );
    assert_eq!(
        clients[1].call("{\"cmdid\":3001,\"params\":{\"event\":\"refund\"}}\n"),
        "{\"code\":400,\"error\":\"params.event: unknown event \\\"refund\\\" (known: signup, purchase)\"}\n"
    );
    assert_eq!(
        clients[1].call("{\"cmdid\":3001,\"params\":{\"event\":\"signup\",\"amount\":-1}}\n"),
        "{\"code\":400,\"error\":\"params.amount: invalid value: integer `-1`, expected u64\"}\n"
    );
}

every_backend!(counts_from_every_core_merge_in_one_read);

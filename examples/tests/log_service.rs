//! The log service example, live on every backend: appends are acknowledged with where they
//! lie, a record acknowledged before `kill -9` is in the files afterwards, a restarted service
//! appends after what is there, and `tail` reads the records back.

#[macro_use]
#[path = "../../tests/common/mod.rs"]
mod common;
mod support;

use common::Client;
use ringcall::Backend;
use support::{Running, TempDir};

/// `(offset, len, batch)` of an append's reply.
fn ack(line: &str, id: usize) -> (usize, usize, usize) {
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!((v["code"].as_u64(), v["id"].as_u64()), (Some(0), Some(id as u64)), "{line}");
    let n = |k: &str| v["data"][k].as_u64().unwrap_or_else(|| panic!("no {k} in {line}")) as usize;
    (n("offset"), n("len"), n("batch"))
}

fn record(round: usize, i: usize) -> String {
    format!("round {round} record {i} \\\"quoted\\\" ünïcödé")
}

/// Every log file of `dir`.
fn files(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut names: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    names.sort();
    names
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

/// Sends `n` appends pipelined on one connection and returns their acknowledgements.
fn append_all(client: &mut Client, round: usize, n: usize) -> Vec<(usize, usize, usize)> {
    let batch: String = (0..n)
        .map(|i| {
            format!("{{\"cmdid\":2001,\"id\":{i},\"params\":{{\"record\":\"{}\"}}}}\n", record(round, i))
        })
        .collect();
    client.send(batch.as_bytes());
    (0..n).map(|i| ack(&client.line(), i)).collect()
}

fn acknowledged_records_survive_kill_9_and_a_restart_appends_after_them(backend: Backend) {
    if backend == Backend::Uring && Backend::Auto.resolve() != Backend::Uring {
        common::skip("RINGCALL_REQUIRE_ALL_BACKENDS", "io_uring is not available here");
        return;
    }
    let dir = TempDir::new(&format!("log-{backend}"));
    let args = ["--addr", "127.0.0.1:0", "--threads", "2", "--backend", backend.name(), "--dir"];
    let args: Vec<&str> = args.iter().copied().chain([dir.0.to_str().unwrap()]).collect();
    let mut acked = Vec::new();
    for round in 0..2 {
        let (service, addr) = Running::start("log_service", &args);
        let mut client = Client::connect(addr);
        for (i, (offset, len, batch)) in append_all(&mut client, round, 200).into_iter().enumerate() {
            assert!(batch >= 1);
            acked.push((record(round, i).replace("\\\"", "\""), offset, len));
        }
        assert_eq!(
            client.call("{\"cmdid\":2001,\"params\":{\"record\":\"two\\nlines\"}}\n"),
            "{\"code\":400,\"error\":\"params.record: must be one line (no \\\\n)\"}\n"
        );
        let stats: serde_json::Value = serde_json::from_str(&client.call("{\"cmdid\":2003}\n")).unwrap();
        let (appends, syncs) =
            (stats["data"]["appends"].as_u64().unwrap(), stats["data"]["syncs"].as_u64().unwrap());
        assert_eq!(appends, 200, "{stats}");
        assert!((1..=200).contains(&syncs), "{stats}");
        // Acknowledged means on disk: a crash now loses none of them.
        service.kill_9();
        let files = files(&dir.0);
        for (text, offset, len) in &acked {
            let line = format!("{text}\n");
            assert_eq!(*len, line.len());
            let found =
                files.iter().filter(|f| f.get(*offset..offset + len) == Some(line.as_bytes())).count();
            assert_eq!(found, 1, "record {text:?} at {offset} is not in the files after kill -9");
        }
        let records: usize = files.iter().map(|f| f.iter().filter(|&&b| b == b'\n').count()).sum();
        assert_eq!(records, acked.len(), "every line in the files was acknowledged once");
    }
    // Both rounds are read back.
    let (_service, addr) = Running::start("log_service", &args);
    let mut client = Client::connect(addr);
    let tail: serde_json::Value =
        serde_json::from_str(&client.call("{\"cmdid\":2002,\"params\":{\"n\":1000}}\n")).unwrap();
    let mut read: Vec<String> = tail["data"]
        .as_array()
        .expect("a list of files")
        .iter()
        .flat_map(|f| f["records"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_owned()))
        .collect();
    let mut expected: Vec<String> = acked.iter().map(|(text, ..)| text.clone()).collect();
    read.sort();
    expected.sort();
    assert_eq!(read, expected);
}

every_backend!(acknowledged_records_survive_kill_9_and_a_restart_appends_after_them);

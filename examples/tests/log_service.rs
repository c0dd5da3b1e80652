//! The log service example, live on every backend: appends are acknowledged with where they
//! lie, a record acknowledged before `kill -9` is in the files afterwards, a restarted service
//! appends after what is there, `tail` reads the records back, and a structured record (the
//! params object) is stored byte for byte as it was sent.

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

/// Whether `backend` runs on this host (without io_uring, `uring` is skipped, or fails where
/// RINGCALL_REQUIRE_ALL_BACKENDS is set).
fn runs_here(backend: Backend) -> bool {
    if backend == Backend::Uring && Backend::Auto.resolve() != Backend::Uring {
        common::skip("RINGCALL_REQUIRE_ALL_BACKENDS", "io_uring is not available here");
        return false;
    }
    true
}

/// The service's arguments: `threads` workers on `backend`, its files in `dir`.
fn service_args(backend: Backend, threads: &str, dir: &std::path::Path) -> Vec<String> {
    ["--addr", "127.0.0.1:0", "--threads", threads, "--backend", backend.name(), "--dir"]
        .into_iter()
        .map(String::from)
        .chain([dir.to_str().unwrap().to_owned()])
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
    if !runs_here(backend) {
        return;
    }
    let dir = TempDir::new(&format!("log-{backend}"));
    let args = service_args(backend, "2", &dir.0);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
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

/// A tmpfs of 256 KiB mounted on a fresh directory (a small disk that fills), unmounted when
/// dropped; `None`, with a SKIPPED line, where this process may not mount one (not root).
struct SmallDisk(TempDir);

impl SmallDisk {
    fn new(name: &str) -> Option<Self> {
        let dir = TempDir::new(name);
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "ringcall-test"])
            .arg(&dir.0)
            .status();
        if !mounted.is_ok_and(|s| s.success()) {
            common::skip("RINGCALL_REQUIRE_TMPFS", "cannot mount a tmpfs here (the test needs root)");
            return None;
        }
        Some(Self(dir))
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0.0).status();
    }
}

/// The disk fills in the middle of a batch: acknowledged records are in the file, records
/// answered 500 are not (the failed batch is cut off, not left torn), and after space is
/// freed and the service restarted, the next record starts a line of its own. A second
/// process on the same directory is refused at start-up, naming the directory.
fn a_full_disk_leaves_no_torn_or_failed_record_and_one_process_owns_a_directory(backend: Backend) {
    if !runs_here(backend) {
        return;
    }
    let Some(disk) = SmallDisk::new(&format!("full-{backend}")) else { return };
    let ballast = disk.0.0.join("ballast");
    std::fs::write(&ballast, vec![0u8; 64 << 10]).unwrap();
    let logs = disk.0.0.join("logs");
    let args = service_args(backend, "1", &logs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (service, addr) = Running::start("log_service", &args);

    // A second process on the directory stops at start-up, with the reason.
    let second = std::process::Command::new(support::example("log_service"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success());
    assert!(said.contains("is in use by another process"), "{said}");

    let mut client = Client::connect(addr);
    let mut acked = Vec::new();
    let mut failed = Vec::new();
    let mut round = 0;
    let mut rounds_failed = 0;
    // Until two rounds have failed: the one the disk filled in, and one after it.
    while rounds_failed < 2 {
        assert!(round < 1000, "the disk never filled");
        let batch: String = (0..50)
            .map(|i| {
                format!("{{\"cmdid\":2001,\"id\":{i},\"params\":{{\"record\":\"{}\"}}}}\n", record(round, i))
            })
            .collect();
        client.send(batch.as_bytes());
        for i in 0..50 {
            let line = client.line();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            let text = record(round, i).replace("\\\"", "\"");
            match v["code"].as_u64() {
                Some(0) => {
                    assert!(failed.is_empty(), "acknowledged after a failure: {line}");
                    acked.push((text, ack(&line, i).0));
                }
                Some(500) => failed.push(text),
                _ => panic!("{line}"),
            }
        }
        rounds_failed += usize::from(!failed.is_empty());
        round += 1;
    }
    let file = std::fs::read(logs.join("log-0.log")).unwrap();
    assert!(file.ends_with(b"\n"), "the file ends in a torn record");
    let text = String::from_utf8(file.clone()).unwrap();
    for (record, offset) in &acked {
        assert_eq!(
            text.get(*offset..offset + record.len()),
            Some(record.as_str()),
            "acknowledged {record:?}"
        );
    }
    for record in &failed {
        assert!(!text.contains(&format!("{record}\n")), "{record:?} was answered 500 but is in the file");
    }
    assert_eq!(text.lines().count(), acked.len());
    service.kill_9();

    // Space freed, service restarted: the next record is a line of its own.
    std::fs::remove_file(&ballast).unwrap();
    let (_service, addr) = Running::start("log_service", &args);
    let mut client = Client::connect(addr);
    let (offset, ..) =
        ack(&client.call("{\"cmdid\":2001,\"id\":0,\"params\":{\"record\":\"after restart\"}}\n"), 0);
    assert_eq!(offset, file.len());
    let tail: serde_json::Value =
        serde_json::from_str(&client.call("{\"cmdid\":2002,\"params\":{\"n\":1}}\n")).unwrap();
    assert_eq!(tail["data"][0]["records"][0], "after restart", "{tail}");
}

/// 2004 stores the params object byte for byte as it was sent, and tail reads it back so.
fn structured_records_are_stored_as_sent(backend: Backend) {
    if !runs_here(backend) {
        return;
    }
    let dir = TempDir::new(&format!("log-json-{backend}"));
    let args = service_args(backend, "1", &dir.0);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (_service, addr) = Running::start("log_service", &args);
    let mut client = Client::connect(addr);
    // As Python's json.dumps sends it: spaced, non-ASCII as \u escapes; and a number spelled
    // as no encoder would write it again.
    let records = [
        r#"{"level": "warn", "msg": "Z\u00fcrich \"q\"\tend", "n": [1.50, 2e3, -0], "ok": true}"#,
        r#"{ }"#,
        r#"{"nested":{"a":{"b":[null,{"c":"\ud83d\ude00"}]}}}"#,
    ];
    let mut file_end = 0;
    for (i, record) in records.iter().enumerate() {
        let (offset, len, _) =
            ack(&client.call(&format!("{{\"cmdid\":2004,\"id\":{i},\"params\": {record} }}\n")), i);
        assert_eq!((offset, len), (file_end, record.len() + 1), "{record}");
        file_end += len;
    }
    let expected: String = records.iter().map(|r| format!("{r}\n")).collect();
    assert_eq!(String::from_utf8(files(&dir.0).concat()).unwrap(), expected);
    let tail: serde_json::Value =
        serde_json::from_str(&client.call("{\"cmdid\":2002,\"params\":{\"n\":3}}\n")).unwrap();
    assert_eq!(tail["data"][0]["records"], serde_json::json!(records), "{tail}");
}

every_backend!(
    structured_records_are_stored_as_sent,
    acknowledged_records_survive_kill_9_and_a_restart_appends_after_them,
    a_full_disk_leaves_no_torn_or_failed_record_and_one_process_owns_a_directory,
);

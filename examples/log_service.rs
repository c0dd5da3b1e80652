//! A log service: callers append records, and each append is acknowledged only once the
//! record is on disk. Appends are group-committed (one `fdatasync` covers every append that
//! arrived while the previous one ran), on the core's own io_uring ring on `uring`.
//!
//! Each core appends to its own file under `--dir` (`log-N.log`, one record per line), so
//! cores share no lock. One process owns a directory (a second one on it stops at start-up);
//! a batch that fails (a full disk) is answered 500 and cut off the file, and the file takes
//! no more appends until the service restarts. Run it and try it:
//!
//! ```sh
//! cargo run --release --example log_service -- --addr 127.0.0.1:8891 --dir /tmp/ringcall-logs
//! printf '{"cmdid":2001,"params":{"record":"user 42 logged in"}}\n{"cmdid":2002,"params":{"n":5}}\n' | nc -q1 127.0.0.1 8891
//! ```
//!
//! - 2001 append `{"record": "<text>"}` → `{"offset": …, "len": …, "batch": …}` once durable
//!   (where the record lies in its worker's file; `batch`: appends made durable by the same
//!   sync). A record must be one line (no `\n`).
//! - 2004 append a structured record: the `params` object itself is the record, stored as the
//!   caller sent it (spacing, escapes and numbers as they came: the line is not re-encoded) →
//!   the same answer as 2001. Any JSON object, e.g. `{"level": "warn", "msg": "disk 91%"}`.
//! - 2002 tail `{"n": 10}` → the last `n` records of each file, read on the blocking pool.
//! - 2003 stats → `{"appends": …, "syncs": …, "bytes": …, "failed": …, "appends_per_sync": …}`
//!   over every file since start.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::Parser;
use ringcall::durable::{AppendFile, DirLock};
use ringcall::{Backend, Ctx, Deferred, HandlerError, HandlerResult, Reply, Request, Server, Service};
use serde::Deserialize;

#[derive(Parser)]
#[command(about = "A durable log service on ringcall")]
struct Args {
    /// Address to listen on (port 0 picks a free one; the address is printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8891")]
    addr: String,
    /// Directory of the log files (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// I/O backend: auto, uring, tokio-uring, epoll or epoll-mt.
    #[arg(long, default_value = "auto")]
    backend: Backend,
    /// Worker threads (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

struct LogService {
    dir: PathBuf,
    /// Numbers the files: each worker opens its own, whatever its core index.
    next_file: AtomicUsize,
    /// Every worker's file, for the stats command (locked only there and at start-up).
    files: Mutex<Vec<AppendFile>>,
}

impl Service for LogService {
    type Routes = LogRoutes;
    type Local = AppendFile;

    fn local(&self, _core: usize) -> AppendFile {
        let name = format!("log-{}.log", self.next_file.fetch_add(1, Ordering::Relaxed));
        // The directory was checked writable, and locked, at start-up.
        let file = AppendFile::open_lines(self.dir.join(name)).unwrap_or_else(|e| panic!("{e}"));
        self.files.lock().unwrap_or_else(|e| e.into_inner()).push(file.clone());
        file
    }
}

#[derive(Deserialize)]
struct Append<'a> {
    record: &'a str,
}

/// 2001: appends the record; answers once it is durable.
fn append(ctx: &Ctx<'_, LogService>, request: &Request<'_, '_>, deferred: Deferred) -> HandlerResult {
    let Append { record } = request.params()?;
    if record.contains('\n') {
        return Err(HandlerError::bad_request("params.record: must be one line (no \\n)"));
    }
    let mut line = Vec::with_capacity(record.len() + 1);
    line.extend_from_slice(record.as_bytes());
    line.push(b'\n');
    // Answered `{"offset":…,"len":…,"batch":…}` once the record is on disk.
    ctx.append(ctx.local(), &line, deferred);
    Ok(())
}

/// 2004: appends the params object, as sent, as the record; answers once it is durable.
fn append_json(ctx: &Ctx<'_, LogService>, request: &Request<'_, '_>, deferred: Deferred) -> HandlerResult {
    // A request line holds no newline, so neither does its params.
    let record = request.params_json().as_bytes();
    let mut line = Vec::with_capacity(record.len() + 1);
    line.extend_from_slice(record);
    line.push(b'\n');
    ctx.append(ctx.local(), &line, deferred);
    Ok(())
}

#[derive(Deserialize)]
struct Tail {
    #[serde(default = "ten")]
    n: usize,
}

fn ten() -> usize {
    10
}

/// 2002: the last `n` records of every log file.
fn tail(ctx: &Ctx<'_, LogService>, request: &Request<'_, '_>, deferred: Deferred) -> HandlerResult {
    let Tail { n } = request.params()?;
    let dir = ctx.service().dir.clone();
    ctx.spawn_blocking(deferred, move || read_tails(&dir, n.min(10_000)));
    Ok(())
}

#[derive(serde::Serialize)]
struct FileTail {
    file: String,
    records: Vec<String>,
}

fn read_tails(dir: &Path, n: usize) -> Result<Vec<FileTail>, HandlerError> {
    let failed = |e: std::io::Error| HandlerError::internal(format!("cannot read {}: {e}", dir.display()));
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(failed)?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with("log-") && name.ends_with(".log"))
        .collect();
    names.sort();
    let mut tails = Vec::new();
    for name in names {
        let text = std::fs::read_to_string(dir.join(&name)).map_err(failed)?;
        let lines: Vec<&str> = text.lines().collect();
        let records = lines[lines.len().saturating_sub(n)..].iter().map(|s| s.to_string()).collect();
        tails.push(FileTail { file: name, records });
    }
    Ok(tails)
}

/// 2003: appends, syncs and bytes of every file, and appends per sync.
fn stats(ctx: &Ctx<'_, LogService>, _: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    let files = ctx.service().files.lock().unwrap_or_else(|e| e.into_inner());
    let mut total = ringcall::durable::AppendStats::default();
    for file in files.iter() {
        let s = file.stats();
        total.appends += s.appends;
        total.syncs += s.syncs;
        total.bytes += s.bytes;
        total.failed += s.failed;
    }
    let per_sync = if total.syncs == 0 { 0.0 } else { total.appends as f64 / total.syncs as f64 };
    reply
        .object()
        .u64("appends", total.appends)
        .u64("syncs", total.syncs)
        .u64("bytes", total.bytes)
        .u64("failed", total.failed)
        .f64("appends_per_sync", per_sync);
    Ok(())
}

ringcall::routes! {
    LogRoutes for LogService {
        2001 => append,
        2002 => tail,
        2004 => append_json,
        2003 => stats,
    }
}

fn main() -> anyhow::Result<()> {
    ringcall_examples::init_logs();
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)
        .map_err(|e| anyhow::anyhow!("cannot create --dir {}: {e}", args.dir.display()))?;
    // Fail here, with the cause, rather than in a worker.
    let probe = args.dir.join(".writable");
    std::fs::write(&probe, b"")
        .map_err(|e| anyhow::anyhow!("--dir {} is not writable: {e}", args.dir.display()))?;
    let _ = std::fs::remove_file(probe);
    // One process per directory: a second one would append at ends it does not know.
    let _lock =
        DirLock::acquire(&args.dir).map_err(|e| anyhow::anyhow!("--dir {}: {e}", args.dir.display()))?;
    let service =
        LogService { dir: args.dir.clone(), next_file: AtomicUsize::new(0), files: Mutex::new(Vec::new()) };
    let builder = Server::builder().addr(args.addr).backend(args.backend).threads(args.threads);
    ringcall_examples::serve(builder, service, "log_service")
}

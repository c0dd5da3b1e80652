//! Durable appends with group commit: a handler appends bytes to an [`AppendFile`] and its
//! reply is sent only once they are on disk (`fdatasync`), and one sync covers every append
//! that arrived while the previous one ran.
//!
//! The commit rule is one sans-I/O machine ([`GroupCommit`]): appends collect in the next
//! batch; when no I/O is in flight the batch becomes the one in flight, which asks for one
//! write of all its bytes at the end of the file followed by one `fdatasync`; when both are
//! done every append of the batch is answered, and the next batch (what arrived meanwhile)
//! goes. Two drivers run it:
//!
//! - on `uring`, the core's own ring: the write and the sync are submitted together, linked
//!   (`IOSQE_IO_LINK`), with no thread hop and no syscall of their own;
//! - on the other backends, a thread per file (what an epoll server has to do for file I/O):
//!   `pwrite` then `fdatasync`, the same batches.
//!
//! A write or sync that fails answers every append of its batch with a 500 and fails the
//! file: after a failed `fdatasync` Linux may have dropped the dirty pages, so nothing
//! appended later could be acknowledged honestly. The file is cut back to its last durable
//! end (the bytes of the failed batch that did land — a disk that filled mid-batch — are
//! removed, so no record answered with an error is in the file, and none is left torn for
//! the next one to be glued to). Restart the service to open it again.
//!
//! A file is locked (`flock`, exclusive) while it is open: a second process, or a second
//! handle, on the same file is refused at open instead of appending at an end it does not
//! know. [`AppendFile::open_lines`] also cuts a last line left unfinished by a crash in the
//! middle of a write (never acknowledged).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::HandlerError;
use ringcall_core::Deferred;

/// Where an acknowledged append lies in its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Appended {
    /// Byte offset of the append's first byte.
    pub offset: u64,
    /// Its length in bytes.
    pub len: u64,
    /// Appends made durable by the same `fdatasync` (1: alone).
    pub batch: u64,
}

/// Counters of one file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AppendStats {
    /// Appends acknowledged as durable.
    pub appends: u64,
    /// `fdatasync`s done (each covers a batch of appends).
    pub syncs: u64,
    /// Bytes made durable.
    pub bytes: u64,
    /// Appends answered with an error (a failed write or sync).
    pub failed: u64,
}

/// One append waiting for its batch's sync.
struct Waiter {
    deferred: Deferred,
    offset: u64,
    len: u64,
}

#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    waiters: Vec<Waiter>,
}

/// The I/O the machine asks for: write `bytes` at `offset`, then `fdatasync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAndSync {
    /// The bytes (valid and unchanged until both results are reported).
    pub ptr: *const u8,
    /// How many.
    pub len: usize,
    /// File offset to write them at.
    pub offset: u64,
}

/// Where the batch in flight is.
enum Flight {
    Idle,
    /// The write (of `in_flight.bytes[written..]`) and the sync were handed out; their
    /// results come in any order.
    Running {
        written: usize,
        write: Option<i32>,
        sync: Option<i32>,
    },
}

/// The group-commit rule (see the module docs). Counts in `stats`.
pub struct GroupCommit {
    end: u64,
    next: Batch,
    in_flight: Batch,
    flight: Flight,
    failed: Option<String>,
    /// After a failure: the file must be cut back to this length (its last durable end).
    truncate: Option<u64>,
    stats: AppendStats,
}

impl GroupCommit {
    /// A machine for a file whose end is at `end`.
    pub fn new(end: u64) -> Self {
        Self {
            end,
            next: Batch::default(),
            in_flight: Batch::default(),
            flight: Flight::Idle,
            failed: None,
            truncate: None,
            stats: AppendStats::default(),
        }
    }

    /// Appends `bytes`; `deferred` is answered once they are durable.
    pub fn append(&mut self, bytes: &[u8], deferred: Deferred) {
        if let Some(why) = &self.failed {
            self.stats.failed += 1;
            deferred.error(HandlerError::internal(format!(
                "append refused: the log file failed earlier ({why})"
            )));
            return;
        }
        let offset = self.end + self.next.bytes.len() as u64 + self.pending_in_flight();
        self.next.bytes.extend_from_slice(bytes);
        self.next.waiters.push(Waiter { deferred, offset, len: bytes.len() as u64 });
    }

    /// Bytes of the batch in flight not yet counted in `end`.
    fn pending_in_flight(&self) -> u64 {
        match self.flight {
            Flight::Idle => 0,
            Flight::Running { .. } => self.in_flight.bytes.len() as u64,
        }
    }

    /// Whether I/O is in flight.
    pub fn busy(&self) -> bool {
        matches!(self.flight, Flight::Running { .. })
    }

    /// The next I/O to run, if none is in flight and appends wait.
    pub fn poll(&mut self) -> Option<WriteAndSync> {
        if self.busy() || self.next.waiters.is_empty() {
            return None;
        }
        std::mem::swap(&mut self.in_flight, &mut self.next);
        self.flight = Flight::Running { written: 0, write: None, sync: None };
        Some(self.io(0))
    }

    fn io(&self, written: usize) -> WriteAndSync {
        let rest = &self.in_flight.bytes[written..];
        WriteAndSync { ptr: rest.as_ptr(), len: rest.len(), offset: self.end + written as u64 }
    }

    /// The write's result: bytes written, or `-errno`.
    pub fn on_write(&mut self, result: i32) -> Option<WriteAndSync> {
        if let Flight::Running { write, .. } = &mut self.flight {
            *write = Some(result);
        }
        self.settle()
    }

    /// The sync's result: 0, or `-errno` (`-ECANCELED` when a short write broke the link).
    pub fn on_sync(&mut self, result: i32) -> Option<WriteAndSync> {
        if let Flight::Running { sync, .. } = &mut self.flight {
            *sync = Some(result);
        }
        self.settle()
    }

    /// Both results are in: answer the batch, or write the rest of a short write; returns
    /// the I/O to run next.
    fn settle(&mut self) -> Option<WriteAndSync> {
        let Flight::Running { written, write: Some(write), sync: Some(sync) } = self.flight else {
            return None;
        };
        let total = self.in_flight.bytes.len();
        if write < 0 || (write == 0 && written < total) {
            let e = if write < 0 {
                io::Error::from_raw_os_error(-write)
            } else {
                io::ErrorKind::WriteZero.into()
            };
            self.fail(format!("write failed: {e}"));
        } else if written + (write as usize) < total {
            // A short write: its linked sync was cancelled; the rest goes with a new sync.
            let written = written + write as usize;
            self.flight = Flight::Running { written, write: None, sync: None };
            return Some(self.io(written));
        } else if sync < 0 {
            self.fail(format!("fdatasync failed: {}", io::Error::from_raw_os_error(-sync)));
        } else {
            let batch = self.in_flight.waiters.len() as u64;
            self.stats.appends += batch;
            self.stats.syncs += 1;
            self.stats.bytes += total as u64;
            self.end += total as u64;
            for Waiter { deferred, offset, len } in self.in_flight.waiters.drain(..) {
                deferred.ok(&Appended { offset, len, batch });
            }
        }
        self.in_flight.bytes.clear();
        self.flight = Flight::Idle;
        self.poll()
    }

    fn fail(&mut self, why: String) {
        tracing::error!("durable append failed, the log file takes no more appends: {why}");
        for waiter in self.in_flight.waiters.drain(..).chain(self.next.waiters.drain(..)) {
            self.stats.failed += 1;
            waiter.deferred.error(HandlerError::internal(format!("append not durable: {why}")));
        }
        self.next.bytes.clear();
        self.failed = Some(why);
        self.truncate = Some(self.end);
    }

    /// After a failed batch, once: the length to cut the file back to (its last durable end),
    /// so that no byte of the batch stays in it. The driver truncates and syncs.
    pub fn take_truncate(&mut self) -> Option<u64> {
        self.truncate.take()
    }

    /// The counters.
    pub fn stats(&self) -> AppendStats {
        self.stats
    }
}

// SAFETY: the raw pointer only describes bytes owned by the machine for the driver.
unsafe impl Send for WriteAndSync {}

/// A file opened for durable appends (created if missing; appends go at its end).
///
/// Make one per core in [`Service::local`](crate::Service::local) (for example
/// `dir/core-N.log`): each core then commits its own appends with no lock shared with
/// other cores. Append with [`Ctx::append`](crate::Ctx::append).
///
/// Clones are handles to the same file (to read its [`stats`](Self::stats) from another
/// core, say); appends through any of them share one group commit.
#[derive(Clone)]
pub struct AppendFile {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").field("path", &self.path).finish_non_exhaustive()
    }
}

pub(crate) struct Shared {
    pub(crate) file: File,
    path: PathBuf,
    pub(crate) commit: Mutex<GroupCommit>,
    /// Wakes the thread driver.
    work: Condvar,
    /// The thread driver was started (the non-`uring` backends).
    thread: std::sync::OnceLock<()>,
    /// The core driver holds this file in its list of files to drive.
    pub(crate) queued: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for AppendFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendFile").field("path", &self.shared.path).finish_non_exhaustive()
    }
}

impl AppendFile {
    /// Opens (or creates) `path` for appends.
    ///
    /// # Errors
    /// The file cannot be opened or created (its directory missing, no permission).
    pub fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::open_at(path.as_ref(), false)
    }

    /// [`open`](Self::open) for a file of `\n`-terminated records: a last line without its
    /// `\n` (a write cut short by a crash; never acknowledged) is cut off, so the next
    /// record starts on a line of its own.
    ///
    /// # Errors
    /// As [`open`](Self::open), or the file cannot be read or cut.
    pub fn open_lines(path: impl AsRef<Path>) -> io::Result<Self> {
        Self::open_at(path.as_ref(), true)
    }

    fn open_at(path: &Path, lines: bool) -> io::Result<Self> {
        let path = path.to_path_buf();
        // O_APPEND: whatever offset a write names, the kernel puts it at the end, so even two
        // handles on one file (a misuse) could never overwrite acknowledged bytes.
        let file = OpenOptions::new().create(true).read(true).append(true).open(&path).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot open {} for appends: {e}", path.display()))
        })?;
        lock_exclusive(&file, &path)?;
        let mut end = file.metadata()?.len();
        if lines {
            let whole = end_of_last_line(&file, end)?;
            if whole < end {
                tracing::warn!(
                    "{}: cutting {} bytes of an unfinished last record (a write interrupted by a crash)",
                    path.display(),
                    end - whole
                );
                file.set_len(whole)?;
                file.sync_data()?;
                end = whole;
            }
        }
        // The file's own entry in its directory must be durable too, once.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir).and_then(|d| d.sync_all())?;
        }
        Ok(Self {
            shared: Arc::new(Shared {
                file,
                path,
                commit: Mutex::new(GroupCommit::new(end)),
                work: Condvar::new(),
                thread: std::sync::OnceLock::new(),
                queued: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Appends made durable, syncs, bytes, failures.
    pub fn stats(&self) -> AppendStats {
        lock(&self.shared.commit).stats()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Appends `bytes` and answers `deferred` on the file's own thread driver.
    pub(crate) fn append_threaded(&self, bytes: &[u8], deferred: Deferred) {
        lock(&self.shared.commit).append(bytes, deferred);
        self.shared.thread.get_or_init(|| {
            let shared = self.shared.clone();
            let name = format!("ringcall-sync-{}", self.shared.file.as_raw_fd());
            if let Err(e) = std::thread::Builder::new().name(name).spawn(move || sync_thread(&shared)) {
                tracing::error!("cannot start the sync thread of {}: {e}", self.shared.path.display());
            }
        });
        self.shared.work.notify_one();
    }
}

/// An exclusive lock on a directory of durable files (`flock` on its `.lock` file), held
/// until dropped: a service that owns a directory takes it at start-up, so a second process
/// started on the same directory stops with a clear error before it serves anything.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Locks `dir` (which must exist).
    ///
    /// # Errors
    /// Another process holds the lock ([`io::ErrorKind::AddrInUse`], naming the directory),
    /// or the lock file cannot be created.
    pub fn acquire(dir: impl AsRef<Path>) -> io::Result<Self> {
        let path = dir.as_ref().join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))?;
        lock_exclusive(&file, &path)?;
        Ok(Self { _file: file })
    }
}

/// Takes the exclusive `flock` of `file`, or says which file another process holds.
fn lock_exclusive(file: &File, path: &Path) -> io::Result<()> {
    // SAFETY: flock on a descriptor this function borrows.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is in use by another process (it holds the file's lock): two writers would each \
                 acknowledge offsets the other overwrites",
                path.display()
            ),
        ));
    }
    Err(io::Error::new(e.kind(), format!("cannot lock {}: {e}", path.display())))
}

/// The length of `file` up to and with its last `\n` (0 if none), reading back from `len`.
fn end_of_last_line(file: &File, len: u64) -> io::Result<u64> {
    let mut chunk = vec![0; 64 * 1024];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let piece = &mut chunk[..(end - start) as usize];
        file.read_exact_at(piece, start)?;
        if let Some(nl) = piece.iter().rposition(|&b| b == b'\n') {
            return Ok(start + nl as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// After a failed batch: cut the file back to its last durable end.
pub(crate) fn truncate_after_failure(shared: &Shared, commit: &mut GroupCommit) {
    if let Some(len) = commit.take_truncate() {
        let cut = shared.file.set_len(len).and_then(|()| shared.file.sync_data());
        match cut {
            Ok(()) => {
                tracing::warn!("{}: cut back to its last durable end, {len} bytes", shared.path.display())
            }
            Err(e) => tracing::error!(
                "{}: cannot cut the failed batch off ({e}); bytes past {len} were not acknowledged",
                shared.path.display()
            ),
        }
    }
}

pub(crate) fn lock(commit: &Mutex<GroupCommit>) -> MutexGuard<'_, GroupCommit> {
    // Every update leaves the machine consistent before anything that could panic.
    commit.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The thread driver: `pwrite` and `fdatasync` for each batch, until the file is dropped.
fn sync_thread(shared: &Arc<Shared>) {
    let mut commit = lock(&shared.commit);
    loop {
        let Some(mut io) = commit.poll() else {
            // When every handle of the file is gone (only this thread holds it), stop.
            if Arc::strong_count(shared) == 1 {
                return;
            }
            commit = shared
                .work
                .wait_timeout(commit, std::time::Duration::from_secs(1))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            continue;
        };
        loop {
            // The batch in flight is not touched by appenders (they fill the next one), so
            // its bytes stay put while the lock is released for the I/O.
            drop(commit);
            // SAFETY: `io` describes bytes of the batch in flight, unchanged until its
            // results are reported below.
            let bytes = unsafe { std::slice::from_raw_parts(io.ptr, io.len) };
            let write = match shared.file.write_at(bytes, io.offset) {
                Ok(n) => n as i32,
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            };
            let sync = if write as usize == io.len {
                match shared.file.sync_data() {
                    Ok(()) => 0,
                    Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
                }
            } else {
                -libc::ECANCELED
            };
            commit = lock(&shared.commit);
            commit.on_write(write);
            let next = commit.on_sync(sync);
            truncate_after_failure(shared, &mut commit);
            match next {
                Some(next) => io = next,
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::StatsRegistry;
    use ringcall_core::Output;

    /// Appends `n` records through `commit`, each answered into `out`.
    fn append(commit: &mut GroupCommit, out: &mut Output, stats: &StatsRegistry, record: &[u8]) {
        out.set_now(std::time::Instant::now());
        let deferred = out.defer(2001, None, None, stats.core(0));
        commit.append(record, deferred);
    }

    fn answers(out: &mut Output, stats: &StatsRegistry) -> String {
        out.take_completions(stats.core(0));
        let text = String::from_utf8(out.ready_bytes().to_vec()).unwrap();
        out.clear_ready();
        text
    }

    fn written(io: &WriteAndSync) -> &[u8] {
        // SAFETY: the machine keeps the batch unchanged until its results are reported.
        unsafe { std::slice::from_raw_parts(io.ptr, io.len) }
    }

    #[test]
    fn appends_that_arrive_during_a_sync_share_the_next_one() {
        let stats = StatsRegistry::new(1);
        let mut out = Output::default();
        let mut commit = GroupCommit::new(100);
        append(&mut commit, &mut out, &stats, b"a\n");
        let io = commit.poll().expect("a write and sync");
        assert_eq!((written(&io), io.offset), (&b"a\n"[..], 100));
        assert!(commit.poll().is_none(), "one batch in flight at a time");
        append(&mut commit, &mut out, &stats, b"bb\n");
        append(&mut commit, &mut out, &stats, b"ccc\n");
        assert!(commit.on_write(2).is_none(), "not durable before the sync");
        assert_eq!(answers(&mut out, &stats), "");
        let next = commit.on_sync(0).expect("the next batch goes at once");
        assert_eq!((written(&next), next.offset), (&b"bb\nccc\n"[..], 102));
        assert_eq!(
            answers(&mut out, &stats),
            "{\"code\":0,\"data\":{\"offset\":100,\"len\":2,\"batch\":1}}\n"
        );
        // Results may come in either order.
        assert!(commit.on_sync(0).is_none());
        assert!(commit.on_write(7).is_none());
        assert_eq!(
            answers(&mut out, &stats),
            "{\"code\":0,\"data\":{\"offset\":102,\"len\":3,\"batch\":2}}\n\
             {\"code\":0,\"data\":{\"offset\":105,\"len\":4,\"batch\":2}}\n"
        );
        assert_eq!(commit.stats(), AppendStats { appends: 3, syncs: 2, bytes: 9, failed: 0 });
        assert!(!commit.busy());
    }

    #[test]
    fn a_short_write_writes_the_rest_with_a_new_sync() {
        let stats = StatsRegistry::new(1);
        let mut out = Output::default();
        let mut commit = GroupCommit::new(0);
        append(&mut commit, &mut out, &stats, b"hello\n");
        commit.poll().unwrap();
        assert!(commit.on_write(2).is_none());
        let rest = commit.on_sync(-libc::ECANCELED).expect("the rest");
        assert_eq!((written(&rest), rest.offset), (&b"llo\n"[..], 2));
        commit.on_write(4);
        commit.on_sync(0);
        assert_eq!(answers(&mut out, &stats), "{\"code\":0,\"data\":{\"offset\":0,\"len\":6,\"batch\":1}}\n");
    }

    #[test]
    fn a_failed_sync_answers_500_and_the_file_takes_no_more_appends() {
        let stats = StatsRegistry::new(1);
        let mut out = Output::default();
        let mut commit = GroupCommit::new(0);
        append(&mut commit, &mut out, &stats, b"a\n");
        commit.poll().unwrap();
        append(&mut commit, &mut out, &stats, b"b\n");
        commit.on_write(2);
        assert!(commit.on_sync(-libc::EIO).is_none());
        append(&mut commit, &mut out, &stats, b"c\n");
        let text = answers(&mut out, &stats);
        assert_eq!(text.matches("\"code\":500").count(), 3, "{text}");
        assert!(text.contains("append not durable: fdatasync failed"), "{text}");
        assert!(text.contains("append refused: the log file failed earlier"), "{text}");
        assert_eq!(commit.stats().failed, 3);
    }

    #[test]
    fn a_failed_batch_asks_for_the_file_to_be_cut_back_to_its_durable_end() {
        let stats = StatsRegistry::new(1);
        let mut out = Output::default();
        let mut commit = GroupCommit::new(100);
        append(&mut commit, &mut out, &stats, b"kept\n");
        commit.poll().unwrap();
        commit.on_write(5);
        commit.on_sync(0);
        assert_eq!(commit.take_truncate(), None);
        append(&mut commit, &mut out, &stats, b"first\n");
        append(&mut commit, &mut out, &stats, b"second\n");
        commit.poll().unwrap();
        // The disk fills: part of the batch lands, the rest fails.
        assert!(commit.on_write(4).is_none());
        let rest = commit.on_sync(-libc::ECANCELED).expect("the rest");
        assert_eq!(rest.offset, 109);
        commit.on_write(-libc::ENOSPC);
        assert!(commit.on_sync(-libc::ECANCELED).is_none());
        assert_eq!(commit.take_truncate(), Some(105), "back to the end of the last durable batch");
        assert_eq!(commit.take_truncate(), None, "once");
        let text = answers(&mut out, &stats);
        assert_eq!(text.matches("\"code\":500").count(), 2, "{text}");
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ringcall-durable-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_file_is_locked_while_open_and_a_directory_by_its_lock() {
        let dir = scratch("lock");
        let path = dir.join("core-0.log");
        let first = AppendFile::open(&path).unwrap();
        let e = AppendFile::open(&path).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("core-0.log is in use by another process"), "{e}");
        drop(first);
        AppendFile::open(&path).expect("free again once closed");
        let held = DirLock::acquire(&dir).unwrap();
        let e = DirLock::acquire(&dir).unwrap_err();
        assert!(e.to_string().contains(".lock is in use by another process"), "{e}");
        drop(held);
        DirLock::acquire(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn open_lines_cuts_an_unfinished_last_record() {
        let dir = scratch("lines");
        let path = dir.join("core-0.log");
        std::fs::write(&path, b"one\ntwo\nthr").unwrap();
        let file = AppendFile::open_lines(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\n");
        assert_eq!(lock(&file.shared.commit).end, 8);
        drop(file);
        std::fs::write(&path, b"no newline at all").unwrap();
        drop(AppendFile::open_lines(&path).unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_thread_driver_makes_appends_durable_in_the_file() {
        let dir = std::env::temp_dir().join(format!("ringcall-durable-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("core-0.log");
        let _ = std::fs::remove_file(&path);
        let file = AppendFile::open(&path).unwrap();
        let stats = StatsRegistry::new(1);
        let mut out = Output::default();
        out.set_now(std::time::Instant::now());
        for record in [&b"one\n"[..], b"two\n"] {
            file.append_threaded(record, out.defer(2001, None, None, stats.core(0)));
        }
        while out.pending() > 0 {
            out.take_completions(stats.core(0));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(std::fs::read(&path).unwrap(), b"one\ntwo\n");
        assert_eq!(file.stats().appends, 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

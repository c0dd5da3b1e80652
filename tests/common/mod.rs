//! Shared helpers for the live-server tests: start a real server on 127.0.0.1:0 with any
//! backend, and a small blocking line client that asserts on raw bytes.

#![allow(dead_code, unused_macros)]

/// Generates one `#[test]` per backend for each test body, in a module per backend
/// (`uring::ping_echo_and_stats`, `epoll::ping_echo_and_stats`, …).
macro_rules! every_backend {
    ($($test:ident),* $(,)?) => {
        every_backend!(@backend uring, Uring, $($test),*);
        every_backend!(@backend tokio_uring, TokioUring, $($test),*);
        every_backend!(@backend epoll, Epoll, $($test),*);
        every_backend!(@backend epoll_mt, EpollMt, $($test),*);
    };
    (@backend $module:ident, $backend:ident, $($test:ident),*) => {
        mod $module {
            $(#[test] fn $test() { super::$test(ringcall::Backend::$backend) })*
        }
    };
}

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use ringcall::WorkerError;
use ringcall::{Backend, HandlerError, HandlerResult, Reply, Request, ServerError, ServerHandle};

/// Reports that the calling test did not run, and why: on the terminal even while the test
/// harness captures output (it captures `print!` and `eprint!`, not writes to the stderr
/// handle), so a reader of `cargo test` sees what was skipped. Where the environment sets
/// `required` (CI does), the missing requirement fails the test instead.
pub(crate) fn skip(required: &str, reason: &str) {
    assert!(std::env::var_os(required).is_none(), "{reason}, and {required} is set");
    let test = std::thread::current().name().unwrap_or("a test").to_owned();
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {reason}");
}

/// Failsafe so a broken server fails a test instead of hanging it; never a timing assertion.
const IO_TIMEOUT: Duration = Duration::from_secs(30);

fn fail(_request: &Request<'_, '_>, _reply: Reply<'_>) -> HandlerResult {
    Err(HandlerError::internal("disk on fire"))
}

/// Takes longer than any slow-request threshold the tests set.
pub(crate) const SLOW_HANDLER: Duration = Duration::from_millis(60);

fn slow(_request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    std::thread::sleep(SLOW_HANDLER);
    reply.str("done");
    Ok(())
}

fn explode(_request: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
    reply.raw(b"[1,2");
    panic!("handler bug");
}

ringcall::routes! {
    /// The shipped server's echo plus three misbehaving handlers.
    pub TestRoutes {
        10000 => ringcall::handlers::echo,
        9001 => fail,
        9002 => explode,
        9003 => slow,
    }
}

/// Starts a server for `backend`, or reports why this host cannot run it. A skip is printed
/// with its reason, and fails the test when RINGCALL_REQUIRE_ALL_BACKENDS is set (as CI does).
pub(crate) fn start_with(
    backend: Backend,
    configure: impl FnOnce(ringcall::ServerBuilder) -> ringcall::ServerBuilder,
) -> Option<ServerHandle> {
    start_service(backend, TestRoutes, configure)
}

/// [`start_with`] for any service.
pub(crate) fn start_service<S: ringcall::Service>(
    backend: Backend,
    service: S,
    configure: impl FnOnce(ringcall::ServerBuilder) -> ringcall::ServerBuilder,
) -> Option<ServerHandle> {
    let builder =
        ringcall::Server::builder().addr("127.0.0.1:0").backend(backend).threads(2).pin_threads(false);
    match configure(builder).start(service) {
        Ok(server) => Some(server),
        Err(e @ ServerError::Worker(WorkerError::IoUringUnavailable { .. })) => {
            skip("RINGCALL_REQUIRE_ALL_BACKENDS", &format!("backend {backend} cannot run on this host: {e}"));
            None
        }
        Err(e) => panic!("cannot start the {backend} server: {e}"),
    }
}

pub(crate) fn start(backend: Backend) -> Option<ServerHandle> {
    start_with(backend, |b| b)
}

/// A blocking connection that reads replies line by line.
pub(crate) struct Client {
    reader: BufReader<TcpStream>,
}

impl Client {
    pub(crate) fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Self { reader: BufReader::new(stream) }
    }

    pub(crate) fn send(&mut self, bytes: &[u8]) {
        self.reader.get_mut().write_all(bytes).expect("write");
    }

    /// The next reply line, with its `\n`.
    pub(crate) fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read reply");
        assert!(n > 0, "connection closed while a reply was expected");
        line
    }

    /// Sends one request line and returns its reply line.
    pub(crate) fn call(&mut self, request: &str) -> String {
        self.send(request.as_bytes());
        self.line()
    }

    /// Asserts the server closed the connection with nothing more to say.
    pub(crate) fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        match self.reader.read_to_end(&mut rest) {
            Ok(_) => assert!(
                rest.is_empty(),
                "unexpected bytes before close: {:?}",
                String::from_utf8_lossy(&rest)
            ),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => assert!(rest.is_empty()),
            Err(e) => panic!("expected the server to close, got {e}"),
        }
    }

    /// Closes with a reset (`SO_LINGER` 0), not a FIN: a peer that is gone, not one that
    /// half-closed and still reads.
    pub(crate) fn reset(mut self) {
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: a valid socket and a linger struct of the size given.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(self.stream()),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0);
    }

    pub(crate) fn shutdown_write(&mut self) {
        self.reader.get_ref().shutdown(Shutdown::Write).unwrap();
    }

    pub(crate) fn stream(&mut self) -> &mut TcpStream {
        self.reader.get_mut()
    }
}

/// Reads a numeric field out of the stats reply's `total` object.
pub(crate) fn total_stat(client: &mut Client, field: &str) -> u64 {
    let reply = client.call("{\"cmdid\":1}\n");
    let total = reply.split("\"total\":").nth(1).expect("stats reply has a total");
    let needle = format!("\"{field}\":");
    let start = total.find(&needle).expect("field present") + needle.len();
    total[start..].chars().take_while(char::is_ascii_digit).collect::<String>().parse().unwrap()
}

/// The hard open-file limit, after raising this process's soft limit to it.
pub(crate) fn raise_nofile() -> u64 {
    ringcall_sys::raise_nofile_limit().expect("raise RLIMIT_NOFILE")
}

/// Everything this test binary logs from now on, from any thread, at `level` and above (the
/// first call installs the subscriber and decides the level; later calls share it).
pub(crate) fn captured_log(level: tracing::Level) -> &'static std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    use std::sync::{Arc, Mutex, OnceLock};
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || LogWriter(sink.clone()))
            .init();
        log
    })
}

struct LogWriter(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

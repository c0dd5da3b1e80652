//! One persistent connection shared by many concurrent callers: each request gets a fresh
//! `id`, a reader task matches replies to callers by that id, and a caller learns whether its
//! request was written before the connection failed (a request whose line never fully
//! reached the server was never run: the server drops an unterminated line).
//!
//! Each connection asks for notices at connect: when the server is about to close it (a
//! shutdown, a connection's age), a notice line (or `"closing":true` on a reply) marks it
//! closing — the pool sends it nothing more, its outstanding replies still arrive, and once
//! the last caller lets go of it its write side closes, so the server can finish early.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use simd_json::prelude::*;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::client::{Call, ClientError, Response, decode_reply, encode_call};

/// How a call on a connection failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The request never reached the server whole: it did not run. Safe to send elsewhere.
    NotWritten(ClientError),
    /// The request was written; it may have run.
    Written(ClientError),
}

type Waiter = oneshot::Sender<Result<Response, ClientError>>;

/// A multiplexed connection.
type Writer = Box<dyn AsyncWrite + Send + Unpin>;
type Reader = BufReader<Box<dyn AsyncRead + Send + Unpin>>;

pub(crate) struct Mux {
    writer: tokio::sync::Mutex<Writer>,
    pending: Arc<Mutex<HashMap<u64, Waiter>>>,
    next_id: AtomicU64,
    closed: Arc<AtomicBool>,
    /// The server said it is closing this connection: send nothing new on it.
    closing: Arc<AtomicBool>,
}

impl Mux {
    /// Connects to `addr` within `timeout` and starts the reader task on the current runtime.
    pub(crate) async fn connect(
        addr: &str,
        timeout: Duration,
        tls: Option<&ringcall_core::ClientTls>,
        token: Option<&ringcall_core::HelloToken>,
    ) -> Result<Arc<Self>, ClientError> {
        let connect_err = |source| ClientError::Connect { addr: addr.to_owned(), source };
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(connect_err(e)),
            Err(_) => return Err(connect_err(std::io::Error::from(std::io::ErrorKind::TimedOut))),
        };
        let _ = stream.set_nodelay(true);
        let (read, write): (Box<dyn AsyncRead + Send + Unpin>, Writer) = match tls {
            None => {
                let (read, write) = stream.into_split();
                (Box::new(read), Box::new(write))
            }
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(tls.config());
                let handshake = connector.connect(tls.server_name().clone(), stream);
                let stream = match tokio::time::timeout(timeout, handshake).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return Err(connect_err(e)),
                    Err(_) => return Err(connect_err(std::io::Error::from(std::io::ErrorKind::TimedOut))),
                };
                let (read, write) = tokio::io::split(stream);
                (Box::new(read), Box::new(write))
            }
        };
        let mux = Arc::new(Self {
            writer: tokio::sync::Mutex::new(write),
            pending: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(1),
            closed: Arc::new(AtomicBool::new(false)),
            closing: Arc::new(AtomicBool::new(false)),
        });
        let (pending, closed, closing) = (mux.pending.clone(), mux.closed.clone(), mux.closing.clone());
        tokio::spawn(read_replies(BufReader::new(read), pending, closed, closing));
        if let Some(token) = token {
            let refused = |why: String| {
                mux.close();
                connect_err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, why))
            };
            match mux.call(&crate::client::Call::hello(token), None).await {
                Ok(response) if response.code == 0 => {}
                Ok(response) => {
                    let why = response.error.unwrap_or_default();
                    return Err(refused(format!("the server refused the token hello: {why}")));
                }
                Err(Failure::NotWritten(e) | Failure::Written(e)) => {
                    return Err(refused(format!("the token hello failed: {e}")));
                }
            }
        }
        // A server without notices answers 404: the connection works, untold.
        if let Err(Failure::NotWritten(e) | Failure::Written(e)) =
            mux.call(&crate::client::Call::notices(), None).await
        {
            mux.close();
            return Err(connect_err(std::io::Error::other(format!("asking for notices failed: {e}"))));
        }
        Ok(mux)
    }

    /// Whether the server said it is closing the connection (or it closed): nothing new
    /// goes on it.
    pub(crate) fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire) || self.is_closed()
    }

    /// Whether the connection has failed or closed.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Requests sent and not answered yet.
    pub(crate) fn in_flight(&self) -> usize {
        lock(&self.pending).len()
    }

    /// Sends `call` (with `timeout_ms` if given) and waits for its reply.
    pub(crate) async fn call(&self, call: &Call, timeout_ms: Option<u64>) -> Result<Response, Failure> {
        if self.is_closed() {
            return Err(Failure::NotWritten(ClientError::Broken));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut line = Vec::with_capacity(64);
        encode_call(&mut line, call, id);
        if let Some(ms) = timeout_ms {
            // `..,"timeout_ms":N}\n`: the deadline travels with the request.
            line.truncate(line.len() - 2);
            line.extend_from_slice(b",\"timeout_ms\":");
            line.extend_from_slice(itoa::Buffer::new().format(ms).as_bytes());
            line.extend_from_slice(b"}\n");
        }
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, tx);
        let written = {
            let mut writer = self.writer.lock().await;
            match writer.write_all(&line).await {
                // A TLS stream holds what it encrypted until flushed.
                Ok(()) => writer.flush().await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = written {
            lock(&self.pending).remove(&id);
            self.closed.store(true, Ordering::Release);
            // Part of the line may have gone out; without its newline it is not a request.
            return Err(Failure::NotWritten(ClientError::Io(e)));
        }
        match rx.await {
            Ok(Ok(response)) => Ok(response),
            // The server refused the connection before reading anything (its core was full).
            Ok(Err(e @ ClientError::Server { code: 503, .. })) => Err(Failure::NotWritten(e)),
            Ok(Err(e)) => Err(Failure::Written(e)),
            Err(_) => Err(Failure::Written(ClientError::Closed("before the reply"))),
        }
    }

    /// Fails the calls still waiting (the caller gave up on the connection).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for (_, waiter) in lock(&self.pending).drain() {
            let _ = waiter.send(Err(ClientError::Closed("by the pool")));
        }
    }
}

fn lock(pending: &Mutex<HashMap<u64, Waiter>>) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
    pending.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Reads replies until the connection ends, handing each to the caller its id names; then
/// fails every call still waiting.
async fn read_replies(
    mut read: Reader,
    pending: Arc<Mutex<HashMap<u64, Waiter>>>,
    closed: Arc<AtomicBool>,
    closing: Arc<AtomicBool>,
) {
    let mut line = Vec::new();
    let why = loop {
        line.clear();
        match read.read_until(b'\n', &mut line).await {
            Ok(0) => break ClientError::Closed("before the reply"),
            Ok(_) if line.last() != Some(&b'\n') => break ClientError::Closed("in the middle of a reply"),
            Ok(_) => {}
            Err(e) => break ClientError::Io(e),
        }
        let (id, notice) = reply_id(&mut line.clone());
        if notice {
            closing.store(true, Ordering::Release);
        }
        if notice && id.is_none() {
            // A notice line answers no request.
            continue;
        }
        let Some(id) = id else {
            // A reply without an id answers no request of ours: a 503 refusal (the server's
            // core was full: nothing it was sent ran) or a 413. It closes the connection.
            break match decode_reply(&mut line, None) {
                Ok(r) if r.code == 503 => {
                    ClientError::Server { code: 503, message: r.error.unwrap_or_default() }
                }
                Ok(r) => ClientError::Protocol(format!(
                    "a reply without an id: {} {}",
                    r.code,
                    r.error.unwrap_or_default()
                )),
                Err(e) => e,
            };
        };
        let waiter = lock(&pending).remove(&id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(decode_reply(&mut line, Some(id)));
        }
    };
    closed.store(true, Ordering::Release);
    let message = why.to_string();
    for (_, waiter) in lock(&pending).drain() {
        let _ = waiter.send(Err(match &why {
            ClientError::Closed(what) => ClientError::Closed(what),
            ClientError::Server { code, message } => {
                ClientError::Server { code: *code, message: message.clone() }
            }
            _ => ClientError::Protocol(message.clone()),
        }));
    }
}

/// The reply's id, and whether the line says the server is closing the connection (a
/// notice line, or `"closing":true` on a reply).
fn reply_id(line: &mut [u8]) -> (Option<u64>, bool) {
    let Ok(value) = simd_json::to_owned_value(line) else {
        return (None, false);
    };
    let notice = value.get("notice").and_then(|n| n.as_str()) == Some("closing")
        || value.get("closing").and_then(|c| c.as_bool()) == Some(true);
    (value.get("id").and_then(|id| id.as_u64()), notice)
}

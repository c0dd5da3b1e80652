//! Clients for the ringcall protocol: [`Client`] (blocking, `std::net`) and [`AsyncClient`]
//! (tokio). Both keep one persistent connection, tag every request with an `id` and check
//! that each reply carries the id it answers, and pipeline batches (send them all, then
//! read the replies in order).
//!
//! Nothing is ever resent behind the caller's back: after a timeout or a broken connection
//! the client refuses further calls until [`Client::reconnect`] is called, because a reply
//! may still be on its way and resending could run a request twice.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use simd_json::OwnedValue;
use simd_json::prelude::*;

/// Default time to wait for a connection or a reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// What can go wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection could not be made.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// No reply (or no connection) within the timeout. The connection is then unusable.
    #[error("no reply within {0:?}; call reconnect() before the next request")]
    Timeout(Duration),
    /// The server answered with an error code.
    #[error("server replied {code}: {message}")]
    Server {
        /// The reply's code (400, 404, 413, 500, 503, …).
        code: u16,
        /// The reply's error message.
        message: String,
    },
    /// The server closed the connection before (or in the middle of) a reply.
    #[error("the server closed the connection {0}")]
    Closed(&'static str),
    /// The params are not a JSON object.
    #[error("params must be a JSON object: {0}")]
    Params(String),
    /// The reply is not a protocol v1 reply, or answers another request.
    #[error("invalid reply: {0}")]
    Protocol(String),
    /// The connection failed earlier; reconnect first.
    #[error("the connection is unusable after an earlier error; call reconnect()")]
    Broken,
    /// Any other socket error.
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// One reply, as the server sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// 0 on success, else the error code.
    pub code: u16,
    /// `data` on success (`null` otherwise).
    pub data: OwnedValue,
    /// `error` on failure.
    pub error: Option<String>,
}

impl Response {
    /// `Ok(data)` on code 0, else [`ClientError::Server`].
    pub fn into_result(self) -> Result<OwnedValue, ClientError> {
        if self.code == 0 {
            Ok(self.data)
        } else {
            Err(ClientError::Server { code: self.code, message: self.error.unwrap_or_default() })
        }
    }
}

/// A request to send: a cmdid and its params (a JSON object, or `None` for none).
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// The command.
    pub cmdid: u32,
    /// The params object.
    pub params: Option<OwnedValue>,
}

impl Call {
    /// A call with no params.
    pub fn new(cmdid: u32) -> Self {
        Self { cmdid, params: None }
    }

    /// The hello presenting `token` ([`HelloToken`](ringcall_core::HelloToken)).
    pub fn hello(token: &ringcall_core::HelloToken) -> Self {
        let mut params = simd_json::owned::Object::new();
        params.insert("token".into(), OwnedValue::from(token.as_str()));
        Self { cmdid: ringcall_core::HELLO, params: Some(OwnedValue::from(params)) }
    }

    /// The capabilities request asking for notice lines on this connection
    /// ([`CAPABILITIES`](ringcall_core::CAPABILITIES)): the server then tells the client
    /// before it closes the connection (docs/protocol.md).
    pub fn notices() -> Self {
        let mut params = simd_json::owned::Object::new();
        params.insert("notices".into(), OwnedValue::from(true));
        Self { cmdid: ringcall_core::CAPABILITIES, params: Some(OwnedValue::from(params)) }
    }

    /// A call whose params are given as JSON text (must be an object).
    ///
    /// # Errors
    /// The text is not a JSON object.
    pub fn with_json(cmdid: u32, params: &str) -> Result<Self, ClientError> {
        let mut bytes = params.as_bytes().to_vec();
        let value = simd_json::to_owned_value(&mut bytes).map_err(|e| {
            ClientError::Params(format!(
                "{params:?} is not JSON (at byte {}: {}); write an object such as '{{\"name\":\"value\"}}'",
                e.index(),
                ringcall_core::json_error(&e)
            ))
        })?;
        if !value.is_object() {
            return Err(ClientError::Params(format!("got {}", value.value_type_name())));
        }
        Ok(Self { cmdid, params: Some(value) })
    }

    /// A call whose params are any serializable value (must serialize to an object).
    ///
    /// # Errors
    /// The value does not serialize to a JSON object.
    pub fn with_params<T: serde::Serialize + ?Sized>(cmdid: u32, params: &T) -> Result<Self, ClientError> {
        let value =
            simd_json::serde::to_owned_value(params).map_err(|e| ClientError::Params(e.to_string()))?;
        if !value.is_object() {
            return Err(ClientError::Params(format!("got {}", value.value_type_name())));
        }
        Ok(Self { cmdid, params: Some(value) })
    }
}

trait TypeName {
    fn value_type_name(&self) -> &'static str;
}

impl TypeName for OwnedValue {
    fn value_type_name(&self) -> &'static str {
        match self.value_type() {
            ValueType::Null => "null",
            ValueType::Bool => "a bool",
            ValueType::String => "a string",
            ValueType::Array => "an array",
            ValueType::Object => "an object",
            _ => "a number",
        }
    }
}

/// Appends `call` as one request line with the given `id`.
pub fn encode_call(out: &mut Vec<u8>, call: &Call, id: u64) {
    out.extend_from_slice(b"{\"cmdid\":");
    out.extend_from_slice(itoa::Buffer::new().format(call.cmdid).as_bytes());
    out.extend_from_slice(b",\"id\":");
    out.extend_from_slice(itoa::Buffer::new().format(id).as_bytes());
    if let Some(params) = &call.params {
        out.extend_from_slice(b",\"params\":");
        // Compact encoding never contains a raw newline, so the frame stays one line.
        let _ = params.write(out);
    }
    out.extend_from_slice(b"}\n");
}

/// Parses one reply line and checks that it answers request `expected_id`.
///
/// # Errors
/// The line is not a protocol v1 reply, or carries another id.
pub fn decode_reply(line: &mut [u8], expected_id: Option<u64>) -> Result<Response, ClientError> {
    let shown = String::from_utf8_lossy(line).trim_end().to_owned();
    let value =
        simd_json::to_owned_value(line).map_err(|e| ClientError::Protocol(format!("{e}: {shown}")))?;
    let code = value
        .get("code")
        .and_then(|c| c.as_u64())
        .and_then(|c| u16::try_from(c).ok())
        .ok_or_else(|| ClientError::Protocol(format!("no code: {shown}")))?;
    if let Some(expected) = expected_id {
        let id = value.get("id").and_then(|i| i.as_u64());
        // A reply to a request the server could not read (e.g. 413) may have no id.
        if id.is_some_and(|id| id != expected) || (id.is_none() && code == 0) {
            return Err(ClientError::Protocol(format!("expected the reply to id {expected}, got {shown}")));
        }
    }
    let error = value.get("error").and_then(|e| e.as_str()).map(str::to_owned);
    let data = value.get("data").cloned().unwrap_or_default();
    Ok(Response { code, data, error })
}

/// The connection-independent half of both clients: ids, the encoded batch, the reply line.
#[derive(Debug)]
struct Wire {
    next_id: u64,
    broken: bool,
    line: Vec<u8>,
    out: Vec<u8>,
}

impl Wire {
    fn new() -> Self {
        Self { next_id: 1, broken: false, line: Vec::new(), out: Vec::new() }
    }

    /// Encodes `calls` into `out` with fresh ids; returns the first id.
    fn encode(&mut self, calls: &[Call]) -> u64 {
        let first_id = self.next_id;
        self.next_id += calls.len() as u64;
        self.out.clear();
        for (i, call) in calls.iter().enumerate() {
            encode_call(&mut self.out, call, first_id + i as u64);
        }
        first_id
    }

    /// Decodes the line just read (`n` bytes) as the reply to `id`.
    fn decode(&mut self, n: usize, id: u64) -> Result<Response, ClientError> {
        if n == 0 {
            return Err(ClientError::Closed("before the reply"));
        }
        if self.line.last() != Some(&b'\n') {
            return Err(ClientError::Closed("in the middle of a reply"));
        }
        decode_reply(&mut self.line, Some(id))
    }
}

fn map_read_error(e: io::Error, timeout: Duration) -> ClientError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout(timeout),
        _ => ClientError::Io(e),
    }
}

/// A blocking client on one persistent connection.
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    timeout: Duration,
    reader: BufReader<Stream>,
    wire: Wire,
    tls: Option<ringcall_core::ClientTls>,
    token: Option<ringcall_core::HelloToken>,
}

/// The blocking client's connection: plain TCP, or TLS over it.
#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl io::Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    let connect_err = |source| ClientError::Connect { addr: addr.to_owned(), source };
    addr.to_socket_addrs()
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| connect_err(io::Error::new(io::ErrorKind::NotFound, "no address")))
}

impl Client {
    /// Connects with the default timeout.
    ///
    /// # Errors
    /// The address does not resolve or the connection fails.
    pub fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_timeout(addr, DEFAULT_TIMEOUT)
    }

    /// Connects; `timeout` bounds the connection and every reply.
    ///
    /// # Errors
    /// The address does not resolve or the connection fails.
    pub fn connect_timeout(addr: &str, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_with(addr, timeout, None)
    }

    /// Connects over TLS ([`ClientTls`](ringcall_core::ClientTls): the CA to trust, the
    /// server's name, the client's certificate for mutual TLS); `timeout` bounds the
    /// connection and every reply.
    ///
    /// # Errors
    /// The address does not resolve or the connection fails (a failed handshake shows at the
    /// first call).
    pub fn connect_tls(
        addr: &str,
        timeout: Duration,
        tls: ringcall_core::ClientTls,
    ) -> Result<Self, ClientError> {
        Self::connect_with(addr, timeout, Some(tls))
    }

    fn connect_with(
        addr: &str,
        timeout: Duration,
        tls: Option<ringcall_core::ClientTls>,
    ) -> Result<Self, ClientError> {
        let addr = resolve(addr)?;
        let stream = Self::open(addr, timeout, tls.as_ref())?;
        Ok(Self { addr, timeout, reader: BufReader::new(stream), wire: Wire::new(), tls, token: None })
    }

    fn open(
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<&ringcall_core::ClientTls>,
    ) -> Result<Stream, ClientError> {
        let connect_err = |source| ClientError::Connect { addr: addr.to_string(), source };
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(connect_err)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(match tls {
            None => Stream::Plain(stream),
            Some(tls) => {
                let session = rustls::ClientConnection::new(tls.config(), tls.server_name().clone())
                    .map_err(|e| ClientError::Io(io::Error::other(e)))?;
                Stream::Tls(Box::new(rustls::StreamOwned::new(session, stream)))
            }
        })
    }

    /// Drops the connection and opens a new one (the only way past a timeout or error).
    ///
    /// # Errors
    /// The new connection fails.
    pub fn reconnect(&mut self) -> Result<(), ClientError> {
        self.reader = BufReader::new(Self::open(self.addr, self.timeout, self.tls.as_ref())?);
        self.wire.broken = false;
        match self.token.clone() {
            Some(token) => self.hello(&token),
            None => Ok(()),
        }
    }

    /// Presents `token` (the server's `--token-file`) as this connection's first line, and
    /// again after every [`reconnect`](Self::reconnect).
    ///
    /// # Errors
    /// The server refused the token (`Server { code: 401, .. }`; it closes the connection),
    /// or the connection failed.
    pub fn with_token(mut self, token: ringcall_core::HelloToken) -> Result<Self, ClientError> {
        self.hello(&token)?;
        self.token = Some(token);
        Ok(self)
    }

    fn hello(&mut self, token: &ringcall_core::HelloToken) -> Result<(), ClientError> {
        self.send(&Call::hello(token))?.into_result().map(drop)
    }

    /// Calls `cmdid` with `params` (any value serializing to an object) and returns `data`.
    ///
    /// # Errors
    /// The server replied with an error code, or the connection failed.
    pub fn call<T: serde::Serialize + ?Sized>(
        &mut self,
        cmdid: u32,
        params: &T,
    ) -> Result<OwnedValue, ClientError> {
        self.send(&Call::with_params(cmdid, params)?)?.into_result()
    }

    /// Sends one call and returns its reply, error codes included.
    ///
    /// # Errors
    /// The connection failed or the reply is invalid.
    pub fn send(&mut self, call: &Call) -> Result<Response, ClientError> {
        let mut replies = self.pipeline(std::slice::from_ref(call))?;
        Ok(replies.pop().expect("one reply per call"))
    }

    /// Sends every call in one write, then reads their replies, in order.
    ///
    /// # Errors
    /// The connection failed or a reply is invalid; replies read before that are lost with
    /// the connection, which must be reconnected.
    pub fn pipeline(&mut self, calls: &[Call]) -> Result<Vec<Response>, ClientError> {
        if self.wire.broken {
            return Err(ClientError::Broken);
        }
        let result = self.pipeline_inner(calls);
        if result.is_err() {
            self.wire.broken = true;
        }
        result
    }

    fn pipeline_inner(&mut self, calls: &[Call]) -> Result<Vec<Response>, ClientError> {
        let first_id = self.wire.encode(calls);
        self.reader.get_mut().write_all(&self.wire.out).map_err(|e| map_read_error(e, self.timeout))?;
        let mut replies = Vec::with_capacity(calls.len());
        for id in first_id..first_id + calls.len() as u64 {
            self.wire.line.clear();
            let n = self
                .reader
                .read_until(b'\n', &mut self.wire.line)
                .map_err(|e| map_read_error(e, self.timeout))?;
            replies.push(self.wire.decode(n, id)?);
        }
        Ok(replies)
    }
}

/// An async (tokio) client on one persistent connection.
#[derive(Debug)]
pub struct AsyncClient {
    addr: SocketAddr,
    timeout: Duration,
    stream: tokio::io::BufStream<Box<dyn AsyncIo>>,
    wire: Wire,
    tls: Option<ringcall_core::ClientTls>,
    token: Option<ringcall_core::HelloToken>,
}

/// The async client's connection: plain TCP, or TLS over it.
trait AsyncIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + std::fmt::Debug {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + std::fmt::Debug> AsyncIo for T {}

impl AsyncClient {
    /// Connects with the default timeout.
    ///
    /// # Errors
    /// The address does not resolve or the connection fails.
    pub async fn connect(addr: &str) -> Result<Self, ClientError> {
        Self::connect_timeout(addr, DEFAULT_TIMEOUT).await
    }

    /// Connects; `timeout` bounds the connection and every reply.
    ///
    /// # Errors
    /// The address does not resolve or the connection fails.
    pub async fn connect_timeout(addr: &str, timeout: Duration) -> Result<Self, ClientError> {
        Self::connect_with(addr, timeout, None).await
    }

    /// Connects over TLS, as [`Client::connect_tls`]; here the handshake is done before this
    /// returns, so a refused certificate fails the connection.
    ///
    /// # Errors
    /// The address does not resolve, the connection fails or the handshake fails.
    pub async fn connect_tls(
        addr: &str,
        timeout: Duration,
        tls: ringcall_core::ClientTls,
    ) -> Result<Self, ClientError> {
        Self::connect_with(addr, timeout, Some(tls)).await
    }

    async fn connect_with(
        addr: &str,
        timeout: Duration,
        tls: Option<ringcall_core::ClientTls>,
    ) -> Result<Self, ClientError> {
        let addr = resolve(addr)?;
        let stream = Self::open(addr, timeout, tls.as_ref()).await?;
        Ok(Self { addr, timeout, stream, wire: Wire::new(), tls, token: None })
    }

    async fn open(
        addr: SocketAddr,
        timeout: Duration,
        tls: Option<&ringcall_core::ClientTls>,
    ) -> Result<tokio::io::BufStream<Box<dyn AsyncIo>>, ClientError> {
        let connect_err = |source| ClientError::Connect { addr: addr.to_string(), source };
        let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout(timeout))?
            .map_err(connect_err)?;
        stream.set_nodelay(true)?;
        let stream: Box<dyn AsyncIo> = match tls {
            None => Box::new(stream),
            Some(tls) => {
                let connector = tokio_rustls::TlsConnector::from(tls.config());
                let handshake = connector.connect(tls.server_name().clone(), stream);
                Box::new(
                    tokio::time::timeout(timeout, handshake)
                        .await
                        .map_err(|_| ClientError::Timeout(timeout))?
                        .map_err(connect_err)?,
                )
            }
        };
        Ok(tokio::io::BufStream::new(stream))
    }

    /// Drops the connection and opens a new one.
    ///
    /// # Errors
    /// The new connection fails.
    pub async fn reconnect(&mut self) -> Result<(), ClientError> {
        self.stream = Self::open(self.addr, self.timeout, self.tls.as_ref()).await?;
        self.wire.broken = false;
        match self.token.clone() {
            Some(token) => self.hello(&token).await,
            None => Ok(()),
        }
    }

    /// Presents `token` as this connection's first line, as [`Client::with_token`].
    ///
    /// # Errors
    /// As [`Client::with_token`].
    pub async fn with_token(mut self, token: ringcall_core::HelloToken) -> Result<Self, ClientError> {
        self.hello(&token).await?;
        self.token = Some(token);
        Ok(self)
    }

    async fn hello(&mut self, token: &ringcall_core::HelloToken) -> Result<(), ClientError> {
        self.send(&Call::hello(token)).await?.into_result().map(drop)
    }

    /// Calls `cmdid` with `params` and returns `data`.
    ///
    /// # Errors
    /// The server replied with an error code, or the connection failed.
    pub async fn call<T: serde::Serialize + ?Sized>(
        &mut self,
        cmdid: u32,
        params: &T,
    ) -> Result<OwnedValue, ClientError> {
        self.send(&Call::with_params(cmdid, params)?).await?.into_result()
    }

    /// Sends one call and returns its reply, error codes included.
    ///
    /// # Errors
    /// The connection failed or the reply is invalid.
    pub async fn send(&mut self, call: &Call) -> Result<Response, ClientError> {
        let mut replies = self.pipeline(std::slice::from_ref(call)).await?;
        Ok(replies.pop().expect("one reply per call"))
    }

    /// Sends every call in one write, then reads their replies, in order.
    ///
    /// # Errors
    /// As [`Client::pipeline`].
    pub async fn pipeline(&mut self, calls: &[Call]) -> Result<Vec<Response>, ClientError> {
        if self.wire.broken {
            return Err(ClientError::Broken);
        }
        let timeout = self.timeout;
        let result = match tokio::time::timeout(timeout, self.pipeline_inner(calls)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout(timeout)),
        };
        if result.is_err() {
            self.wire.broken = true;
        }
        result
    }

    async fn pipeline_inner(&mut self, calls: &[Call]) -> Result<Vec<Response>, ClientError> {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
        let first_id = self.wire.encode(calls);
        self.stream.write_all(&self.wire.out).await?;
        self.stream.flush().await?;
        let mut replies = Vec::with_capacity(calls.len());
        for id in first_id..first_id + calls.len() as u64 {
            self.wire.line.clear();
            let n = self.stream.read_until(b'\n', &mut self.wire.line).await?;
            replies.push(self.wire.decode(n, id)?);
        }
        Ok(replies)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_one_compact_line() {
        let mut out = Vec::new();
        encode_call(&mut out, &Call::with_json(10000, "{\n \"a\": [1, 2]\n}").unwrap(), 7);
        assert_eq!(out, b"{\"cmdid\":10000,\"id\":7,\"params\":{\"a\":[1,2]}}\n");
        out.clear();
        encode_call(&mut out, &Call::new(0), 8);
        assert_eq!(out, b"{\"cmdid\":0,\"id\":8}\n");
    }

    #[test]
    fn rejects_params_that_are_not_objects() {
        assert!(matches!(Call::with_json(1, "[1]"), Err(ClientError::Params(_))));
        assert!(matches!(Call::with_json(1, "{"), Err(ClientError::Params(_))));
        assert!(matches!(Call::with_params(1, &5), Err(ClientError::Params(_))));
    }

    #[test]
    fn decodes_replies_and_checks_ids() {
        let mut ok = b"{\"code\":0,\"id\":3,\"data\":{\"x\":1}}\n".to_vec();
        let reply = decode_reply(&mut ok, Some(3)).unwrap();
        assert_eq!(reply.code, 0);
        assert_eq!(reply.data.get("x").and_then(|x| x.as_u64()), Some(1));
        let mut wrong = b"{\"code\":0,\"id\":4,\"data\":null}\n".to_vec();
        assert!(matches!(decode_reply(&mut wrong, Some(3)), Err(ClientError::Protocol(_))));
        let mut err = b"{\"code\":404,\"id\":3,\"error\":\"unknown cmdid 9\"}\n".to_vec();
        let reply = decode_reply(&mut err, Some(3)).unwrap();
        assert!(matches!(reply.into_result(), Err(ClientError::Server { code: 404, .. })));
        let mut too_long = b"{\"code\":413,\"error\":\"too long\"}\n".to_vec();
        assert_eq!(decode_reply(&mut too_long, Some(3)).unwrap().code, 413);
    }
}

//! TLS on every backend, against the real server: a rustls client and `openssl s_client`
//! (the system tool, as a user would try it) get their replies, large pipelined replies
//! cross many TLS records intact, a plain-TCP client on the TLS port is closed without a
//! reply and without disturbing anyone, and a bad certificate or key is refused at start-up
//! with the file named. Certificates are made by the test (rcgen).

#[macro_use]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{TestRoutes, start_service};
use ringcall::Backend;
use ringcall::simd_json::prelude::*;
use ringcall::{TlsConfig, TlsError};

/// A self-signed certificate for `localhost` and 127.0.0.1, written to a directory of its own.
struct Certs {
    dir: PathBuf,
    cert_pem: String,
}

impl Certs {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ringcall-tls-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        std::fs::write(dir.join("cert.pem"), made.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), made.key_pair.serialize_pem()).unwrap();
        Self { dir, cert_pem: made.cert.pem() }
    }

    fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    fn config(&self) -> TlsConfig {
        TlsConfig::from_pem_files(&self.cert(), &self.key()).unwrap()
    }

    /// A rustls client that trusts this certificate only.
    fn client(
        &self,
        addr: std::net::SocketAddr,
    ) -> BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap())
            .unwrap();
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let session =
            rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        BufReader::new(rustls::StreamOwned::new(session, tcp))
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn line(client: &mut impl BufRead) -> String {
    let mut line = String::new();
    client.read_line(&mut line).unwrap();
    line
}

fn tls_round_trips_and_plain_clients_are_closed(backend: Backend) {
    let certs = Certs::new(backend.name());
    let Some(server) = start_service(backend, TestRoutes, |b| b.tls(certs.config())) else { return };
    let addr = server.local_addr();
    let mut client = certs.client(addr);
    client.get_mut().write_all(b"{\"cmdid\":0}\n").unwrap();
    assert_eq!(line(&mut client), "{\"code\":0,\"data\":\"pong\"}\n");
    // Pipelined replies much larger than a TLS record (16 KiB).
    let big = "x".repeat(40_000);
    let batch: String =
        (0..20).map(|i| format!("{{\"cmdid\":10000,\"id\":{i},\"params\":{{\"v\":\"{big}\"}}}}\n")).collect();
    client.get_mut().write_all(batch.as_bytes()).unwrap();
    for i in 0..20 {
        assert_eq!(line(&mut client), format!("{{\"code\":0,\"id\":{i},\"data\":{{\"v\":\"{big}\"}}}}\n"));
    }

    // Plain text on the TLS port: closed, with nothing that looks like a reply.
    let mut plain = TcpStream::connect(addr).unwrap();
    plain.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    plain.write_all(b"{\"cmdid\":0}\n").unwrap();
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(!String::from_utf8_lossy(&got).contains("pong"), "{got:?}");
    // The TLS client never noticed.
    client.get_mut().write_all(b"{\"cmdid\":0}\n").unwrap();
    assert_eq!(line(&mut client), "{\"code\":0,\"data\":\"pong\"}\n");

    // The system's openssl, as a user would try it.
    let mut openssl = Command::new("openssl")
        .args(["s_client", "-quiet", "-verify_return_error", "-servername", "localhost", "-connect"])
        .arg(addr.to_string())
        .arg("-CAfile")
        .arg(certs.cert())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl");
    openssl
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"{\"cmdid\":10000,\"params\":{\"via\":\"openssl\"}}\n")
        .unwrap();
    let mut reply = String::new();
    BufReader::new(openssl.stdout.take().unwrap()).read_line(&mut reply).unwrap();
    let _ = openssl.kill();
    let _ = openssl.wait();
    assert_eq!(reply, "{\"code\":0,\"data\":{\"via\":\"openssl\"}}\n");
}

/// A TLS client over the core's connection limit reads the 503 inside its TLS session (a
/// plain-text line would be a protocol error to it), then the close; a peer that opens a
/// connection and never finishes its handshake is closed at the hello timeout, so such
/// peers cannot keep legitimate clients out.
fn tls_refusals_are_readable_and_half_done_handshakes_time_out(backend: Backend) {
    let certs = Certs::new(&format!("{}-limits", backend.name()));
    let Some(server) = start_service(backend, TestRoutes, |b| {
        b.tls(certs.config()).threads(1).max_connections_per_core(2).hello_timeout(Duration::from_secs(2))
    }) else {
        return;
    };
    let addr = server.local_addr();
    let mut kept = certs.client(addr);
    kept.get_mut().write_all(b"{\"cmdid\":0}\n").unwrap();
    assert_eq!(line(&mut kept), "{\"code\":0,\"data\":\"pong\"}\n");
    // A TCP connection that never starts its handshake holds the second place...
    let mut half_open = TcpStream::connect(addr).unwrap();
    half_open.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut over = certs.client(addr);
    // ...so this one is over the limit: it is told so in TLS, then closed.
    over.get_mut().write_all(b"{\"cmdid\":0}\n").unwrap();
    assert_eq!(
        line(&mut over),
        "{\"code\":503,\"error\":\"too many connections on this core; retry later\"}\n"
    );
    assert_eq!(line(&mut over), "", "closed after the refusal");
    // The half-open one is closed at the hello timeout, which frees its place.
    let mut got = Vec::new();
    let _ = half_open.read_to_end(&mut got);
    assert!(got.is_empty(), "{got:?}");
    let mut after = loop {
        let mut c = certs.client(addr);
        c.get_mut().write_all(b"{\"cmdid\":0}\n").unwrap();
        let reply = line(&mut c);
        if reply == "{\"code\":0,\"data\":\"pong\"}\n" {
            break c;
        }
        // The server may not have seen the half-open close yet: refused, try again.
        assert!(reply.starts_with("{\"code\":503"), "{reply}");
        std::thread::sleep(Duration::from_millis(10));
    };
    after.get_mut().write_all(b"{\"cmdid\":0}\n").unwrap();
    assert_eq!(line(&mut after), "{\"code\":0,\"data\":\"pong\"}\n");
    let stats = server.stats().total();
    assert!(stats.hello_timeouts >= 1 && stats.rejected_connections >= 1, "{stats:?}");
}

#[test]
fn a_bad_certificate_or_key_is_refused_naming_the_file() {
    let certs = Certs::new("errors");
    let missing = certs.dir.join("nope.pem");
    let e = TlsConfig::from_pem_files(&missing, &certs.key()).unwrap_err();
    assert!(matches!(e, TlsError::Read { .. }) && e.to_string().contains("nope.pem"), "{e}");
    // A key as the certificate: no certificate in it.
    let e = TlsConfig::from_pem_files(&certs.key(), &certs.key()).unwrap_err();
    assert!(e.to_string().contains("holds no certificate"), "{e}");
    // Another certificate's key.
    let other = Certs::new("other");
    let e = TlsConfig::from_pem_files(&certs.cert(), &other.key()).unwrap_err();
    assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
    assert!(e.to_string().contains("cannot be used together"), "{e}");
}

#[test]
fn plain_tcp_on_a_non_loopback_address_is_warned_about_once() {
    let log = common::captured_log(tracing::Level::WARN);
    let warning = "serving plain TCP on a non-loopback address";
    let count = || String::from_utf8_lossy(&log.lock().unwrap()).matches(warning).count();
    let before = count();
    let loopback = ringcall::Server::builder()
        .addr("127.0.0.1:0")
        .threads(1)
        .backend(Backend::Epoll)
        .start(TestRoutes)
        .unwrap();
    assert_eq!(count(), before, "loopback is fine");
    let certs = Certs::new("warn");
    let tls = ringcall::Server::builder()
        .addr("0.0.0.0:0")
        .threads(1)
        .backend(Backend::Epoll)
        .tls(certs.config())
        .start(TestRoutes)
        .unwrap();
    assert_eq!(count(), before, "TLS is fine");
    let open = ringcall::Server::builder()
        .addr("0.0.0.0:0")
        .threads(2)
        .backend(Backend::Epoll)
        .start(TestRoutes)
        .unwrap();
    assert_eq!(count(), before + 1, "one warning per server, not per worker");
    drop((loopback, tls, open));
}

/// A CA, a server certificate it signed, and client certificates it (or another CA) signed.
struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ringcall-pki-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} CA"));
        let ca = params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        let pki = Self { dir, ca, ca_key };
        let (cert, key) = pki.issue("localhost");
        std::fs::write(pki.dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(pki.dir.join("server.key"), key.serialize_pem()).unwrap();
        pki
    }

    fn issue(&self, name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        (params.signed_by(&key, &self.ca, &self.ca_key).unwrap(), key)
    }

    fn server_config(&self) -> TlsConfig {
        TlsConfig::mutual_from_pem_files(
            &self.dir.join("server.pem"),
            &self.dir.join("server.key"),
            &self.dir.join("ca.pem"),
        )
        .unwrap()
    }

    /// A client trusting this CA, presenting `client` (a certificate and key) if given.
    fn client(
        &self,
        addr: std::net::SocketAddr,
        client: Option<&(rcgen::Certificate, rcgen::KeyPair)>,
    ) -> BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.der().clone()).unwrap();
        let builder =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots);
        let config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(
                    vec![cert.der().clone()],
                    rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        let session =
            rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        BufReader::new(rustls::StreamOwned::new(session, tcp))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The caller is refused: no reply line comes, only an error or the end of the stream.
fn refused(client: &mut BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>) {
    let _ = client.get_mut().write_all(b"{\"cmdid\":0}\n");
    let mut line = String::new();
    let read = client.read_line(&mut line);
    assert!(read.is_err() || line.is_empty(), "a refused client got {line:?}");
}

fn mutual_tls_checks_client_certificates_and_the_acl_names_who_may_call_what(backend: Backend) {
    let pki = Pki::new(backend.name());
    let acl = ringcall::Acl::parse("[allow]\n\"*\" = [0]\n\"billing.internal\" = [10000]\n").unwrap();
    let Some(server) = start_service(backend, TestRoutes, |b| b.tls(pki.server_config().with_acl(acl)))
    else {
        return;
    };
    let addr = server.local_addr();
    let billing = pki.issue("billing.internal");
    let mut client = pki.client(addr, Some(&billing));
    client.get_mut().write_all(b"{\"cmdid\":10000,\"params\":{\"a\":1}}\n").unwrap();
    assert_eq!(line(&mut client), "{\"code\":0,\"data\":{\"a\":1}}\n");
    // Not in its rules: 403, and the connection goes on.
    client.get_mut().write_all(b"{\"cmdid\":1,\"id\":5}\n{\"cmdid\":0}\n").unwrap();
    assert_eq!(
        line(&mut client),
        "{\"code\":403,\"id\":5,\"error\":\"billing.internal may not call cmdid 1\"}\n"
    );
    assert_eq!(line(&mut client), "{\"code\":0,\"data\":\"pong\"}\n");
    // Another identity the same CA signed: only what "*" allows.
    let mut other = pki.client(addr, Some(&pki.issue("frontend.internal")));
    other.get_mut().write_all(b"{\"cmdid\":10000}\n{\"cmdid\":0}\n").unwrap();
    assert_eq!(line(&mut other), "{\"code\":403,\"error\":\"frontend.internal may not call cmdid 10000\"}\n");
    assert_eq!(line(&mut other), "{\"code\":0,\"data\":\"pong\"}\n");
    // No certificate, or one from another CA: refused at the handshake.
    refused(&mut pki.client(addr, None));
    let stranger = Pki::new(&format!("{}-other", backend.name()));
    refused(&mut pki.client(addr, Some(&stranger.issue("billing.internal"))));
    assert_eq!(server.stats().total().replies_with(403), 2);
}

every_backend!(
    tls_round_trips_and_plain_clients_are_closed,
    tls_refusals_are_readable_and_half_done_handshakes_time_out,
    mutual_tls_checks_client_certificates_and_the_acl_names_who_may_call_what,
    the_blocking_client_speaks_tls_and_mutual_tls,
    the_client_pool_speaks_mutual_tls,
    the_async_client_speaks_mutual_tls,
);

fn the_async_client_speaks_mutual_tls(backend: Backend) {
    let pki = Pki::new(&format!("async-{}", backend.name()));
    let Some(server) = start_service(backend, TestRoutes, |b| b.tls(pki.server_config())) else {
        return;
    };
    let (cert, key) = pki.issue("billing.internal");
    std::fs::write(pki.dir.join("async.pem"), cert.pem()).unwrap();
    std::fs::write(pki.dir.join("async.key"), key.serialize_pem()).unwrap();
    let ca = pki.dir.join("ca.pem");
    let identity = (pki.dir.join("async.pem"), pki.dir.join("async.key"));
    let tls =
        ringcall::ClientTls::from_pem_files(&ca, "localhost", Some((&identity.0, &identity.1))).unwrap();
    let addr = server.local_addr().to_string();
    let timeout = Duration::from_secs(30);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let mut client = ringcall::client::AsyncClient::connect_tls(&addr, timeout, tls).await.unwrap();
        // A reply of many TLS records, then pipelined calls.
        let big = "y".repeat(100_000);
        let data = client.call(10000, &serde_json::json!({ "big": big })).await.unwrap();
        assert_eq!(data.get("big").and_then(|b| b.as_str()).map(str::len), Some(100_000));
        let calls: Vec<_> = (0..10)
            .map(|i| ringcall::client::Call::with_params(10000, &serde_json::json!({ "i": i })).unwrap())
            .collect();
        let replies = client.pipeline(&calls).await.unwrap();
        for (i, reply) in replies.iter().enumerate() {
            assert_eq!(reply.data.encode(), format!("{{\"i\":{i}}}"));
        }
        client.reconnect().await.unwrap();
        assert_eq!(client.call(0, &serde_json::json!({})).await.unwrap().encode(), "\"pong\"");
        // Without a client certificate the handshake fails, before connect returns.
        let anonymous = ringcall::ClientTls::from_pem_files(&ca, "localhost", None).unwrap();
        let refused = ringcall::client::AsyncClient::connect_tls(&addr, timeout, anonymous).await;
        // TLS 1.3 finishes the client's handshake before the server checks its certificate:
        // the refusal may show at the first call instead.
        if let Ok(mut client) = refused {
            assert!(client.call(0, &serde_json::json!({})).await.is_err());
        }
    });
}

fn the_blocking_client_speaks_tls_and_mutual_tls(backend: Backend) {
    let pki = Pki::new(&format!("client-{}", backend.name()));
    let acl = ringcall::Acl::parse("[allow]\n\"billing.internal\" = [10000]\n").unwrap();
    let Some(server) = start_service(backend, TestRoutes, |b| b.tls(pki.server_config().with_acl(acl)))
    else {
        return;
    };
    let (cert, key) = pki.issue("billing.internal");
    std::fs::write(pki.dir.join("billing.pem"), cert.pem()).unwrap();
    std::fs::write(pki.dir.join("billing.key"), key.serialize_pem()).unwrap();
    let tls = ringcall::ClientTls::from_pem_files(
        &pki.dir.join("ca.pem"),
        "localhost",
        Some((&pki.dir.join("billing.pem"), &pki.dir.join("billing.key"))),
    )
    .unwrap();
    let mut client =
        ringcall::client::Client::connect_tls(&server.local_addr().to_string(), Duration::from_secs(30), tls)
            .unwrap();
    let data = client.call(10000, &serde_json::json!({"over": "tls"})).unwrap();
    assert_eq!(data.encode(), "{\"over\":\"tls\"}");
    match client.call(1, &serde_json::json!({})) {
        Err(ringcall::client::ClientError::Server { code: 403, message }) => {
            assert_eq!(message, "billing.internal may not call cmdid 1")
        }
        other => panic!("expected a 403, got {other:?}"),
    }
    // Without a client certificate the handshake fails, and the call says so.
    let anonymous = ringcall::ClientTls::from_pem_files(&pki.dir.join("ca.pem"), "localhost", None).unwrap();
    let mut client = ringcall::client::Client::connect_tls(
        &server.local_addr().to_string(),
        Duration::from_secs(30),
        anonymous,
    )
    .unwrap();
    assert!(client.call(10000, &serde_json::json!({})).is_err());
}

fn the_client_pool_speaks_mutual_tls(backend: Backend) {
    let pki = Pki::new(&format!("pool-{}", backend.name()));
    let (Some(a), Some(b)) = (
        start_service(backend, TestRoutes, |s| s.tls(pki.server_config())),
        start_service(backend, TestRoutes, |s| s.tls(pki.server_config())),
    ) else {
        return;
    };
    let (cert, key) = pki.issue("billing.internal");
    std::fs::write(pki.dir.join("pool.pem"), cert.pem()).unwrap();
    std::fs::write(pki.dir.join("pool.key"), key.serialize_pem()).unwrap();
    let tls = ringcall::ClientTls::from_pem_files(
        &pki.dir.join("ca.pem"),
        "localhost",
        Some((&pki.dir.join("pool.pem"), &pki.dir.join("pool.key"))),
    )
    .unwrap();
    let config = ringcall::pool::PoolConfig { tls: Some(tls), ..Default::default() };
    let endpoints = [a.local_addr().to_string(), b.local_addr().to_string()];
    let pool = ringcall::pool::Pool::with_endpoints(&[&endpoints[0], &endpoints[1]], config).unwrap();
    for i in 0..50 {
        let call = ringcall::client::Call::with_params(10000, &serde_json::json!({ "i": i })).unwrap();
        let reply = pool.call(&call, ringcall::pool::CallOptions::default()).unwrap();
        assert_eq!(reply.data.encode(), format!("{{\"i\":{i}}}"));
    }
    assert!(pool.status().iter().all(|s| s.answered > 0), "{:?}", pool.status());
}

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
use ringcall::protocol::{TlsConfig, TlsError};

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

every_backend!(tls_round_trips_and_plain_clients_are_closed);

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

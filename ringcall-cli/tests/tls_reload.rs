//! Certificate rotation without a restart, on every backend: `ringcall serve` with a TLS
//! certificate gets a new one written over its files and a SIGHUP; new connections get the
//! new certificate, the connection opened before goes on with the old one.

#[macro_use]
mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::spawn_server;
use ringcall::Backend;

struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new() -> Self {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        Self { cert: params.self_signed(&key).unwrap(), key }
    }

    /// A fresh certificate and key for localhost, written to `dir` (replacing what is there,
    /// each file renamed into place whole).
    fn issue_into(&self, dir: &std::path::Path) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .signed_by(&key, &self.cert, &self.key)
            .unwrap();
        for (name, text) in [("key.pem", key.serialize_pem()), ("cert.pem", cert.pem())] {
            std::fs::write(dir.join(format!("{name}.new")), text).unwrap();
            std::fs::rename(dir.join(format!("{name}.new")), dir.join(name)).unwrap();
        }
        cert.der().to_vec()
    }

    /// Connects, pings, and returns the connection and the certificate the server showed.
    fn connect(
        &self,
        addr: SocketAddr,
    ) -> (BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>, Vec<u8>) {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
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
        let mut client = BufReader::new(rustls::StreamOwned::new(session, tcp));
        assert_eq!(ping(&mut client), "{\"code\":0,\"data\":\"pong\"}\n");
        let shown = client.get_ref().conn.peer_certificates().unwrap()[0].to_vec();
        (client, shown)
    }
}

fn ping(client: &mut BufReader<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>) -> String {
    client.get_mut().write_all(b"{\"cmdid\":0}\n").unwrap();
    let mut line = String::new();
    client.read_line(&mut line).unwrap();
    line
}

fn sighup_rotates_the_certificate_for_new_connections(backend: Backend) {
    let dir = std::env::temp_dir().join(format!("ringcall-reload-{}-{}", backend.name(), std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::new();
    let first = ca.issue_into(&dir);
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let args = ["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()];
    let (mut server, addr) = spawn_server(backend, &args, None);
    let (mut old, shown) = ca.connect(addr);
    assert_eq!(shown, first);

    let second = ca.issue_into(&dir);
    // SAFETY: plain kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(server.id() as i32, libc::SIGHUP) }, 0);
    // Failsafe only: the reload happens on the server's signal thread.
    let give_up = Instant::now() + Duration::from_secs(30);
    while ca.connect(addr).1 != second {
        assert!(Instant::now() < give_up, "new connections never got the new certificate");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The connection made before goes on, on its own session.
    assert_eq!(ping(&mut old), "{\"code\":0,\"data\":\"pong\"}\n");

    // A broken file: the certificate in use stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    assert_eq!(unsafe { libc::kill(server.id() as i32, libc::SIGHUP) }, 0);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ca.connect(addr).1, second);
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

every_backend!(sighup_rotates_the_certificate_for_new_connections);

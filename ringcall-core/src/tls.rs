//! TLS for every backend, in the connection core: rustls is sans-I/O (`read_tls`,
//! `process_new_packets`, `write_tls`), so the TLS session sits between the bytes a backend
//! moves and the protocol session, once, for all backends. Received ciphertext is decrypted
//! into plaintext the processor frames as usual (copied once: a TLS record is not a line);
//! replies are encrypted when a batch is handed to the backend. Connections without TLS do
//! not touch any of this.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A server's TLS configuration (certificate chain and key, and the CA that client
/// certificates must be signed by, for mutual TLS), shared by every connection.
#[derive(Clone)]
pub struct TlsConfig {
    pub(crate) server: Arc<rustls::ServerConfig>,
    /// Client certificates are required (mutual TLS).
    pub(crate) mutual: bool,
    /// Which identity may call which cmdids.
    pub(crate) acl: Option<Arc<super::acl::Acl>>,
    /// The certificate in use, replaced by [`reload`](Self::reload).
    cert: Arc<CertSource>,
}

/// The certificate and key every handshake uses, and the files they come from: a reload
/// swaps them for new handshakes while connections already open keep theirs.
#[derive(Debug)]
struct CertSource {
    cert: PathBuf,
    key: PathBuf,
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl rustls::server::ResolvesServerCert for CertSource {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
    }
}

/// The crypto provider of every TLS session: the process default when the application
/// installed one (`rustls::crypto::CryptoProvider::install_default`, with aws-lc-rs for
/// post-quantum key exchange, say), else ring's.
fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    if let Some(installed) = rustls::crypto::CryptoProvider::get_default() {
        return installed.clone();
    }
    // rustls 0.23.48 deprecates ring's provider (it has no post-quantum key exchange); ring is
    // still what builds without cmake here (see Cargo.toml), and an application that wants
    // more installs its own provider, taken above.
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads `cert` and `key` as a certified key, checking that they match.
fn certified_key(cert: &Path, key: &Path) -> Result<rustls::sign::CertifiedKey, TlsError> {
    let (chain, private) = load_pair(cert, key)?;
    rustls::sign::CertifiedKey::from_der(chain, private, &crypto_provider())
        .map_err(|source| TlsError::Mismatch { cert: cert.to_owned(), key: key.to_owned(), source })
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConfig").finish_non_exhaustive()
    }
}

/// Why the TLS configuration could not be loaded. Each names the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file is missing or unreadable.
    #[error("cannot read {what} {path}: {source} (give a readable PEM file)")]
    Read {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file holds no certificate or no key in PEM form.
    #[error("{path} holds no {what} in PEM form ({detail}); expected -----BEGIN {pem}----- blocks")]
    Pem {
        /// What was looked for.
        what: &'static str,
        /// The PEM label expected.
        pem: &'static str,
        /// The file.
        path: PathBuf,
        /// The parser's words.
        detail: String,
    },
    /// The key does not belong to the certificate, or rustls refuses them.
    #[error(
        "the certificate {cert} and the key {key} cannot be used together: {source} (is the key the one the certificate was issued for?)"
    )]
    Mismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        source: rustls::Error,
    },
}

/// Reads a certificate chain and a private key.
fn load_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let read = |what, path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read { what, path: path.to_owned(), source })
    };
    let cert_pem = read("certificate", cert)?;
    let key_pem = read("key", key)?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&cert_pem).collect::<Result<_, _>>().map_err(|e| TlsError::Pem {
            what: "certificate",
            pem: "CERTIFICATE",
            path: cert.to_owned(),
            detail: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            what: "certificate",
            pem: "CERTIFICATE",
            path: cert.to_owned(),
            detail: "no block found".into(),
        });
    }
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Pem {
        what: "private key",
        pem: "PRIVATE KEY",
        path: key.to_owned(),
        detail: e.to_string(),
    })?;
    Ok((chain, private))
}

/// The CA certificates in `ca` (PEM), as trust roots.
fn load_roots(ca: &Path, what: &'static str) -> Result<rustls::RootCertStore, TlsError> {
    let pem = std::fs::read(ca).map_err(|source| TlsError::Read { what, path: ca.to_owned(), source })?;
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(&pem) {
        let der = der.map_err(|e| TlsError::Pem {
            what: "CA certificate",
            pem: "CERTIFICATE",
            path: ca.to_owned(),
            detail: e.to_string(),
        })?;
        roots.add(der).map_err(|source| TlsError::Mismatch {
            cert: ca.to_owned(),
            key: ca.to_owned(),
            source,
        })?;
    }
    if roots.is_empty() {
        return Err(TlsError::Pem {
            what: "CA certificate",
            pem: "CERTIFICATE",
            path: ca.to_owned(),
            detail: "no block found".into(),
        });
    }
    Ok(roots)
}

/// The identity of a verified client: the first DNS name of its certificate's subject
/// alternative names.
pub(crate) fn client_identity(session: &rustls::ServerConnection) -> Option<Arc<str>> {
    let leaf = session.peer_certificates()?.first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    cert.valid_dns_names().next().map(Arc::from)
}

impl TlsConfig {
    /// Loads a certificate chain (PEM, leaf first) and its private key (PEM: PKCS#8, PKCS#1
    /// or SEC1), checking that they match.
    ///
    /// # Errors
    /// A file is missing, unreadable, holds no PEM object of its kind, or the key does not
    /// match the certificate.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Self::build(cert, key, None)
    }

    /// [`from_pem_files`](Self::from_pem_files), and every client must present a certificate
    /// signed by a CA in `ca` (PEM): mutual TLS. A client's identity, the first DNS name of its certificate's subject alternative
    /// names, is given to handlers ([`Request::identity`](crate::Request::identity)).
    ///
    /// # Errors
    /// The CA file is missing, unreadable or holds no certificate.
    pub fn mutual_from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<Self, TlsError> {
        Self::build(cert, key, Some(ca))
    }

    /// Reads the certificate and key files again and uses them for every new handshake
    /// (connections already open keep theirs). On an error the certificate in use stays.
    ///
    /// # Errors
    /// As [`from_pem_files`](Self::from_pem_files).
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = certified_key(&self.cert.cert, &self.cert.key)?;
        *self.cert.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(fresh);
        Ok(())
    }

    fn build(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        let source = Arc::new(CertSource {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: std::sync::RwLock::new(Arc::new(certified_key(cert, key)?)),
        });
        let provider = crypto_provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Mismatch { cert: cert.to_owned(), key: key.to_owned(), source })?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = load_roots(ca, "client CA")?;
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| TlsError::Pem {
                            what: "usable CA certificate",
                            pem: "CERTIFICATE",
                            path: ca.to_owned(),
                            detail: e.to_string(),
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let server = builder.with_cert_resolver(source.clone());
        Ok(Self { server: Arc::new(server), mutual: client_ca.is_some(), acl: None, cert: source })
    }

    /// Answers 403 to every call `acl` does not allow (see [`Acl`](super::acl::Acl)); the
    /// identities it names are those of client certificates, so give it with
    /// [`mutual_from_pem_files`](Self::mutual_from_pem_files).
    pub fn with_acl(mut self, acl: super::acl::Acl) -> Self {
        self.acl = Some(Arc::new(acl));
        self
    }

    /// A session for a new connection.
    pub(crate) fn session(&self) -> Result<rustls::ServerConnection, rustls::Error> {
        let mut conn = rustls::ServerConnection::new(self.server.clone())?;
        // Replies are bounded by the connection's own backpressure, not by rustls's buffer.
        conn.set_buffer_limit(None);
        Ok(conn)
    }
}

/// What a client needs to speak TLS to a server: the CA that signed the server's certificate,
/// the name the certificate must carry, and, for mutual TLS, the client's own certificate.
#[derive(Clone)]
pub struct ClientTls {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) server_name: rustls::pki_types::ServerName<'static>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

impl ClientTls {
    /// The rustls configuration, for connections this crate does not make (e.g. a
    /// `tokio_rustls::TlsConnector`).
    pub fn config(&self) -> Arc<rustls::ClientConfig> {
        self.config.clone()
    }

    /// The name the server's certificate must carry.
    pub fn server_name(&self) -> &rustls::pki_types::ServerName<'static> {
        &self.server_name
    }

    /// Trusts the CA certificates in `ca` (PEM) for a server named `server_name` (a DNS name
    /// or an IP address its certificate carries); presents `identity` (certificate and key
    /// files) when the server asks for one.
    ///
    /// # Errors
    /// A file is missing or unreadable, holds no PEM object of its kind, or the name is not
    /// a valid DNS name or IP address.
    pub fn from_pem_files(
        ca: &Path,
        server_name: &str,
        identity: Option<(&Path, &Path)>,
    ) -> Result<Self, TlsError> {
        let roots = load_roots(ca, "CA")?;
        let provider = crypto_provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Mismatch { cert: ca.to_owned(), key: ca.to_owned(), source })?
            .with_root_certificates(roots);
        let config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let (chain, private) = load_pair(cert, key)?;
                builder.with_client_auth_cert(chain, private).map_err(|source| TlsError::Mismatch {
                    cert: cert.to_owned(),
                    key: key.to_owned(),
                    source,
                })?
            }
        };
        let server_name =
            rustls::pki_types::ServerName::try_from(server_name.to_owned()).map_err(|e| TlsError::Pem {
                what: "valid server name",
                pem: "",
                path: PathBuf::from(server_name),
                detail: e.to_string(),
            })?;
        Ok(Self { config: Arc::new(config), server_name })
    }
}

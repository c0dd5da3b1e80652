//! Who may talk to a server: [`Access`] bundles its TLS configuration (certificates, client
//! identities and the access policy, in [`tls`](super::tls) and [`acl`](super::acl)) and the
//! shared-token hello ([`HelloToken`]) for plain-TCP setups on one host.
//!
//! The hello: on a server started with a token, the first line of every connection must be
//! `{"cmdid":2,"params":{"token":"…"}}`. A matching token (compared in constant time) is
//! answered like any call and opens the connection to every command; anything else is
//! answered 401 and the connection is closed. A token is a shared secret sent in clear text:
//! it keeps other local users and stray clients out of a loopback service, and is no
//! substitute for TLS across hosts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use subtle::ConstantTimeEq;

use super::tls::TlsConfig;

/// cmdid of the hello that presents the token (a built-in: any server answers it).
pub const HELLO: u32 = 2;

/// cmdid of the capabilities request every server answers: `{"notices":true}` in its params
/// asks for notice lines on this connection (docs/protocol.md).
pub const CAPABILITIES: u32 = 3;

/// cmdid of the built-in ping every server answers (`"pong"`): what a pool probes a
/// server with.
pub const PING: u32 = 0;

/// The shortest token accepted: 16 bytes, so a guess per connection gets nowhere.
pub(crate) const MIN_TOKEN_BYTES: usize = 16;

/// How connections are admitted: TLS on a TLS port, the token hello where one is set.
#[derive(Clone, Default)]
pub struct Access {
    /// TLS, on a TLS port.
    pub tls: Option<TlsConfig>,
    /// The token every connection's first line must present, if any.
    pub token: Option<HelloToken>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.is_some())
            .finish()
    }
}

/// A shared secret a connection presents in its first line (never printed by `Debug`).
#[derive(Clone)]
pub struct HelloToken(Arc<[u8]>);

impl std::fmt::Debug for HelloToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HelloToken(..)")
    }
}

/// Why a token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file cannot be read.
    #[error("cannot read the token file {path}: {source} (write one with `openssl rand -hex 32 > {path}`)")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The token is too short or not printable.
    #[error("the token in {path} is not usable: {why} (write one with `openssl rand -hex 32 > {path}`)")]
    Invalid {
        /// The file (or `<value>` for a token given directly).
        path: PathBuf,
        /// What is wrong.
        why: &'static str,
    },
}

impl HelloToken {
    /// The token held in `path` (surrounding white space, such as a final newline, is not
    /// part of it).
    ///
    /// # Errors
    /// The file cannot be read, or its token is shorter than 16 bytes or holds
    /// characters that cannot travel in a JSON string unescaped.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenError::Read { path: path.to_owned(), source })?;
        Self::new(text.trim()).map_err(|why| TokenError::Invalid { path: path.to_owned(), why })
    }

    /// A token given directly.
    ///
    /// # Errors
    /// As [`from_file`](Self::from_file), with the reason alone.
    pub fn new(token: &str) -> Result<Self, &'static str> {
        if token.len() < MIN_TOKEN_BYTES {
            return Err("it is shorter than 16 bytes");
        }
        if !token.bytes().all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\') {
            return Err("it holds white space, quotes, backslashes or non-ASCII characters");
        }
        Ok(Self(token.as_bytes().into()))
    }

    /// The token, to send.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("checked ASCII at construction")
    }

    /// Whether `presented` is this token, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &[u8]) -> bool {
        self.0.ct_eq(presented).into()
    }

    /// The hello line presenting this token, with request id `id`.
    pub fn hello_line(&self, id: u64) -> Vec<u8> {
        format!("{{\"cmdid\":{HELLO},\"id\":{id},\"params\":{{\"token\":\"{}\"}}}}\n", self.as_str())
            .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked_and_compared_whole() {
        assert!(HelloToken::new("short").is_err());
        assert!(HelloToken::new("sixteen bytes!!!").is_err(), "white space");
        assert!(HelloToken::new("0123456789abcdef\"").is_err(), "a quote");
        let token = HelloToken::new("0123456789abcdef").unwrap();
        assert!(token.matches(b"0123456789abcdef"));
        assert!(!token.matches(b"0123456789abcdeF"));
        assert!(!token.matches(b"0123456789abcde"));
        assert!(!token.matches(b"0123456789abcdef0"));
        assert!(!token.matches(b""));
        assert_eq!(format!("{token:?}"), "HelloToken(..)");
        let line = token.hello_line(7);
        let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(value["cmdid"], HELLO);
        assert_eq!(value["params"]["token"], "0123456789abcdef");
    }

    #[test]
    fn token_files_are_trimmed_and_errors_name_the_file_and_fix() {
        let dir = std::env::temp_dir().join(format!("ringcall-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  0123456789abcdef0123\n").unwrap();
        assert!(HelloToken::from_file(&file).unwrap().matches(b"0123456789abcdef0123"));
        std::fs::write(&file, "abc\n").unwrap();
        let err = HelloToken::from_file(&file).unwrap_err().to_string();
        assert!(err.contains(&*file.to_string_lossy()) && err.contains("openssl rand"), "{err}");
        let missing = HelloToken::from_file(&dir.join("missing")).unwrap_err().to_string();
        assert!(missing.contains("cannot read") && missing.contains("missing"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

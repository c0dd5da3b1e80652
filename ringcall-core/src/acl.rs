//! Access control: which client identity (from its TLS certificate) may call which cmdids.
//!
//! The policy is a small TOML file:
//!
//! ```toml
//! # Keys: client identities (the DNS name in their certificate); "*" is every caller.
//! # Values: a list of cmdids, or "*" for all of them.
//! [allow]
//! "*" = [0]                              # anyone may ping
//! "billing.internal" = [2001, 2002, 1]
//! "admin.internal" = "*"
//! ```
//!
//! A call the policy does not allow is answered `{"code":403,...}` and the connection stays
//! usable. Checked before the handler runs (built-ins included), on every backend.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The cmdids one rule allows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    All,
    /// Sorted.
    Some(Vec<u32>),
}

impl Allowed {
    fn allows(&self, cmdid: u32) -> bool {
        match self {
            Allowed::All => true,
            Allowed::Some(cmdids) => cmdids.binary_search(&cmdid).is_ok(),
        }
    }
}

/// A parsed access policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl {
    everyone: Option<Allowed>,
    by_identity: HashMap<Box<str>, Allowed>,
}

/// Why a policy file was refused. Names the file and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    /// It cannot be read.
    #[error("cannot read the access policy {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a policy.
    #[error(
        "the access policy {path} is not valid: {detail} (expected an [allow] table of \"identity\" = [cmdids] or \"*\")"
    )]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    allow: HashMap<String, Rule>,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Rule {
    Star(String),
    List(Vec<u32>),
}

impl Acl {
    /// Reads the policy at `path`.
    ///
    /// # Errors
    /// The file cannot be read or is not a policy.
    pub fn from_file(path: &Path) -> Result<Self, AclError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| AclError::Read { path: path.to_owned(), source })?;
        Self::parse(&text).map_err(|detail| AclError::Invalid { path: path.to_owned(), detail })
    }

    /// Parses a policy.
    ///
    /// # Errors
    /// What is wrong with it, in words.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        let mut acl = Acl { everyone: None, by_identity: HashMap::new() };
        for (identity, rule) in file.allow {
            let allowed = match rule {
                Rule::Star(s) if s == "*" => Allowed::All,
                Rule::Star(s) => return Err(format!("{identity:?} = {s:?}: give a list of cmdids or \"*\"")),
                Rule::List(mut cmdids) => {
                    cmdids.sort_unstable();
                    cmdids.dedup();
                    Allowed::Some(cmdids)
                }
            };
            if identity == "*" {
                acl.everyone = Some(allowed);
            } else {
                acl.by_identity.insert(identity.into(), allowed);
            }
        }
        Ok(acl)
    }

    /// Whether a caller with `identity` may call `cmdid`.
    pub fn allows(&self, identity: Option<&str>, cmdid: u32) -> bool {
        self.everyone.as_ref().is_some_and(|a| a.allows(cmdid))
            || identity.and_then(|i| self.by_identity.get(i)).is_some_and(|a| a.allows(cmdid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_by_identity_and_for_everyone() {
        let acl = Acl::parse(
            "[allow]\n\"*\" = [0]\n\"billing.internal\" = [2001, 1]\n\"admin.internal\" = \"*\"\n",
        )
        .unwrap();
        assert!(acl.allows(None, 0));
        assert!(!acl.allows(None, 2001));
        assert!(acl.allows(Some("billing.internal"), 2001) && acl.allows(Some("billing.internal"), 0));
        assert!(!acl.allows(Some("billing.internal"), 2002));
        assert!(acl.allows(Some("admin.internal"), 31337));
        assert!(!acl.allows(Some("other.internal"), 2001));
        // Identities are compared exactly: case matters.
        assert!(!acl.allows(Some("Billing.internal"), 2001));
        assert!(!acl.allows(Some("BILLING.INTERNAL"), 2001));
        assert!(Acl::parse("[allow]\n\"x\" = \"some\"\n").unwrap_err().contains("give a list"));
        assert!(Acl::parse("[deny]\n").is_err());
    }
}

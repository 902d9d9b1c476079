//! Who the caller is, under one config: where its API key comes from ([`KeySource`]) and, when an
//! API-key list is configured (a mounted Secret file), the tenant the key belongs to. Reading the
//! key off a request's headers is [`crate::admit::caller`]'s part.
//!
//! Keys are secrets: they are looked up by their SHA-256 digest and then compared in constant
//! time, and never logged; logs carry [`short_hash`] instead.

use std::{collections::HashMap, fmt, sync::Arc};

use sha2::{Digest, Sha256};
use sluice_crds::{
    rate_limit_policy::IdentitySource,
    sidecar_config::{ApiKeyEntry, IdentityConfig},
};
use subtle::ConstantTimeEq;

/// The tenant of callers that send no key when no key list is configured.
pub const ANONYMOUS: &str = "anonymous";

/// How callers are identified under one config.
#[derive(Debug)]
pub struct Identity {
    source: KeySource,
    keys: Option<KeyRing>,
}

/// Where a request carries its API key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// The value of this header (a valid header name; the config reload checks it).
    Header(Box<str>),
}

/// The accepted API keys and their tenants.
pub struct KeyRing {
    by_digest: HashMap<Digest32, (Box<[u8]>, Arc<str>)>,
}

/// A SHA-256 digest.
type Digest32 = [u8; 32];

/// An identified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The key as sent (empty when none was sent). Never log it; see [`Caller::key_hash`].
    pub key: String,
    /// The tenant: from the key list, or the key itself without one.
    pub tenant: Arc<str>,
}

/// Why a caller was not identified (answered with 401).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unauthorized {
    /// A key list is configured and the request carries no key.
    Missing,
    /// The key is not in the list; carries the key's [`short_hash`].
    Unknown(String),
}

// === impl Identity ===

impl Identity {
    /// Identity as `config` says, with `keys` read from its keys file (if any).
    pub fn new(config: &IdentityConfig, keys: Option<KeyRing>) -> Result<Self, String> {
        let source = match config.source {
            IdentitySource::Bearer => KeySource::Bearer,
            IdentitySource::Header => KeySource::Header(
                config
                    .header
                    .as_deref()
                    .ok_or("identity.header is required when source is Header")?
                    .into(),
            ),
        };
        Ok(Self { source, keys })
    }

    /// Anyone may call; each key is its own tenant.
    pub fn open() -> Self {
        Self {
            source: KeySource::Bearer,
            keys: None,
        }
    }

    /// Where requests carry their key.
    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// Whether a key list is configured.
    pub fn has_keys(&self) -> bool {
        self.keys.is_some()
    }

    /// The caller that sent `key` (`None`: no key, or an empty one).
    pub fn caller(&self, key: Option<&str>) -> Result<Caller, Unauthorized> {
        match (&self.keys, key.filter(|k| !k.is_empty())) {
            (None, Some(key)) => Ok(Caller {
                key: key.to_owned(),
                tenant: Arc::from(key),
            }),
            (None, None) => Ok(Caller {
                key: String::new(),
                tenant: Arc::from(ANONYMOUS),
            }),
            (Some(_), None) => Err(Unauthorized::Missing),
            (Some(ring), Some(key)) => match ring.tenant(key) {
                Some(tenant) => Ok(Caller {
                    key: key.to_owned(),
                    tenant,
                }),
                None => Err(Unauthorized::Unknown(short_hash(key))),
            },
        }
    }
}

// === impl KeyRing ===

impl KeyRing {
    /// Parses a keys file: a YAML list of `{key, tenant}`.
    pub fn from_yaml(text: &str) -> Result<Self, String> {
        let entries: Vec<ApiKeyEntry> =
            serde_yaml::from_str(text).map_err(|e| format!("keys file: {e}"))?;
        let mut by_digest = HashMap::with_capacity(entries.len());
        for (i, e) in entries.into_iter().enumerate() {
            if e.key.is_empty() || e.tenant.is_empty() {
                return Err(format!(
                    "keys file: entry {i}: key and tenant must not be empty"
                ));
            }
            let digest: [u8; 32] = Sha256::digest(e.key.as_bytes()).into();
            let value = (e.key.into_bytes().into_boxed_slice(), Arc::from(e.tenant));
            if by_digest.insert(digest, value).is_some() {
                return Err(format!("keys file: entry {i}: duplicate key"));
            }
        }
        Ok(Self { by_digest })
    }

    /// Reads and parses a keys file.
    pub fn load(path: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("keys file {path}: {e}"))?;
        Self::from_yaml(&text).map_err(|e| format!("{path}: {e}"))
    }

    /// The tenant of `key`, if it is in the list. The lookup is by digest (its timing reveals
    /// nothing about the stored keys) and the final comparison is constant-time.
    pub fn tenant(&self, key: &str) -> Option<Arc<str>> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let (stored, tenant) = self.by_digest.get(&digest)?;
        constant_time_eq(stored, key.as_bytes()).then(|| tenant.clone())
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether the list is empty (every key is refused).
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print keys.
        f.debug_struct("KeyRing")
            .field("keys", &self.len())
            .finish()
    }
}

// === impl Caller ===

impl Caller {
    /// A short, non-reversible tag of the key for logs.
    pub fn key_hash(&self) -> String {
        short_hash(&self.key)
    }
}

/// The first 8 hex digits of the key's SHA-256: enough to tell keys apart in logs, useless to
/// recover them.
pub fn short_hash(key: &str) -> String {
    let d = Sha256::digest(key.as_bytes());
    format!("{:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3])
}

/// Compares two byte strings in time that depends only on their lengths (`subtle`).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn bad_key_files_are_rejected() {
        assert!(
            KeyRing::from_yaml("- key: a\n")
                .unwrap_err()
                .contains("tenant")
        );
        assert!(
            KeyRing::from_yaml("- key: a\n  tenant: t\n- key: a\n  tenant: u\n")
                .unwrap_err()
                .contains("duplicate")
        );
        assert!(KeyRing::from_yaml("- key: a\n  tenant: t\n  extra: 1\n").is_err());
        assert!(KeyRing::from_yaml("- key: ''\n  tenant: t\n").is_err());
    }

    #[test]
    fn comparisons_and_hashes() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        let h = short_hash("sk-secret");
        assert_eq!(h.len(), 8);
        assert!(!h.contains("secret"));
    }
}

//! The API-key list: a mounted YAML file of `{key, tenant, roles}`. Keys are secrets: they are
//! looked up by their SHA-256 digest and then compared in constant time, and never logged; logs
//! carry [`short_hash`] instead.

use std::{collections::HashMap, fmt, sync::Arc};

use sha2::{Digest, Sha256};
use sluice_crds::sidecar_config::ApiKeyEntry;
use subtle::ConstantTimeEq;

use super::caller::Roles;

/// The accepted API keys, with their tenants and roles.
pub struct KeyRing {
    by_digest: HashMap<Digest32, KeyEntry>,
}

struct KeyEntry {
    key: Box<[u8]>,
    tenant: Arc<str>,
    roles: Roles,
}

/// A SHA-256 digest.
type Digest32 = [u8; 32];

// === impl KeyRing ===

impl KeyRing {
    /// Parses a keys file: a YAML list of `{key, tenant, roles}` (roles optional).
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
            let entry = KeyEntry {
                key: e.key.into_bytes().into_boxed_slice(),
                tenant: Arc::from(e.tenant),
                roles: e.roles.into_iter().map(String::into_boxed_str).collect(),
            };
            if by_digest.insert(digest, entry).is_some() {
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

    /// The tenant of `key`, if it is in the list (see [`KeyRing::lookup`]).
    pub fn tenant(&self, key: &str) -> Option<Arc<str>> {
        self.lookup(key).map(|(tenant, _)| tenant)
    }

    /// The tenant and roles of `key`, if it is in the list. The lookup is by digest (its timing
    /// reveals nothing about the stored keys) and the final comparison is constant-time.
    pub fn lookup(&self, key: &str) -> Option<(Arc<str>, Roles)> {
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let entry = self.by_digest.get(&digest)?;
        constant_time_eq(&entry.key, key.as_bytes())
            .then(|| (entry.tenant.clone(), entry.roles.clone()))
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
    fn keys_carry_their_roles() {
        let ring = KeyRing::from_yaml(
            "- key: a\n  tenant: t\n  roles: [chat, admin]\n- key: b\n  tenant: u\n",
        )
        .unwrap();
        let (tenant, roles) = ring.lookup("a").unwrap();
        assert_eq!((&*tenant, roles.len()), ("t", 2));
        assert!(ring.lookup("b").unwrap().1.is_empty());
        assert!(ring.lookup("c").is_none());
    }

    #[test]
    fn comparisons_and_hashes() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}

//! What a cached answer is found by: a SHA-256 over the normalized request, scoped to one tenant
//! or shared by all. A digest, not the request itself, so that a key costs 32 bytes whatever the
//! prompt's length, and the cache holds no prompt text.

use std::fmt;

use sha2::{Digest, Sha256};

/// Opens every digest: keeps these apart from any other SHA-256 the sidecar takes, and a change
/// of the encoding below changes the version, so old and new keys never meet.
const DOMAIN: &[u8] = b"sluice response cache v1\0";

/// The fingerprint of a normalized request within a scope (a tenant, or shared).
///
/// Two requests share an answer only when their keys are equal: the caller puts in everything
/// the answer depends on (model and variant, messages, sampling parameters, ...).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CacheKey([u8; 32]);

impl CacheKey {
    /// The key of `parts` for one tenant's eyes only: the same parts under another `scope` give
    /// another key, so one tenant's answers never reach another.
    ///
    /// Each part (and the scope) is hashed after its length, so `["ab", "c"]` and `["a", "bc"]`,
    /// or a scope ending where a part begins, give different keys.
    pub fn new(scope: &str, parts: &[&[u8]]) -> Self {
        Self::digest(Some(scope), parts)
    }

    /// The key of `parts` shared by every tenant (a cache configured as shared). No tenant's
    /// [`CacheKey::new`] gives it, whatever the tenant's name.
    pub fn shared(parts: &[&[u8]]) -> Self {
        Self::digest(None, parts)
    }

    /// The digest's bytes (for logs or tracing, never to rebuild the request).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    fn digest(scope: Option<&str>, parts: &[&[u8]]) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(DOMAIN);
        // A tag before the scope: a shared key is not any tenant's (not even the tenant "").
        match scope {
            None => hasher.update([0]),
            Some(scope) => {
                hasher.update([1]);
                field(&mut hasher, scope.as_bytes());
            }
        }
        for part in parts {
            field(&mut hasher, part);
        }
        Self(hasher.finalize().into())
    }
}

/// `bytes` after its length: a sequence of these reads back one way only.
fn field(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

impl fmt::Debug for CacheKey {
    /// The first 8 bytes in hex: enough to tell keys apart in a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

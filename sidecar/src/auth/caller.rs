//! An identified caller, and why one was not identified.

use std::sync::Arc;

use sha2::{Digest, Sha256};

/// A caller's roles (shared: a key's roles are the same for each of its requests).
pub type Roles = Arc<[Box<str>]>;

/// The tenant of callers that send no key when no key list is configured.
pub const ANONYMOUS: &str = "anonymous";

/// An identified caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// What its rate-limit buckets `per: Key` count: the API key as sent (empty when none was
    /// sent), or `jwt:<issuer>:<subject>` for a token. Never log it; see [`Caller::key_hash`].
    pub key: String,
    /// The tenant: from the key list or the token's tenant claim, or the key itself without a
    /// list.
    pub tenant: Arc<str>,
    /// Its roles (from the key list or the token's roles claim).
    pub roles: Roles,
}

/// Why a caller was not identified (answered with 401).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unauthorized {
    /// A credential is required and the request carries none.
    Missing,
    /// The key is not in the list; carries the key's [`short_hash`].
    Unknown(String),
    /// A bearer token was refused; carries why (never the token).
    Token(String),
}

// === impl Caller ===

impl Caller {
    /// A caller without roles.
    pub fn new(key: String, tenant: Arc<str>) -> Self {
        Self {
            key,
            tenant,
            roles: Arc::from([]),
        }
    }

    /// A short, non-reversible tag of the key for logs.
    pub fn key_hash(&self) -> String {
        short_hash(&self.key)
    }

    /// The tenant as it may be shown (logs, traces, forwards): without a key list each key is
    /// its own tenant, and a credential is never shown, so such a tenant shows as `key-<hash>`.
    pub fn shown_tenant(&self) -> std::borrow::Cow<'_, str> {
        if !self.key.is_empty() && *self.tenant == *self.key {
            std::borrow::Cow::Owned(format!("key-{}", self.key_hash()))
        } else {
            std::borrow::Cow::Borrowed(&self.tenant)
        }
    }

    /// Whether the caller has any of `roles`.
    pub fn has_any_role(&self, roles: &[String]) -> bool {
        self.roles.iter().any(|r| roles.iter().any(|w| **r == **w))
    }
}

/// The first 8 hex digits of the key's SHA-256: enough to tell keys apart in logs, useless to
/// recover them.
pub fn short_hash(key: &str) -> String {
    let d = Sha256::digest(key.as_bytes());
    format!("{:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_hashes_tell_keys_apart_and_reveal_nothing() {
        let h = short_hash("sk-secret");
        assert_eq!(h.len(), 8);
        assert!(!h.contains("secret"));
        assert_ne!(h, short_hash("sk-secreT"));
    }

    #[test]
    fn a_tenant_that_is_the_key_itself_is_never_shown() {
        let own = Caller::new("sk-secret".into(), Arc::from("sk-secret"));
        assert_eq!(
            own.shown_tenant(),
            format!("key-{}", short_hash("sk-secret"))
        );
        let listed = Caller::new("sk-secret".into(), Arc::from("team-a"));
        assert_eq!(listed.shown_tenant(), "team-a");
    }
}

//! How callers are identified under one config, and what they may use.

use std::sync::Arc;

use sluice_crds::{
    auth::AuthConfig, rate_limit_policy::IdentitySource, sidecar_config::IdentityConfig,
};

use super::{
    access::{AccessRules, Forbidden, Grant},
    caller::{ANONYMOUS, Caller, Unauthorized, short_hash},
    jwt,
    keys::KeyRing,
};

/// How callers are identified under one config.
#[derive(Debug)]
pub struct Identity {
    source: KeySource,
    keys: Option<KeyRing>,
    /// `auth`'s JWT issuers.
    issuers: Vec<jwt::Issuer>,
    /// `auth`'s access rules: `Some` exactly when the config has `auth` (a credential is then
    /// required).
    access: Option<AccessRules>,
}

/// Where a request carries its API key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    /// `Authorization: Bearer <key>`.
    Bearer,
    /// The value of this header (a valid header name; the config reload checks it).
    Header(Box<str>),
}

// === impl Identity ===

impl Identity {
    /// Identity as a `RateLimitPolicy` says (`config`), with `keys` read from its keys file (if
    /// any).
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
        Ok(Self {
            source,
            keys,
            issuers: Vec::new(),
            access: None,
        })
    }

    /// Identity as `auth` says: bearer API keys from `keys`, tokens of `issuers`, and its
    /// access rules.
    pub fn with_auth(auth: &AuthConfig, keys: Option<KeyRing>, issuers: Vec<jwt::Issuer>) -> Self {
        Self {
            source: KeySource::Bearer,
            keys,
            issuers,
            access: Some(AccessRules::new(&auth.allow)),
        }
    }

    /// Anyone may call; each key is its own tenant.
    pub fn open() -> Self {
        Self {
            source: KeySource::Bearer,
            keys: None,
            issuers: Vec::new(),
            access: None,
        }
    }

    /// Where requests carry their credential.
    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// Whether a credential is required (a key list or `auth` is configured).
    pub fn has_keys(&self) -> bool {
        self.keys.is_some() || self.access.is_some()
    }

    /// The caller that sent `credential` (`None`: none, or an empty one).
    pub fn caller(&self, credential: Option<&str>) -> Result<Caller, Unauthorized> {
        let credential = credential.filter(|k| !k.is_empty());
        let Some(credential) = credential else {
            return match self.has_keys() {
                true => Err(Unauthorized::Missing),
                false => Ok(Caller::new(String::new(), Arc::from(ANONYMOUS))),
            };
        };
        if !self.issuers.is_empty() && jwt::looks_like_jwt(credential) {
            return jwt::verify(&self.issuers, credential);
        }
        match &self.keys {
            None if self.access.is_none() => {
                Ok(Caller::new(credential.to_owned(), Arc::from(credential)))
            }
            None => Err(Unauthorized::Unknown(short_hash(credential))),
            Some(ring) => match ring.lookup(credential) {
                Some((tenant, roles)) => Ok(Caller {
                    key: credential.to_owned(),
                    tenant,
                    roles,
                }),
                None => Err(Unauthorized::Unknown(short_hash(credential))),
            },
        }
    }

    /// What `caller` may use: everything without `auth`, else what its access rules grant.
    pub fn grant(&self, caller: &Caller) -> Result<Grant, Forbidden> {
        match &self.access {
            None => Ok(Grant::all()),
            Some(rules) => rules.grant(caller),
        }
    }
}

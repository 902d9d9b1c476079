//! Who is calling, and what they may use, under one config ([`Identity`]).
//!
//! Two ways to say it. Without `spec.auth` (the sidecar config's `auth`), a `RateLimitPolicy`'s
//! `identity` reads an API key from `Authorization: Bearer` or a configured header ([`KeySource`]),
//! and with a keys list maps it to its tenant; without one each key is its own tenant and a
//! request without a key is [`ANONYMOUS`]. With `auth`, a credential is required: an API key
//! from its list ([`keys`]) or a JWT from one of its issuers ([`jwt`], keys from [`jwks`]), which
//! gives the caller's tenant and roles; its access rules ([`access`]) then decide what the caller
//! may use. Reading the credential off a request's headers is [`crate::admit::caller`]'s part.
//!
//! Credentials are never logged: logs carry the tenant and [`short_hash`] of the key (for a
//! token, of its issuer and subject).

pub mod access;
pub mod caller;
mod identity;
pub mod jwks;
pub mod jwt;
pub mod keys;

pub use self::{
    access::{AccessRules, Forbidden, Grant},
    caller::{ANONYMOUS, Caller, Roles, Unauthorized, short_hash},
    identity::{Identity, KeySource},
    jwks::KeySets,
    keys::{KeyRing, constant_time_eq},
};

#[cfg(test)]
mod tests;

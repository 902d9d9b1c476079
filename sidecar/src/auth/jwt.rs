//! JWT bearer tokens of `auth.jwt`'s issuers: the signature checked against the issuer's key
//! set (asymmetric algorithms only: a key set holds public keys, so HMAC and `none` are
//! refused), then `exp`, `nbf`, `iss` and `aud` with [`LEEWAY`] of clock skew; the caller's
//! tenant and roles come from the issuer's configured claims. `jsonwebtoken` does the
//! cryptography (on aws-lc-rs).

use std::sync::Arc;

use jsonwebtoken::{
    Algorithm, AlgorithmFamily, DecodingKey, Validation,
    errors::ErrorKind,
    jwk::{Jwk, JwkSet},
};
use serde_json::Value;
use sluice_crds::auth::JwtIssuerConfig;

use super::{
    caller::{Caller, Roles, Unauthorized},
    jwks::RemoteKeySet,
};

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY: u64 = 60;

/// One accepted issuer and its keys.
#[derive(Debug)]
pub struct Issuer {
    config: JwtIssuerConfig,
    keys: IssuerKeys,
}

/// Where an issuer's keys come from.
#[derive(Debug)]
pub enum IssuerKeys {
    /// A mounted file, as read with the config.
    File(Arc<JwkSet>),
    /// Fetched from `jwks_uri`.
    Remote(Arc<RemoteKeySet>),
}

impl Issuer {
    /// The issuer `config` with its `keys`.
    pub fn new(config: JwtIssuerConfig, keys: IssuerKeys) -> Self {
        Self { config, keys }
    }
}

/// Whether a bearer credential is shaped like a JWT (three base64url parts, a JSON header) rather
/// than an API key.
pub fn looks_like_jwt(credential: &str) -> bool {
    credential.starts_with("eyJ") && credential.bytes().filter(|b| *b == b'.').count() == 2
}

/// Verifies `token` against the issuer it names; the caller it identifies.
pub fn verify(issuers: &[Issuer], token: &str) -> Result<Caller, Unauthorized> {
    let refused = |why: String| Unauthorized::Token(why);
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| refused(format!("malformed token header: {e}")))?;
    let alg = header.alg;
    if alg.family() == AlgorithmFamily::Hmac {
        return Err(refused(format!(
            "algorithm {alg:?} is not accepted (only signatures checkable with public keys)"
        )));
    }
    // Which issuer's keys to check against: the one it claims (the claim is only trusted once
    // the signature of that issuer's key verifies).
    let claimed: Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|e| refused(format!("malformed token claims: {e}")))?;
    let iss = claimed.get("iss").and_then(Value::as_str).unwrap_or("");
    let issuer = issuers
        .iter()
        .find(|i| i.config.issuer == iss)
        .ok_or_else(|| refused(format!("issuer {iss:?} is not accepted")))?;
    let jwk = issuer.key(header.kid.as_deref(), alg)?;
    let key = DecodingKey::from_jwk(&jwk)
        .map_err(|e| refused(format!("the issuer's key is unusable: {e}")))?;
    let mut validation = Validation::new(alg);
    validation.leeway = LEEWAY;
    validation.validate_nbf = true;
    validation.set_issuer(&[&issuer.config.issuer]);
    validation.set_audience(&issuer.config.audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    let claims = jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map_err(|e| refused(reason(e.kind())))?
        .claims;
    let tenant = match claim(&claims, &issuer.config.tenant_claim) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => {
            return Err(refused(format!(
                "the token has no tenant claim {:?}",
                issuer.config.tenant_claim
            )));
        }
    };
    let roles: Roles = match claim(&claims, &issuer.config.roles_claim) {
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(Value::as_str)
            .map(Box::from)
            .collect(),
        Some(Value::String(s)) => s.split_whitespace().map(Box::from).collect(),
        _ => Arc::from([]),
    };
    let subject = claims.get("sub").and_then(Value::as_str).unwrap_or(&tenant);
    Ok(Caller {
        key: format!("jwt:{}:{subject}", issuer.config.issuer),
        tenant: Arc::from(tenant),
        roles,
    })
}

impl Issuer {
    /// The key `kid` names (or the set's only key when the token names none), fit for `alg`.
    fn key(&self, kid: Option<&str>, alg: Algorithm) -> Result<Jwk, Unauthorized> {
        let refused = |why: String| Unauthorized::Token(why);
        let set = match &self.keys {
            IssuerKeys::File(set) => set.clone(),
            IssuerKeys::Remote(remote) => remote.keys().ok_or_else(|| {
                refused(format!(
                    "the keys of issuer {:?} are not fetched yet from {}",
                    self.config.issuer,
                    remote.uri()
                ))
            })?,
        };
        let found = match kid {
            Some(kid) => set.find(kid),
            None if set.keys.len() == 1 => set.keys.first(),
            None => None,
        };
        let Some(jwk) = found else {
            if let IssuerKeys::Remote(remote) = &self.keys {
                remote.request_refresh();
            }
            return Err(refused(format!(
                "issuer {:?} has no key {:?}",
                self.config.issuer,
                kid.unwrap_or("(the token names none)")
            )));
        };
        if let Some(key_alg) = jwk.common.key_algorithm
            && key_alg != alg.into()
        {
            return Err(refused(format!(
                "key {:?} is for {key_alg:?}, the token is signed with {alg:?}",
                kid.unwrap_or_default()
            )));
        }
        Ok(jwk.clone())
    }
}

/// The value at a dotted claim path (`realm_access.roles`).
fn claim<'v>(claims: &'v Value, path: &str) -> Option<&'v Value> {
    claims
        .get(path)
        .or_else(|| path.split('.').try_fold(claims, |v, part| v.get(part)))
}

/// A refusal's reason for the client, from the validation error.
fn reason(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".to_owned(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".to_owned(),
        ErrorKind::InvalidAudience => "the token is not for this audience (aud)".to_owned(),
        ErrorKind::InvalidIssuer => "the token's issuer is not accepted".to_owned(),
        ErrorKind::MissingRequiredClaim(c) => format!("the token has no {c:?} claim"),
        ErrorKind::InvalidAlgorithm => "the token's algorithm does not match its key".to_owned(),
        other => format!("the token is invalid ({other:?})"),
    }
}

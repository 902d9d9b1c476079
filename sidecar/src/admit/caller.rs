//! Who is calling: the credential read off a request's headers where the config in force says it
//! is (`Authorization: Bearer` or a configured header), then checked ([`Identity::caller`]), and
//! removed from the headers.

use http::{HeaderMap, header};

use crate::auth::{Caller, Identity, KeySource, Unauthorized};

/// Identifies the caller of a request, and removes its credential from `headers`.
pub fn identify(identity: &Identity, headers: &mut HeaderMap) -> Result<Caller, Unauthorized> {
    let caller = identity.caller(key_of(identity.source(), headers));
    match identity.source() {
        KeySource::Bearer => headers.remove(header::AUTHORIZATION),
        KeySource::Header(name) => headers.remove(&**name),
    };
    caller
}

/// The key a request carries, trimmed (`None`: none, or not valid text).
fn key_of<'h>(source: &KeySource, headers: &'h HeaderMap) -> Option<&'h str> {
    match source {
        KeySource::Bearer => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            }),
        KeySource::Header(name) => headers
            .get(&**name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::auth::{ANONYMOUS, KeyRing, short_hash};
    use http::HeaderValue;
    use sluice_crds::{rate_limit_policy::IdentitySource, sidecar_config::IdentityConfig};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    const KEYS: &str = "- key: sk-alice-1\n  tenant: alice\n- key: sk-alice-2\n  tenant: alice\n- key: sk-bob\n  tenant: bob\n";

    #[test]
    fn bearer_keys_are_their_own_tenants_without_a_list() {
        let id = Identity::open();
        let c = identify(&id, &mut headers(&[("authorization", "Bearer sk-x")])).unwrap();
        assert_eq!((c.key.as_str(), &*c.tenant), ("sk-x", "sk-x"));
        let c = identify(&id, &mut headers(&[("authorization", "bearer   sk-y ")])).unwrap();
        assert_eq!(c.key, "sk-y");
        let c = identify(&id, &mut HeaderMap::new()).unwrap();
        assert_eq!(&*c.tenant, ANONYMOUS);
        let c = identify(&id, &mut headers(&[("authorization", "Basic abc")])).unwrap();
        assert_eq!(&*c.tenant, ANONYMOUS, "not a bearer token");
    }

    #[test]
    fn a_key_list_maps_keys_to_tenants_and_refuses_others() {
        let ring = KeyRing::from_yaml(KEYS).unwrap();
        assert_eq!(ring.len(), 3);
        let id = Identity::new(&IdentityConfig::default(), Some(ring)).unwrap();
        let c = identify(&id, &mut headers(&[("authorization", "Bearer sk-alice-2")])).unwrap();
        assert_eq!(&*c.tenant, "alice");
        assert_eq!(
            identify(&id, &mut headers(&[("authorization", "Bearer sk-eve")])),
            Err(Unauthorized::Unknown(short_hash("sk-eve")))
        );
        assert_eq!(
            identify(&id, &mut HeaderMap::new()),
            Err(Unauthorized::Missing)
        );
        assert!(
            !format!("{id:?}").contains("sk-"),
            "keys never appear in Debug"
        );
    }

    #[test]
    fn a_configured_header_carries_the_key() {
        let config = IdentityConfig {
            source: IdentitySource::Header,
            header: Some("x-api-key".into()),
            keys_file: None,
        };
        let id = Identity::new(&config, None).unwrap();
        let mut sent = headers(&[("x-api-key", "k1"), ("authorization", "Bearer other")]);
        let c = identify(&id, &mut sent).unwrap();
        assert_eq!(c.key, "k1");
        assert!(!sent.contains_key("x-api-key"), "the credential is removed");
        assert!(sent.contains_key("authorization"), "another header is not");
    }
}

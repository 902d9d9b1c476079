#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use serde_json::json;
use sluice_crds::auth::{AccessRule, AuthConfig, JwtIssuerConfig};

use super::{
    jwt::{Issuer, IssuerKeys},
    *,
};

#[path = "../../tests/common/issuer.rs"]
mod issuer;

use issuer::{Alg, TestIssuer, claims, now};

const ISS: &str = "https://issuer.test";
const AUD: &str = "sluice";

fn issuer_config(tenant_claim: &str, roles_claim: &str) -> JwtIssuerConfig {
    JwtIssuerConfig {
        issuer: ISS.into(),
        audiences: vec![AUD.into()],
        jwks_uri: None,
        jwks_file: Some("unused".into()),
        tenant_claim: tenant_claim.into(),
        roles_claim: roles_claim.into(),
    }
}

fn identity(keys: &[&TestIssuer], tenant_claim: &str, roles_claim: &str) -> Identity {
    let set = jwks::parse(TestIssuer::jwks(keys).as_bytes()).unwrap();
    let config = AuthConfig {
        jwt: vec![issuer_config(tenant_claim, roles_claim)],
        ..Default::default()
    };
    let issuers = vec![Issuer::new(
        config.jwt[0].clone(),
        IssuerKeys::File(Arc::new(set)),
    )];
    Identity::with_auth(&config, None, issuers)
}

fn refusal(id: &Identity, token: &str) -> String {
    match id.caller(Some(token)) {
        Err(Unauthorized::Token(why)) => why,
        other => panic!("expected a refused token, got {other:?}"),
    }
}

#[test]
fn tokens_of_each_algorithm_identify_their_tenant_and_roles() {
    let keys = [
        TestIssuer::new(Alg::RS256, "rsa"),
        TestIssuer::new(Alg::ES256, "ec"),
        TestIssuer::new(Alg::EdDSA, "ed"),
    ];
    let id = identity(&keys.iter().collect::<Vec<_>>(), "org.id", "roles");
    for key in &keys {
        let token = key.token(&claims(
            ISS,
            AUD,
            json!({"org": {"id": "acme"}, "roles": ["chat", "tester"]}),
        ));
        let caller = id.caller(Some(&token)).unwrap();
        assert_eq!(&*caller.tenant, "acme", "{:?}", key.alg);
        assert_eq!(caller.roles.len(), 2);
        assert_eq!(caller.key, format!("jwt:{ISS}:user-1"));
    }
    // A space-separated string (as `scope`) and a numeric tenant.
    let id = identity(&[&keys[0]], "tid", "scope");
    let token = keys[0].token(&claims(ISS, AUD, json!({"tid": 42, "scope": "a b"})));
    let caller = id.caller(Some(&token)).unwrap();
    assert_eq!((&*caller.tenant, caller.roles.len()), ("42", 2));
}

#[test]
fn forged_expired_and_misdirected_tokens_are_refused() {
    let key = TestIssuer::new(Alg::RS256, "k1");
    let id = identity(&[&key], "sub", "roles");
    let good = claims(ISS, AUD, json!({}));
    assert!(id.caller(Some(&key.token(&good))).is_ok());

    // Signed by another key under the same kid.
    let forger = TestIssuer::new(Alg::RS256, "k1");
    assert!(refusal(&id, &forger.token(&good)).contains("signature"));
    // A payload swapped under a valid signature.
    let token = key.token(&good);
    let other = key.token(&claims(ISS, AUD, json!({"sub": "admin"})));
    let spliced = format!(
        "{}.{}.{}",
        token.split('.').next().unwrap(),
        other.split('.').nth(1).unwrap(),
        token.split('.').nth(2).unwrap()
    );
    assert!(refusal(&id, &spliced).contains("signature"));

    let expired = claims(ISS, AUD, json!({"exp": now() - 120}));
    assert!(refusal(&id, &key.token(&expired)).contains("expired"));
    let within_skew = claims(ISS, AUD, json!({"exp": now() - 10}));
    assert!(id.caller(Some(&key.token(&within_skew))).is_ok());
    let early = claims(ISS, AUD, json!({"nbf": now() + 600}));
    assert!(refusal(&id, &key.token(&early)).contains("not valid yet"));
    let no_exp = json!({"iss": ISS, "aud": AUD, "sub": "u"});
    assert!(refusal(&id, &key.token(&no_exp)).contains("exp"));
    assert!(refusal(&id, &key.token(&claims(ISS, "other", json!({})))).contains("audience"));
    assert!(
        refusal(
            &id,
            &key.token(&claims("https://evil.test", AUD, json!({})))
        )
        .contains("not accepted")
    );
    let no_tenant = claims(ISS, AUD, json!({"sub": ""}));
    assert!(refusal(&id, &key.token(&no_tenant)).contains("tenant"));
    // Unknown key id.
    let stranger = TestIssuer::new(Alg::ES256, "k2");
    assert!(refusal(&id, &stranger.token(&good)).contains("no key"));
    // HMAC (a public key used as a shared secret) is never accepted.
    let hs = key.token_with_header(&json!({"alg": "HS256", "kid": "k1"}), &good);
    assert!(refusal(&id, &hs).contains("not accepted"));
    let none = key.token_with_header(&json!({"alg": "none"}), &good);
    assert!(refusal(&id, &none).contains("malformed"));
    // A token signed with ES256 but naming the RSA key.
    let ec = TestIssuer::new(Alg::ES256, "k1");
    assert!(id.caller(Some(&ec.token(&good))).is_err());
    // Nothing refused ever echoes the token.
    let token = forger.token(&good);
    assert!(!refusal(&id, &token).contains(&token[..20]));
}

#[test]
fn with_auth_a_credential_is_required_and_keys_carry_roles() {
    let ring = KeyRing::from_yaml("- key: sk-1\n  tenant: team-a\n  roles: [chat]\n").unwrap();
    let config = AuthConfig {
        keys_file: Some("unused".into()),
        allow: vec![AccessRule {
            roles: vec!["chat".into()],
            ..Default::default()
        }],
        ..Default::default()
    };
    let id = Identity::with_auth(&config, Some(ring), Vec::new());
    assert_eq!(id.caller(None), Err(Unauthorized::Missing));
    assert!(matches!(
        id.caller(Some("sk-2")),
        Err(Unauthorized::Unknown(_))
    ));
    // Without issuers, a token-shaped credential is just an unknown key.
    assert!(matches!(
        id.caller(Some("eyJhbGciOi.e30.sig")),
        Err(Unauthorized::Unknown(_))
    ));
    let caller = id.caller(Some("sk-1")).unwrap();
    assert_eq!(&*caller.tenant, "team-a");
    assert!(id.grant(&caller).is_ok());
    let roleless = Caller::new("x".into(), Arc::from("team-b"));
    assert!(id.grant(&roleless).is_err());
    // Without `auth` (a policy's identity) everything is granted.
    assert_eq!(Identity::open().grant(&roleless), Ok(Grant::all()));
}

//! A JWT issuer for tests: a key pair generated in the test (aws-lc-rs), its JWK, and tokens it
//! signs. Written from RFC 7515/7517/7518, independently of the verifier under test.

use aws_lc_rs::{
    rand::SystemRandom,
    rsa::KeySize,
    signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RSA_PKCS1_SHA256,
        RsaKeyPair,
    },
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD as B64};
use serde_json::{Value, json};

/// The signature algorithms a test issuer can use.
#[derive(Clone, Copy, Debug)]
pub enum Alg {
    RS256,
    ES256,
    EdDSA,
}

/// A signing key and its id.
pub struct TestIssuer {
    pub alg: Alg,
    pub kid: String,
    key: Key,
}

enum Key {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

impl TestIssuer {
    /// A fresh key pair for `alg`, named `kid`.
    pub fn new(alg: Alg, kid: &str) -> Self {
        let key = match alg {
            Alg::RS256 => Key::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).unwrap()),
            Alg::ES256 => {
                Key::Ec(EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap())
            }
            Alg::EdDSA => Key::Ed(Ed25519KeyPair::generate().unwrap()),
        };
        Self {
            alg,
            kid: kid.to_owned(),
            key,
        }
    }

    /// The public key as a JWK.
    pub fn jwk(&self) -> Value {
        match &self.key {
            Key::Rsa(k) => {
                let public = k.public_key();
                json!({
                    "kty": "RSA", "kid": self.kid, "alg": "RS256", "use": "sig",
                    "n": B64.encode(public.modulus().big_endian_without_leading_zero()),
                    "e": B64.encode(public.exponent().big_endian_without_leading_zero()),
                })
            }
            Key::Ec(k) => {
                // Uncompressed point: 0x04 || x || y.
                let point = k.public_key().as_ref();
                json!({
                    "kty": "EC", "kid": self.kid, "alg": "ES256", "crv": "P-256",
                    "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
                })
            }
            Key::Ed(k) => json!({
                "kty": "OKP", "kid": self.kid, "alg": "EdDSA", "crv": "Ed25519",
                "x": B64.encode(k.public_key().as_ref()),
            }),
        }
    }

    /// A key set of `issuers`' public keys, as JSON text.
    pub fn jwks(issuers: &[&TestIssuer]) -> String {
        json!({"keys": issuers.iter().map(|i| i.jwk()).collect::<Vec<_>>()}).to_string()
    }

    /// A compact JWS of `claims`, signed with this key (header `alg` and `kid`).
    pub fn token(&self, claims: &Value) -> String {
        let alg = format!("{:?}", self.alg);
        self.token_with_header(&json!({"alg": alg, "typ": "JWT", "kid": self.kid}), claims)
    }

    /// A compact JWS with the given header, signed with this key.
    pub fn token_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let signature = match &self.key {
            Key::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(
                    &RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    input.as_bytes(),
                    &mut sig,
                )
                .unwrap();
                sig
            }
            Key::Ec(k) => k
                .sign(&SystemRandom::new(), input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec(),
            Key::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
        };
        format!("{input}.{}", B64.encode(signature))
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims from `issuer` for `audience`, valid for an hour, with `extra` merged in.
pub fn claims(issuer: &str, audience: &str, extra: Value) -> Value {
    let mut c = json!({
        "iss": issuer, "aud": audience, "sub": "user-1",
        "iat": now(), "exp": now() + 3600,
    });
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

//! Forwarded requests' credentials: the per-model forwarding token (a mounted Secret) and the
//! signature a forwarding sidecar puts in [`FORWARDED_HEADER`], which the serving sidecar verifies
//! before it skips routing and admission. The signature also covers [`CALLER_HEADER`], the
//! caller the entry pod identified: forwards carry that identity, never the client's credential.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hmac::{Hmac, Mac};
use http::HeaderValue;
use sha2::Sha256;
use subtle::ConstantTimeEq;

use super::pick::{seed, splitmix64};
use crate::{
    auth::Caller,
    error::{Result, StartupError},
};

/// The internal header a forwarding sidecar signs its requests with:
/// `v2.<unix seconds>.<nonce hex>.<HMAC-SHA256 hex>`.
pub const FORWARDED_HEADER: &str = "x-sluice-forwarded";
/// The internal header naming the caller of a forwarded request (hex of
/// `{"tenant": ..., "roles": [...]}`), as the entry pod identified it; signed with the request.
pub const CALLER_HEADER: &str = "x-sluice-caller";
/// How far a forwarded request's timestamp may be from this pod's clock.
pub const FORWARD_MAX_SKEW: Duration = Duration::from_secs(300);

/// The per-model forwarding secret (a Secret the operator generates, mounted as a file). Never
/// printed.
#[derive(Clone)]
pub struct ForwardToken(Arc<[u8]>);

impl ForwardToken {
    /// Reads the token file: its content with surrounding whitespace trimmed, not empty.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let raw = std::fs::read(path).map_err(|e| {
            StartupError::Config(format!("--forward-token-file {}: {e}", path.display()))
        })?;
        let token = raw.trim_ascii();
        if token.is_empty() {
            return Err(StartupError::Config(format!(
                "--forward-token-file {} is empty",
                path.display()
            )));
        }
        Ok(Self(token.into()))
    }

    /// A token from bytes (tests, benches).
    pub fn new(bytes: impl AsRef<[u8]>) -> Self {
        Self(bytes.as_ref().into())
    }
}

impl fmt::Debug for ForwardToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ForwardToken([redacted])")
    }
}

/// Signs and verifies [`FORWARDED_HEADER`]: HMAC-SHA256 keyed with the forwarding token over
/// `sluice-forward-v2\n<unix seconds>\n<nonce>\n<request path>\n<caller>`, compared in constant
/// time;
/// timestamps more than [`FORWARD_MAX_SKEW`] away are refused, so a leaked header value stops
/// working within minutes and never reveals the token. (There is no replay cache: within the
/// window a captured value can be replayed on the same path, which needs in-cluster sniffing.)
#[derive(Clone)]
pub struct ForwardAuth {
    /// The MAC keyed with the token (its inner and outer hash states precomputed); each
    /// signature starts from a clone.
    key: Hmac<Sha256>,
    nonce: Arc<AtomicU64>,
}

impl fmt::Debug for ForwardAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ForwardAuth")
    }
}

// === impl ForwardAuth ===

impl ForwardAuth {
    /// Keys the MAC with `token`.
    pub fn new(token: &ForwardToken) -> Self {
        let key = match Hmac::<Sha256>::new_from_slice(&token.0) {
            Ok(key) => key,
            // HMAC takes a key of any length (a longer one is hashed first).
            Err(_) => unreachable!("HMAC-SHA256 accepts keys of every length"),
        };
        Self {
            key,
            nonce: Arc::new(AtomicU64::new(seed())),
        }
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.key.clone();
        for p in parts {
            mac.update(p);
        }
        mac.finalize().into_bytes().into()
    }

    fn mac_for(&self, ts: &str, nonce: &str, path: &str, caller: &[u8]) -> [u8; 32] {
        self.mac(&[
            b"sluice-forward-v2\n",
            ts.as_bytes(),
            b"\n",
            nonce.as_bytes(),
            b"\n",
            path.as_bytes(),
            b"\n",
            caller,
        ])
    }

    /// The header value for a request to `path` from `caller` (the [`CALLER_HEADER`] value
    /// sent with it), signed now.
    pub fn sign(&self, path: &str, caller: &[u8]) -> HeaderValue {
        self.sign_at(path, caller, unix_now())
    }

    fn sign_at(&self, path: &str, caller: &[u8], now: u64) -> HeaderValue {
        let nonce = format!(
            "{:016x}",
            splitmix64(self.nonce.fetch_add(1, Ordering::Relaxed))
        );
        let ts = now.to_string();
        let mac = hex(&self.mac_for(&ts, &nonce, path, caller));
        // Only ASCII digits, hex and dots.
        HeaderValue::from_str(&format!("v2.{ts}.{nonce}.{mac}"))
            .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }

    /// Whether `value` is a valid signature for a request to `path` from `caller` now.
    pub fn verify(&self, value: &HeaderValue, path: &str, caller: &[u8]) -> bool {
        self.verify_at(value, path, caller, unix_now())
    }

    fn verify_at(&self, value: &HeaderValue, path: &str, caller: &[u8], now: u64) -> bool {
        let Ok(value) = value.to_str() else {
            return false;
        };
        let mut parts = value.split('.');
        let (Some("v2"), Some(ts), Some(nonce), Some(mac), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return false;
        };
        let Ok(at) = ts.parse::<u64>() else {
            return false;
        };
        if now.abs_diff(at) > FORWARD_MAX_SKEW.as_secs()
            || nonce.is_empty()
            || nonce.len() > 32
            || mac.len() != 64
        {
            return false;
        }
        let expected = hex(&self.mac_for(ts, nonce, path, caller));
        expected.as_bytes().ct_eq(mac.as_bytes()).into()
    }
}

/// The [`CALLER_HEADER`] value for `caller` (its tenant as shown, and roles; never its
/// credential).
pub fn caller_header(caller: &Caller) -> HeaderValue {
    let json = serde_json::json!({"tenant": caller.shown_tenant(), "roles": &*caller.roles});
    // Hex: only visible ASCII, whatever the tenant's characters.
    HeaderValue::from_str(&hex(json.to_string().as_bytes()))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// The caller a verified [`CALLER_HEADER`] value names (`None`: malformed).
pub fn caller_from(value: &[u8]) -> Option<Caller> {
    #[derive(serde::Deserialize)]
    struct Named {
        tenant: String,
        roles: Vec<String>,
    }
    if !value.len().is_multiple_of(2) {
        return None;
    }
    let bytes: Option<Vec<u8>> = value
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect();
    let named: Named = serde_json::from_slice(&bytes?).ok()?;
    Some(Caller {
        key: String::new(),
        tenant: Arc::from(named.tenant),
        roles: named
            .roles
            .into_iter()
            .map(String::into_boxed_str)
            .collect(),
    })
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn token() -> ForwardToken {
        ForwardToken::new("s3cret-token-for-tests")
    }

    #[test]
    fn token_files_are_trimmed_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("sluice-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "  abc\n").unwrap();
        let t = ForwardToken::from_file(&path).unwrap();
        assert_eq!(&*t.0, b"abc");
        assert_eq!(format!("{t:?}"), "ForwardToken([redacted])");
        std::fs::write(&path, "\n").unwrap();
        let e = ForwardToken::from_file(&path).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        let e = ForwardToken::from_file(&dir.join("missing"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--forward-token-file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let auth = ForwardAuth::new(&ForwardToken::new("Jefe"));
        assert_eq!(
            hex(&auth.mac(&[b"what do ya ", b"want for nothing?"])),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block is hashed first.
        let auth = ForwardAuth::new(&ForwardToken::new([0xaa; 131]));
        assert_eq!(
            hex(&auth.mac(&[b"Test Using Larger Than Block-Size Key - Hash Key First"])),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn forwarded_header_verifies_only_with_the_token_path_and_time() {
        let auth = ForwardAuth::new(&token());
        let now = 1_700_000_000;
        let caller = caller_header(&Caller::new(String::new(), Arc::from("alice")));
        let caller = caller.as_bytes();
        let v = auth.sign_at("/v1/chat/completions", caller, now);
        assert!(auth.verify_at(&v, "/v1/chat/completions", caller, now));
        assert!(auth.verify_at(&v, "/v1/chat/completions", caller, now + 299));
        assert!(
            !auth.verify_at(&v, "/v1/chat/completions", caller, now + 301),
            "expired"
        );
        assert!(
            !auth.verify_at(&v, "/v1/completions", caller, now),
            "other path"
        );
        let mallory = caller_header(&Caller::new(String::new(), Arc::from("mallory")));
        assert!(
            !auth.verify_at(&v, "/v1/chat/completions", mallory.as_bytes(), now),
            "another caller"
        );
        let other = ForwardAuth::new(&ForwardToken::new("another model's token"));
        assert!(
            !other.verify_at(&v, "/v1/chat/completions", caller, now),
            "other token"
        );
        // Tampering with any part fails.
        let s = v.to_str().unwrap();
        for forged in [
            s.replacen("v2.", "v1.", 1),
            format!("{s}0"),
            s.replace(&now.to_string(), &(now + 1).to_string()),
            "1".into(),
            "true".into(),
            "v2.1700000000.00.".to_owned() + &"0".repeat(64),
        ] {
            let h = HeaderValue::from_str(&forged).unwrap();
            assert!(
                !auth.verify_at(&h, "/v1/chat/completions", caller, now),
                "{forged}"
            );
        }
        // Nonces differ, so values differ.
        assert_ne!(auth.sign_at("/p", b"", now), auth.sign_at("/p", b"", now));
    }

    #[test]
    fn the_caller_header_round_trips_any_tenant() {
        let caller = Caller {
            key: "sk-secret".into(),
            tenant: Arc::from("ünïcode \"tenant\"\n"),
            roles: vec![Box::from("chat"), Box::from("admin")].into(),
        };
        let value = caller_header(&caller);
        let text = value.to_str().unwrap();
        assert!(!text.contains("sk-secret") && !hex(b"sk-secret").is_empty());
        assert!(
            !text.contains(&hex(b"sk-secret")),
            "the credential is not carried"
        );
        let back = caller_from(value.as_bytes()).unwrap();
        assert_eq!((back.tenant, back.roles), (caller.tenant, caller.roles));
        assert!(caller_from(b"zz").is_none());
        assert!(caller_from(b"7b").is_none());
    }
}

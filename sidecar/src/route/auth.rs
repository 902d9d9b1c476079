//! Forwarded requests' credentials: the per-model forwarding token (a mounted Secret) and the
//! signature a forwarding sidecar puts in [`FORWARDED_HEADER`], which the serving sidecar verifies
//! before it skips routing and admission.

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
use crate::error::{Result, StartupError};

/// The internal header a forwarding sidecar signs its requests with:
/// `v1.<unix seconds>.<nonce hex>.<HMAC-SHA256 hex>`.
pub const FORWARDED_HEADER: &str = "x-sluice-forwarded";
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
/// `sluice-forward-v1\n<unix seconds>\n<nonce>\n<request path>`, compared in constant time;
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

    fn mac_for(&self, ts: &str, nonce: &str, path: &str) -> [u8; 32] {
        self.mac(&[
            b"sluice-forward-v1\n",
            ts.as_bytes(),
            b"\n",
            nonce.as_bytes(),
            b"\n",
            path.as_bytes(),
        ])
    }

    /// The header value for a request to `path`, signed now.
    pub fn sign(&self, path: &str) -> HeaderValue {
        self.sign_at(path, unix_now())
    }

    fn sign_at(&self, path: &str, now: u64) -> HeaderValue {
        let nonce = format!(
            "{:016x}",
            splitmix64(self.nonce.fetch_add(1, Ordering::Relaxed))
        );
        let ts = now.to_string();
        let mac = hex(&self.mac_for(&ts, &nonce, path));
        // Only ASCII digits, hex and dots.
        HeaderValue::from_str(&format!("v1.{ts}.{nonce}.{mac}"))
            .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
    }

    /// Whether `value` is a valid signature for a request to `path` now.
    pub fn verify(&self, value: &HeaderValue, path: &str) -> bool {
        self.verify_at(value, path, unix_now())
    }

    fn verify_at(&self, value: &HeaderValue, path: &str, now: u64) -> bool {
        let Ok(value) = value.to_str() else {
            return false;
        };
        let mut parts = value.split('.');
        let (Some("v1"), Some(ts), Some(nonce), Some(mac), None) = (
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
        let expected = hex(&self.mac_for(ts, nonce, path));
        expected.as_bytes().ct_eq(mac.as_bytes()).into()
    }
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
        let v = auth.sign_at("/v1/chat/completions", now);
        assert!(auth.verify_at(&v, "/v1/chat/completions", now));
        assert!(auth.verify_at(&v, "/v1/chat/completions", now + 299));
        assert!(
            !auth.verify_at(&v, "/v1/chat/completions", now + 301),
            "expired"
        );
        assert!(!auth.verify_at(&v, "/v1/completions", now), "other path");
        let other = ForwardAuth::new(&ForwardToken::new("another model's token"));
        assert!(
            !other.verify_at(&v, "/v1/chat/completions", now),
            "other token"
        );
        // Tampering with any part fails.
        let s = v.to_str().unwrap();
        for forged in [
            s.replacen("v1.", "v2.", 1),
            format!("{s}0"),
            s.replace(&now.to_string(), &(now + 1).to_string()),
            "1".into(),
            "true".into(),
            "v1.1700000000.00.".to_owned() + &"0".repeat(64),
        ] {
            let h = HeaderValue::from_str(&forged).unwrap();
            assert!(!auth.verify_at(&h, "/v1/chat/completions", now), "{forged}");
        }
        // Nonces differ, so values differ.
        assert_ne!(auth.sign_at("/p", now), auth.sign_at("/p", now));
    }
}

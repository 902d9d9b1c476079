//! Traffic split between a model's variants (issue 7, the data-plane half).
//!
//! Every sidecar receives traffic from the model Service and decides, per request, which variant
//! serves it ([`RouteDecision`]): this pod, another variant's Service (see [`crate::forward`]),
//! or — for a request another sidecar already routed and signed — this pod without routing or
//! admitting it again (limits are charged once, at the entry pod).
//!
//! How a variant is chosen, in order:
//!
//! 1. A request carrying [`FORWARDED_HEADER`] was forwarded by another sidecar. It must verify
//!    (HMAC with the model's forwarding token, see [`ForwardAuth`]) or it is refused with 403, so
//!    a client cannot skip limits or pick a variant by sending internal headers.
//! 2. The override header (`routing.overrideHeader`, e.g. `x-sluice-variant: canary`) pins the
//!    request to the named variant, even one with weight 0 (for testers).
//! 3. With `routing.stickyHeader` set and present, weighted rendezvous hashing of its value: the
//!    same value lands on the same variant while the weights are unchanged, and a weight change
//!    moves only the keys it must (a variant going to 0, or any one weight changing with the
//!    others keeping their ratios, moves exactly the keys of the shares that changed).
//! 4. Otherwise a weighted choice driven by a per-process golden-ratio (Weyl) sequence: a
//!    low-discrepancy sequence, so after `n` requests each variant's count is within a couple of
//!    requests of `n * weight / 100` on every pod — the split follows the weights exactly
//!    whatever the replica counts, with no randomness to average out.
//!
//! Only variants with weight > 0 take routed traffic (the operator writes effective weight 0 for
//! variants without ready pods), and remote variants only when this sidecar can forward (it has
//! the token and the variant has an address). When nothing else is possible the request is
//! served locally.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::{HeaderMap, HeaderValue};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use sha2::{Digest, Sha256};
use sluice_crds::{SidecarConfig, sidecar_config::VariantRoute};

use crate::{
    error::{Error, Result},
    forward::Forwarder,
};

/// The internal header a forwarding sidecar signs its requests with:
/// `v1.<unix seconds>.<nonce hex>.<HMAC-SHA256 hex>`.
pub const FORWARDED_HEADER: &str = "x-sluice-forwarded";
/// Set on every API response: the variant that served it.
pub const VARIANT_HEADER: &str = "x-sluice-variant";
/// How far a forwarded request's timestamp may be from this pod's clock.
pub const FORWARD_MAX_SKEW: Duration = Duration::from_secs(300);

/// Where one request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteDecision {
    /// Routing chose this pod's variant: admit, then serve here.
    Local,
    /// Routing chose another variant: admit here, then forward to its Service.
    Forward {
        /// The chosen variant.
        variant: String,
        /// Its Service's base URL, e.g. `http://chat-canary.default.svc:8080`.
        address: String,
    },
    /// A verified request another sidecar routed here: serve here, without routing again and
    /// without admission (limits were charged at the entry pod).
    ForwardedIn,
}

// === impl RouteDecision ===

impl RouteDecision {
    /// Whether rate-limit admission must be skipped (it already happened at the entry pod).
    pub fn skips_admission(&self) -> bool {
        matches!(self, Self::ForwardedIn)
    }

    /// Metric label.
    fn label(&self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Forward { .. } => "forward",
            Self::ForwardedIn => "forwarded_in",
        }
    }
}

/// The per-model forwarding secret (a Secret the operator generates, mounted as a file). Never
/// printed.
#[derive(Clone)]
pub struct ForwardToken(Arc<[u8]>);

impl ForwardToken {
    /// Reads the token file: its content with surrounding whitespace trimmed, not empty.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let raw = std::fs::read(path)
            .map_err(|e| Error::Config(format!("--forward-token-file {}: {e}", path.display())))?;
        let token = raw.trim_ascii();
        if token.is_empty() {
            return Err(Error::Config(format!(
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
    /// SHA-256 state after absorbing `key ^ ipad` (HMAC's inner hash, precomputed).
    inner: Sha256,
    /// SHA-256 state after absorbing `key ^ opad`.
    outer: Sha256,
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
        const BLOCK: usize = 64;
        let mut key = [0u8; BLOCK];
        if token.0.len() > BLOCK {
            key[..32].copy_from_slice(&Sha256::digest(&token.0));
        } else {
            key[..token.0.len()].copy_from_slice(&token.0);
        }
        let mut inner = Sha256::new();
        inner.update(key.map(|b| b ^ 0x36));
        let mut outer = Sha256::new();
        outer.update(key.map(|b| b ^ 0x5c));
        Self {
            inner,
            outer,
            nonce: Arc::new(AtomicU64::new(seed())),
        }
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut inner = self.inner.clone();
        for p in parts {
            inner.update(p);
        }
        let mut outer = self.outer.clone();
        outer.update(inner.finalize());
        outer.finalize().into()
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
        constant_time_eq(expected.as_bytes(), mac.as_bytes())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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

/// A per-process starting point (pods need not agree on it; they only must not all start at 0
/// in lockstep, which would not matter either, but costs nothing to avoid).
fn seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    splitmix64(nanos ^ (u64::from(std::process::id()) << 32))
}

// === choosing ===

/// 2^64 / golden ratio: the Weyl sequence step with the lowest discrepancy.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The SplitMix64 finaliser: a fast, well-mixing, stable bijection on u64.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(GOLDEN);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, 64 bit: stable across processes, builds and Rust versions (all pods must agree).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Maps 64 random bits to a float in the open interval (0, 1).
fn unit_open(bits: u64) -> f64 {
    ((bits >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// Weighted choice: `u` in [0, 1) is mapped onto the cumulative weights of `candidates` in their
/// order. `None` when no candidate has weight.
pub fn weighted_pick<'a>(candidates: &[&'a VariantRoute], u: f64) -> Option<&'a VariantRoute> {
    let total: u64 = candidates.iter().map(|v| u64::from(v.weight)).sum();
    if total == 0 {
        return None;
    }
    let point = u * total as f64;
    let mut cumulative = 0u64;
    let mut last = None;
    for v in candidates.iter().copied().filter(|v| v.weight > 0) {
        cumulative += u64::from(v.weight);
        last = Some(v);
        if point < cumulative as f64 {
            return Some(v);
        }
    }
    last
}

/// Weighted rendezvous hashing (an exponential race): each candidate draws
/// `-ln(u(key, name)) / weight` from a hash of the key and its name, and the smallest wins. A
/// candidate wins with probability `weight / total`; the draw of a key for a variant never
/// changes, so keys only move when a weight changes, and only as far as they must: lowering one
/// weight only moves keys away from that variant, raising one only moves keys to it, and
/// removing a variant (weight 0) moves only its own keys. Independent of the candidates' order.
pub fn sticky_pick<'a>(candidates: &[&'a VariantRoute], key: &[u8]) -> Option<&'a VariantRoute> {
    let key_hash = fnv1a(key);
    candidates
        .iter()
        .copied()
        .filter(|v| v.weight > 0)
        .map(|v| {
            let bits = splitmix64(key_hash ^ splitmix64(fnv1a(v.name.as_bytes())));
            (-unit_open(bits).ln() / f64::from(v.weight), v)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, v)| v)
}

// === metrics ===

/// Labels of `sluice_routed_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The variant chosen (this pod's for `forwarded_in`).
    pub variant: String,
    /// `local`, `forward` or `forwarded_in`.
    pub decision: String,
}

/// Labels of `sluice_forward_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardFailureLabels {
    /// The variant that could not be reached.
    pub variant: String,
    /// `connect`, `timeout` or `error`.
    pub kind: String,
}

/// Routing metrics: how traffic is split from this pod, and forwards that failed.
#[derive(Clone, Debug, Default)]
pub struct RoutingMetrics {
    /// Routing decisions, by variant and decision.
    pub routed: Family<RouteLabels, Counter>,
    /// Forwards that failed, by variant and kind.
    pub forward_failures: Family<ForwardFailureLabels, Counter>,
    /// Requests that went to another variant (or local) because their forward failed to connect.
    pub fallbacks: Counter,
}

impl RoutingMetrics {
    /// Creates the metrics and registers them (the registry carries the `sluice` prefix).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "routed_requests",
            "Generation requests routed by this sidecar, by chosen variant and decision",
            m.routed.clone(),
        );
        registry.register(
            "forward_failures",
            "Forwards to another variant that failed, by variant and kind",
            m.forward_failures.clone(),
        );
        registry.register(
            "forward_fallbacks",
            "Requests re-routed because forwarding to their variant failed to connect",
            m.fallbacks.clone(),
        );
        m
    }
}

// === impl Routing ===

/// The routing state of one sidecar: its own variant, whether (and how) it can forward, and the
/// weighted sequence. One per process, shared by every connection.
pub struct Routing {
    local: String,
    auth: Option<ForwardAuth>,
    forwarder: Option<Forwarder>,
    sequence: AtomicU64,
    metrics: RoutingMetrics,
    warned_local_only: AtomicBool,
}

impl fmt::Debug for Routing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Routing")
            .field("local", &self.local)
            .field("forwarding", &self.auth.is_some())
            .finish()
    }
}

impl Routing {
    /// Routing for a pod of variant `local`; without a token this sidecar neither forwards nor
    /// accepts forwarded requests, and routes everything to its own variant.
    /// Forwards give up connecting after `connect_timeout`.
    pub fn new(
        local: impl Into<String>,
        token: Option<&ForwardToken>,
        connect_timeout: Duration,
        metrics: RoutingMetrics,
    ) -> Self {
        Self {
            local: local.into(),
            auth: token.map(ForwardAuth::new),
            forwarder: token.map(|_| Forwarder::new(connect_timeout)),
            sequence: AtomicU64::new(seed()),
            metrics,
            warned_local_only: AtomicBool::new(false),
        }
    }

    /// This pod's variant.
    pub fn local_variant(&self) -> &str {
        &self.local
    }

    /// The signer for outgoing forwards (None: forwarding disabled).
    pub fn auth(&self) -> Option<&ForwardAuth> {
        self.auth.as_ref()
    }

    /// The client forwards go through (None: forwarding disabled).
    pub fn forwarder(&self) -> Option<&Forwarder> {
        self.forwarder.as_ref()
    }

    /// The metrics.
    pub fn metrics(&self) -> &RoutingMetrics {
        &self.metrics
    }

    /// Logs, once, what this sidecar can route to under `config`; called at start-up.
    pub fn log_startup(&self, config: &SidecarConfig) {
        let known = config.variants.iter().any(|v| v.name == self.local);
        if !known {
            tracing::warn!(
                variant = %self.local,
                variants = ?config.variants.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
                "this pod's --variant is not in the sidecar config; it forwards everything it can"
            );
        }
        if self.auth.is_none() && config.variants.iter().any(|v| v.name != self.local) {
            tracing::warn!(
                variant = %self.local,
                "no --forward-token-file: other variants are unreachable from this pod, \
                 so it serves every request itself and refuses forwarded ones"
            );
        } else {
            tracing::info!(variant = %self.local, forwarding = self.auth.is_some(), "routing");
        }
    }

    /// Whether `variant` can take routed traffic from this pod (weight aside).
    fn reachable(&self, variant: &VariantRoute) -> bool {
        variant.name == self.local
            || (self.auth.is_some() && variant.address.as_deref().is_some_and(|a| !a.is_empty()))
    }

    fn candidates<'a>(
        &self,
        config: &'a SidecarConfig,
        exclude: &[String],
    ) -> Vec<&'a VariantRoute> {
        config
            .variants
            .iter()
            .filter(|v| v.weight > 0 && self.reachable(v) && !exclude.contains(&v.name))
            .collect()
    }

    fn to_decision(&self, variant: &VariantRoute) -> RouteDecision {
        if variant.name == self.local {
            RouteDecision::Local
        } else {
            RouteDecision::Forward {
                variant: variant.name.clone(),
                address: variant.address.clone().unwrap_or_default(),
            }
        }
    }

    fn next_unit(&self) -> f64 {
        unit_open(self.sequence.fetch_add(GOLDEN, Ordering::Relaxed))
    }

    fn sticky_key<'h>(config: &SidecarConfig, headers: &'h HeaderMap) -> Option<&'h [u8]> {
        let name = config.routing.sticky_header.as_deref()?;
        headers
            .get(name)
            .map(HeaderValue::as_bytes)
            .filter(|v| !v.is_empty())
    }

    /// The override header's value, when the config names one and the request carries it.
    pub fn override_of<'h>(config: &SidecarConfig, headers: &'h HeaderMap) -> Option<&'h str> {
        let name = config.routing.override_header.as_deref()?;
        let value = headers.get(name)?;
        // Non-UTF-8 values cannot name a variant; treated as an unknown name below.
        Some(value.to_str().unwrap_or("\u{fffd}"))
    }

    /// Decides where a generation request to `path` goes. Errors: 403 for an internal header
    /// that does not verify, 400 for an override naming no variant, 503 for an override naming
    /// a variant this pod cannot reach.
    pub fn decide(
        &self,
        config: &SidecarConfig,
        headers: &HeaderMap,
        path: &str,
    ) -> Result<RouteDecision> {
        let decision = self.decide_inner(config, headers, path)?;
        let variant = match &decision {
            RouteDecision::Forward { variant, .. } => variant.as_str(),
            RouteDecision::Local | RouteDecision::ForwardedIn => self.local.as_str(),
        };
        self.metrics
            .routed
            .get_or_create(&RouteLabels {
                variant: variant.to_owned(),
                decision: decision.label().to_owned(),
            })
            .inc();
        Ok(decision)
    }

    fn decide_inner(
        &self,
        config: &SidecarConfig,
        headers: &HeaderMap,
        path: &str,
    ) -> Result<RouteDecision> {
        if let Some(value) = headers.get(FORWARDED_HEADER) {
            return match &self.auth {
                Some(auth) if auth.verify(value, path) => Ok(RouteDecision::ForwardedIn),
                Some(_) => Err(Error::Forbidden(format!(
                    "the {FORWARDED_HEADER} header is internal to sluice and did not verify"
                ))),
                None => Err(Error::Forbidden(format!(
                    "the {FORWARDED_HEADER} header is internal to sluice; this server accepts no \
                     forwarded requests"
                ))),
            };
        }
        if let Some(name) = Self::override_of(config, headers) {
            if name == self.local {
                return Ok(RouteDecision::Local);
            }
            let header = config
                .routing
                .override_header
                .as_deref()
                .unwrap_or_default();
            let Some(variant) = config.variants.iter().find(|v| v.name == name) else {
                let known: Vec<&str> = config.variants.iter().map(|v| v.name.as_str()).collect();
                return Err(Error::invalid(
                    header,
                    format!(
                        "header {header} names variant {name:?}, which this model does not \
                         have (variants: {})",
                        known.join(", ")
                    ),
                ));
            };
            if !self.reachable(variant) {
                return Err(Error::VariantUnavailable(format!(
                    "variant {name:?} (asked for with header {header}) cannot be reached from \
                     this server"
                )));
            }
            return Ok(self.to_decision(variant));
        }
        Ok(self.route(config, headers, &[]).unwrap_or_else(|| {
            if !self.warned_local_only.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    variant = %self.local,
                    "no variant with weight is reachable from this pod; serving locally"
                );
            }
            RouteDecision::Local
        }))
    }

    /// The weighted (or sticky) choice among reachable variants with weight, minus `exclude`.
    fn route(
        &self,
        config: &SidecarConfig,
        headers: &HeaderMap,
        exclude: &[String],
    ) -> Option<RouteDecision> {
        let candidates = self.candidates(config, exclude);
        let chosen = match Self::sticky_key(config, headers) {
            Some(key) => sticky_pick(&candidates, key),
            None => weighted_pick(&candidates, self.next_unit()),
        }?;
        Some(self.to_decision(chosen))
    }

    /// Where a request goes after forwarding to the variants in `failed` could not connect: this
    /// pod when its variant has weight, else another reachable variant with weight (sticky keys
    /// keep their next-best variant), else nowhere (503).
    pub fn fallback(
        &self,
        config: &SidecarConfig,
        headers: &HeaderMap,
        failed: &[String],
    ) -> Option<RouteDecision> {
        let local_weight = config
            .variants
            .iter()
            .find(|v| v.name == self.local)
            .map_or(0, |v| v.weight);
        let next = if local_weight > 0 {
            Some(RouteDecision::Local)
        } else {
            match self.route(config, headers, failed)? {
                RouteDecision::Local => None,
                other => Some(other),
            }
        };
        if next.is_some() {
            self.metrics.fallbacks.inc();
        }
        next
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use sluice_crds::sidecar_config::SIDECAR_CONFIG_VERSION;

    fn variant(name: &str, weight: u32) -> VariantRoute {
        VariantRoute {
            name: name.to_owned(),
            weight,
            address: Some(format!("http://{name}.default.svc:8080")),
        }
    }

    fn config(variants: &[(&str, u32)]) -> SidecarConfig {
        let mut c = crate::config::default_sidecar_config("m");
        assert_eq!(c.version, SIDECAR_CONFIG_VERSION);
        c.variants = variants.iter().map(|(n, w)| variant(n, *w)).collect();
        c
    }

    fn token() -> ForwardToken {
        ForwardToken::new("s3cret-token-for-tests")
    }

    fn routing(local: &str, with_token: bool) -> Routing {
        let t = token();
        Routing::new(
            local,
            with_token.then_some(&t),
            Duration::from_secs(1),
            RoutingMetrics::default(),
        )
    }

    fn chosen(d: &RouteDecision, local: &str) -> String {
        match d {
            RouteDecision::Forward { variant, .. } => variant.clone(),
            _ => local.to_owned(),
        }
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

    #[test]
    fn forged_or_unverifiable_internal_headers_are_403() {
        let c = config(&[("stable", 90), ("canary", 10)]);
        let mut h = HeaderMap::new();
        h.insert(FORWARDED_HEADER, HeaderValue::from_static("1"));
        for r in [routing("stable", true), routing("stable", false)] {
            let e = r.decide(&c, &h, "/v1/completions").unwrap_err();
            assert_eq!(e.status(), http::StatusCode::FORBIDDEN);
        }
        // A genuine one from a peer with the same token: served here, admission skipped.
        let peer = routing("canary", true);
        h.insert(
            FORWARDED_HEADER,
            peer.auth().unwrap().sign("/v1/completions"),
        );
        let d = routing("stable", true)
            .decide(&c, &h, "/v1/completions")
            .unwrap();
        assert_eq!(d, RouteDecision::ForwardedIn);
        assert!(d.skips_admission());
        // But not by a pod without the token.
        assert!(
            routing("stable", false)
                .decide(&c, &h, "/v1/completions")
                .is_err()
        );
    }

    #[test]
    fn weighted_split_is_exact_to_a_few_requests() {
        for weights in [
            vec![("stable", 90), ("canary", 10)],
            vec![("a", 50), ("b", 50)],
            vec![("a", 70), ("b", 20), ("c", 10)],
            vec![("a", 1), ("b", 99)],
        ] {
            let c = config(&weights);
            let r = routing("a", true);
            let n = 2000u32;
            let mut counts = std::collections::HashMap::<String, u32>::new();
            for _ in 0..n {
                let d = r.decide(&c, &HeaderMap::new(), "/p").unwrap();
                *counts.entry(chosen(&d, "a")).or_default() += 1;
            }
            for (name, w) in &weights {
                let got = f64::from(counts.get(*name).copied().unwrap_or(0));
                let want = f64::from(n * w) / 100.0;
                assert!(
                    (got - want).abs() <= 3.0,
                    "{weights:?}: {name} got {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn weight_zero_and_unreachable_variants_get_nothing() {
        let c = config(&[("stable", 100), ("canary", 0)]);
        let r = routing("canary", true);
        for _ in 0..500 {
            let d = r.decide(&c, &HeaderMap::new(), "/p").unwrap();
            assert_eq!(chosen(&d, "canary"), "stable");
        }
        // Without a token, remote variants are unreachable: everything is local.
        let c = config(&[("stable", 50), ("canary", 50)]);
        let r = routing("canary", false);
        for _ in 0..100 {
            assert_eq!(
                r.decide(&c, &HeaderMap::new(), "/p").unwrap(),
                RouteDecision::Local
            );
        }
        // A remote variant without an address is unreachable too.
        let mut c = config(&[("stable", 50), ("canary", 50)]);
        c.variants[0].address = None;
        let r = routing("canary", true);
        for _ in 0..100 {
            assert_eq!(
                r.decide(&c, &HeaderMap::new(), "/p").unwrap(),
                RouteDecision::Local
            );
        }
    }

    #[test]
    fn override_pins_even_weight_zero_and_rejects_unknown_names() {
        let mut c = config(&[("stable", 100), ("canary", 0)]);
        c.routing.override_header = Some("x-sluice-variant".into());
        let r = routing("stable", true);
        let mut h = HeaderMap::new();
        h.insert("x-sluice-variant", HeaderValue::from_static("canary"));
        for _ in 0..10 {
            assert_eq!(
                r.decide(&c, &h, "/p").unwrap(),
                RouteDecision::Forward {
                    variant: "canary".into(),
                    address: "http://canary.default.svc:8080".into()
                }
            );
        }
        h.insert("x-sluice-variant", HeaderValue::from_static("stable"));
        assert_eq!(r.decide(&c, &h, "/p").unwrap(), RouteDecision::Local);
        h.insert("x-sluice-variant", HeaderValue::from_static("nope"));
        let e = r.decide(&c, &h, "/p").unwrap_err();
        assert_eq!(e.status(), http::StatusCode::BAD_REQUEST);
        assert_eq!(e.body().error.param.as_deref(), Some("x-sluice-variant"));
        // Pinned to a variant this pod cannot reach: 503, not a silent local answer.
        h.insert("x-sluice-variant", HeaderValue::from_static("canary"));
        let e = routing("stable", false).decide(&c, &h, "/p").unwrap_err();
        assert_eq!(e.status(), http::StatusCode::SERVICE_UNAVAILABLE);
    }

    fn sticky_assign(weights: &[(&str, u32)], keys: usize) -> Vec<String> {
        let variants: Vec<VariantRoute> = weights.iter().map(|(n, w)| variant(n, *w)).collect();
        let refs: Vec<&VariantRoute> = variants.iter().collect();
        (0..keys)
            .map(|i| {
                sticky_pick(&refs, format!("user-{i}").as_bytes())
                    .unwrap()
                    .name
                    .clone()
            })
            .collect()
    }

    fn moved(a: &[String], b: &[String]) -> f64 {
        a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
    }

    #[test]
    fn sticky_keys_follow_the_weights_and_stay_put() {
        let n = 100_000;
        let weights = [("a", 70), ("b", 20), ("c", 10)];
        let first = sticky_assign(&weights, n);
        for (name, w) in weights {
            let share = first.iter().filter(|v| *v == name).count() as f64 / n as f64;
            assert!(
                (share - f64::from(w) / 100.0).abs() < 0.01,
                "{name}: {share}"
            );
        }
        // Same weights (in any order): nobody moves.
        assert_eq!(first, sticky_assign(&[("c", 10), ("a", 70), ("b", 20)], n));
        // And through the router, with a header.
        let mut c = config(&weights);
        c.routing.sticky_header = Some("x-user-id".into());
        let r = routing("a", true);
        for (i, expected) in first.iter().enumerate().take(1000) {
            let mut h = HeaderMap::new();
            h.insert(
                "x-user-id",
                HeaderValue::from_str(&format!("user-{i}")).unwrap(),
            );
            let d = r.decide(&c, &h, "/p").unwrap();
            assert_eq!(&chosen(&d, "a"), expected);
        }
    }

    #[test]
    fn a_weight_change_moves_only_the_fair_share_of_keys() {
        let n = 100_000;
        // Canary 10% -> 20%: exactly the 10% that must move, all from stable to canary.
        let before = sticky_assign(&[("stable", 90), ("canary", 10)], n);
        let after = sticky_assign(&[("stable", 80), ("canary", 20)], n);
        let m = moved(&before, &after);
        assert!((m - 0.10).abs() < 0.005, "moved {m}");
        assert!(
            before
                .iter()
                .zip(&after)
                .all(|(x, y)| x == y || (x == "stable" && y == "canary")),
            "keys only move from the variant that lost weight to the one that gained it"
        );
        // A variant losing its pods (weight 0, share spread proportionally): only its keys move.
        let before = sticky_assign(&[("a", 20), ("b", 50), ("c", 30)], n);
        let after = sticky_assign(&[("a", 40), ("b", 0), ("c", 60)], n);
        for (x, y) in before.iter().zip(&after) {
            assert!(x == y || x == "b", "{x} -> {y}");
        }
        // With integer weights the ratios shift slightly (50:25 -> 67:33): a few more move.
        let before = sticky_assign(&[("a", 50), ("b", 25), ("c", 25)], n);
        let after = sticky_assign(&[("a", 67), ("b", 0), ("c", 33)], n);
        let m = moved(&before, &after);
        assert!((0.245..0.26).contains(&m), "moved {m}");
        // Any change of one weight (others keep their ratios) moves only the difference.
        let before = sticky_assign(&[("a", 60), ("b", 30), ("c", 10)], n);
        let after = sticky_assign(&[("a", 40), ("b", 45), ("c", 15)], n);
        let m = moved(&before, &after);
        assert!((m - 0.20).abs() < 0.01, "moved {m}");
        // A transfer between two of three variants: at most ~1.5x the 10% that must move.
        let before = sticky_assign(&[("a", 50), ("b", 25), ("c", 25)], n);
        let after = sticky_assign(&[("a", 40), ("b", 35), ("c", 25)], n);
        let m = moved(&before, &after);
        assert!((0.095..0.15).contains(&m), "moved {m}");
    }

    #[test]
    fn fallback_prefers_local_then_other_variants() {
        let c = config(&[("stable", 50), ("canary", 50)]);
        let r = routing("stable", true);
        assert_eq!(
            r.fallback(&c, &HeaderMap::new(), &["canary".into()]),
            Some(RouteDecision::Local)
        );
        let c = config(&[("stable", 0), ("canary", 60), ("blue", 40)]);
        let d = r
            .fallback(&c, &HeaderMap::new(), &["canary".into()])
            .unwrap();
        assert_eq!(chosen(&d, "stable"), "blue");
        assert_eq!(
            r.fallback(&c, &HeaderMap::new(), &["canary".into(), "blue".into()]),
            None
        );
    }
}

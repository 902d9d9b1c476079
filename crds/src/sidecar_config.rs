//! The sidecar config document: the single contract between the operator (which writes it into
//! the model's ConfigMap) and the sidecars (which read it from a mounted file or the watched
//! ConfigMap and hot-reload it).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::rate_limit_policy::{Identity as PolicyIdentity, IdentitySource, RateLimitRule};
use crate::{Error, Result};

/// The only document version this build reads and writes.
pub const SIDECAR_CONFIG_VERSION: &str = "v1alpha1";
/// The ConfigMap data key the document is stored under.
pub const SIDECAR_CONFIG_KEY: &str = "sidecar.yaml";

/// Everything a sidecar needs to route and limit requests. Unknown fields are rejected so a typo
/// never silently disables a limit.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SidecarConfig {
    /// Document version; must be `v1alpha1`.
    pub version: String,
    /// Content hash of the rest of the document, below 2^48 so a float64 gauge
    /// (`sluice_config_generation`) carries it exactly; the operator compares it with what each
    /// pod exports to report convergence. 0 means "not sealed" (hand-written configs).
    #[serde(default)]
    pub generation: u64,
    /// The model id clients send.
    pub model: String,
    /// Variants with their effective weights (sum 100) and in-cluster addresses.
    pub variants: Vec<VariantRoute>,
    /// Sticky and override headers.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// Where callers' keys come from.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Who may call (API keys, JWT issuers, access rules). When set, it identifies callers and
    /// `identity` is not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<crate::auth::AuthConfig>,
    /// Effective limit rules of every policy that targets the model, named `policy/rule`.
    #[serde(default)]
    pub rules: Vec<RateLimitRule>,
    /// This pod's share of cluster-scoped limits (1 / pods serving the model), in (0, 1].
    #[serde(default = "one")]
    pub replica_share: f64,
    /// When the engine counts as saturated, so sheddable requests are refused first.
    #[serde(default)]
    pub saturation: SaturationConfig,
    /// The model that takes requests this one cannot serve (absent: none; they get 503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fallback: Option<FallbackRoute>,
    /// The response cache (absent: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<CacheConfig>,
    /// Every other model served in the same namespace, so that any sidecar answers for all of
    /// them: a request naming one of these is sent on to it (one endpoint for all models).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelAddress>,
}

/// Another model of the namespace, as a sidecar sends requests on to it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ModelAddress {
    /// The model id clients send for it (its `spec.servedName`, else its name).
    pub name: String,
    /// Base URL of its model Service, e.g. `http://chat.default.svc:8080`.
    pub address: String,
}

/// The sidecar flag naming the file of the fallback model's forwarding token (its forwarding
/// Secret, mounted by the operator): the fallback's sidecars verify forwards with it.
pub const FALLBACK_TOKEN_FILE_FLAG: &str = "fallback-token-file";

/// Where requests go that this model cannot serve (`InferenceModel.spec.fallback`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FallbackRoute {
    /// The fallback InferenceModel's name (reported in the `x-sluice-fallback` header).
    pub model: String,
    /// Base URL of its model Service, e.g. `http://backup.default.svc:8080`.
    pub address: String,
}

/// The response cache (`InferenceModel.spec.cache`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of answers a pod keeps at most.
    pub max_bytes: u64,
    /// Seconds an answer stays.
    pub ttl_seconds: u32,
    /// Entries are shared between tenants (else each tenant has its own).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared: bool,
}

/// One variant as the sidecars route to it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VariantRoute {
    /// The variant's name.
    pub name: String,
    /// Effective weight, 0..=100 (0 after a rollback or while the variant has no ready pods).
    pub weight: u32,
    /// Base URL of the variant's Service, e.g. `http://chat-canary.default.svc:8080`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
}

/// Routing headers (see `InferenceModel.spec.routing`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingConfig {
    /// Header whose value pins a caller to a variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sticky_header: Option<String>,
    /// Header that names the variant to use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub override_header: Option<String>,
    /// When forwards to a failing variant stop (absent: [`BreakerConfig::default`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub breaker: Option<BreakerConfig>,
}

/// Failed forwards in a row that open a variant's circuit breaker, unless configured.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
/// Seconds an open breaker holds forwards back, unless configured.
pub const DEFAULT_BREAKER_OPEN_SECS: u32 = 30;

/// The circuit breaker of forwards to each other variant: after `consecutiveFailures` failed
/// forwards in a row (no connection, a timeout, a 5xx answer) the variant gets none for
/// `openSeconds` (its requests go where a failed forward would fall back); then the next
/// forward decides: a failure opens it again, a success closes it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BreakerConfig {
    /// Failed forwards in a row that open the breaker (at least 1).
    pub consecutive_failures: u32,
    /// Seconds it stays open (at least 1).
    pub open_seconds: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_BREAKER_FAILURES,
            open_seconds: DEFAULT_BREAKER_OPEN_SECS,
        }
    }
}

/// Where the caller's key comes from, and the file of accepted keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IdentityConfig {
    /// `Bearer` or `Header`.
    #[serde(default)]
    pub source: IdentitySource,
    /// The header when source is `Header`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// Path of a mounted YAML file of accepted keys ([`ApiKeyEntry`] list). When set, unknown
    /// keys get 401.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keys_file: Option<String>,
}

/// Saturation marks for priority shedding.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SaturationConfig {
    /// Requests in flight (running or queued) at which `Sheddable` requests are refused, and
    /// `Standard` ones at twice this. Unset: no shedding. The operator writes the sequences the
    /// engine runs at once (`engine.maxConcurrentSequences`), the smallest of any variant: the
    /// document is shared by every variant's pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
}

/// One accepted API key in the keys file (a Secret entry mounted into the pod).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiKeyEntry {
    /// The secret key callers send.
    pub key: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// Its roles (for `spec.auth.allow` and rate-limit rules' `match.roles`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

fn one() -> f64 {
    1.0
}

// === impl SidecarConfig ===

impl SidecarConfig {
    /// Parses and checks a document; any problem is an error naming the field, so a bad edit is
    /// rejected while the last good config stays in force.
    ///
    /// A document written as JSON (a subset of YAML: what the operator writes, see
    /// [`SidecarConfig::to_json`]) goes through the JSON parser, about twice as fast as the
    /// YAML one: a 1,000-rule document reloads within the sidecar's 10 ms budget.
    pub fn from_yaml(text: &str) -> Result<Self> {
        let config: Self = if text.trim_start().starts_with('{') {
            serde_json::from_str(text).map_err(Error::ParseJson)?
        } else {
            serde_yaml::from_str(text)?
        };
        config.validate()?;
        Ok(config)
    }

    /// Renders the document as YAML (what a person writes for `sluice-sidecar --config`).
    pub fn to_yaml(&self) -> Result<String> {
        Ok(serde_yaml::to_string(self)?)
    }

    /// Renders the document as stored in the ConfigMap: indented JSON, which is valid YAML to
    /// every reader and parses fast on reload.
    pub fn to_json(&self) -> Result<String> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        Ok(text)
    }

    /// Checks what the types cannot: version, weights, unique names, positive limits, share.
    pub fn validate(&self) -> Result<()> {
        const WHAT: &str = "sidecar config";
        if self.version != SIDECAR_CONFIG_VERSION {
            return Err(Error::invalid(
                WHAT,
                format!(
                    "unsupported version {:?} (this sidecar reads {SIDECAR_CONFIG_VERSION:?})",
                    self.version
                ),
            ));
        }
        if self.model.is_empty() {
            return Err(Error::invalid(WHAT, "model must not be empty"));
        }
        if self.variants.is_empty() {
            return Err(Error::invalid(WHAT, "at least one variant is required"));
        }
        if let Some(b) = self.routing.breaker
            && (b.consecutive_failures == 0 || b.open_seconds == 0)
        {
            return Err(Error::invalid(
                WHAT,
                "routing.breaker: consecutiveFailures and openSeconds must be at least 1",
            ));
        }
        let mut names = HashSet::new();
        for v in &self.variants {
            if v.name.is_empty() || !names.insert(v.name.as_str()) {
                return Err(Error::invalid(
                    WHAT,
                    format!("variant names must be unique and non-empty: {:?}", v.name),
                ));
            }
            if v.weight > 100 {
                return Err(Error::invalid(
                    WHAT,
                    format!("variant {:?}: weight {} is above 100", v.name, v.weight),
                ));
            }
        }
        let total: u32 = self.variants.iter().map(|v| v.weight).sum();
        if total != 100 {
            return Err(Error::invalid(
                WHAT,
                format!("variant weights sum to {total}, not 100"),
            ));
        }
        if !(self.replica_share > 0.0 && self.replica_share <= 1.0) {
            return Err(Error::invalid(
                WHAT,
                format!("replicaShare {} is not in (0, 1]", self.replica_share),
            ));
        }
        if let Some(auth) = &self.auth {
            auth.validate()
                .map_err(|reason| Error::invalid(WHAT, reason))?;
            for rule in &auth.allow {
                if let Some(v) = rule.variants.iter().find(|v| !names.contains(v.as_str())) {
                    return Err(Error::invalid(
                        WHAT,
                        format!("auth.allow names variant {v:?}, which the model does not have"),
                    ));
                }
            }
        }
        if self.identity.source == IdentitySource::Header && self.identity.header.is_none() {
            return Err(Error::invalid(
                WHAT,
                "identity.header is required when source is Header",
            ));
        }
        let mut rules = HashSet::new();
        for r in &self.rules {
            if r.name.is_empty() || !rules.insert(r.name.as_str()) {
                return Err(Error::invalid(
                    WHAT,
                    format!("rule names must be unique and non-empty: {:?}", r.name),
                ));
            }
            validate_rule(r).map_err(|reason| Error::invalid(WHAT, reason))?;
        }
        if self.saturation.max_in_flight == Some(0) {
            return Err(Error::invalid(
                WHAT,
                "saturation.maxInFlight must be positive",
            ));
        }
        if let Some(f) = &self.fallback
            && (f.model.is_empty() || !f.address.starts_with("http://"))
        {
            return Err(Error::invalid(
                WHAT,
                format!(
                    "fallback needs a model and an http:// address, not {:?} at {:?}",
                    f.model, f.address
                ),
            ));
        }
        if let Some(c) = &self.cache
            && (c.max_bytes == 0 || c.ttl_seconds == 0)
        {
            return Err(Error::invalid(
                WHAT,
                "cache.maxBytes and cache.ttlSeconds must be positive",
            ));
        }
        let mut models = HashSet::new();
        for m in &self.models {
            // A name listed twice, or this model's own, would make where a request goes
            // depend on the order of the list.
            if m.name.is_empty() || m.name == self.model || !models.insert(m.name.as_str()) {
                return Err(Error::invalid(
                    WHAT,
                    format!(
                        "models: names must be unique, non-empty and not this model's own: {:?}",
                        m.name
                    ),
                ));
            }
            if !m.address.starts_with("http://") {
                return Err(Error::invalid(
                    WHAT,
                    format!(
                        "models: {:?} needs an http:// address, not {:?}",
                        m.name, m.address
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Sets `generation` to the content hash of everything else, so equal documents get equal
    /// generations on every operator replica and across restarts.
    pub fn sealed(mut self) -> Result<Self> {
        self.generation = 0;
        let canonical = serde_json::to_vec(&self)?;
        let digest = Sha256::digest(&canonical);
        let mut bytes = [0u8; 8];
        bytes[2..].copy_from_slice(&digest[..6]);
        // 48 bits, never 0 (0 means "not sealed").
        self.generation = u64::from_be_bytes(bytes).max(1);
        Ok(self)
    }

    /// Builds the identity section from a policy's, given where its keys Secret is mounted.
    pub fn identity_from_policy(
        identity: &PolicyIdentity,
        keys_file: Option<String>,
    ) -> IdentityConfig {
        IdentityConfig {
            source: identity.source,
            header: identity.header.clone(),
            keys_file: identity.keys.as_ref().and(keys_file),
        }
    }
}

/// Checks one rule: a limit or priority is set, every limit is positive, cluster scope is not
/// combined with per-pod-meaningless limits.
pub fn validate_rule(rule: &RateLimitRule) -> std::result::Result<(), String> {
    let name = &rule.name;
    let limits: [(&str, Option<u64>); 6] = [
        ("requestsPerSecond", rule.requests_per_second.map(u64::from)),
        ("requestsPerMinute", rule.requests_per_minute.map(u64::from)),
        ("tokensPerMinute", rule.tokens_per_minute),
        ("tokensPerDay", rule.tokens_per_day),
        ("maxConcurrent", rule.max_concurrent.map(u64::from)),
        ("bytesPerSecond", rule.bytes_per_second),
    ];
    if let Some((field, _)) = limits.iter().find(|(_, v)| *v == Some(0)) {
        return Err(format!("rule {name:?}: {field} must be positive"));
    }
    if rule.burst == Some(0) {
        return Err(format!("rule {name:?}: burst must be positive"));
    }
    if limits.iter().all(|(_, v)| v.is_none()) && rule.priority.is_none() {
        return Err(format!(
            "rule {name:?}: needs at least one limit or a priority"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/sidecar-config.yaml");

    #[test]
    fn example_round_trips() {
        let config = SidecarConfig::from_yaml(EXAMPLE).expect("example parses");
        let again =
            SidecarConfig::from_yaml(&config.to_yaml().expect("renders")).expect("reparses");
        assert_eq!(config, again);
    }

    #[test]
    fn the_configmap_form_is_json_that_reads_back_the_same() {
        let config = SidecarConfig::from_yaml(EXAMPLE).expect("example parses");
        let json = config.to_json().expect("renders");
        assert!(json.starts_with('{'), "{json}");
        assert_eq!(SidecarConfig::from_yaml(&json).expect("reparses"), config);
        // JSON is YAML: a reader that knows only YAML gets the same document.
        let via_yaml: SidecarConfig = serde_yaml::from_str(&json).expect("valid YAML");
        assert_eq!(via_yaml, config);
        // And the JSON path rejects what the YAML path rejects.
        let typo = json.replacen("\"model\"", "\"modle\": 1,\n  \"model\"", 1);
        let err = SidecarConfig::from_yaml(&typo).expect_err("unknown field");
        assert!(err.to_string().contains("unknown field"), "{err}");
        let zero = json.replacen("\"requestsPerMinute\": 2", "\"requestsPerMinute\": 0", 1);
        assert_ne!(zero, json, "example must carry requestsPerMinute: 2");
        let err = SidecarConfig::from_yaml(&zero).expect_err("zero limit");
        assert!(err.to_string().contains("must be positive"), "{err}");
    }

    #[test]
    fn sealing_is_stable_and_fits_a_float() {
        let config = SidecarConfig::from_yaml(EXAMPLE).expect("example parses");
        let a = config.clone().sealed().expect("seals");
        let b = a.clone().sealed().expect("seals");
        assert_eq!(a.generation, b.generation);
        assert!(a.generation > 0 && a.generation < (1 << 48));
        assert_eq!(a.generation as f64 as u64, a.generation);
        let mut changed = config;
        changed.rules[0].requests_per_minute = Some(3);
        assert_ne!(changed.sealed().expect("seals").generation, a.generation);
    }

    #[test]
    fn the_other_models_are_checked_and_sealed() {
        let base = SidecarConfig::from_yaml(EXAMPLE).expect("example parses");
        assert!(base.models.is_empty());
        assert!(!base.to_json().expect("renders").contains("models"));
        let with = |models: &[(&str, &str)]| {
            let mut c = base.clone();
            c.models = models
                .iter()
                .map(|(name, address)| ModelAddress {
                    name: (*name).to_owned(),
                    address: (*address).to_owned(),
                })
                .collect();
            c
        };
        let good = with(&[
            ("chat", "http://chat.ns.svc:8080"),
            ("embed", "http://embed.ns.svc:8080"),
        ]);
        let text = good.to_json().expect("renders");
        assert_eq!(SidecarConfig::from_yaml(&text).expect("valid"), good);
        assert_ne!(
            good.clone().sealed().expect("seals").generation,
            base.clone().sealed().expect("seals").generation,
            "the generation covers the list"
        );
        for (models, expected) in [
            (vec![("", "http://x:1")], "non-empty"),
            (vec![("smollm2", "http://x:1")], "not this model's own"),
            (vec![("a", "http://x:1"), ("a", "http://y:1")], "unique"),
            (vec![("a", "https://x:1")], "http:// address"),
            (vec![("a", "x:1")], "http:// address"),
        ] {
            let err = with(&models).validate().expect_err("rejected").to_string();
            assert!(err.contains(expected), "{models:?}: {err}");
        }
        let typo = text.replacen("\"address\"", "\"adress\"", 1);
        let err = SidecarConfig::from_yaml(&typo).expect_err("unknown field");
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn rejects_what_would_silently_change_limits() {
        let cases = [
            ("version: v2", "unsupported version"),
            ("weight: 100", "sum to"),
            ("requestsPerMinute: 2", "must be positive"),
            ("model: smollm2", "unknown field"),
        ];
        let replacements = [
            ("version: v1alpha1", "version: v2"),
            ("weight: 100", "weight: 95"),
            ("requestsPerMinute: 2", "requestsPerMinute: 0"),
            ("model: smollm2", "model: smollm2\nmodle: typo"),
        ];
        for ((_, expected), (from, to)) in cases.iter().zip(replacements) {
            assert!(EXAMPLE.contains(from), "example must contain {from:?}");
            let err = SidecarConfig::from_yaml(&EXAMPLE.replacen(from, to, 1))
                .expect_err("must be rejected")
                .to_string();
            assert!(err.contains(expected), "{err} should mention {expected}");
        }
    }
}

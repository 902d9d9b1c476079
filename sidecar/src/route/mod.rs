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
//!
//! This module decides only; [`crate::forward`] carries out a [`RouteDecision::Forward`].

pub mod auth;
mod breaker;
pub mod metrics;
pub mod pick;

use std::{
    fmt,
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    time::Instant,
};

use http::{HeaderMap, HeaderValue};
use sluice_crds::{SidecarConfig, sidecar_config::VariantRoute};

use crate::auth::{Caller, Grant};

pub use self::{
    auth::{
        CALLER_HEADER, FORWARD_MAX_SKEW, FORWARDED_HEADER, ForwardAuth, ForwardToken, caller_from,
        caller_header,
    },
    metrics::{ForwardFailureLabels, RouteLabels, RoutingMetrics},
    pick::{sticky_pick, weighted_pick},
};
use self::{
    breaker::Breakers,
    pick::{GOLDEN, seed, unit_open},
};

/// Set on every API response: the variant that served it.
pub const VARIANT_HEADER: &str = "x-sluice-variant";
/// The `kind` of `sluice_forward_failures_total` for a request routed to a variant whose
/// breaker was open (so not sent there).
pub const BREAKER_OPEN_KIND: &str = "breaker_open";

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

/// Why a request cannot be routed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The request carries [`FORWARDED_HEADER`] and it does not verify (or this pod accepts no
    /// forwarded requests): clients cannot skip limits or pick variants with it.
    #[error("{0}")]
    Forbidden(String),
    /// The override header names a variant the model does not have.
    #[error("{message}")]
    UnknownVariant {
        /// The override header's name (the request field at fault).
        header: String,
        /// For a human: the name and the model's variants.
        message: String,
    },
    /// The variant the override header names cannot be reached from this pod.
    #[error("{0}")]
    Unreachable(String),
}

// === impl Router ===

/// The routing state of one sidecar: its own variant, whether it can forward (it holds the
/// token), and the weighted sequence. One per process, shared by every connection.
pub struct Router {
    local: String,
    auth: Option<ForwardAuth>,
    sequence: AtomicU64,
    metrics: RoutingMetrics,
    warned_local_only: AtomicBool,
    /// Forwards held back from variants that keep failing.
    breakers: Breakers,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("local", &self.local)
            .field("forwarding", &self.auth.is_some())
            .finish()
    }
}

impl Router {
    /// Routing for a pod of variant `local`; without a token this sidecar neither forwards nor
    /// accepts forwarded requests, and routes everything to its own variant.
    pub fn new(
        local: impl Into<String>,
        token: Option<&ForwardToken>,
        metrics: RoutingMetrics,
    ) -> Self {
        Self {
            local: local.into(),
            auth: token.map(ForwardAuth::new),
            sequence: AtomicU64::new(seed()),
            metrics,
            warned_local_only: AtomicBool::new(false),
            breakers: Breakers::default(),
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
        grant: &Grant,
    ) -> Vec<&'a VariantRoute> {
        config
            .variants
            .iter()
            .filter(|v| {
                v.weight > 0
                    && self.reachable(v)
                    && !exclude.contains(&v.name)
                    && grant.allows(&v.name)
            })
            .collect()
    }

    /// Whether forwards to `variant` are held back by its breaker now (never this pod's own).
    fn held_back(&self, variant: &VariantRoute) -> bool {
        variant.name != self.local
            && self
                .breakers
                .is_open(&variant.name, Instant::now(), &self.metrics)
    }

    /// Records how a forward to `variant` ended, for its breaker: a failure is no connection,
    /// no answer in time, or a 5xx answer.
    pub fn record_forward(&self, config: &SidecarConfig, variant: &str, succeeded: bool) {
        let settings = config.routing.breaker.unwrap_or_default();
        self.breakers
            .record(variant, succeeded, settings, Instant::now(), &self.metrics);
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

    /// The caller of a request another sidecar routed here ([`RouteDecision::ForwardedIn`]),
    /// as the entry pod identified it; `None` when the request was not forwarded. Errors: 403
    /// when its signature does not verify (or this pod accepts no forwarded requests), so a
    /// client cannot skip limits or pick a variant by sending internal headers.
    pub fn forwarded_caller(
        &self,
        headers: &HeaderMap,
        path: &str,
    ) -> Result<Option<Caller>, RouteError> {
        let Some(value) = headers.get(FORWARDED_HEADER) else {
            return Ok(None);
        };
        let named = headers
            .get(CALLER_HEADER)
            .map_or(&[][..], HeaderValue::as_bytes);
        let caller = match &self.auth {
            Some(auth) if auth.verify(value, path, named) => caller_from(named),
            Some(_) => None,
            None => {
                return Err(RouteError::Forbidden(format!(
                    "the {FORWARDED_HEADER} header is internal to sluice; this server accepts no \
                     forwarded requests"
                )));
            }
        };
        let caller = caller.ok_or_else(|| {
            RouteError::Forbidden(format!(
                "the {FORWARDED_HEADER} header is internal to sluice and did not verify"
            ))
        })?;
        self.count(&RouteDecision::ForwardedIn);
        Ok(Some(caller))
    }

    /// Decides which variant serves a generation request from a caller allowed `grant`.
    /// Errors: 403 for an override the caller may not send, 400 for an override naming no
    /// variant, 503 for an override naming a variant this pod cannot reach, or when no variant
    /// the caller may use can take it.
    pub fn decide(
        &self,
        config: &SidecarConfig,
        headers: &HeaderMap,
        grant: &Grant,
    ) -> Result<RouteDecision, RouteError> {
        let decision = self.decide_inner(config, headers, grant)?;
        self.count(&decision);
        Ok(decision)
    }

    fn count(&self, decision: &RouteDecision) {
        let variant = match decision {
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
    }

    fn decide_inner(
        &self,
        config: &SidecarConfig,
        headers: &HeaderMap,
        grant: &Grant,
    ) -> Result<RouteDecision, RouteError> {
        if let Some(name) = Self::override_of(config, headers) {
            let header = config
                .routing
                .override_header
                .as_deref()
                .unwrap_or_default();
            if !grant.may_override || !grant.allows(name) {
                return Err(RouteError::Forbidden(format!(
                    "this caller may not choose variant {name:?} with header {header}"
                )));
            }
            if name == self.local {
                return Ok(RouteDecision::Local);
            }
            let Some(variant) = config.variants.iter().find(|v| v.name == name) else {
                let known: Vec<&str> = config.variants.iter().map(|v| v.name.as_str()).collect();
                return Err(RouteError::UnknownVariant {
                    header: header.to_owned(),
                    message: format!(
                        "header {header} names variant {name:?}, which this model does not \
                         have (variants: {})",
                        known.join(", ")
                    ),
                });
            };
            if !self.reachable(variant) {
                return Err(RouteError::Unreachable(format!(
                    "variant {name:?} (asked for with header {header}) cannot be reached from \
                     this server"
                )));
            }
            if self.breakers.is_open(name, Instant::now(), &self.metrics) {
                return Err(RouteError::Unreachable(format!(
                    "variant {name:?} (asked for with header {header}) failed repeatedly; its \
                     breaker holds forwards back for a while"
                )));
            }
            return Ok(self.to_decision(variant));
        }
        if let Some(decision) = self.route(config, headers, &[], grant) {
            return Ok(decision);
        }
        if !grant.allows(&self.local) {
            return Err(RouteError::Unreachable(
                "no variant this caller may use can take the request now".to_owned(),
            ));
        }
        Ok({
            if !self.warned_local_only.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    variant = %self.local,
                    "no variant with weight is reachable from this pod; serving locally"
                );
            }
            RouteDecision::Local
        })
    }

    /// The weighted (or sticky) choice among reachable variants with weight that `grant`
    /// allows, minus `exclude`.
    fn route(
        &self,
        config: &SidecarConfig,
        headers: &HeaderMap,
        exclude: &[String],
        grant: &Grant,
    ) -> Option<RouteDecision> {
        let candidates = self.candidates(config, exclude, grant);
        let mut chosen = self.pick(config, headers, &candidates)?;
        if self.held_back(chosen) {
            // Its breaker is open: counted as a failed forward to it (what the canary analysis
            // judges a variant by; a variant held back would otherwise look idle, not broken),
            // then the choice is made again among the others, as a failed forward falls back.
            self.metrics
                .forward_failures
                .get_or_create(&ForwardFailureLabels {
                    variant: chosen.name.clone(),
                    kind: BREAKER_OPEN_KIND.to_owned(),
                })
                .inc();
            let rest: Vec<&VariantRoute> = candidates
                .into_iter()
                .filter(|v| !self.held_back(v))
                .collect();
            chosen = self.pick(config, headers, &rest)?;
        }
        Some(self.to_decision(chosen))
    }

    /// The sticky choice among `among` for a request with a sticky key, else the weighted one.
    fn pick<'a>(
        &self,
        config: &SidecarConfig,
        headers: &HeaderMap,
        among: &[&'a VariantRoute],
    ) -> Option<&'a VariantRoute> {
        match Self::sticky_key(config, headers) {
            Some(key) => sticky_pick(among, key),
            None => weighted_pick(among, self.next_unit()),
        }
    }

    /// Where a request goes after forwarding to the variants in `failed` could not connect: this
    /// pod when its variant has weight (and `grant` allows it), else another reachable variant
    /// with weight that `grant` allows (sticky keys keep their next-best variant), else nowhere
    /// (503).
    pub fn fallback(
        &self,
        config: &SidecarConfig,
        headers: &HeaderMap,
        failed: &[String],
        grant: &Grant,
    ) -> Option<RouteDecision> {
        let local_weight = config
            .variants
            .iter()
            .find(|v| v.name == self.local)
            .map_or(0, |v| v.weight);
        let next = if local_weight > 0 && grant.allows(&self.local) {
            Some(RouteDecision::Local)
        } else {
            match self.route(config, headers, failed, grant)? {
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
        let mut c = crate::cli::default_sidecar_config("m");
        assert_eq!(c.version, SIDECAR_CONFIG_VERSION);
        c.variants = variants.iter().map(|(n, w)| variant(n, *w)).collect();
        c
    }

    fn token() -> ForwardToken {
        ForwardToken::new("s3cret-token-for-tests")
    }

    fn routing(local: &str, with_token: bool) -> Router {
        let t = token();
        Router::new(local, with_token.then_some(&t), RoutingMetrics::default())
    }

    fn chosen(d: &RouteDecision, local: &str) -> String {
        match d {
            RouteDecision::Forward { variant, .. } => variant.clone(),
            _ => local.to_owned(),
        }
    }

    #[test]
    fn forged_or_unverifiable_internal_headers_are_403() {
        let mut h = HeaderMap::new();
        h.insert(FORWARDED_HEADER, HeaderValue::from_static("1"));
        for r in [routing("stable", true), routing("stable", false)] {
            let e = r.forwarded_caller(&h, "/v1/completions").unwrap_err();
            assert!(matches!(e, RouteError::Forbidden(_)), "{e:?}");
        }
        // A genuine one from a peer with the same token: served here as the caller it names.
        let peer = routing("canary", true);
        let alice = Caller::new(String::new(), "alice".into());
        let named = caller_header(&alice);
        h.insert(
            FORWARDED_HEADER,
            peer.auth()
                .unwrap()
                .sign("/v1/completions", named.as_bytes()),
        );
        h.insert(CALLER_HEADER, named);
        let caller = routing("stable", true)
            .forwarded_caller(&h, "/v1/completions")
            .unwrap();
        assert_eq!(caller, Some(alice));
        // Not when the caller is swapped, and not by a pod without the token.
        let mut swapped = h.clone();
        swapped.insert(
            CALLER_HEADER,
            caller_header(&Caller::new(String::new(), "admin".into())),
        );
        for (r, h) in [
            (routing("stable", true), &swapped),
            (routing("stable", false), &h),
        ] {
            assert!(r.forwarded_caller(h, "/v1/completions").is_err());
        }
        assert_eq!(
            routing("stable", true)
                .forwarded_caller(&HeaderMap::new(), "/p")
                .unwrap(),
            None
        );
    }

    #[test]
    fn grants_limit_the_variants_routed_to_and_the_override() {
        let c = {
            let mut c = config(&[("stable", 90), ("canary", 10)]);
            c.routing.override_header = Some("x-sluice-variant".into());
            c
        };
        let r = routing("stable", true);
        let canary_only = Grant {
            variants: Some(vec!["canary".into()]),
            may_override: false,
        };
        for _ in 0..20 {
            let d = r.decide(&c, &HeaderMap::new(), &canary_only).unwrap();
            assert_eq!(chosen(&d, "stable"), "canary");
        }
        let mut h = HeaderMap::new();
        h.insert("x-sluice-variant", HeaderValue::from_static("canary"));
        let e = r.decide(&c, &h, &canary_only).unwrap_err();
        assert!(matches!(e, RouteError::Forbidden(_)), "{e:?}");
        let stable_override = Grant {
            variants: Some(vec!["stable".into()]),
            may_override: true,
        };
        let e = r.decide(&c, &h, &stable_override).unwrap_err();
        assert!(
            matches!(e, RouteError::Forbidden(_)),
            "outside the grant: {e:?}"
        );
        assert!(r.decide(&c, &h, &Grant::all()).is_ok());
        // Nothing the caller may use has weight: 503, not the local variant.
        let c = config(&[("stable", 100), ("canary", 0)]);
        let e = r.decide(&c, &HeaderMap::new(), &canary_only).unwrap_err();
        assert!(matches!(e, RouteError::Unreachable(_)), "{e:?}");
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
                let d = r.decide(&c, &HeaderMap::new(), &Grant::all()).unwrap();
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
            let d = r.decide(&c, &HeaderMap::new(), &Grant::all()).unwrap();
            assert_eq!(chosen(&d, "canary"), "stable");
        }
        // Without a token, remote variants are unreachable: everything is local.
        let c = config(&[("stable", 50), ("canary", 50)]);
        let r = routing("canary", false);
        for _ in 0..100 {
            assert_eq!(
                r.decide(&c, &HeaderMap::new(), &Grant::all()).unwrap(),
                RouteDecision::Local
            );
        }
        // A remote variant without an address is unreachable too.
        let mut c = config(&[("stable", 50), ("canary", 50)]);
        c.variants[0].address = None;
        let r = routing("canary", true);
        for _ in 0..100 {
            assert_eq!(
                r.decide(&c, &HeaderMap::new(), &Grant::all()).unwrap(),
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
                r.decide(&c, &h, &Grant::all()).unwrap(),
                RouteDecision::Forward {
                    variant: "canary".into(),
                    address: "http://canary.default.svc:8080".into()
                }
            );
        }
        h.insert("x-sluice-variant", HeaderValue::from_static("stable"));
        assert_eq!(
            r.decide(&c, &h, &Grant::all()).unwrap(),
            RouteDecision::Local
        );
        h.insert("x-sluice-variant", HeaderValue::from_static("nope"));
        let e = r.decide(&c, &h, &Grant::all()).unwrap_err();
        assert!(
            matches!(&e, RouteError::UnknownVariant { header, .. } if header == "x-sluice-variant"),
            "{e:?}"
        );
        // Pinned to a variant this pod cannot reach: 503, not a silent local answer.
        h.insert("x-sluice-variant", HeaderValue::from_static("canary"));
        let e = routing("stable", false)
            .decide(&c, &h, &Grant::all())
            .unwrap_err();
        assert!(matches!(e, RouteError::Unreachable(_)), "{e:?}");
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
            let d = r.decide(&c, &h, &Grant::all()).unwrap();
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
            r.fallback(&c, &HeaderMap::new(), &["canary".into()], &Grant::all()),
            Some(RouteDecision::Local)
        );
        let c = config(&[("stable", 0), ("canary", 60), ("blue", 40)]);
        let d = r
            .fallback(&c, &HeaderMap::new(), &["canary".into()], &Grant::all())
            .unwrap();
        assert_eq!(chosen(&d, "stable"), "blue");
        assert_eq!(
            r.fallback(
                &c,
                &HeaderMap::new(),
                &["canary".into(), "blue".into()],
                &Grant::all()
            ),
            None
        );
    }
}

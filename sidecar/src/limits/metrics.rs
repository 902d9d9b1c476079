//! The limiter's metrics (`sluice_ratelimit_*`): shadow refusals, refusals by rule and reason,
//! and the buckets held.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Name of the gauge of requests the limiter admitted and not yet settled (running, queued
/// for the engine, or forwarded): the number the saturation mark (`saturation.maxInFlight`) is
/// compared with. `sluice_requests_in_flight` and `sluice_queue_depth` count only what
/// reached this pod's engine.
pub const ADMITTED_IN_FLIGHT: &str = "ratelimit_in_flight";

/// Labels naming a rule.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    /// The rule's name.
    pub rule: String,
}

/// Labels of refusals.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// The refusing rule (or `saturation`).
    pub rule: String,
    /// Why ([`super::Cause::reason`]): `rate_limit_exceeded`, `insufficient_quota`,
    /// `request_too_large`, `saturated`.
    pub reason: String,
}

/// Metrics of the limiter.
#[derive(Clone, Debug, Default)]
pub struct LimitMetrics {
    /// `sluice_ratelimit_shadow_total{rule}`.
    pub shadow: Family<RuleLabels, Counter>,
    /// `sluice_ratelimit_refused_total{rule,reason}`.
    pub refused: Family<RefusalLabels, Counter>,
    /// `sluice_ratelimit_buckets`: buckets held (as of the last sweep).
    pub buckets: Gauge,
    /// `sluice_ratelimit_buckets_evicted_total`: buckets dropped from full tables.
    pub evicted: Counter,
}

impl LimitMetrics {
    /// Registers the metrics in `registry` (prefix `sluice_` comes from the registry).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ratelimit_shadow",
            "Requests shadow rules would have refused, by rule",
            m.shadow.clone(),
        );
        registry.register(
            "ratelimit_refused",
            "Requests refused by rate limits or shed at the saturation mark, by rule and reason",
            m.refused.clone(),
        );
        registry.register(
            "ratelimit_buckets",
            "Rate-limit buckets held (as of the last sweep)",
            m.buckets.clone(),
        );
        registry.register(
            "ratelimit_buckets_evicted",
            "Rate-limit buckets dropped because their table was full",
            m.evicted.clone(),
        );
        m
    }

    pub(super) fn shadow(&self, rule: &str) {
        self.shadow
            .get_or_create(&RuleLabels {
                rule: rule.to_owned(),
            })
            .inc();
    }

    pub(super) fn refused(&self, rule: &str, reason: &str) {
        self.refused
            .get_or_create(&RefusalLabels {
                rule: rule.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }
}

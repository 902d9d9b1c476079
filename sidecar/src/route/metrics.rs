//! Routing metrics: how traffic is split from this pod (`sluice_routed_requests_total`),
//! forwards that failed or fell back, and the breakers that hold failing variants back.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

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
    /// `connect`, `timeout`, `error`, or `breaker_open` (routed to it while its breaker held
    /// forwards back: not sent, served elsewhere).
    pub kind: String,
}

/// Labels of the breaker metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    /// The destination variant.
    pub variant: String,
}

impl BreakerLabels {
    /// The labels of `variant`'s breaker.
    pub fn of(variant: &str) -> Self {
        Self {
            variant: variant.to_owned(),
        }
    }
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
    /// 1 while forwards to a variant are held back by its breaker.
    pub breaker_open: Family<BreakerLabels, Gauge>,
    /// Times a variant's breaker opened.
    pub breaker_opened: Family<BreakerLabels, Counter>,
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
            sluice_crds::contract::FORWARD_FAILURES,
            "Forwards to another variant that failed (or were held back by its open breaker), by variant and kind",
            m.forward_failures.clone(),
        );
        registry.register(
            "forward_fallbacks",
            "Requests re-routed because forwarding to their variant failed to connect",
            m.fallbacks.clone(),
        );
        registry.register(
            sluice_crds::contract::FORWARD_BREAKER_OPEN,
            "1 while this sidecar's breaker holds forwards to the variant back",
            m.breaker_open.clone(),
        );
        registry.register(
            sluice_crds::contract::FORWARD_BREAKER_OPENED,
            "Times this sidecar's breaker of forwards to the variant opened",
            m.breaker_opened.clone(),
        );
        m
    }
}

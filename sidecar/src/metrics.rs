//! The sidecar's metrics: one `prometheus_client` registry, every name prefixed `sluice_`, units
//! in the names. mistral.rs has no metrics recorder of its own, so nothing needs merging.

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};
use sluice_crds::contract;
use std::sync::{Arc, atomic::AtomicU64};

use crate::engine::PrefixCacheMeter;

/// Labels of `sluice_requests_total`: the operator's canary analysis reads them by the names
/// in [`contract`] (`LABEL_ROUTE`, `LABEL_VARIANT`, `LABEL_STATUS`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The API route, e.g. `/v1/chat/completions`.
    pub route: String,
    /// The variant that served the request (this pod's, or the one it was forwarded to).
    pub variant: String,
    /// The HTTP status answered.
    pub status: u16,
}

/// Every metric the request path and the engine wrapper update. Cloning shares the metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Requests answered, by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Requests admitted to the engine and not finished yet.
    pub in_flight: Gauge,
    /// Requests waiting for an engine slot.
    pub queue_depth: Gauge,
    /// Prompt tokens processed.
    pub prompt_tokens: Counter,
    /// Completion tokens generated.
    pub completion_tokens: Counter,
    /// Time from request arrival to the first generated token.
    pub time_to_first_token: Histogram,
    /// Mean time between output tokens after the first, per request.
    pub time_per_output_token: Histogram,
    /// End-to-end request duration.
    pub request_duration: Histogram,
    /// Generations stopped because the client went away.
    pub cancelled: Counter,
    /// Seconds the model took to load.
    pub model_load: Gauge<f64, AtomicU64>,
    /// Seconds from process start to ready.
    pub cold_start: Gauge<f64, AtomicU64>,
}

// === impl Metrics ===

impl Metrics {
    /// Creates the metrics and registers them in `registry` (which should carry the `sluice`
    /// prefix; see [`new_registry`]).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            requests: Family::default(),
            in_flight: Gauge::default(),
            queue_depth: Gauge::default(),
            prompt_tokens: Counter::default(),
            completion_tokens: Counter::default(),
            // 5 ms .. ~82 s
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            // 0.5 ms .. ~8 s
            time_per_output_token: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            request_duration: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            cancelled: Counter::default(),
            model_load: Gauge::default(),
            cold_start: Gauge::default(),
        };
        registry.register(
            contract::REQUESTS,
            "OpenAI API requests answered, by route and status",
            m.requests.clone(),
        );
        registry.register(
            contract::REQUESTS_IN_FLIGHT,
            "Requests admitted to the engine and not finished",
            m.in_flight.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for an engine slot",
            m.queue_depth.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens processed",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "completion_tokens",
            "Completion tokens generated",
            m.completion_tokens.clone(),
        );
        registry.register_with_unit(
            contract::TIME_TO_FIRST_TOKEN,
            "Time from request arrival to the first generated token",
            Unit::Seconds,
            m.time_to_first_token.clone(),
        );
        registry.register_with_unit(
            "time_per_output_token",
            "Mean time between output tokens after the first, per request",
            Unit::Seconds,
            m.time_per_output_token.clone(),
        );
        registry.register_with_unit(
            "request_duration",
            "End-to-end duration of OpenAI API requests",
            Unit::Seconds,
            m.request_duration.clone(),
        );
        registry.register(
            "generations_cancelled",
            "Generations stopped because the client disconnected",
            m.cancelled.clone(),
        );
        registry.register_with_unit(
            "model_load",
            "Time the model took to load",
            Unit::Seconds,
            m.model_load.clone(),
        );
        registry.register_with_unit(
            "cold_start",
            "Time from process start to ready",
            Unit::Seconds,
            m.cold_start.clone(),
        );
        m
    }

    /// Counts one answered request.
    pub fn record_request(&self, route: &str, variant: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_owned(),
                variant: variant.to_owned(),
                status,
            })
            .inc();
    }
}

/// The engine's prefix cache, read from its meter at each scrape.
#[derive(Debug)]
pub struct PrefixCacheMetrics(Arc<PrefixCacheMeter>);

impl PrefixCacheMetrics {
    /// Registers the prefix cache's metrics in `registry`.
    pub fn register(registry: &mut Registry, meter: Arc<PrefixCacheMeter>) {
        registry.register_collector(Box::new(Self(meter)));
    }
}

impl Collector for PrefixCacheMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let m = &self.0;
        let as_i64 = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        for (name, help, value) in [
            (
                "prefix_cache_hits",
                "Prompts whose prefill started from a cached prefix",
                m.hits(),
            ),
            (
                "prefix_cache_misses",
                "Prompts looked up in the prefix cache and not found",
                m.misses(),
            ),
            (
                "prefix_cache_evictions",
                "Prefix cache entries dropped to stay within its entry or byte bound",
                m.evictions(),
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        for (name, help, value) in [
            (
                "prefix_cache",
                "Memory held by the prefix cache's KV tensors",
                m.bytes(),
            ),
            (
                "prefix_cache_limit",
                "The prefix cache's memory budget (--prefix-cache-bytes; 0: off)",
                m.max_bytes(),
            ),
        ] {
            let gauge = ConstGauge::new(as_i64(value));
            gauge.encode(encoder.encode_descriptor(
                name,
                help,
                Some(&Unit::Bytes),
                gauge.metric_type(),
            )?)?;
        }
        let entries = ConstGauge::new(as_i64(m.entries()));
        entries.encode(encoder.encode_descriptor(
            "prefix_cache_entries",
            "Sequences held by the prefix cache",
            None,
            entries.metric_type(),
        )?)
    }
}

/// The binary's one registry, prefix `sluice` ([`contract::PREFIX`]).
pub fn new_registry() -> Registry {
    Registry::with_prefix(contract::PREFIX)
}

/// Renders the registry in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_prefix_and_units() {
        let mut registry = new_registry();
        let m = Metrics::register(&mut registry);
        PrefixCacheMetrics::register(&mut registry, Arc::new(PrefixCacheMeter::new(1 << 20)));
        m.record_request("/v1/chat/completions", "default", 200);
        m.time_to_first_token.observe(0.1);
        m.model_load.set(1.5);
        let text = encode(&registry);
        for name in [
            "sluice_requests_total{route=\"/v1/chat/completions\",variant=\"default\",status=\"200\"} 1",
            "sluice_requests_in_flight",
            "sluice_queue_depth",
            "sluice_prompt_tokens_total",
            "sluice_completion_tokens_total",
            "sluice_time_to_first_token_seconds_bucket",
            "sluice_time_per_output_token_seconds",
            "sluice_model_load_seconds 1.5",
            "sluice_cold_start_seconds",
            "sluice_prefix_cache_hits_total 0",
            "sluice_prefix_cache_misses_total 0",
            "sluice_prefix_cache_evictions_total 0",
            "sluice_prefix_cache_bytes 0",
            "sluice_prefix_cache_limit_bytes 1048576",
            "sluice_prefix_cache_entries 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn request_labels_are_named_as_the_contract_says() {
        let mut registry = new_registry();
        let m = Metrics::register(&mut registry);
        m.record_request("/v1/completions", "canary", 429);
        let text = encode(&registry);
        let line = text
            .lines()
            .find(|l| l.starts_with(contract::REQUESTS_TOTAL_SERIES))
            .unwrap_or_else(|| panic!("no {} in\n{text}", contract::REQUESTS_TOTAL_SERIES));
        let labels = &line[line.find('{').unwrap() + 1..line.find('}').unwrap()];
        let names: Vec<&str> = labels
            .split(',')
            .map(|l| l.split('=').next().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                contract::LABEL_ROUTE,
                contract::LABEL_VARIANT,
                contract::LABEL_STATUS
            ]
        );
        for name in [
            contract::REQUESTS_IN_FLIGHT_SERIES,
            contract::TIME_TO_FIRST_TOKEN_BUCKET_SERIES,
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}

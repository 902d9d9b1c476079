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
        info::Info,
    },
    registry::{Registry, Unit},
};
use sluice_crds::contract;
use std::{
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant},
};

use crate::engine::{PrefixCacheMeter, device::EngineDevice};

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
    /// Completion tokens per second over the last [`TOKEN_RATE_WINDOW`], counted as they are
    /// generated (`sluice_completion_tokens_per_second`, an autoscaler's `TokensPerSecond`).
    pub completion_rate: Arc<TokenRate>,
    /// Time from request arrival to the first generated token.
    pub time_to_first_token: Histogram,
    /// Mean time between output tokens after the first, per request.
    pub time_per_output_token: Histogram,
    /// End-to-end request duration.
    pub request_duration: Histogram,
    /// Generations stopped because the client went away.
    pub cancelled: Counter,
    /// Answers ended by the end of the drain grace period, with an error (event) and a clean
    /// end of the body rather than a cut connection.
    pub cut_at_drain_end: Counter,
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
            completion_rate: Arc::new(TokenRate::new(TOKEN_RATE_WINDOW, Instant::now())),
            // 5 ms .. ~82 s
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            // 0.5 ms .. ~8 s
            time_per_output_token: Histogram::new(exponential_buckets(0.0005, 2.0, 15)),
            request_duration: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            cancelled: Counter::default(),
            cut_at_drain_end: Counter::default(),
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
            contract::QUEUE_DEPTH,
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
        registry.register_collector(Box::new(CompletionRate(m.completion_rate.clone())));
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
        registry.register(
            "answers_cut_at_drain_end",
            "Answers still running when the drain grace period ended, ended with an error",
            m.cut_at_drain_end.clone(),
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

/// The window of `sluice_completion_tokens_per_second`: short enough that an autoscaler sees
/// load change within a scrape or two, long enough to cover the usual 15-30 s scrape interval
/// (no token goes unseen between two scrapes) and to smooth a batch's bursts.
pub const TOKEN_RATE_WINDOW: Duration = Duration::from_secs(30);

/// Tokens counted into one-second buckets, read as a rate over the last window. Callers pass
/// the instant (on the monotonic clock), so the arithmetic is exact whatever the wall clock
/// does; a lock per record is cheap next to generating a token.
#[derive(Debug)]
pub struct TokenRate {
    /// Second 0 of the buckets.
    start: Instant,
    window_secs: u64,
    /// `(second since start, tokens)`, at `second % window_secs`.
    buckets: Mutex<Vec<(u64, u64)>>,
}

// === impl TokenRate ===

impl TokenRate {
    /// A rate over `window` (whole seconds, at least 2), counting from `start`.
    pub fn new(window: Duration, start: Instant) -> Self {
        let window_secs = window.as_secs().max(2);
        Self {
            start,
            window_secs,
            buckets: Mutex::new(vec![(u64::MAX, 0); window_secs as usize]),
        }
    }

    /// Counts `tokens` generated now.
    pub fn record(&self, tokens: u64) {
        self.record_at(tokens, Instant::now());
    }

    /// Counts `tokens` generated at `now`.
    pub fn record_at(&self, tokens: u64, now: Instant) {
        if tokens == 0 {
            return;
        }
        let second = now.saturating_duration_since(self.start).as_secs();
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = &mut buckets[(second % self.window_secs) as usize];
        if bucket.0 != second {
            *bucket = (second, 0);
        }
        bucket.1 += tokens;
    }

    /// Tokens per second now.
    pub fn per_second(&self) -> f64 {
        self.per_second_at(Instant::now())
    }

    /// Tokens per second at `now`: the tokens of the current second and the `window - 1`
    /// before it, over the time they span (less since `start` while the window is filling, and
    /// never under a second, so the first tokens after start do not read as a burst).
    pub fn per_second_at(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
        let second = elapsed as u64;
        let oldest = second.saturating_sub(self.window_secs - 1);
        let tokens: u64 = self
            .buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(s, _)| (oldest..=second).contains(s))
            .map(|(_, n)| n)
            .sum();
        let span = (elapsed - oldest as f64).max(1.0);
        tokens as f64 / span
    }
}

/// [`TokenRate`] as a gauge, computed at each scrape.
#[derive(Debug)]
struct CompletionRate(Arc<TokenRate>);

impl Collector for CompletionRate {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let gauge = ConstGauge::new(self.0.per_second());
        gauge.encode(encoder.encode_descriptor(
            contract::COMPLETION_TOKENS_PER_SECOND,
            &format!(
                "Completion tokens generated per second over the last {} seconds",
                self.0.window_secs
            ),
            None,
            gauge.metric_type(),
        )?)
    }
}

/// The engine's sequence slots in use, as a ratio of how many it batches at once
/// (`sluice_engine_occupancy_ratio`): 1 means new requests queue.
#[derive(Debug)]
pub struct EngineOccupancy {
    in_flight: Gauge,
    max_seqs: usize,
}

impl EngineOccupancy {
    /// Registers the gauge, read from `metrics`' in-flight count at each scrape.
    pub fn register(registry: &mut Registry, metrics: &Metrics, max_seqs: usize) {
        registry.register_collector(Box::new(Self {
            in_flight: metrics.in_flight.clone(),
            max_seqs: max_seqs.max(1),
        }));
    }
}

impl Collector for EngineOccupancy {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let ratio = self.in_flight.get().max(0) as f64 / self.max_seqs as f64;
        let gauge = ConstGauge::new(ratio.min(1.0));
        gauge.encode(encoder.encode_descriptor(
            contract::ENGINE_OCCUPANCY,
            "Engine sequence slots in use, as a ratio of the sequences it batches at once",
            // OpenMetrics' `ratios` reads oddly; Prometheus' own convention is `_ratio`.
            Some(&Unit::Other("ratio".to_owned())),
            gauge.metric_type(),
        )?)
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

/// Labels of the connection metrics: which listener (`api` or `admin`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `api` or `admin`.
    pub listener: &'static str,
}

/// Labels of the connection counters: the listener and why the connection ended or was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionReasonLabels {
    /// `api` or `admin`.
    pub listener: &'static str,
    /// Refused: `max_connections` or `max_connections_per_client`; timed out: `idle` (nothing
    /// sent since the last answer, or since the connection opened) or `header` (a request head
    /// begun and not finished; answered 408).
    pub reason: &'static str,
}

/// Connections per listener: open now, refused at accept, closed for want of a request.
#[derive(Clone, Debug, Default)]
pub struct ConnectionMetrics {
    /// Connections open now.
    pub open: Family<ListenerLabels, Gauge>,
    /// Connections refused at accept (503) because a connection limit was reached.
    pub refused: Family<ConnectionReasonLabels, Counter>,
    /// Connections closed because no request (or no whole head) came in time.
    pub timed_out: Family<ConnectionReasonLabels, Counter>,
}

impl ConnectionMetrics {
    /// Creates the connection metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "connections_open",
            "Connections open now, by listener",
            m.open.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused with 503 at accept because a connection limit was reached",
            m.refused.clone(),
        );
        registry.register(
            "connections_timed_out",
            "Connections closed because no request, or no whole request head, came in time",
            m.timed_out.clone(),
        );
        m
    }
}

/// Labels of `sluice_engine_device_info`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    /// `cpu` or `cuda:N`.
    device: String,
    /// The processor's or GPU's name.
    name: String,
    /// The activation dtype, as `--dtype` spells it.
    dtype: String,
}

/// Registers what the engine computes on: `sluice_engine_device_info{device,name,dtype} 1` and
/// `sluice_engine_device_memory_bytes` (the GPU's memory; on the CPU, what the process may use).
pub fn register_device(registry: &mut Registry, device: &EngineDevice) {
    registry.register(
        "engine_device",
        "The device the engine computes on, its name and the activation dtype",
        Info::new(DeviceLabels {
            device: device.label.clone(),
            name: device.name.clone(),
            dtype: device.dtype.as_str().to_owned(),
        }),
    );
    registry.register_with_unit(
        "engine_device_memory",
        "Memory of the device the engine computes on (for the CPU, what this process may use)",
        Unit::Bytes,
        ConstGauge::new(i64::try_from(device.memory_bytes).unwrap_or(i64::MAX)),
    );
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
            "sluice_completion_tokens_per_second 0",
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
        // The autoscalers' per-pod metrics are gauges: the adapter serves them as they are.
        for name in [
            contract::REQUESTS_IN_FLIGHT_SERIES,
            contract::COMPLETION_TOKENS_PER_SECOND_SERIES,
        ] {
            assert!(
                text.contains(&format!("# TYPE {name} gauge\n")),
                "{name} is no gauge in\n{text}"
            );
        }
    }

    #[test]
    fn token_rate_is_the_last_window_over_the_time_it_spans() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let rate = TokenRate::new(Duration::from_secs(30), start);
        assert_eq!(rate.per_second_at(at(0)), 0.0);

        // Filling: 20 tokens in the first two seconds read as 10/s, not as a burst.
        rate.record_at(20, at(1_500));
        assert_eq!(rate.per_second_at(at(2_000)), 10.0);

        // Steady: 10 tokens every second for two minutes read as 10/s, within the current
        // second's share.
        let rate = TokenRate::new(Duration::from_secs(30), start);
        for s in 0..120 {
            rate.record_at(10, at(s * 1_000));
        }
        let r = rate.per_second_at(at(119_999));
        assert!((r - 10.0).abs() < 0.01, "{r}");
        // Halfway through a second whose tokens are in: 30 seconds' tokens over 29.5 s.
        let r = rate.per_second_at(at(119_500));
        assert!((r - 300.0 / 29.5).abs() < 1e-9, "{r}");

        // A burst stays in the window for 30 s, then leaves it.
        rate.record_at(600, at(125_000));
        let r = rate.per_second_at(at(126_000));
        assert!(r > 20.0, "{r}");
        assert!(rate.per_second_at(at(154_999)) > 19.0);
        assert_eq!(rate.per_second_at(at(155_000)), 0.0);
        // Nothing for a long time: buckets from earlier laps of the ring do not count.
        assert_eq!(rate.per_second_at(at(3_600_000)), 0.0);
        rate.record_at(30, at(3_600_000));
        assert_eq!(rate.per_second_at(at(3_601_000)), 30.0 / 29.0);
    }
}

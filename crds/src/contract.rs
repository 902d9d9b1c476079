//! The metrics contract between the sidecar, which exports these series on its admin
//! `/metrics`, and the operator, which reads them: the canary analysis judges variants by
//! requests and time to first token, the RateLimitPolicy status counts the pods that enforce a
//! config generation, the InferenceModel status counts the pods whose circuit breaker holds a
//! variant back, and the autoscalers the operator renders name per-pod metrics (served to
//! them through the custom metrics API by the prometheus-adapter rules the chart ships,
//! `charts/sluice/prometheus-adapter-rules.yaml`).
//!
//! The sidecar registers each metric under [`PREFIX`] with the short name here
//! (`prometheus_client` adds the unit and the `_total`/`_bucket` suffixes); the operator matches
//! the exposed names. A test below pins the two spellings to each other.

/// Prefix of every sidecar metric (the registry's prefix).
pub const PREFIX: &str = "sluice";

/// Registered name of the counter of requests answered, by [`LABEL_ROUTE`], [`LABEL_VARIANT`]
/// and [`LABEL_STATUS`].
pub const REQUESTS: &str = "requests";
/// Registered name (unit: seconds) of the histogram of the time from a request's arrival to
/// its first generated token.
pub const TIME_TO_FIRST_TOKEN: &str = "time_to_first_token";
/// Registered name of the gauge of the sidecar config generation in force.
pub const CONFIG_GENERATION: &str = "config_generation";
/// Registered name of the gauge of requests admitted to the engine and not finished.
pub const REQUESTS_IN_FLIGHT: &str = "requests_in_flight";
/// Registered name of the gauge of requests waiting for an engine slot (admitted, queued in
/// front of the engine); an autoscaler's `QueueDepth` metric.
pub const QUEUE_DEPTH: &str = "queue_depth";
/// Registered name of the gauge of the engine's sequence slots in use, as a ratio of
/// `maxConcurrentSequences` (0 to 1; unit `ratio`).
pub const ENGINE_OCCUPANCY: &str = "engine_occupancy";
/// Registered name of the gauge of completion tokens generated per second over the sidecar's
/// last few seconds (not a unit `prometheus_client` knows, so the name carries it).
pub const COMPLETION_TOKENS_PER_SECOND: &str = "completion_tokens_per_second";

/// Registered name of the counter of forwards to another variant that failed, by
/// [`LABEL_VARIANT`] (the variant that could not be reached) and `kind`. The canary analysis
/// counts them against that variant: a pod that is down answers nothing itself.
pub const FORWARD_FAILURES: &str = "forward_failures";
/// Registered name of the gauge, by [`LABEL_VARIANT`] (the destination), that is 1 while the
/// sidecar's circuit breaker holds its forwards to that variant back. The operator counts, per
/// variant, the pods that hold it open, in the model's status.
pub const FORWARD_BREAKER_OPEN: &str = "forward_breaker_open";
/// Registered name of the counter, by [`LABEL_VARIANT`], of the times the sidecar's breaker of
/// forwards to that variant opened (for alerts on a breaker that keeps flapping).
pub const FORWARD_BREAKER_OPENED: &str = "forward_breaker_opened";

/// [`REQUESTS`] as exposed.
pub const REQUESTS_TOTAL_SERIES: &str = "sluice_requests_total";
/// The buckets of [`TIME_TO_FIRST_TOKEN`] as exposed (cumulative, labelled [`LABEL_LE`]).
pub const TIME_TO_FIRST_TOKEN_BUCKET_SERIES: &str = "sluice_time_to_first_token_seconds_bucket";
/// [`FORWARD_FAILURES`] as exposed.
pub const FORWARD_FAILURES_SERIES: &str = "sluice_forward_failures_total";
/// [`FORWARD_BREAKER_OPEN`] as exposed.
pub const FORWARD_BREAKER_OPEN_SERIES: &str = "sluice_forward_breaker_open";
/// [`FORWARD_BREAKER_OPENED`] as exposed.
pub const FORWARD_BREAKER_OPENED_TOTAL_SERIES: &str = "sluice_forward_breaker_opened_total";
/// [`CONFIG_GENERATION`] as exposed.
pub const CONFIG_GENERATION_SERIES: &str = "sluice_config_generation";
/// [`REQUESTS_IN_FLIGHT`] as exposed; an autoscaler's `InFlightRequests` metric.
pub const REQUESTS_IN_FLIGHT_SERIES: &str = "sluice_requests_in_flight";
/// [`QUEUE_DEPTH`] as exposed; an autoscaler's `QueueDepth` metric.
pub const QUEUE_DEPTH_SERIES: &str = "sluice_queue_depth";
/// [`ENGINE_OCCUPANCY`] as exposed.
pub const ENGINE_OCCUPANCY_SERIES: &str = "sluice_engine_occupancy_ratio";
/// [`COMPLETION_TOKENS_PER_SECOND`] as exposed; an autoscaler's `TokensPerSecond` metric. A
/// gauge each pod computes itself, so the adapter serves it per pod as it is (no `rate()`).
pub const COMPLETION_TOKENS_PER_SECOND_SERIES: &str = "sluice_completion_tokens_per_second";

/// Label: the API route of a request (`/v1/chat/completions`).
pub const LABEL_ROUTE: &str = "route";
/// Label: the variant that served a request (the pod's own, or the one it forwarded to).
pub const LABEL_VARIANT: &str = "variant";
/// Label: the HTTP status answered.
pub const LABEL_STATUS: &str = "status";
/// Label: a histogram bucket's upper bound (Prometheus' own).
pub const LABEL_LE: &str = "le";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposed_names_are_the_registered_ones_with_prefix_unit_and_suffix() {
        let exposed = |name: &str, suffix: &str| format!("{PREFIX}_{name}{suffix}");
        assert_eq!(exposed(REQUESTS, "_total"), REQUESTS_TOTAL_SERIES);
        assert_eq!(
            exposed(TIME_TO_FIRST_TOKEN, "_seconds_bucket"),
            TIME_TO_FIRST_TOKEN_BUCKET_SERIES
        );
        assert_eq!(exposed(CONFIG_GENERATION, ""), CONFIG_GENERATION_SERIES);
        assert_eq!(exposed(FORWARD_FAILURES, "_total"), FORWARD_FAILURES_SERIES);
        assert_eq!(
            exposed(FORWARD_BREAKER_OPEN, ""),
            FORWARD_BREAKER_OPEN_SERIES
        );
        assert_eq!(
            exposed(FORWARD_BREAKER_OPENED, "_total"),
            FORWARD_BREAKER_OPENED_TOTAL_SERIES
        );
        assert_eq!(exposed(REQUESTS_IN_FLIGHT, ""), REQUESTS_IN_FLIGHT_SERIES);
        assert_eq!(exposed(QUEUE_DEPTH, ""), QUEUE_DEPTH_SERIES);
        assert_eq!(exposed(ENGINE_OCCUPANCY, "_ratio"), ENGINE_OCCUPANCY_SERIES);
        assert_eq!(
            exposed(COMPLETION_TOKENS_PER_SECOND, ""),
            COMPLETION_TOKENS_PER_SECOND_SERIES
        );
    }
}

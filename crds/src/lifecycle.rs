//! How a sidecar pod stops, agreed between the sidecar (its `--drain-grace-secs` flag and
//! default) and the operator (the pod's preStop hook, the flag it passes, the grace period).
//!
//! The kubelet runs the preStop hook, then sends SIGTERM, then SIGKILL once
//! `terminationGracePeriodSeconds` (counted from the start of the hook) are over. The sleep
//! keeps the pod serving while its removal from the Services' endpoints reaches every proxy, so
//! requests stop arriving before the sidecar stops accepting them; after SIGTERM the sidecar
//! lets the requests in flight finish for up to the drain grace; the margin covers closing the
//! admin port and exiting. The grace period is their sum, so the kubelet never kills a drain.

/// The sidecar's flag (clap's long name, without the dashes): seconds in-flight requests get
/// to finish after SIGTERM.
pub const DRAIN_GRACE_SECS_FLAG: &str = "drain-grace-secs";
/// The sidecar's own drain grace, when run by hand. The operator passes
/// [`drain_grace_secs`] of the variant's request timeout instead.
pub const DRAIN_GRACE_SECS: u32 = 30;
/// The sidecar's flag: seconds a request may take, queueing and generation included.
pub const REQUEST_TIMEOUT_SECS_FLAG: &str = "request-timeout-secs";
/// The request timeout of a sidecar (and of a model's `engine.requestTimeout`) left unset.
pub const REQUEST_TIMEOUT_SECS: u32 = 300;
/// The sidecar's flag: seconds a request may wait for its first token (queue and prompt).
pub const FIRST_TOKEN_TIMEOUT_SECS_FLAG: &str = "first-token-timeout-secs";
/// The preStop `sleep` before SIGTERM, while endpoint removal propagates (kube-proxy and
/// ingress controllers typically catch up within a few seconds).
pub const PRE_STOP_SLEEP_SECS: u32 = 5;
/// Time after the drain for the sidecar to close its admin port and exit.
pub const TERMINATION_MARGIN_SECS: u32 = 5;

/// The drain of a pod whose requests may take `request_timeout_secs`: as long, so that a
/// rollout never cuts a generation that could still finish in time.
pub const fn drain_grace_secs(request_timeout_secs: u32) -> u32 {
    request_timeout_secs
}

/// The pod's `terminationGracePeriodSeconds` for a drain of `drain_secs`: preStop sleep, drain
/// and margin.
pub const fn termination_grace_period_secs(drain_secs: u32) -> u32 {
    PRE_STOP_SLEEP_SECS + drain_secs + TERMINATION_MARGIN_SECS
}

// Checked when compiled: a margin of 0 would let the kubelet's SIGKILL race the exit, and
// Kubernetes' own default (30 s) is what killed drains mid-way.
const _: () = assert!(
    TERMINATION_MARGIN_SECS > 0
        && termination_grace_period_secs(drain_grace_secs(REQUEST_TIMEOUT_SECS)) > 30
);

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
/// The drain grace: the sidecar's default, and what the operator passes explicitly.
pub const DRAIN_GRACE_SECS: u32 = 30;
/// The preStop `sleep` before SIGTERM, while endpoint removal propagates (kube-proxy and
/// ingress controllers typically catch up within a few seconds).
pub const PRE_STOP_SLEEP_SECS: u32 = 5;
/// Time after the drain for the sidecar to close its admin port and exit.
pub const TERMINATION_MARGIN_SECS: u32 = 5;
/// The pod's `terminationGracePeriodSeconds`: preStop sleep, drain and margin.
pub const TERMINATION_GRACE_PERIOD_SECS: u32 =
    PRE_STOP_SLEEP_SECS + DRAIN_GRACE_SECS + TERMINATION_MARGIN_SECS;

// Checked when compiled: a margin of 0 would let the kubelet's SIGKILL race the exit, and
// Kubernetes' own default (30 s) is what killed drains mid-way.
const _: () = assert!(TERMINATION_MARGIN_SECS > 0 && TERMINATION_GRACE_PERIOD_SECS > 30);

//! Canary analysis and progressive rollout: each variant's sidecar metrics → a verdict →
//! rollbacks and progressive steps, decided by the operator and written only to
//! `status.rollout` and the sidecar config (never to `spec`, so Git stays the source of truth
//! and Argo CD sees no drift).
//!
//! # How a variant is judged
//!
//! Every reconcile of a model with `spec.rollout.analysis` (requeued at least every `interval`)
//! scrapes the admin `/metrics` of each running pod of each variant (through
//! [`MetricsSource`](crate::scrape::MetricsSource), so tests fake it) and keeps, per pod, the
//! cumulative counters it read ([`History`]). Over the last `window` (or since the first scrape
//! of the current generation when that is shorter), per pod and then summed over the variant's
//! pods ([`Counters::delta`]; a counter that went down means the pod restarted, and counts from
//! zero):
//!
//! - requests: `sluice_requests_total` (every route and status);
//! - error rate: the fraction of those with a 5xx `status`;
//! - p95 time to first token: from the `sluice_time_to_first_token_seconds` bucket deltas,
//!   interpolated linearly inside the bucket like Prometheus' `histogram_quantile`.
//!
//! When samples carry a `variant` label, only those naming the judged variant count. A variant
//! with fewer than `minRequests` requests in the window is [`Verdict::NotEnoughData`]; one
//! above `maxErrorRate` or `maxTtftP95` is a [`Verdict::Breach`]; otherwise
//! [`Verdict::Healthy`].
//!
//! # What the operator does about it ([`decide`])
//!
//! - With `autoRollback` (the default) a breaching variant that still gets traffic is rolled
//!   back: its effective weight becomes 0 and its share goes to the other variants in proportion
//!   to their weights ([`crate::desired::weights::for_plan`]). The status says
//!   `Degraded=True`, reason `CanaryRolledBack`, with the measured numbers, and one Event is
//!   published. The rollback holds until the spec changes.
//! - The last variant serving traffic is never rolled back: when every serving variant breaches,
//!   the one with the highest desired weight keeps serving and the status says so (reason
//!   `AnalysisFailing`, as for a breach with `autoRollback: false`).
//! - A new `metadata.generation` (the user edited the variant, its weight, anything in spec)
//!   starts a fresh analysis: rollbacks are cleared, steps restart, and the counters read
//!   before the edit no longer count.
//!
//! # Progressive steps
//!
//! With `spec.rollout.steps`, the variant being rolled out is the **last variant in spec order
//! with a positive weight**, unless that is the first variant (variants are listed stable
//! first, new last). Its effective weight follows the step weights, capped at its desired
//! weight; the rest goes to the other variants in proportion to their desired weights, or to
//! the first variant when they all have 0. So `stable: 90, canary: 10` with steps 5 → 10 ramps
//! the canary to its 10%, and `stable: 0, canary: 100` with steps 10 → 50 → 100 is a full
//! progressive rollout; either way the end state is what spec says. A step advances once
//! its `pause` has passed **and** the variant's verdict is `Healthy` (enough requests, within
//! the thresholds; without `analysis` the pause alone suffices). After the last step's pause the
//! variant gets its desired weight. A rolled-back variant's steps stop where they are.
//!
//! # Layout
//!
//! - [`judge`](mod@judge): counters read from the sidecars → what they measure → a
//!   [`Verdict`]; pure.
//! - [`plan`]: the rollout state in `status.rollout` → the [`RoutePlan`] the weights follow,
//!   and this reconcile's [`Decision`] (rollbacks, steps); pure.
//! - [`analyze`](mod@analyze): keeps each pod's counters over the window ([`History`]) from the
//!   reconcile's scrape of the pods ([`crate::scrape::scrape_variants`], shared with the
//!   breaker counts in the status), judges and decides.

pub mod analyze;
pub mod judge;
pub mod plan;

pub use self::analyze::{History, analyze, measure};
pub use self::judge::{
    Counters, Measured, Verdict, format_duration, histogram_quantile, judge, verdict,
};
pub use self::plan::{
    Decision, REASON_FAILING, REASON_ROLLED_BACK, RoutePlan, current, decide, problem, requeue,
    route_plan, step_variant,
};

#[cfg(test)]
mod tests;

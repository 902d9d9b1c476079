//! Canary analysis (issue 7): each variant's sidecar metrics → a verdict → rollbacks and
//! progressive steps, decided by the operator and written only to `status.rollout` and the
//! sidecar config (never to `spec`, so Git stays the source of truth and Argo CD sees no drift).
//!
//! # How a variant is judged
//!
//! Every reconcile of a model with `spec.rollout.analysis` (requeued at least every `interval`)
//! scrapes the admin `/metrics` of each running pod of each variant (through
//! [`MetricsSource`], so tests fake it) and keeps, per pod, the cumulative counters it read
//! ([`History`]). Over the last `window` (or since the first scrape of the current generation
//! when that is shorter), per pod and then summed over the variant's pods ([`Counters::delta`];
//! a counter that went down means the pod restarted, and counts from zero):
//!
//! - requests: `sluice_requests_total` (every route and status);
//! - error rate: the fraction of those with a 5xx `status`;
//! - p95 time to first token: from the `sluice_time_to_first_token_seconds` bucket deltas,
//!   interpolated linearly inside the bucket like Prometheus' `histogram_quantile`.
//!
//! When samples carry a `variant` label, only those naming the judged variant count. A variant
//! with fewer than `minRequests` requests in the window is [`Verdict::NotEnoughData`]; one above
//! `maxErrorRate` or `maxTtftP95` is a [`Verdict::Breach`]; otherwise [`Verdict::Healthy`].
//!
//! # What the operator does about it ([`decide`])
//!
//! - With `autoRollback` (the default) a breaching variant that still gets traffic is rolled
//!   back: its effective weight becomes 0 and its share goes to the other variants in proportion
//!   to their weights ([`crate::routing::model_effective_weights`]). The status says
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

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sluice_crds::InferenceModel;
use sluice_crds::inference_model::{Analysis, RolledBackVariant, RolloutStatus};
use tracing::{debug, info, warn};

use crate::policy::{MetricsSource, PodEndpoint, Sample, pod_endpoints};
use crate::resources::LABEL_VARIANT;

/// Requests answered by a sidecar, by `route` and `status`.
pub const REQUESTS_METRIC: &str = "sluice_requests_total";
/// Buckets of the sidecar's time-to-first-token histogram.
pub const TTFT_BUCKET_METRIC: &str = "sluice_time_to_first_token_seconds_bucket";
/// Degraded reason: the analysis rolled a variant back.
pub const REASON_ROLLED_BACK: &str = "CanaryRolledBack";
/// Degraded reason: a variant breaches but was not rolled back (`autoRollback: false`, or it is
/// the last variant serving traffic).
pub const REASON_FAILING: &str = "AnalysisFailing";
/// How often a model with steps but no analysis is requeued to advance them.
const STEP_POLL: Duration = Duration::from_secs(30);

/// Cumulative counters of one pod (or their sum, or their increase over a window).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Requests answered.
    pub requests: f64,
    /// Of which with a 5xx status.
    pub errors: f64,
    /// Time-to-first-token histogram: `(le, cumulative count)`, sorted by `le` (`+Inf` last).
    pub ttft: Vec<(f64, f64)>,
}

/// What was measured for a variant over the window.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// Requests in the window.
    pub requests: u64,
    /// 5xx answers / requests (0 without requests).
    pub error_rate: f64,
    /// 95th percentile time to first token in seconds, when any was observed.
    pub ttft_p95: Option<f64>,
}

/// The analysis' judgement of one variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Enough requests, within every threshold.
    Healthy(Measured),
    /// Enough requests, and over a threshold; `message` says which, with the numbers.
    Breach {
        /// The numbers.
        measured: Measured,
        /// E.g. `error rate 12.0% > 5.0% over 40 requests in 5m`.
        message: String,
    },
    /// Fewer requests than `minRequests`: not judged.
    NotEnoughData(Measured),
}

// === impl Counters ===

impl Counters {
    /// The counters of `variant` among one pod's samples (samples labelled with another
    /// `variant` are skipped).
    pub fn from_samples(samples: &[Sample], variant: &str) -> Self {
        let mine = |s: &Sample| s.labels.get("variant").is_none_or(|v| v == variant);
        let mut out = Self::default();
        let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for s in samples.iter().filter(|s| mine(s)) {
            if !s.value.is_finite() || s.value < 0.0 {
                continue;
            }
            if s.name == REQUESTS_METRIC {
                out.requests += s.value;
                let status = s.labels.get("status").and_then(|v| v.parse::<u16>().ok());
                if status.is_some_and(|c| (500..600).contains(&c)) {
                    out.errors += s.value;
                }
            } else if s.name == TTFT_BUCKET_METRIC {
                let Some(le) = s.labels.get("le").and_then(|v| parse_le(v)) else {
                    continue;
                };
                // Keyed by the bit pattern of a non-negative float: ordered like the floats.
                buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
            }
        }
        out.ttft = buckets.into_values().collect();
        out
    }

    /// The increase since `start`. A counter below its start means the pod restarted: the
    /// whole current value is the increase.
    pub fn delta(&self, start: &Counters) -> Counters {
        let reset = self.requests < start.requests
            || self.errors < start.errors
            || self.ttft.iter().any(|(le, n)| {
                start
                    .ttft
                    .iter()
                    .any(|(sle, sn)| sle.to_bits() == le.to_bits() && n < sn)
            });
        if reset {
            return self.clone();
        }
        Counters {
            requests: self.requests - start.requests,
            errors: self.errors - start.errors,
            ttft: self
                .ttft
                .iter()
                .map(|(le, n)| {
                    let before = start
                        .ttft
                        .iter()
                        .find(|(sle, _)| sle.to_bits() == le.to_bits())
                        .map_or(0.0, |(_, sn)| *sn);
                    (*le, n - before)
                })
                .collect(),
        }
    }

    /// Adds `other` (another pod of the same variant).
    pub fn add(&mut self, other: &Counters) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (le, n) in &other.ttft {
            match self
                .ttft
                .iter_mut()
                .find(|(l, _)| l.to_bits() == le.to_bits())
            {
                Some(b) => b.1 += n,
                None => self.ttft.push((*le, *n)),
            }
        }
        self.ttft.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// What these counters (an increase over a window) measure.
    pub fn measured(&self) -> Measured {
        Measured {
            requests: self.requests.round().max(0.0) as u64,
            error_rate: if self.requests > 0.0 {
                (self.errors / self.requests).clamp(0.0, 1.0)
            } else {
                0.0
            },
            ttft_p95: histogram_quantile(0.95, &self.ttft),
        }
    }
}

fn parse_le(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" | "inf" => Some(f64::INFINITY),
        _ => v.parse::<f64>().ok().filter(|x| !x.is_nan() && *x >= 0.0),
    }
}

/// The `q` quantile of a cumulative histogram `(le, count)` sorted by `le` and ending with
/// `+Inf`, as Prometheus' `histogram_quantile` computes it: linear interpolation inside the
/// bucket the rank falls in (from 0 for the first bucket); a rank in the `+Inf` bucket gives the
/// highest finite bound. `None` without observations.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        || buckets.last()?.0 != f64::INFINITY
    {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let i = buckets.iter().position(|(_, n)| *n >= rank)?;
    let (upper, count) = buckets[i];
    if upper == f64::INFINITY {
        // Prometheus answers the highest finite bound (or NaN when there is none).
        return buckets[..i].last().map(|(le, _)| *le);
    }
    let (lower, below) = if i == 0 { (0.0, 0.0) } else { buckets[i - 1] };
    if count <= below {
        return Some(upper);
    }
    Some(lower + (upper - lower) * (rank - below) / (count - below))
}

/// Judges a variant from its counters at the end and at the start of the window.
pub fn verdict(now: &Counters, window_start: &Counters, analysis: &Analysis) -> Verdict {
    judge(&now.delta(window_start), analysis)
}

/// Judges a variant from its counters' increase over the window.
pub fn judge(window: &Counters, analysis: &Analysis) -> Verdict {
    let m = window.measured();
    if m.requests < u64::try_from(analysis.min_requests.max(1)).unwrap_or(1) {
        return Verdict::NotEnoughData(m);
    }
    let over = format!(
        "over {} requests in {}",
        m.requests,
        format_duration(analysis.window.into())
    );
    let mut breaches = Vec::new();
    if let Some(max) = analysis.max_error_rate
        && m.error_rate > max
    {
        breaches.push(format!(
            "error rate {:.1}% > {:.1}%",
            m.error_rate * 100.0,
            max * 100.0
        ));
    }
    if let (Some(max), Some(p95)) = (&analysis.max_ttft_p95, m.ttft_p95) {
        let max: Duration = (*max).into();
        if p95 > max.as_secs_f64() {
            breaches.push(format!(
                "p95 time to first token {p95:.2}s > {}",
                format_duration(max)
            ));
        }
    }
    if breaches.is_empty() {
        Verdict::Healthy(m)
    } else {
        Verdict::Breach {
            message: format!("{} {over}", breaches.join(", ")),
            measured: m,
        }
    }
}

/// `5m`, `90s`, `1h`, `1.5s`: short and exact.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{}s", d.as_secs_f64());
    }
    let s = d.as_secs();
    if s > 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s > 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

// === History ===

/// Identifies one pod's series: model (`namespace/name`), variant, pod.
type PodKey = (String, String, String);

#[derive(Debug)]
struct PodHistory {
    generation: i64,
    snapshots: VecDeque<(Timestamp, Counters)>,
}

/// The counters read from each pod, kept for one window, per model generation. Lives in the
/// controller's Context (analysis state that is cheap to lose: after an operator restart the
/// window starts again at the first scrape).
#[derive(Debug, Default)]
pub struct History(Mutex<HashMap<PodKey, PodHistory>>);

// === impl History ===

impl History {
    /// Records `counters` read from a pod at `now` and returns their increase over `window`
    /// (since the newest reading at least `window` old, else since the oldest reading of this
    /// generation; zero on the first reading).
    pub fn observe(
        &self,
        key: (&str, &str, &str),
        generation: i64,
        now: Timestamp,
        counters: Counters,
        window: Duration,
    ) -> Counters {
        // A poisoned lock only means another reconcile panicked; the map is still usable.
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (key.0.to_owned(), key.1.to_owned(), key.2.to_owned());
        let h = map.entry(key).or_insert_with(|| PodHistory {
            generation,
            snapshots: VecDeque::new(),
        });
        if h.generation != generation {
            // A new spec generation: what was served before the edit no longer counts.
            h.generation = generation;
            h.snapshots.clear();
        }
        // Readings less than a second apart (a burst of watch events) replace each other.
        if let Some((t, _)) = h.snapshots.back()
            && millis_between(*t, now) < 1000
            && h.snapshots.len() > 1
        {
            h.snapshots.pop_back();
        }
        h.snapshots.push_back((now, counters.clone()));
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        // Keep one reading at or before the window's start (the base), drop older ones.
        while h.snapshots.len() > 1 && millis_between(h.snapshots[1].0, now) >= window_ms {
            h.snapshots.pop_front();
        }
        let base = &h.snapshots[0].1;
        counters.delta(base)
    }

    /// Forgets the pods of `model` that are not in `live` (deleted pods, removed variants).
    pub fn retain(&self, model: &str, live: &BTreeSet<(String, String)>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|(m, v, p), _| m != model || live.contains(&(v.clone(), p.clone())));
    }

    /// Forgets everything about `model` (analysis turned off, model deleted).
    pub fn forget(&self, model: &str) {
        self.retain(model, &BTreeSet::new());
    }
}

fn millis_between(earlier: Timestamp, later: Timestamp) -> i64 {
    later.as_millisecond() - earlier.as_millisecond()
}

// === Scraping ===

/// Scrapes every running pod of each variant of `model` and returns each variant's counters'
/// increase over the window (summed over its pods). Pods that cannot be scraped are skipped
/// (logged); a variant without any scraped pod is absent.
pub async fn measure(
    source: &dyn MetricsSource,
    history: &History,
    model: &InferenceModel,
    pods: &[Pod],
    analysis: &Analysis,
    now: Timestamp,
) -> BTreeMap<String, Counters> {
    let model_key = format!(
        "{}/{}",
        model.namespace().unwrap_or_default(),
        model.name_any()
    );
    let generation = model.metadata.generation.unwrap_or(0);
    let mut targets: Vec<(String, PodEndpoint)> = Vec::new();
    for v in &model.spec.variants {
        let of_variant: Vec<Pod> = pods
            .iter()
            .filter(|p| p.labels().get(LABEL_VARIANT) == Some(&v.name))
            .cloned()
            .collect();
        for ep in pod_endpoints(&of_variant) {
            targets.push((v.name.clone(), ep));
        }
    }
    let scraped = futures::future::join_all(
        targets
            .iter()
            .map(|(_, ep)| async move { source.scrape(ep).await }),
    )
    .await;
    let mut out: BTreeMap<String, Counters> = BTreeMap::new();
    let mut live = BTreeSet::new();
    for ((variant, ep), result) in targets.iter().zip(scraped) {
        live.insert((variant.clone(), ep.name.clone()));
        match result {
            Ok(samples) => {
                let counters = Counters::from_samples(&samples, variant);
                let delta = history.observe(
                    (&model_key, variant, &ep.name),
                    generation,
                    now,
                    counters,
                    analysis.window.into(),
                );
                out.entry(variant.clone()).or_default().add(&delta);
            }
            Err(error) => {
                warn!(%error, %variant, pod = %ep.name, "cannot read sidecar metrics for canary analysis");
            }
        }
    }
    history.retain(&model_key, &live);
    out
}

// === Decision ===

/// The variant progressive steps apply to: the last variant in spec order with a positive
/// desired weight, unless it is the first variant.
pub fn step_variant(model: &InferenceModel) -> Option<&str> {
    let (i, v) = model
        .spec
        .variants
        .iter()
        .enumerate()
        .rev()
        .find(|(_, v)| v.weight > 0)?;
    (i > 0).then_some(v.name.as_str())
}

/// The rollout state of the model's current generation, if `status.rollout` holds one.
pub fn current(model: &InferenceModel) -> Option<&RolloutStatus> {
    model
        .status
        .as_ref()?
        .rollout
        .as_ref()
        .filter(|r| Some(r.generation) == model.metadata.generation)
}

/// What the sidecars should route with before readiness is considered: per variant in spec
/// order `(name, desired, target)` (desired is spec's weight; target follows the steps), and the
/// variants rolled back. Read from `status.rollout` of the current generation only.
pub fn route_plan(model: &InferenceModel) -> (Vec<(String, i32, i32)>, BTreeSet<String>) {
    let desired: Vec<(String, i32)> = model
        .spec
        .variants
        .iter()
        .map(|v| (v.name.clone(), v.weight))
        .collect();
    let plain = || desired.iter().map(|(n, w)| (n.clone(), *w, *w)).collect();
    let Some(state) = current(model) else {
        return (plain(), BTreeSet::new());
    };
    let rolled_back = state.rolled_back.iter().map(|r| r.name.clone()).collect();
    let steps = model
        .spec
        .rollout
        .as_ref()
        .map(|r| r.steps.as_slice())
        .unwrap_or_default();
    let (Some(variant), Some(step)) = (state.step_variant.as_deref(), state.step) else {
        return (plain(), rolled_back);
    };
    let Some(step_weight) = usize::try_from(step).ok().and_then(|i| steps.get(i)) else {
        // Past the last step: the desired weights.
        return (plain(), rolled_back);
    };
    (
        with_step(&desired, variant, step_weight.weight),
        rolled_back,
    )
}

/// `desired` with `variant` capped at `weight` and the rest of the total split over the others
/// in proportion to their desired weights (largest remainder).
fn with_step(desired: &[(String, i32)], variant: &str, weight: i32) -> Vec<(String, i32, i32)> {
    let total: i64 = desired.iter().map(|(_, w)| i64::from((*w).max(0))).sum();
    let Some((_, want)) = desired.iter().find(|(n, _)| n == variant) else {
        return desired.iter().map(|(n, w)| (n.clone(), *w, *w)).collect();
    };
    let cap = i64::from(weight.min(*want).max(0));
    let others: Vec<i64> = desired
        .iter()
        .map(|(n, w)| {
            if n == variant {
                0
            } else {
                i64::from((*w).max(0))
            }
        })
        .collect();
    let mut split = largest_remainder(total - cap, &others);
    if others.iter().all(|w| *w == 0)
        && let Some(first) = desired.iter().position(|(n, _)| n != variant)
    {
        // Nobody else wants traffic in the end (a full rollout): the first (stable) variant
        // keeps what the step does not give the new one yet.
        split[first] = total - cap;
    }
    desired
        .iter()
        .zip(split)
        .map(|((n, w), s)| {
            let target = if n == variant { cap } else { s };
            (n.clone(), *w, target as i32)
        })
        .collect()
}

/// Splits `total` in proportion to `weights` (non-negative), so the parts sum to `total`;
/// remainders go to the largest fractions first (ties to the first listed). All zero weights:
/// everything to none (all parts 0).
fn largest_remainder(total: i64, weights: &[i64]) -> Vec<i64> {
    let sum: i64 = weights.iter().sum();
    if sum <= 0 || total <= 0 {
        return vec![0; weights.len()];
    }
    let mut parts: Vec<(i64, i64)> = weights
        .iter()
        .map(|w| (w * total / sum, w * total % sum))
        .collect();
    let assigned: i64 = parts.iter().map(|p| p.0).sum();
    let mut order: Vec<usize> = (0..parts.len()).filter(|i| weights[*i] > 0).collect();
    order.sort_by(|a, b| parts[*b].1.cmp(&parts[*a].1).then(a.cmp(b)));
    for i in order.into_iter().cycle().take((total - assigned) as usize) {
        parts[i].0 += 1;
    }
    parts.into_iter().map(|p| p.0).collect()
}

/// The operator's decision for one reconcile.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// The new `status.rollout` (`None` without `spec.rollout`).
    pub rollout: Option<RolloutStatus>,
    /// Variants rolled back by this decision (for logs).
    pub rolled_back_now: Vec<String>,
}

/// Decides rollbacks and steps from the verdicts of this reconcile (absent variant: no data).
/// Pure: `now` is the reconcile's clock.
pub fn decide(
    model: &InferenceModel,
    verdicts: &BTreeMap<String, Verdict>,
    now: Timestamp,
) -> Decision {
    let Some(rollout) = &model.spec.rollout else {
        return Decision {
            rollout: None,
            rolled_back_now: Vec::new(),
        };
    };
    let generation = model.metadata.generation.unwrap_or(0);
    let mut state = current(model).cloned().unwrap_or_else(|| RolloutStatus {
        generation,
        ..Default::default()
    });
    state.message = None;

    // Steps: start at the first step for a fresh generation.
    if !rollout.steps.is_empty()
        && state.step.is_none()
        && let Some(v) = step_variant(model)
    {
        state.step = Some(0);
        state.step_started_at = Some(Time(now));
        state.step_variant = Some(v.to_owned());
    }

    // Rollbacks. Serving: a positive target weight, not rolled back yet.
    let mut rolled_back_now = Vec::new();
    let mut failing = Vec::new();
    let with_state = {
        let mut m = model.clone();
        m.status.get_or_insert_default().rollout = Some(state.clone());
        m
    };
    let (plan, already) = route_plan(&with_state);
    let serving: Vec<&(String, i32, i32)> = plan
        .iter()
        .filter(|(n, _, t)| *t > 0 && !already.contains(n))
        .collect();
    let breaching: Vec<(&(String, i32, i32), &String)> = serving
        .iter()
        .filter_map(|v| match verdicts.get(&v.0) {
            Some(Verdict::Breach { message, .. }) => Some((*v, message)),
            _ => None,
        })
        .collect();
    if !breaching.is_empty() {
        // Never roll back the last variant serving traffic: when all breach, the one with the
        // highest desired weight (first in spec order on a tie) keeps serving.
        let keep: Option<&str> = (breaching.len() == serving.len()).then(|| {
            breaching
                .iter()
                .rev()
                .max_by_key(|(v, _)| v.1)
                .map(|(v, _)| v.0.as_str())
                .unwrap_or_default()
        });
        for ((name, _, _), message) in breaching {
            if !rollout.auto_rollback {
                failing.push(format!(
                    "variant {name} breaches: {message} (autoRollback is off)"
                ));
            } else if keep == Some(name.as_str()) {
                failing.push(format!(
                    "variant {name} breaches: {message}; kept: it is the last variant serving traffic"
                ));
            } else {
                info!(variant = %name, %message, "canary analysis: rolling back");
                state.rolled_back.push(RolledBackVariant {
                    name: name.clone(),
                    reason: message.clone(),
                });
                rolled_back_now.push(name.clone());
            }
        }
    }
    if !failing.is_empty() {
        state.message = Some(failing.join("; "));
    }

    // Advance the step while the variant passes.
    if let (Some(variant), Some(step)) = (state.step_variant.clone(), state.step) {
        let rolled_back = state.rolled_back.iter().any(|r| r.name == variant);
        let index = usize::try_from(step).unwrap_or(usize::MAX);
        if let Some(current_step) = rollout.steps.get(index)
            && !rolled_back
        {
            let started = state.step_started_at.as_ref().map_or(now, |t| t.0);
            let pause: Duration = current_step.pause.into();
            let paused = millis_between(started, now)
                >= i64::try_from(pause.as_millis()).unwrap_or(i64::MAX);
            let passes = rollout.analysis.is_none()
                || matches!(verdicts.get(&variant), Some(Verdict::Healthy(_)));
            if paused && passes {
                info!(%variant, step = step + 1, "rollout step passed; advancing");
                state.step = Some(step + 1);
                state.step_started_at = Some(Time(now));
            } else {
                debug!(%variant, step, paused, passes, "rollout step holds");
            }
        }
    }

    Decision {
        rollout: Some(state),
        rolled_back_now,
    }
}

/// What the status' Degraded condition should say about the analysis, if anything:
/// `(reason, message)`.
pub fn problem(model: &InferenceModel) -> Option<(&'static str, String)> {
    let state = current(model)?;
    let mut parts: Vec<String> = state
        .rolled_back
        .iter()
        .map(|r| format!("variant {} rolled back: {}", r.name, r.reason))
        .collect();
    let reason = if parts.is_empty() {
        REASON_FAILING
    } else {
        REASON_ROLLED_BACK
    };
    parts.extend(state.message.clone());
    if parts.is_empty() {
        return None;
    }
    let mut message = parts.join("; ");
    if reason == REASON_ROLLED_BACK {
        message.push_str("; edit the variant (a new spec generation) to analyse it again");
    }
    Some((reason, message))
}

/// How soon the model must be reconciled again for its analysis and steps.
pub fn requeue(model: &InferenceModel) -> Option<Duration> {
    let rollout = model.spec.rollout.as_ref()?;
    match &rollout.analysis {
        Some(a) => Some(Duration::from(a.interval).max(Duration::from_secs(1))),
        None if !rollout.steps.is_empty() => Some(STEP_POLL),
        None => None,
    }
}

/// Scrapes, judges and decides for one model: the model with its new `status.rollout` (what
/// [`crate::routing::model_effective_weights`] and [`crate::status::compute`] read). Without
/// `spec.rollout` the model is returned with no rollout state.
pub async fn analyze(
    source: &dyn MetricsSource,
    history: &History,
    model: &InferenceModel,
    pods: &[Pod],
    now: Timestamp,
) -> (InferenceModel, Decision) {
    let analysis = model
        .spec
        .rollout
        .as_ref()
        .and_then(|r| r.analysis.as_ref());
    let verdicts: BTreeMap<String, Verdict> = match analysis {
        Some(a) => measure(source, history, model, pods, a, now)
            .await
            .into_iter()
            .map(|(v, c)| {
                let verdict = judge(&c, a);
                debug!(variant = %v, ?verdict, "canary analysis");
                (v, verdict)
            })
            .collect(),
        None => {
            history.forget(&format!(
                "{}/{}",
                model.namespace().unwrap_or_default(),
                model.name_any()
            ));
            BTreeMap::new()
        }
    };
    let decision = decide(model, &verdicts, now);
    let mut planned = model.clone();
    if decision.rollout.is_some() || planned.status.as_ref().is_some_and(|s| s.rollout.is_some()) {
        planned.status.get_or_insert_default().rollout = decision.rollout.clone();
    }
    (planned, decision)
}

#[cfg(test)]
mod reconcile_tests;
#[cfg(test)]
mod tests;

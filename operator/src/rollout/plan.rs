//! The rollout plan: what `status.rollout` of the current generation says the sidecars should
//! route with (progressive step weights, rolled-back variants), and the decision each
//! reconcile takes from the variants' verdicts (rollbacks, step advances), written back to
//! `status.rollout`. Pure: the clock comes in as an argument.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use sluice_crds::InferenceModel;
use sluice_crds::inference_model::{RolledBackVariant, RolloutStatus};
use tracing::{debug, info};

use crate::rollout::judge::Verdict;

/// Degraded reason: the analysis rolled a variant back.
pub const REASON_ROLLED_BACK: &str = "CanaryRolledBack";
/// Degraded reason: a variant breaches but was not rolled back (`autoRollback: false`, or it is
/// the last variant serving traffic).
pub const REASON_FAILING: &str = "AnalysisFailing";
/// How often a model with steps but no analysis is requeued to advance them.
const STEP_POLL: Duration = Duration::from_secs(30);

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

/// What the sidecars should route with before readiness is considered, read from
/// `status.rollout` of the current generation only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// Per variant in spec order: `(name, desired, target)`; desired is spec's weight, target
    /// follows the steps.
    pub variants: Vec<(String, i32, i32)>,
    /// The variants rolled back.
    pub rolled_back: BTreeSet<String>,
}

/// The [`RoutePlan`] of `model`.
pub fn route_plan(model: &InferenceModel) -> RoutePlan {
    let desired: Vec<(String, i32)> = model
        .spec
        .variants
        .iter()
        .map(|v| (v.name.clone(), v.weight))
        .collect();
    let plain = || desired.iter().map(|(n, w)| (n.clone(), *w, *w)).collect();
    let Some(state) = current(model) else {
        return RoutePlan {
            variants: plain(),
            rolled_back: BTreeSet::new(),
        };
    };
    let rolled_back = state.rolled_back.iter().map(|r| r.name.clone()).collect();
    let steps = model
        .spec
        .rollout
        .as_ref()
        .map(|r| r.steps.as_slice())
        .unwrap_or_default();
    let (Some(variant), Some(step)) = (state.step_variant.as_deref(), state.step) else {
        return RoutePlan {
            variants: plain(),
            rolled_back,
        };
    };
    let Some(step_weight) = usize::try_from(step).ok().and_then(|i| steps.get(i)) else {
        // Past the last step: the desired weights.
        return RoutePlan {
            variants: plain(),
            rolled_back,
        };
    };
    RoutePlan {
        variants: with_step(&desired, variant, step_weight.weight),
        rolled_back,
    }
}

/// `desired` with `variant` capped at `weight` and the rest of the total split over the others
/// in proportion to their desired weights (largest remainder).
pub(super) fn with_step(
    desired: &[(String, i32)],
    variant: &str,
    weight: i32,
) -> Vec<(String, i32, i32)> {
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
    let RoutePlan {
        variants: plan,
        rolled_back: already,
    } = route_plan(&with_state);
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

/// Milliseconds from `earlier` to `later` (negative when `later` is earlier).
pub(super) fn millis_between(earlier: Timestamp, later: Timestamp) -> i64 {
    later.as_millisecond() - earlier.as_millisecond()
}

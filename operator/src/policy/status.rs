//! A RateLimitPolicy's status: `Accepted` (or why not), per target how many pods enforce the
//! config generation that carries the policy, and `Converged` once all of them do. Pure; the
//! controller patches the result.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use sluice_crds::RateLimitPolicy;
use sluice_crds::rate_limit_policy::{PolicyTarget, RateLimitPolicyStatus};

use crate::conditions::{Transition, condition};
use crate::policy::convergence::PodGeneration;
use crate::policy::merge::Verdict;

/// Condition type: the policy is valid, its target exists, and it conflicts with no older one.
pub const ACCEPTED: &str = "Accepted";
/// Condition type: every pod of every model the policy applies to enforces its rules.
pub const CONVERGED: &str = "Converged";

/// Pods named in a `Converged=False` message at most.
const MAX_LAGGING: usize = 5;

/// What was observed for one model the policy applies to.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetObservation {
    /// The InferenceModel.
    pub model: String,
    /// Generation of the sidecar config in the model's ConfigMap, when that config carries the
    /// policy's current rules; `None` while the operator has not written them yet.
    pub desired_generation: Option<u64>,
    /// The model's running pods and the generation each enforces.
    pub pods: Vec<PodGeneration>,
}

// === impl TargetObservation ===

impl TargetObservation {
    fn applied(&self) -> i32 {
        let Some(desired) = self.desired_generation else {
            return 0;
        };
        self.pods
            .iter()
            .filter(|p| p.generation.as_ref().is_ok_and(|g| *g == desired))
            .count() as i32
    }

    fn total(&self) -> i32 {
        self.pods.len() as i32
    }
}

/// The status of `policy` given its verdict and what was observed on the models it applies to
/// (one observation per model in `verdict.applied_to`; others are ignored).
pub fn policy_status(
    policy: &RateLimitPolicy,
    verdict: &Verdict,
    observations: &[TargetObservation],
    now: Timestamp,
) -> RateLimitPolicyStatus {
    let prev = policy
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let generation = policy.metadata.generation;
    let observed: Vec<&TargetObservation> = observations
        .iter()
        .filter(|o| verdict.applied_to.contains(&o.model))
        .collect();

    let accepted = match &verdict.rejection {
        None => condition(
            prev,
            ACCEPTED,
            true,
            "Accepted",
            format!(
                "{} rule(s) applied to {}",
                policy.spec.rules.len(),
                verdict.applied_to.join(", ")
            ),
            generation,
            now,
        ),
        Some(r) => {
            let mut message = r.message.clone();
            if !verdict.kept_on.is_empty() {
                message.push_str(&format!(
                    "; the rules accepted before stay in force on {}",
                    verdict.kept_on.join(", ")
                ));
            }
            condition(prev, ACCEPTED, false, r.reason, message, generation, now)
        }
    };

    let (ok, reason, message) = if observed.is_empty() {
        (
            false,
            "NotApplied",
            "the policy's rules are not applied to any InferenceModel".to_owned(),
        )
    } else if let Some(o) = observed.iter().find(|o| o.desired_generation.is_none()) {
        (
            false,
            "Pending",
            format!(
                "the sidecar config of {} does not carry the policy's rules yet",
                o.model
            ),
        )
    } else if let Some(o) = observed.iter().find(|o| o.pods.is_empty()) {
        (
            false,
            "NoPods",
            format!("{} has no running pod to enforce the rules", o.model),
        )
    } else {
        let lagging: Vec<String> = observed
            .iter()
            .flat_map(|o| {
                let desired = o.desired_generation.unwrap_or_default();
                o.pods.iter().filter_map(move |p| match &p.generation {
                    Ok(g) if *g == desired => None,
                    Ok(g) => Some(format!("{} enforces generation {g}, not {desired}", p.pod)),
                    Err(e) => Some(format!("{}: {e}", p.pod)),
                })
            })
            .collect();
        let applied: i32 = observed.iter().map(|o| o.applied()).sum();
        let total: i32 = observed.iter().map(|o| o.total()).sum();
        if lagging.is_empty() {
            (
                true,
                "Converged",
                format!("{applied}/{total} pods enforce the policy"),
            )
        } else {
            let mut shown = lagging[..lagging.len().min(MAX_LAGGING)].join("; ");
            if lagging.len() > MAX_LAGGING {
                shown.push_str(&format!("; and {} more", lagging.len() - MAX_LAGGING));
            }
            (
                false,
                "Progressing",
                format!("{applied}/{total} pods enforce the policy: {shown}"),
            )
        }
    };
    let converged_condition = condition(prev, CONVERGED, ok, reason, message, generation, now);

    let targets: Vec<PolicyTarget> = observed
        .iter()
        .map(|o| PolicyTarget {
            model: o.model.clone(),
            desired_generation: o.desired_generation.unwrap_or_default() as i64,
            pods_applied: o.applied(),
            pods_total: o.total(),
        })
        .collect();
    let converged = (!targets.is_empty()).then(|| {
        let applied: i32 = targets.iter().map(|t| t.pods_applied).sum();
        let total: i32 = targets.iter().map(|t| t.pods_total).sum();
        format!("{applied}/{total}")
    });
    let target = if verdict.targets.is_empty() {
        policy.spec.target_ref.as_ref().map(|t| t.name.clone())
    } else {
        Some(verdict.targets.join(","))
    };
    RateLimitPolicyStatus {
        observed_generation: generation,
        conditions: vec![accepted, converged_condition],
        targets,
        target,
        rules: Some(policy.spec.rules.len() as i32),
        converged,
    }
}

/// Condition changes worth an Event: any change of `Accepted` (a Warning when it becomes
/// False), and `Converged` becoming True (rollout progress is not news).
pub fn transitions(old: &[Condition], new: &[Condition]) -> Vec<Transition> {
    new.iter()
        .filter(|n| {
            let before = old.iter().find(|o| o.type_ == n.type_);
            let changed = before.is_none_or(|o| o.status != n.status || o.reason != n.reason);
            changed && (n.type_ == ACCEPTED || (n.type_ == CONVERGED && n.status == "True"))
        })
        .map(|n| Transition::of(n, n.type_ == ACCEPTED && n.status == "False"))
        .collect()
}

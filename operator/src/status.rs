//! Status: what the operator observed, as conditions a user can act on, and the transitions
//! between them (which become Events). Pure functions; the controller patches the result.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sluice_crds::inference_model::VariantStatus;
use sluice_crds::{InferenceModel, InferenceModelStatus};

use crate::conditions::{self, Transition, truncated};
use crate::desired::weights::EffectiveWeights;
use crate::names::{endpoint, variant_object_name};
use crate::observe::{Observed, wanted_replicas};

/// Condition type: the model serves requests (every variant that should run has a ready pod).
pub const READY: &str = "Ready";
/// Condition type: a rollout or scale-up is under way.
pub const PROGRESSING: &str = "Progressing";
/// Condition type: something needs a user's attention; the reason says what.
pub const DEGRADED: &str = "Degraded";

/// Degraded reason: the sidecars' circuit breakers hold forwards to a variant that gets
/// traffic back, so its share is served elsewhere. Also the reason of the Warning Event
/// published when a variant's breaker opens ([`events`]).
pub const REASON_BREAKER_OPEN: &str = "BreakerOpen";
/// Ready reason: the model scales to zero and is at zero; its activator answers.
pub const REASON_SCALED_TO_ZERO: &str = "ScaledToZero";
/// Degraded reason: `spec.fallback` names an InferenceModel that does not exist.
pub const REASON_FALLBACK_NOT_FOUND: &str = "FallbackNotFound";

/// Longest condition message; pod messages (scheduler, fetch logs) can be long.
const MAX_MESSAGE: usize = 1024;

/// The status of a valid model, from what was observed and the effective weights in force.
pub fn compute(
    model: &InferenceModel,
    namespace: &str,
    observed: &Observed,
    weights: &EffectiveWeights,
    now: Timestamp,
) -> InferenceModelStatus {
    let name = model.name_any();
    let generation = model.metadata.generation;
    let wanted = wanted_replicas(model);
    let mut variants = Vec::new();
    let mut not_ready = Vec::new();
    let mut rolling = Vec::new();
    for (variant, desired, effective) in &weights.weights {
        let dep = observed.deployment(&variant_object_name(&name, variant));
        let st = dep.and_then(|d| d.status.clone()).unwrap_or_default();
        let ready = st.ready_replicas.unwrap_or(0);
        let spec_replicas = dep
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.replicas)
            .unwrap_or(wanted);
        variants.push(VariantStatus {
            name: variant.clone(),
            desired_weight: *desired,
            effective_weight: *effective,
            ready_replicas: ready,
            replicas: st.replicas.unwrap_or(0),
            breaker_open_pods: observed.breakers.open(variant),
        });
        if wanted > 0 && ready == 0 {
            not_ready.push(variant.clone());
        }
        let up_to_date = dep.is_some_and(|d| {
            st.observed_generation >= d.metadata.generation
                && st.updated_replicas.unwrap_or(0) >= spec_replicas
                && st.replicas.unwrap_or(0) <= spec_replicas
                && ready >= spec_replicas
        });
        if !up_to_date {
            rolling.push(variant.clone());
        }
    }

    let problem = observed.problem();
    let prev = model
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let cond = |type_: &str, ok: bool, reason: &str, message: String| {
        condition(prev, type_, ok, reason, message, generation, now)
    };

    let carried = model.status.as_ref();
    let scaled_to_zero = carried.is_some_and(|s| s.scaled_to_zero);
    let ready = if scaled_to_zero {
        let since = carried
            .and_then(|s| s.last_request_time.as_ref())
            .map_or_else(|| "a while".to_owned(), |t| t.0.to_string());
        cond(
            READY,
            true,
            REASON_SCALED_TO_ZERO,
            format!(
                "no request since {since}: scaled to zero; the activator holds the next requests \
                 while a pod starts"
            ),
        )
    } else if wanted == 0 {
        cond(
            READY,
            false,
            "ScaledToZero",
            "replicas is 0: no pods serve the model".into(),
        )
    } else if not_ready.is_empty() {
        let mut msg = format!("all {} variants have ready pods", variants.len());
        if !weights.redistributed_from.is_empty() {
            msg = format!(
                "{msg}; traffic of {} moved to ready variants",
                weights.redistributed_from.join(", ")
            );
        }
        cond(READY, true, "AllVariantsReady", msg)
    } else {
        let mut msg = format!("no ready pods yet in: {}", not_ready.join(", "));
        if !weights.redistributed_from.is_empty() && not_ready.len() < variants.len() {
            msg = format!("{msg}; their traffic goes to the ready variants meanwhile");
        }
        match &problem {
            Some(p) => cond(READY, false, p.reason, msg),
            None if not_ready.len() < variants.len() => cond(READY, false, "VariantsNotReady", msg),
            None => cond(READY, false, "NoReadyPods", msg),
        }
    };
    let progressing = if rolling.is_empty() {
        cond(
            PROGRESSING,
            false,
            "RolloutComplete",
            "every variant runs its current spec".into(),
        )
    } else {
        cond(
            PROGRESSING,
            true,
            "RollingOut",
            format!("rolling out: {}", rolling.join(", ")),
        )
    };
    // A rollback (or a breach that was not rolled back) explains the weights users see, so it
    // comes first; pod problems follow (they are often why forwards fail); open breakers last
    // (`variants` counts them whatever the reason says).
    let breakers: Vec<String> = variants
        .iter()
        .filter(|v| diverted(v))
        .map(|v| {
            format!(
                "breaker open for variant {} on {} of {} pods that forward to it",
                v.name,
                v.breaker_open_pods,
                observed.breakers.forwarding_to(&v.name)
            )
        })
        .collect();
    let degraded = match (crate::rollout::plan::problem(model), problem) {
        (Some((reason, message)), _) => cond(DEGRADED, true, reason, message),
        (None, Some(p)) => cond(DEGRADED, true, p.reason, p.message),
        (None, None) if !breakers.is_empty() => cond(
            DEGRADED,
            true,
            REASON_BREAKER_OPEN,
            format!(
                "{}: forwards there failed in a row, so those pods serve that traffic where \
                 failed forwards fall back until a forward succeeds again",
                breakers.join("; ")
            ),
        ),
        (None, None) if observed.fallback_missing => cond(
            DEGRADED,
            true,
            REASON_FALLBACK_NOT_FOUND,
            format!(
                "spec.fallback names InferenceModel {:?}, which this namespace does not have: \
                 requests this model cannot serve get 503 until it exists",
                model
                    .spec
                    .fallback
                    .as_ref()
                    .map_or("", |f| f.model.as_str())
            ),
        ),
        (None, None) => cond(DEGRADED, false, "AsExpected", "no problems found".into()),
    };

    let ready_variants = variants.iter().filter(|v| v.ready_replicas > 0).count();
    InferenceModelStatus {
        observed_generation: generation,
        conditions: vec![ready, progressing, degraded],
        ready_variants: Some(format!("{ready_variants}/{}", variants.len())),
        weights: Some(weights_summary(&variants)),
        variants,
        endpoint: Some(endpoint(&name, namespace)),
        // Decided by the canary analysis before this status is computed (see
        // `crate::rollout::plan::decide`); carried as is.
        rollout: carried.and_then(|s| s.rollout.clone()),
        // Decided by the idle tracking before this status is computed (`crate::idle`).
        last_request_time: carried.and_then(|s| s.last_request_time.clone()),
        scaled_to_zero,
    }
}

/// The status of a model whose spec is invalid: nothing is applied until it is fixed.
pub fn invalid(model: &InferenceModel, reason: &str, now: Timestamp) -> InferenceModelStatus {
    let generation = model.metadata.generation;
    let prev = model
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let message = format!("{reason}; fix the spec, nothing is applied until then");
    let mut status = model.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.conditions = vec![
        condition(
            prev,
            READY,
            false,
            "InvalidSpec",
            message.clone(),
            generation,
            now,
        ),
        condition(
            prev,
            PROGRESSING,
            false,
            "InvalidSpec",
            message.clone(),
            generation,
            now,
        ),
        condition(
            prev,
            DEGRADED,
            true,
            "InvalidSpec",
            message,
            generation,
            now,
        ),
    ];
    status
}

/// Whether the breakers of `v` divert traffic: some pod holds its breaker open while it should
/// get traffic. A variant with no effective weight gets no forwards, so its breakers change
/// nothing (and a sidecar updates them only on a forward's outcome: they may be stale).
fn diverted(v: &VariantStatus) -> bool {
    v.breaker_open_pods > 0 && v.effective_weight > 0
}

/// `stable=90/90,canary=10/0`: desired/effective per variant, for `kubectl get im`.
pub fn weights_summary(variants: &[VariantStatus]) -> String {
    variants
        .iter()
        .map(|v| format!("{}={}/{}", v.name, v.desired_weight, v.effective_weight))
        .collect::<Vec<_>>()
        .join(",")
}

/// A condition (see [`conditions::condition`]) with its message cut to [`MAX_MESSAGE`].
fn condition(
    prev: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    conditions::condition(
        prev,
        type_,
        ok,
        reason,
        truncated(message, MAX_MESSAGE),
        generation,
        now,
    )
}

/// Conditions whose status or reason changed (new ones included), one per reason (an
/// `InvalidSpec` that flips all three conditions is one Event, a Warning).
pub fn transitions(old: &[Condition], new: &[Condition]) -> Vec<Transition> {
    let all: Vec<Transition> = new
        .iter()
        .filter(|n| {
            let before = old.iter().find(|o| o.type_ == n.type_);
            match before {
                Some(o) => o.status != n.status || o.reason != n.reason,
                // A model born healthy is not news.
                None => !(n.type_ == DEGRADED && n.status == "False"),
            }
        })
        .map(|n| {
            let was_ready = old.iter().any(|o| o.type_ == READY && o.status == "True");
            let warning = (n.type_ == DEGRADED && n.status == "True")
                || (n.type_ == READY && n.status == "False" && was_ready);
            Transition::of(n, warning)
        })
        .collect();
    let mut out: Vec<Transition> = Vec::new();
    for t in all {
        match out.iter_mut().find(|o| o.reason == t.reason) {
            Some(o) if t.warning && !o.warning => *o = t,
            Some(_) => {}
            None => out.push(t),
        }
    }
    out
}

/// The Events of a status change from `old` to `new`: one per condition transition
/// ([`transitions`]), and a Warning ([`REASON_BREAKER_OPEN`]) for each variant whose breaker
/// opened: held open by no pod before, by some now, while it gets traffic. Those replace the
/// Degraded transition to the same reason, which would say the same once more.
pub fn events(old: Option<&InferenceModelStatus>, new: &InferenceModelStatus) -> Vec<Transition> {
    let (old_conditions, old_variants) = old
        .map(|s| (s.conditions.as_slice(), s.variants.as_slice()))
        .unwrap_or_default();
    let opened: Vec<Transition> = new
        .variants
        .iter()
        .filter(|v| diverted(v))
        .filter(|v| !old_variants.iter().any(|o| o.name == v.name && diverted(o)))
        .map(|v| Transition {
            type_: DEGRADED.to_owned(),
            status: "True".to_owned(),
            reason: REASON_BREAKER_OPEN.to_owned(),
            message: format!(
                "breaker open for variant {} on {}: forwards there failed in a row, so that \
                 traffic is served where failed forwards fall back",
                v.name,
                match v.breaker_open_pods {
                    1 => "1 pod".to_owned(),
                    n => format!("{n} pods"),
                }
            ),
            warning: true,
        })
        .collect();
    let mut out = transitions(old_conditions, &new.conditions);
    if !opened.is_empty() {
        out.retain(|t| t.reason != REASON_BREAKER_OPEN);
        out.extend(opened);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{deployment_with_status, model_from_yaml, pod_from_yaml, weights_for};

    const MODEL: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: InferenceModel
metadata: {name: chat, namespace: ns, uid: "1", generation: 3}
spec:
  variants:
    - {name: stable, weight: 90, model: {url: "https://e.com/a.gguf"}}
    - {name: canary, weight: 10, model: {url: "https://e.com/b.gguf"}}
"#;

    fn now() -> Timestamp {
        Timestamp::from_second(1_700_000_000).expect("valid")
    }

    fn status_for(model: &InferenceModel, observed: &Observed) -> InferenceModelStatus {
        let w = weights_for(model, &observed.ready_counts());
        compute(model, "ns", observed, &w, now())
    }

    fn cond<'a>(s: &'a InferenceModelStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition")
    }

    #[test]
    fn ready_when_every_variant_has_a_ready_pod() {
        let model = model_from_yaml(MODEL);
        let observed = Observed {
            deployments: vec![
                deployment_with_status("chat", "stable", 1, 1),
                deployment_with_status("chat", "canary", 1, 1),
            ],
            pods: vec![],
            ..Default::default()
        };
        let s = status_for(&model, &observed);
        assert_eq!(cond(&s, READY).status, "True");
        assert_eq!(cond(&s, PROGRESSING).status, "False");
        assert_eq!(cond(&s, DEGRADED).reason, "AsExpected");
        assert_eq!(s.ready_variants.as_deref(), Some("2/2"));
        assert_eq!(s.weights.as_deref(), Some("stable=90/90,canary=10/10"));
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(s.endpoint.as_deref(), Some("http://chat.ns.svc:8080/v1"));
    }

    #[test]
    fn unready_canary_gets_no_traffic_and_status_says_so() {
        let model = model_from_yaml(MODEL);
        let observed = Observed {
            deployments: vec![
                deployment_with_status("chat", "stable", 1, 1),
                deployment_with_status("chat", "canary", 1, 0),
            ],
            pods: vec![],
            ..Default::default()
        };
        let s = status_for(&model, &observed);
        assert_eq!(s.weights.as_deref(), Some("stable=90/100,canary=10/0"));
        assert_eq!(s.ready_variants.as_deref(), Some("1/2"));
        let ready = cond(&s, READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "VariantsNotReady")
        );
        assert!(ready.message.contains("canary"), "{}", ready.message);
        assert_eq!(cond(&s, PROGRESSING).status, "True");
    }

    #[test]
    fn fetch_failure_and_unschedulable_are_actionable() {
        let model = model_from_yaml(MODEL);
        let fetch_failed = pod_from_yaml(
            r#"
metadata: {name: chat-stable-1, labels: {sluice.dev/variant: stable}}
status:
  initContainerStatuses:
    - name: fetch
      image: x
      imageID: ""
      ready: false
      restartCount: 3
      state: {waiting: {reason: CrashLoopBackOff}}
      lastState: {terminated: {exitCode: 1, message: "download stalled: no bytes for 60s"}}
"#,
        );
        let unschedulable = pod_from_yaml(
            r#"
metadata: {name: chat-canary-1, labels: {sluice.dev/variant: canary}}
status:
  conditions:
    - {type: PodScheduled, status: "False", reason: Unschedulable, message: "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}
"#,
        );
        let mut observed = Observed {
            deployments: vec![deployment_with_status("chat", "stable", 1, 0)],
            pods: vec![unschedulable.clone()],
            ..Default::default()
        };
        let s = status_for(&model, &observed);
        let d = cond(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "Unschedulable")
        );
        assert!(d.message.contains("Insufficient nvidia.com/gpu"));

        observed.pods.push(fetch_failed);
        let s = status_for(&model, &observed);
        let d = cond(&s, DEGRADED);
        assert_eq!(d.reason, "WeightsFetchFailed");
        assert!(d.message.contains("download stalled"), "{}", d.message);
        assert_eq!(cond(&s, READY).reason, "WeightsFetchFailed");
    }

    #[test]
    fn transition_time_moves_only_with_the_status_and_events_only_on_change() {
        let mut model = model_from_yaml(MODEL);
        let observed = Observed::default();
        let first = status_for(&model, &observed);
        assert_eq!(transitions(&[], &first.conditions).len(), 2);
        model.status = Some(first.clone());
        let w = weights_for(&model, &observed.ready_counts());
        let later = Timestamp::from_second(1_700_000_100).expect("valid");
        let second = compute(&model, "ns", &observed, &w, later);
        assert_eq!(
            first, second,
            "an unchanged model yields an identical status"
        );
        assert!(transitions(&first.conditions, &second.conditions).is_empty());
    }

    #[test]
    fn open_breakers_are_counted_per_variant_and_degrade_a_variant_that_gets_traffic() {
        let mut model = model_from_yaml(MODEL);
        let with_breakers = |open: &[(&str, &[&str])]| {
            let mut observed = Observed {
                deployments: vec![
                    deployment_with_status("chat", "stable", 2, 2),
                    deployment_with_status("chat", "canary", 1, 1),
                ],
                ..Default::default()
            };
            for (pod_variant, held) in open {
                observed.breakers.record(pod_variant, held.iter().copied());
            }
            observed
        };
        let healthy = status_for(
            &model,
            &with_breakers(&[("stable", &[]), ("stable", &[]), ("canary", &[])]),
        );
        assert_eq!(cond(&healthy, DEGRADED).reason, "AsExpected");
        model.status = Some(healthy.clone());

        // One stable pod holds the canary's breaker open.
        let open = status_for(
            &model,
            &with_breakers(&[("stable", &["canary"]), ("stable", &[]), ("canary", &[])]),
        );
        let counts: Vec<(&str, i32)> = open
            .variants
            .iter()
            .map(|v| (v.name.as_str(), v.breaker_open_pods))
            .collect();
        assert_eq!(counts, [("stable", 0), ("canary", 1)]);
        let json = serde_json::to_value(&open.variants).expect("encodes");
        assert_eq!(json[1]["breakerOpenPods"], 1);
        assert!(json[0].get("breakerOpenPods").is_none(), "omitted at 0");
        let d = cond(&open, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", REASON_BREAKER_OPEN)
        );
        assert!(
            d.message
                .starts_with("breaker open for variant canary on 1 of 2 pods that forward to it:"),
            "{}",
            d.message
        );
        // One Warning for the variant, not a second one for the condition.
        let e = events(Some(&healthy), &open);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].warning && e[0].reason == REASON_BREAKER_OPEN);
        assert!(e[0].message.contains("variant canary"), "{}", e[0].message);
        assert!(events(Some(&open), &open).is_empty(), "still open: no news");

        // Then the canary's pod holds stable's open too: news for stable only.
        model.status = Some(open.clone());
        let both = status_for(
            &model,
            &with_breakers(&[
                ("stable", &["canary"]),
                ("stable", &[]),
                ("canary", &["stable"]),
            ]),
        );
        let e = events(Some(&open), &both);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].message.contains("variant stable"), "{}", e[0].message);

        // All closed again: Degraded clears, which is the Event.
        model.status = Some(both.clone());
        let closed = status_for(
            &model,
            &with_breakers(&[("stable", &[]), ("stable", &[]), ("canary", &[])]),
        );
        assert!(closed.variants.iter().all(|v| v.breaker_open_pods == 0));
        assert_eq!(cond(&closed, DEGRADED).reason, "AsExpected");
        let e = events(Some(&both), &closed);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(!e[0].warning && e[0].reason == "AsExpected");
    }

    #[test]
    fn a_breaker_of_a_variant_without_traffic_is_reported_but_diverts_nothing() {
        let model = model_from_yaml(MODEL);
        let mut observed = Observed {
            deployments: vec![
                deployment_with_status("chat", "stable", 1, 1),
                // Not ready: no traffic, so no forwards its breaker could hold back.
                deployment_with_status("chat", "canary", 1, 0),
            ],
            ..Default::default()
        };
        observed.breakers.record("stable", ["canary"]);
        let s = status_for(&model, &observed);
        assert_eq!(s.variants[1].breaker_open_pods, 1);
        assert_eq!(s.variants[1].effective_weight, 0);
        assert_eq!(cond(&s, DEGRADED).reason, "AsExpected");
        assert!(
            !events(None, &s)
                .iter()
                .any(|t| t.reason == REASON_BREAKER_OPEN)
        );
    }

    #[test]
    fn invalid_spec_is_degraded() {
        let model = model_from_yaml(MODEL);
        let s = invalid(&model, "variant weights sum to 110, not 100", now());
        let d = cond(&s, DEGRADED);
        assert_eq!(
            (d.status.as_str(), d.reason.as_str()),
            ("True", "InvalidSpec")
        );
        assert!(d.message.contains("110"));
        let t = transitions(&[], &s.conditions);
        assert!(t.iter().any(|t| t.warning && t.reason == "InvalidSpec"));
    }
}

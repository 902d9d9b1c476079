//! Scale to zero: when a model with `autoscaling.minReplicas: 0` last served a request, and
//! when to scale it down. The sidecars' `/metrics`, scraped once per reconcile, say whether it
//! served one since the previous reconcile ([`RequestCounts`]); [`decide`] turns that, the
//! replicas the model's Deployments have and the last status into what the status says and
//! whether to scale to zero now. The activator, not the operator, scales a model back up (its
//! requests cannot wait for a reconcile), which [`decide`] reads as a request.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use sluice_crds::InferenceModel;
use sluice_crds::contract::{QUEUE_DEPTH_SERIES, REQUESTS_IN_FLIGHT_SERIES, REQUESTS_TOTAL_SERIES};

use crate::names::LABEL_VARIANT;
use crate::scrape::Scraped;
use crate::status::{READY, REASON_SCALED_TO_ZERO};

/// Per model, each pod's `sluice_requests_total` (all series) at the previous reconcile.
#[derive(Debug, Default)]
pub struct RequestCounts(Mutex<HashMap<ObjectRef<InferenceModel>, BTreeMap<String, f64>>>);

// === impl RequestCounts ===

impl RequestCounts {
    /// Whether `scraped` (this reconcile's scrape of `model`'s pods) shows a request since the
    /// previous call: a pod answered more, a pod first seen has answered some, or a request is
    /// in a pod's engine or queue now. Remembers the counts for the next call.
    pub fn active(&self, model: &InferenceModel, scraped: &[Scraped]) -> bool {
        let mut active = false;
        let mut now = BTreeMap::new();
        for pod in scraped {
            let Ok(samples) = &pod.samples else { continue };
            let sum = |name: &str| -> f64 {
                samples
                    .iter()
                    .filter(|s| s.name == name && s.value.is_finite())
                    .map(|s| s.value)
                    .sum()
            };
            let answered = sum(REQUESTS_TOTAL_SERIES);
            active |= sum(REQUESTS_IN_FLIGHT_SERIES) + sum(QUEUE_DEPTH_SERIES) > 0.0;
            now.insert(pod.pod.name.clone(), answered);
        }
        let key = ObjectRef::from_obj(model);
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let before = map.get(&key);
        active |= now.iter().any(|(pod, answered)| {
            let previous = before.and_then(|b| b.get(pod)).copied().unwrap_or(0.0);
            *answered > previous
        });
        map.insert(key, now);
        active
    }

    /// Drops a deleted model's counts.
    pub fn forget(&self, model: &InferenceModel) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ObjectRef::from_obj(model));
    }
}

/// What [`decide`] found.
#[derive(Clone, Debug, PartialEq)]
pub struct Idle {
    /// When the model last served (or was woken by) a request: `status.lastRequestTime`.
    pub last_request: Timestamp,
    /// Scale the model's Deployments to 0 now.
    pub scale_down: bool,
    /// The Deployments are at 0 (or are being scaled there now): `status.scaledToZero`.
    pub scaled_to_zero: bool,
}

/// Replicas the model's variant Deployments ask for in all (`None`: none exists yet). A
/// Deployment with no `replicas` has Kubernetes' default of 1.
pub fn variant_replicas(deployments: &[Deployment]) -> Option<i32> {
    let variants: Vec<&Deployment> = deployments
        .iter()
        .filter(|d| d.labels().contains_key(LABEL_VARIANT))
        .collect();
    (!variants.is_empty()).then(|| {
        variants
            .iter()
            .map(|d| d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1))
            .sum()
    })
}

/// The idle state of a model that scales to zero after `idle_after`, given whether a request
/// was seen since the last reconcile (`active`), the replicas its Deployments ask for, the
/// pods ready now, and its last status. A model found above 0 that status had at 0 was woken
/// (by its activator) or scaled by hand: either way its idle time starts again. Idle time
/// counts only while the model is ready (from its `Ready` condition's transition): the
/// requests that woke it wait for a pod, and a model that cannot start is not idle but broken.
pub fn decide(
    model: &InferenceModel,
    idle_after: Duration,
    active: bool,
    replicas: Option<i32>,
    ready: i32,
    now: Timestamp,
) -> Idle {
    let status = model.status.as_ref();
    let was_zero = status.is_some_and(|s| s.scaled_to_zero);
    let woken = was_zero && replicas.is_some_and(|r| r > 0);
    let last_request = match status.and_then(|s| s.last_request_time.as_ref()) {
        Some(Time(t)) if !active && !woken => *t,
        // The first reconcile of a model starts its idle time.
        _ => now,
    };
    let ready_since = status
        .into_iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == READY && c.status == "True" && c.reason != REASON_SCALED_TO_ZERO)
        .map(|c| c.last_transition_time.0);
    let scale_down = match ready_since {
        Some(since) if replicas.is_some_and(|r| r > 0) && ready > 0 && !woken => {
            let idle_from = last_request.max(since);
            let idle_for = u64::try_from(now.as_millisecond() - idle_from.as_millisecond());
            Duration::from_millis(idle_for.unwrap_or(0)) >= idle_after
        }
        _ => false,
    };
    Idle {
        last_request,
        scale_down,
        scaled_to_zero: scale_down || (replicas == Some(0) && !woken),
    }
}

/// How soon to look again at an awake model that scales to zero: often enough that it goes to
/// zero within a tenth of `idle_after` past it (at least every second, at most every 30 s).
pub fn poll(idle_after: Duration) -> Duration {
    (idle_after / 10).clamp(Duration::from_secs(1), Duration::from_secs(30))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
    use sluice_crds::InferenceModelStatus;

    use super::*;
    use crate::scrape::{PodEndpoint, Sample};

    fn model(status: Option<InferenceModelStatus>) -> InferenceModel {
        let mut m: InferenceModel = serde_yaml::from_str(
            "apiVersion: sluice.dev/v1alpha1\nkind: InferenceModel\nmetadata: {name: chat, namespace: ns}\nspec:\n  autoscaling: {minReplicas: 0, maxReplicas: 2, idleAfter: 60s, metrics: [{type: QueueDepth, target: 2}]}\n  variants: [{name: a, weight: 100, model: {pvc: {claimName: m, path: m.gguf}}}]\n",
        )
        .expect("model");
        m.status = status;
        m
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("time")
    }

    fn scraped(pod: &str, answered: f64, in_flight: f64) -> Scraped {
        let sample = |name: &str, value: f64| Sample {
            name: name.to_owned(),
            labels: BTreeMap::new(),
            value,
        };
        Scraped {
            variant: "a".to_owned(),
            pod: PodEndpoint {
                name: pod.to_owned(),
                admin_url: String::new(),
            },
            samples: Ok(vec![
                sample(REQUESTS_TOTAL_SERIES, answered),
                sample(REQUESTS_IN_FLIGHT_SERIES, in_flight),
                sample(QUEUE_DEPTH_SERIES, 0.0),
            ]),
        }
    }

    #[test]
    fn a_request_is_a_grown_count_a_new_pods_answers_or_one_in_flight() {
        let counts = RequestCounts::default();
        let m = model(None);
        assert!(!counts.active(&m, &[scraped("p1", 0.0, 0.0)]));
        assert!(!counts.active(&m, &[scraped("p1", 0.0, 0.0)]));
        assert!(counts.active(&m, &[scraped("p1", 0.0, 1.0)]), "in flight");
        assert!(counts.active(&m, &[scraped("p1", 3.0, 0.0)]), "answered");
        assert!(!counts.active(&m, &[scraped("p1", 3.0, 0.0)]));
        assert!(counts.active(&m, &[scraped("p1", 3.0, 0.0), scraped("p2", 1.0, 0.0)]));
        // A pod that went away and one that restarted (a lower count) are no requests.
        assert!(!counts.active(&m, &[scraped("p2", 0.0, 0.0)]));
    }

    fn status(last: i64, zero: bool, ready_at: Option<i64>) -> Option<InferenceModelStatus> {
        let ready = |since: i64, ok: bool, reason: &str| Condition {
            type_: READY.to_owned(),
            status: if ok { "True" } else { "False" }.to_owned(),
            reason: reason.to_owned(),
            message: String::new(),
            last_transition_time: Time(at(since)),
            observed_generation: None,
        };
        let condition = match (zero, ready_at) {
            (true, _) => ready(last, true, REASON_SCALED_TO_ZERO),
            (false, Some(t)) => ready(t, true, "AllVariantsReady"),
            (false, None) => ready(last, false, "NoReadyPods"),
        };
        Some(InferenceModelStatus {
            last_request_time: Some(Time(at(last))),
            scaled_to_zero: zero,
            conditions: vec![condition],
            ..Default::default()
        })
    }

    #[test]
    fn idles_to_zero_after_idle_after_and_a_wake_restarts_the_clock() {
        let idle_after = Duration::from_secs(60);
        let decide = |status, active, replicas, ready, now| {
            decide(
                &model(status),
                idle_after,
                active,
                Some(replicas),
                ready,
                at(now),
            )
        };
        // First look: the idle time starts now.
        let first = decide(None, false, 1, 1, 0);
        assert_eq!(first.last_request, at(0));
        assert!(!first.scale_down && !first.scaled_to_zero);
        // Under idleAfter: stays; a request restarts the clock.
        assert!(!decide(status(0, false, Some(0)), false, 1, 1, 59).scale_down);
        let busy = decide(status(0, false, Some(0)), true, 1, 1, 61);
        assert_eq!((busy.last_request, busy.scale_down), (at(61), false));
        // Idle for idleAfter: down to zero.
        let down = decide(status(0, false, Some(0)), false, 2, 2, 60);
        assert!(down.scale_down && down.scaled_to_zero);
        assert_eq!(down.last_request, at(0));
        // At zero it stays there, and is not scaled again.
        let zero = decide(status(0, true, None), false, 0, 0, 600);
        assert!(zero.scaled_to_zero && !zero.scale_down);
        // The activator scaled it up: awake, the clock restarted.
        let woken = decide(status(0, true, None), false, 1, 0, 700);
        assert_eq!(
            woken,
            Idle {
                last_request: at(700),
                scale_down: false,
                scaled_to_zero: false
            }
        );
        // Its pod still starting long after: not idle.
        assert!(!decide(status(700, false, None), false, 1, 0, 900).scale_down);
        // Ready only since 880: idle from then, not from the wake.
        assert!(!decide(status(700, false, Some(880)), false, 1, 1, 930).scale_down);
        assert!(decide(status(700, false, Some(880)), false, 1, 1, 940).scale_down);
    }

    #[test]
    fn polls_a_tenth_of_idle_after_within_bounds() {
        assert_eq!(poll(Duration::from_secs(900)), Duration::from_secs(30));
        assert_eq!(poll(Duration::from_secs(60)), Duration::from_secs(6));
        assert_eq!(poll(Duration::from_secs(3)), Duration::from_secs(1));
    }
}

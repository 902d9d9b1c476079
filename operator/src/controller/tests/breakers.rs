//! The sidecars' circuit breakers through `reconcile`, against the mocked API server and a fake
//! metrics source: a pod holding a variant's breaker open shows in that variant's status and in
//! Degraded, with a Warning Event; once no pod holds it, the status clears. Scraped without
//! `spec.rollout`: the breakers are read for any model whose variants forward to each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use sluice_crds::{InferenceModel, InferenceModelStatus};

use super::rollout::{lives, pods, steady_lists};
use crate::controller::{Context, reconcile};
use crate::desired::Desired;
use crate::fixtures::{self, Recorded, Step, model_from_yaml, test_now, weights_for};
use crate::observe::{Observed, ReadyCounts};
use crate::policy::merge::ModelLimits;
use crate::scrape::{MetricsSource, PodEndpoint, Sample, ScrapeError, parse_prometheus_text};
use crate::status::{self, REASON_BREAKER_OPEN};

const MODEL: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: InferenceModel
metadata: {name: chat, namespace: ns, uid: "uid-1", generation: 1, resourceVersion: "10"}
spec:
  replicas: 1
  resources: {cpu: "1", memory: 1Gi}
  variants:
    - {name: stable, weight: 90, model: {url: "https://e.com/a.gguf"}}
    - {name: canary, weight: 10, model: {url: "https://e.com/b.gguf"}}
"#;

/// Each pod's `/metrics` text.
#[derive(Default)]
struct Sidecars(Mutex<HashMap<String, String>>);

impl Sidecars {
    fn set(&self, pod: &str, text: &str) {
        self.0
            .lock()
            .expect("lock")
            .insert(pod.to_owned(), text.to_owned());
    }
}

impl MetricsSource for Sidecars {
    fn scrape<'a>(
        &'a self,
        pod: &'a PodEndpoint,
    ) -> BoxFuture<'a, Result<Vec<Sample>, ScrapeError>> {
        let text = self.0.lock().expect("lock").get(&pod.name).cloned();
        Box::pin(async move { parse_prometheus_text(&text.ok_or(ScrapeError::Timeout)?) })
    }
}

/// The variants' Deployments as the API server reports them: applied, each pod ready.
pub(super) fn ready_deployments(d: &Desired) -> Vec<Value> {
    let mut out = lives(&d.deployments);
    for v in &mut out {
        v["metadata"]["generation"] = json!(1);
        v["status"] = json!({"observedGeneration": 1, "replicas": 1, "updatedReplicas": 1,
                             "readyReplicas": 1, "availableReplicas": 1});
    }
    out
}

/// Lists answered with everything applied and ready: a reconcile that only reads.
fn steady(d: &Desired) -> Vec<Step> {
    let mut steps = steady_lists(d);
    steps[0] = Step::list(
        "/apis/apps/v1/namespaces/ns/deployments",
        ready_deployments(d),
    );
    steps
}

/// The model as a previous reconcile left it, with no breaker open, and what it applied.
fn settled() -> (InferenceModel, Desired) {
    let mut model = model_from_yaml(MODEL);
    // As applied with each variant's pod ready (the sidecar config follows the ready pods).
    let ready = ReadyCounts::settled(&model);
    let d = fixtures::desired_with(&model, &ModelLimits::default(), &ready).expect("renders");
    let observed = Observed {
        deployments: serde_json::from_value(json!(ready_deployments(&d))).expect("deployments"),
        pods: serde_json::from_value(json!(pods())).expect("pods"),
        ..Default::default()
    };
    let weights = weights_for(&model, &observed.ready_counts());
    model.status = Some(status::compute(
        &model,
        "ns",
        &observed,
        &weights,
        test_now(),
    ));
    (model, d)
}

/// One reconcile of `model` reading `sidecars`, whose status changes: what it patched and
/// published, and when it asked to be requeued.
async fn reconcile_once(
    sidecars: &Arc<Sidecars>,
    model: &InferenceModel,
    d: &Desired,
) -> (Action, Vec<Recorded>) {
    let (ctx, server) = Context::test_with_metrics(sidecars.clone());
    let mut steps = steady(d);
    steps.push(Step::apply_status(model));
    steps.push(Step::event("ns"));
    let verifier = server.run(steps);
    let action = reconcile(Arc::new(model.clone()), ctx)
        .await
        .expect("reconciles");
    let seen = verifier.await.expect("verifier");
    let n = seen.len();
    assert!(
        seen[..n - 2].iter().all(Recorded::changes_nothing),
        "{seen:#?}"
    );
    (action, seen[n - 2..].to_vec())
}

fn degraded(status: &Value) -> (String, String, String) {
    let c = status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Degraded")
        .expect("Degraded");
    let text = |k: &str| c[k].as_str().expect("string").to_owned();
    (text("status"), text("reason"), text("message"))
}

#[tokio::test]
async fn a_breaker_open_on_a_pod_shows_in_status_and_an_event_until_it_closes() {
    let sidecars = Arc::new(Sidecars::default());
    sidecars.set(
        "chat-stable-0",
        "# TYPE sluice_forward_breaker_open gauge\n\
         sluice_forward_breaker_open{variant=\"canary\"} 1\n\
         # TYPE sluice_forward_breaker_opened counter\n\
         sluice_forward_breaker_opened_total{variant=\"canary\"} 1\n# EOF\n",
    );
    sidecars.set("chat-canary-0", "# EOF\n");
    let (model, d) = settled();

    let (action, seen) = reconcile_once(&sidecars, &model, &d).await;
    let status = &seen[0].body["status"];
    assert_eq!(status["variants"][0]["name"], "stable");
    assert!(
        status["variants"][0].get("breakerOpenPods").is_none(),
        "{status}"
    );
    assert_eq!(status["variants"][1]["name"], "canary");
    assert_eq!(status["variants"][1]["breakerOpenPods"], 1);
    let (state, reason, message) = degraded(status);
    assert_eq!(
        (state.as_str(), reason.as_str()),
        ("True", REASON_BREAKER_OPEN)
    );
    assert!(
        message.starts_with("breaker open for variant canary on 1 of 1 pods that forward to it:"),
        "{message}"
    );
    let event = &seen[1].body;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Warning"), &json!(REASON_BREAKER_OPEN))
    );
    assert!(
        event["note"]
            .as_str()
            .expect("note")
            .contains("variant canary"),
        "{event}"
    );
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(15)),
        "an open breaker is polled until it closes"
    );

    // The next forward to the canary succeeded: the breaker closed.
    let mut open = model.clone();
    open.status =
        Some(serde_json::from_value::<InferenceModelStatus>(status.clone()).expect("a status"));
    sidecars.set(
        "chat-stable-0",
        "sluice_forward_breaker_open{variant=\"canary\"} 0\n\
         sluice_forward_breaker_opened_total{variant=\"canary\"} 1\n",
    );
    let (action, seen) = reconcile_once(&sidecars, &open, &d).await;
    let status = &seen[0].body["status"];
    assert!(
        status["variants"]
            .as_array()
            .expect("variants")
            .iter()
            .all(|v| v.get("breakerOpenPods").is_none()),
        "{status}"
    );
    assert_eq!(degraded(status).1, "AsExpected");
    let event = &seen[1].body;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Normal"), &json!("AsExpected"))
    );
    assert_eq!(
        action,
        Action::requeue(Duration::from_secs(60)),
        "traffic is split: breakers are polled even when settled"
    );
}

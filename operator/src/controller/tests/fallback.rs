//! `spec.fallback` through `reconcile`, against the mocked API server: the operator looks the
//! fallback model up among the namespace's models (it only needs its name to render the
//! address and the Secret mount), and
//! a model whose fallback does not exist is Degraded (`FallbackNotFound`, with an Event) until
//! it does.

use std::sync::Arc;

use serde_json::{Value, json};
use sluice_crds::{InferenceModel, InferenceModelStatus};

use super::breakers::ready_deployments;
use super::rollout::steady_lists;
use super::with_status;
use crate::controller::{Context, reconcile};
use crate::desired::Desired;
use crate::fixtures::{self, Step, model_from_yaml};
use crate::observe::{Observed, ReadyCounts};
use crate::policy::merge::ModelLimits;
use crate::status::REASON_FALLBACK_NOT_FOUND;

const MODEL: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: InferenceModel
metadata: {name: chat, namespace: ns, uid: "uid-1", generation: 1, resourceVersion: "10"}
spec:
  replicas: 1
  resources: {cpu: "1", memory: 1Gi}
  fallback: {model: backup}
  variants:
    - {name: stable, weight: 100, model: {url: "https://e.com/a.gguf"}}
"#;

/// One reconcile of `model` (already applied as `d`) with the fallback model `backup` present
/// or not: the status it patched and the Event it published.
async fn reconcile_once(
    model: &InferenceModel,
    d: &Desired,
    backup: Option<Value>,
) -> (Value, Value) {
    let (ctx, server) = Context::test();
    let mut steps = steady_lists(d);
    steps[0] = Step::list(
        "/apis/apps/v1/namespaces/ns/deployments",
        ready_deployments(d),
    );
    // After the pods, before the policies: the namespace's models, the fallback among them
    // or not.
    steps[2] = Step::models("ns", backup.into_iter().collect());
    steps.push(Step::apply_status(model));
    steps.push(Step::event("ns"));
    let verifier = server.run(steps);
    reconcile(Arc::new(model.clone()), ctx)
        .await
        .expect("reconciles");
    let seen = verifier.await.expect("verifier");
    let n = seen.len();
    (seen[n - 2].body["status"].clone(), seen[n - 1].body.clone())
}

fn degraded(status: &Value) -> (String, String) {
    let c = status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Degraded")
        .expect("Degraded");
    (
        c["status"].as_str().expect("status").to_owned(),
        c["reason"].as_str().expect("reason").to_owned(),
    )
}

#[tokio::test]
async fn a_missing_fallback_model_degrades_the_model_until_it_exists() {
    let model = model_from_yaml(MODEL);
    let ready = ReadyCounts::settled(&model);
    let d = fixtures::desired_with(&model, &ModelLimits::default(), &ready).expect("renders");
    let observed = Observed {
        deployments: serde_json::from_value(json!(ready_deployments(&d))).expect("deployments"),
        ..Default::default()
    };
    let mut model = with_status(model, &observed);

    let (status, event) = reconcile_once(&model, &d, None).await;
    assert_eq!(
        degraded(&status),
        ("True".to_owned(), REASON_FALLBACK_NOT_FOUND.to_owned()),
        "{status}"
    );
    assert_eq!(event["reason"], REASON_FALLBACK_NOT_FOUND);
    assert_eq!(event["type"], "Warning");

    // The fallback model is created: Degraded clears.
    model.status = Some(serde_json::from_value::<InferenceModelStatus>(status).expect("status"));
    let backup = json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "InferenceModel",
        "metadata": {"name": "backup", "namespace": "ns"},
        "spec": {"variants": [{"name": "a", "weight": 100, "model": {"url": "https://e.com/c.gguf"}}]}});
    // Applied already: the sidecars answer for it too (one endpoint for all models).
    let d = crate::controller::desired_state(
        &model,
        "ns",
        &fixtures::settings(),
        &ModelLimits::default(),
        &ready,
        &[serde_json::from_value(backup.clone()).expect("model")],
    )
    .expect("renders")
    .1;
    assert_eq!(d.sidecar_config.models.len(), 1);
    let (status, _) = reconcile_once(&model, &d, Some(backup)).await;
    assert_eq!(degraded(&status).0, "False", "{status}");
}

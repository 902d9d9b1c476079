//! Reconcile against a mocked API server: the exact requests for create, update, no-op,
//! deletion, conflicts and server errors.

use std::sync::Arc;

use kube::runtime::controller::Action;
use serde_json::{Value, json};
use sluice_crds::InferenceModel;

use super::apply::is_subset;
use super::{error_policy, reconcile};
use crate::controller::Context;
use crate::desired::Desired;
use crate::fixtures::{self, Step, model_from_yaml, test_now, weights_for};
use crate::observe::Observed;
use crate::status;

mod breakers;
mod fallback;
mod rollout;

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

const CORE: &str = "/api/v1/namespaces/ns";
const APPS: &str = "/apis/apps/v1/namespaces/ns";
const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/ns";
const HPA: &str = "/apis/autoscaling/v2/namespaces/ns/horizontalpodautoscalers";
const POLICIES: &str = "/apis/sluice.dev/v1alpha1/namespaces/ns/ratelimitpolicies";

/// The RateLimitPolicies of the namespace (none), read before the desired state.
fn no_policies() -> Step {
    Step::get(
        POLICIES,
        Some(
            json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicyList", "metadata": {}, "items": []}),
        ),
    )
}

fn desired_for(model: &InferenceModel) -> Desired {
    fixtures::desired_for(model).expect("renders")
}

/// As the API server returns an applied object: ours plus server-set fields.
fn live<T: serde::Serialize>(obj: &T) -> Value {
    let mut v = serde_json::to_value(obj).expect("encodes");
    v["metadata"]["uid"] = json!("child-uid");
    v["metadata"]["resourceVersion"] = json!("5");
    v["metadata"]["creationTimestamp"] = json!("2024-01-01T00:00:00Z");
    v
}

fn lives<T: serde::Serialize>(objs: &[T]) -> Vec<Value> {
    objs.iter().map(live).collect()
}

/// The model as a previous reconcile left it: status written against `observed`.
fn with_status(mut model: InferenceModel, observed: &Observed) -> InferenceModel {
    let weights = weights_for(&model, &observed.ready_counts());
    model.status = Some(status::compute(
        &model,
        "ns",
        observed,
        &weights,
        test_now(),
    ));
    model
}

/// What reconcile requests when nothing exists yet: lists, then every apply in order.
fn create_steps(model: &InferenceModel) -> Vec<Step> {
    vec![
        Step::list(&format!("{APPS}/deployments"), vec![]),
        Step::list(&format!("{CORE}/pods"), vec![]),
        Step::models("ns", vec![]),
        no_policies(),
        Step::list(&format!("{CORE}/serviceaccounts"), vec![]),
        Step::apply(&format!("{CORE}/serviceaccounts/chat-sidecar")),
        Step::list(&format!("{RBAC}/roles"), vec![]),
        Step::apply(&format!("{RBAC}/roles/chat-sidecar")),
        Step::list(&format!("{RBAC}/rolebindings"), vec![]),
        Step::apply(&format!("{RBAC}/rolebindings/chat-sidecar")),
        Step::list(&format!("{CORE}/configmaps"), vec![]),
        Step::apply(&format!("{CORE}/configmaps/chat-sidecar-config")),
        Step::list(&format!("{CORE}/services"), vec![]),
        Step::apply(&format!("{CORE}/services/chat")),
        Step::apply(&format!("{CORE}/services/chat-stable")),
        Step::apply(&format!("{CORE}/services/chat-canary")),
        // The forwarding Secret: created (before the pods that mount it), never read.
        Step::create(&format!("{CORE}/secrets")),
        Step::apply(&format!("{APPS}/deployments/chat-stable")),
        Step::apply(&format!("{APPS}/deployments/chat-canary")),
        Step::list(HPA, vec![]),
        Step::apply_status(model),
        // Transitions: Ready=False (no pods yet), Progressing=True. Degraded=False at birth
        // is not news.
        Step::event("ns"),
        Step::event("ns"),
    ]
}

/// Lists answered with everything already applied for `model` (nothing to do).
fn steady_lists(d: &Desired) -> Vec<Step> {
    vec![
        Step::list(&format!("{APPS}/deployments"), lives(&d.deployments)),
        Step::list(&format!("{CORE}/pods"), vec![]),
        Step::models("ns", vec![]),
        no_policies(),
        Step::list(
            &format!("{CORE}/serviceaccounts"),
            vec![live(&d.service_account)],
        ),
        Step::list(&format!("{RBAC}/roles"), vec![live(&d.role)]),
        Step::list(&format!("{RBAC}/rolebindings"), vec![live(&d.role_binding)]),
        Step::list(&format!("{CORE}/configmaps"), vec![live(&d.config_map)]),
        Step::list(&format!("{CORE}/services"), lives(&d.services)),
        Step::forwarding_secret_exists("ns"),
        Step::list(HPA, lives(&d.autoscalers)),
    ]
}

#[tokio::test]
async fn create_applies_everything_then_status_and_events() {
    let (ctx, server) = Context::test();
    let model = Arc::new(model_from_yaml(MODEL));
    let verifier = server.run(create_steps(&model));
    let action = reconcile(model, ctx).await.expect("reconciles");
    let seen = verifier.await.expect("verifier");
    assert_eq!(
        action,
        Action::requeue(std::time::Duration::from_secs(15)),
        "not ready yet: poll"
    );

    let deployment = &seen[17].body;
    assert_eq!(deployment["metadata"]["ownerReferences"][0]["uid"], "uid-1");
    assert_eq!(
        deployment["metadata"]["ownerReferences"][0]["controller"],
        true
    );
    assert_eq!(deployment["spec"]["replicas"], 1);
    let status = &seen[20].body["status"];
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(status["readyVariants"], "0/2");
    assert_eq!(status["weights"], "stable=90/90,canary=10/10");
    assert_eq!(status["endpoint"], "http://chat.ns.svc:8080/v1");
    let reasons: Vec<_> = seen[21..]
        .iter()
        .map(|r| r.body["reason"].clone())
        .collect();
    assert_eq!(reasons, [json!("NoReadyPods"), json!("RollingOut")]);
}

#[tokio::test]
async fn first_reconcile_creates_the_forwarding_secret_every_pod_mounts() {
    let (ctx, server) = Context::test();
    let model = Arc::new(model_from_yaml(MODEL));
    let verifier = server.run(create_steps(&model));
    reconcile(model, ctx).await.expect("reconciles");
    let seen = verifier.await.expect("verifier");

    // Created (POST, not an apply that would re-send a new value), without reading first.
    assert_eq!(
        (&seen[16].method, seen[16].path.as_str()),
        (&http::Method::POST, "/api/v1/namespaces/ns/secrets")
    );
    assert!(seen[16].query.contains("fieldManager=sluice-operator"));
    assert!(
        !seen
            .iter()
            .any(|r| r.method == http::Method::GET && r.path.contains("/secrets")),
        "the operator reads no Secret"
    );
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(seen[16].body.clone()).expect("a Secret");
    assert_eq!(secret.metadata.name.as_deref(), Some("chat-forwarding"));
    let owner = &secret.metadata.owner_references.as_ref().expect("owner")[0];
    assert_eq!(
        (owner.uid.as_str(), owner.controller),
        ("uid-1", Some(true))
    );
    let data = secret.data.expect("data");
    assert_eq!(data.keys().collect::<Vec<_>>(), ["token"]);
    let token = String::from_utf8(data["token"].0.clone()).expect("UTF-8");
    assert_eq!(token.len(), 64, "32 random bytes, hex");
    assert!(token.bytes().all(|c| c.is_ascii_hexdigit()), "{token}");

    for deployment in [&seen[17].body, &seen[18].body] {
        let pod = &deployment["spec"]["template"]["spec"];
        let volume = pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .find(|v| v["name"] == "forwarding")
            .expect("forwarding volume");
        assert_eq!(volume["secret"]["secretName"], "chat-forwarding");
        assert_eq!(
            volume["secret"]["items"],
            json!([{"key": "token", "path": "token"}])
        );
        let sidecar = &pod["containers"][0];
        let mount = sidecar["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .find(|m| m["name"] == "forwarding")
            .expect("forwarding mount");
        assert_eq!(mount["mountPath"], "/etc/sluice/forwarding");
        assert_eq!(mount["readOnly"], true);
        let args: Vec<&str> = sidecar["args"]
            .as_array()
            .expect("args")
            .iter()
            .filter_map(|a| a.as_str())
            .collect();
        assert!(
            args.windows(2)
                .any(|w| w == ["--forward-token-file", "/etc/sluice/forwarding/token"]),
            "{args:?}"
        );
        assert!(
            args.windows(2)
                .any(|w| w == ["--cache-dir", "/tmp/sluice-cache"]),
            "{args:?}"
        );
        assert!(
            sidecar["env"]
                .as_array()
                .expect("env")
                .contains(&json!({"name": "HF_HUB_OFFLINE", "value": "1"})),
            "{sidecar}"
        );
    }
}

#[tokio::test]
async fn forwarding_secret_that_exists_is_kept() {
    let (ctx, server) = Context::test();
    let model = Arc::new(model_from_yaml(MODEL));
    let mut steps = create_steps(&model);
    // An earlier reconcile (or another replica) created it: the create is refused, theirs
    // stands, and the reconcile goes on to the Deployments that mount it.
    steps[16] = steps[16].clone().fails_with(409);
    let verifier = server.run(steps);
    reconcile(model, ctx.clone()).await.expect("reconciles");
    let seen = verifier.await.expect("verifier");
    assert!(seen[17].path.ends_with("/deployments/chat-stable"));
    // Not counted as applied: only the objects patched are.
    let patched = seen
        .iter()
        .filter(|r| r.method == http::Method::PATCH && !r.path.ends_with("/status"))
        .count();
    assert_eq!(ctx.metrics.applies.get(), patched as u64);
}

#[tokio::test]
async fn forwarding_secret_that_cannot_be_created_fails_the_reconcile() {
    let (ctx, server) = Context::test();
    let model = Arc::new(model_from_yaml(MODEL));
    let mut steps = create_steps(&model);
    // Forbidden (no create on secrets granted): the pods would not start, so no Deployment
    // is applied and the reconcile fails (retried with backoff).
    steps[16] = steps[16].clone().fails_with(403);
    steps.truncate(17);
    let verifier = server.run(steps);
    let err = reconcile(model, ctx).await.expect_err("fails");
    assert!(err.to_string().contains("403"), "{err}");
    let seen = verifier.await.expect("verifier");
    assert!(!seen.iter().any(|r| r.path.contains("/deployments/")));
}

#[tokio::test]
async fn present_forwarding_secret_is_never_read_or_replaced() {
    let (ctx, server) = Context::test();
    let model = model_from_yaml(MODEL);
    let d = desired_for(&model);
    let observed = Observed {
        deployments: serde_json::from_value(json!(lives(&d.deployments))).expect("deployments"),
        pods: vec![],
        ..Default::default()
    };
    let model = Arc::new(with_status(model, &observed));
    let verifier = server.run(steady_lists(&d));
    reconcile(model, ctx).await.expect("reconciles");
    let seen = verifier.await.expect("verifier");
    let secrets: Vec<_> = seen
        .iter()
        .filter(|r| r.path.contains("/secrets"))
        .map(|r| (r.method.clone(), r.path.as_str()))
        .collect();
    assert_eq!(
        secrets,
        [(http::Method::POST, "/api/v1/namespaces/ns/secrets")],
        "only a create, refused as it exists: never read, rotated or re-applied"
    );
}

#[tokio::test]
async fn unchanged_model_writes_nothing() {
    let (ctx, server) = Context::test();
    let model = model_from_yaml(MODEL);
    let d = desired_for(&model);
    let observed = Observed {
        deployments: serde_json::from_value(json!(lives(&d.deployments))).expect("deployments"),
        pods: vec![],
        ..Default::default()
    };
    let model = Arc::new(with_status(model, &observed));
    let verifier = server.run(steady_lists(&d));
    reconcile(model, ctx.clone()).await.expect("reconciles");
    let seen = verifier.await.expect("verifier");
    // Only reads, and the forwarding Secret's create that the API server refuses (409).
    assert!(
        seen.iter().all(fixtures::Recorded::changes_nothing),
        "only reads: {seen:#?}"
    );
    assert_eq!(ctx.metrics.applies.get(), 0);
}

#[tokio::test]
async fn weight_change_updates_only_the_config_map_and_status() {
    let (ctx, server) = Context::test();
    let old = model_from_yaml(MODEL);
    let d = desired_for(&old);
    let observed = Observed {
        deployments: serde_json::from_value(json!(lives(&d.deployments))).expect("deployments"),
        pods: vec![],
        ..Default::default()
    };
    let old = with_status(old, &observed);
    let mut new = old.clone();
    new.spec.variants[0].weight = 70;
    new.spec.variants[1].weight = 30;
    new.metadata.generation = Some(2);

    let mut steps = steady_lists(&d);
    steps.insert(
        8,
        Step::apply(&format!("{CORE}/configmaps/chat-sidecar-config")),
    );
    steps.push(Step::apply_status(&new));
    let verifier = server.run(steps);
    reconcile(Arc::new(new), ctx).await.expect("reconciles");
    let seen = verifier.await.expect("verifier");

    let cm = seen[8].body["data"]["sidecar.yaml"]
        .as_str()
        .expect("config")
        .to_owned();
    let config = sluice_crds::SidecarConfig::from_yaml(&cm).expect("valid sidecar config");
    let weights: Vec<u32> = config.variants.iter().map(|v| v.weight).collect();
    assert_eq!(weights, [70, 30], "{cm}");
    assert!(
        !seen.iter().any(|r| r.path.contains("/deployments/")),
        "weights must not touch Deployments"
    );
    let status = &seen.last().expect("status").body["status"];
    assert_eq!(status["weights"], "stable=70/70,canary=30/30");
    assert_eq!(status["observedGeneration"], 2);
}

#[tokio::test]
async fn drifted_deployment_is_reapplied() {
    let (ctx, server) = Context::test();
    let model = model_from_yaml(MODEL);
    let d = desired_for(&model);
    let mut deployments = lives(&d.deployments);
    deployments[1]["spec"]["template"]["spec"]["containers"][0]["image"] =
        json!("someone-else:latest");
    let observed = Observed {
        deployments: serde_json::from_value(json!(deployments.clone())).expect("d"),
        pods: vec![],
        ..Default::default()
    };
    let model = Arc::new(with_status(model, &observed));
    let mut steps = steady_lists(&d);
    steps[0] = Step::list(&format!("{APPS}/deployments"), deployments);
    // After the Services list and the forwarding Secret read.
    steps.insert(10, Step::apply(&format!("{APPS}/deployments/chat-canary")));
    let verifier = server.run(steps);
    reconcile(model, ctx).await.expect("reconciles");
    let seen = verifier.await.expect("verifier");
    assert_eq!(
        seen[10].body["spec"]["template"]["spec"]["containers"][0]["image"],
        "sidecar:test"
    );
}

#[tokio::test]
async fn removed_variant_is_pruned() {
    let (ctx, server) = Context::test();
    let old = model_from_yaml(MODEL);
    let d_old = desired_for(&old);
    let mut new = old.clone();
    new.spec.variants.truncate(1);
    new.spec.variants[0].weight = 100;
    let d_new = desired_for(&new);

    let mut steps = steady_lists(&d_old);
    // The config changes (one variant), the canary's Service and Deployment go.
    steps.insert(
        8,
        Step::apply(&format!("{CORE}/configmaps/chat-sidecar-config")),
    );
    steps.insert(10, Step::delete(&format!("{CORE}/services/chat-canary")));
    // After the forwarding Secret read.
    steps.insert(12, Step::delete(&format!("{APPS}/deployments/chat-canary")));
    steps.push(Step::apply_status(&new));
    steps.push(Step::event("ns"));
    steps.push(Step::event("ns"));
    let verifier = server.run(steps);
    reconcile(Arc::new(new), ctx).await.expect("reconciles");
    let seen = verifier.await.expect("verifier");
    assert_eq!(d_new.deployments.len(), 1);
    assert!(
        seen.iter().any(
            |r| r.method == http::Method::DELETE && r.path.ends_with("deployments/chat-canary")
        )
    );
}

#[tokio::test]
async fn deleted_model_is_left_to_the_garbage_collector() {
    let (ctx, server) = Context::test();
    let mut model = model_from_yaml(MODEL);
    model.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        test_now(),
    ));
    let verifier = server.run(vec![]);
    let action = reconcile(Arc::new(model), ctx).await.expect("reconciles");
    assert_eq!(action, Action::await_change());
    assert!(verifier.await.expect("verifier").is_empty());
}

#[tokio::test]
async fn invalid_spec_patches_status_only() {
    let (ctx, server) = Context::test();
    let model = model_from_yaml(&MODEL.replace("weight: 10", "weight: 20"));
    let verifier = server.run(vec![Step::apply_status(&model), Step::event("ns")]);
    let action = reconcile(Arc::new(model), ctx).await.expect("reconciles");
    assert_eq!(action, Action::await_change());
    let seen = verifier.await.expect("verifier");
    let conditions = seen[0].body["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .clone();
    assert!(
        conditions
            .iter()
            .any(|c| c["type"] == "Degraded" && c["reason"] == "InvalidSpec")
    );
    assert_eq!(
        (&seen[1].body["type"], &seen[1].body["reason"]),
        (&json!("Warning"), &json!("InvalidSpec"))
    );
}

#[tokio::test]
async fn conflict_fails_the_reconcile_and_backs_off() {
    let (ctx, server) = Context::test();
    let model = Arc::new(model_from_yaml(MODEL));
    let mut steps = create_steps(&model);
    steps.truncate(6);
    steps[5] = steps[5].clone().fails_with(409);
    let verifier = server.run(steps);
    let err = reconcile(model.clone(), ctx.clone())
        .await
        .expect_err("conflict");
    verifier.await.expect("verifier");
    assert_eq!(err.reason(), "Conflict");
    assert_eq!(
        error_policy(model.clone(), &err, ctx.clone()),
        Action::requeue(std::time::Duration::from_secs(5))
    );
    assert_eq!(
        error_policy(model, &err, ctx.clone()),
        Action::requeue(std::time::Duration::from_secs(10))
    );
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    ctx.metrics.clone().register(&mut registry);
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
    assert!(
        text.contains(r#"sluice_operator_reconcile_failures_total{reason="Conflict"} 2"#),
        "{text}"
    );
}

#[tokio::test]
async fn server_error_fails_the_reconcile_before_any_write() {
    let (ctx, server) = Context::test();
    let model = Arc::new(model_from_yaml(MODEL));
    let verifier = server.run(vec![
        Step::list(&format!("{APPS}/deployments"), vec![]).fails_with(500),
    ]);
    let err = reconcile(model, ctx).await.expect_err("500");
    verifier.await.expect("verifier");
    assert_eq!(err.reason(), "ServerError");
}

#[test]
fn subset_ignores_server_defaults_but_not_changed_values() {
    let desired = json!({"a": 1, "b": [{"x": 1}], "c": {}});
    assert!(is_subset(
        &desired,
        &json!({"a": 1, "b": [{"x": 1, "y": 2}], "c": {"d": 1}, "e": 3})
    ));
    assert!(!is_subset(
        &desired,
        &json!({"a": 2, "b": [{"x": 1}], "c": {}})
    ));
    assert!(!is_subset(
        &desired,
        &json!({"a": 1, "b": [{"x": 1}, {"x": 2}], "c": {}})
    ));
    assert!(!is_subset(&desired, &json!({"a": 1, "b": [{"x": 1}]})));
}

/// The watches' shared pause stays short however many watch errors come in a row (an API
/// server restart cuts every watch at once), and starts over after an event.
#[test]
fn the_shared_watch_backoff_is_capped_at_a_second_and_resets() {
    use kube::runtime::utils::Backoff as _;
    let mut backoff = super::WatchBackoff::default();
    let delays: Vec<u128> = backoff.by_ref().take(30).map(|d| d.as_millis()).collect();
    assert_eq!(&delays[..4], &[200, 400, 800, 1000]);
    assert!(delays[4..].iter().all(|&d| d == 1000), "{delays:?}");
    backoff.reset();
    assert_eq!(backoff.next().map(|d| d.as_millis()), Some(200));
}

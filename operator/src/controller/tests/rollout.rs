//! Canary analysis through `reconcile`, against the mocked API server and a fake metrics source:
//! a breaching canary is rolled back (ConfigMap, status, Event; spec untouched), a healthy one
//! keeps its weight, a new generation resets the verdict.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use http::Method;
use serde_json::{Value, json};
use sluice_crds::InferenceModel;
use sluice_crds::inference_model::{RolledBackVariant, RolloutStatus};

use crate::controller::{Context, reconcile};
use crate::desired::Desired;
use crate::fixtures::{self, Recorded, Step, model_from_yaml, test_now, weights_for};
use crate::observe::Observed;
use crate::scrape::{MetricsSource, PodEndpoint, Sample, ScrapeError, parse_prometheus_text};
use crate::status;

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
  rollout:
    analysis: {interval: 30s, window: 5m, maxErrorRate: 0.05, minRequests: 20}
"#;

const CORE: &str = "/api/v1/namespaces/ns";
const APPS: &str = "/apis/apps/v1/namespaces/ns";
const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/ns";
const HPA: &str = "/apis/autoscaling/v2/namespaces/ns/horizontalpodautoscalers";
const POLICIES: &str = "/apis/sluice.dev/v1alpha1/namespaces/ns/ratelimitpolicies";
const CONFIG_MAP: &str = "/api/v1/namespaces/ns/configmaps/chat-sidecar-config";

/// The sidecars' `/metrics`: per pod, 200s and 500s answered so far.
#[derive(Default)]
struct FakeSidecars(Mutex<HashMap<String, (u64, u64)>>);

impl FakeSidecars {
    fn set(&self, pod: &str, ok: u64, errors: u64) {
        self.0
            .lock()
            .expect("lock")
            .insert(pod.to_owned(), (ok, errors));
    }
}

impl MetricsSource for FakeSidecars {
    fn scrape<'a>(
        &'a self,
        pod: &'a PodEndpoint,
    ) -> BoxFuture<'a, Result<Vec<Sample>, ScrapeError>> {
        let found = self.0.lock().expect("lock").get(&pod.name).copied();
        Box::pin(async move {
            let (ok, err) = found.ok_or(ScrapeError::Timeout)?;
            parse_prometheus_text(&format!(
                "sluice_requests_total{{route=\"/v1/chat/completions\",status=\"200\"}} {ok}\n\
                 sluice_requests_total{{route=\"/v1/chat/completions\",status=\"500\"}} {err}\n"
            ))
        })
    }
}

pub(super) fn pods() -> Vec<Value> {
    [
        ("chat-stable-0", "stable", "10.0.0.1"),
        ("chat-canary-0", "canary", "10.0.0.2"),
    ]
    .iter()
    .map(|(name, variant, ip)| {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns",
                         "labels": {"sluice.dev/model": "chat", "sluice.dev/variant": variant}},
            "status": {"phase": "Running", "podIP": ip},
        })
    })
    .collect()
}

fn live<T: serde::Serialize>(obj: &T) -> Value {
    let mut v = serde_json::to_value(obj).expect("encodes");
    v["metadata"]["uid"] = json!("child-uid");
    v["metadata"]["resourceVersion"] = json!("5");
    v
}

pub(super) fn lives<T: serde::Serialize>(objs: &[T]) -> Vec<Value> {
    objs.iter().map(live).collect()
}

fn desired_for(model: &InferenceModel) -> Desired {
    fixtures::desired_for(model).expect("renders")
}

/// The model as a previous reconcile left it (status and rollout state written), and what it
/// applied.
fn settled(mut model: InferenceModel, rollout: RolloutStatus) -> (InferenceModel, Desired) {
    model.status.get_or_insert_default().rollout = Some(rollout);
    let d = desired_for(&model);
    let observed = Observed {
        deployments: serde_json::from_value(json!(lives(&d.deployments))).expect("deployments"),
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

/// Lists answered with everything `d` already applied: reads only.
pub(super) fn steady_lists(d: &Desired) -> Vec<Step> {
    vec![
        Step::list(&format!("{APPS}/deployments"), lives(&d.deployments)),
        Step::list(&format!("{CORE}/pods"), pods()),
        Step::models("ns", vec![]),
        Step::get(
            POLICIES,
            Some(
                json!({"apiVersion": "sluice.dev/v1alpha1", "kind": "RateLimitPolicyList", "metadata": {}, "items": []}),
            ),
        ),
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

/// Index of the ConfigMap list in [`steady_lists`]: an apply of the config goes right after.
const CONFIG_MAP_LIST: usize = 7;

fn context(sidecars: Arc<FakeSidecars>) -> (Arc<Context>, crate::fixtures::ApiServerVerifier) {
    Context::test_with_metrics(sidecars)
}

/// Reconciles `models` one after the other (same Context: the analysis' history lives there)
/// against one mocked API server that expects `steps` in order.
async fn run(
    ctx: &Arc<Context>,
    server: crate::fixtures::ApiServerVerifier,
    models: &[&InferenceModel],
    steps: Vec<Step>,
) -> Vec<Recorded> {
    let verifier = server.run(steps);
    for model in models {
        reconcile(Arc::new((*model).clone()), ctx.clone())
            .await
            .expect("reconciles");
    }
    verifier.await.expect("verifier")
}

fn weights_in(config_apply: &Recorded) -> String {
    let doc = config_apply.body["data"]["sidecar.yaml"]
        .as_str()
        .expect("sidecar config")
        .to_owned();
    let config: sluice_crds::SidecarConfig = serde_yaml::from_str(&doc).expect("parses");
    config
        .variants
        .iter()
        .map(|v| format!("{}={}", v.name, v.weight))
        .collect::<Vec<_>>()
        .join(",")
}

fn fresh(generation: i64) -> RolloutStatus {
    RolloutStatus {
        generation,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_breaching_canary_is_rolled_back_in_config_status_and_event() {
    let sidecars = Arc::new(FakeSidecars::default());
    sidecars.set("chat-stable-0", 1000, 0);
    sidecars.set("chat-canary-0", 100, 0);
    let (model, d) = settled(model_from_yaml(MODEL), fresh(1));

    // Two reconciles: the first reads the baseline and writes nothing; by the second the
    // canary answered 40 more requests, 5 of them 500s.
    let (ctx, server) = context(sidecars.clone());
    let mut steps = steady_lists(&d);
    let n = steps.len();
    steps.extend(steady_lists(&d));
    steps.insert(n + CONFIG_MAP_LIST + 1, Step::apply(CONFIG_MAP));
    steps.push(Step::apply_status(&model));
    steps.push(Step::event("ns"));
    let verifier = server.run(steps);
    reconcile(Arc::new(model.clone()), ctx.clone())
        .await
        .expect("reconciles");
    sidecars.set("chat-stable-0", 1400, 0);
    sidecars.set("chat-canary-0", 135, 5);
    reconcile(Arc::new(model.clone()), ctx)
        .await
        .expect("reconciles");
    let seen = verifier.await.expect("verifier");
    assert!(seen[..n].iter().all(Recorded::changes_nothing), "{seen:#?}");
    let seen = seen[n..].to_vec();

    assert_eq!(
        weights_in(&seen[CONFIG_MAP_LIST + 1]),
        "stable=100,canary=0"
    );
    let status = &seen[seen.len() - 2].body["status"];
    assert_eq!(status["weights"], "stable=90/100,canary=10/0");
    let degraded = status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == "Degraded")
        .expect("Degraded")
        .clone();
    assert_eq!(degraded["status"], "True");
    assert_eq!(degraded["reason"], "CanaryRolledBack");
    assert!(
        degraded["message"].as_str().expect("message").starts_with(
            "variant canary rolled back: error rate 12.5% > 5.0% over 40 requests in 5m"
        ),
        "{degraded}"
    );
    assert_eq!(status["rollout"]["rolledBack"][0]["name"], "canary");
    let event = &seen[seen.len() - 1].body;
    assert_eq!(
        (&event["type"], &event["reason"]),
        (&json!("Warning"), &json!("CanaryRolledBack"))
    );
    assert!(
        !seen
            .iter()
            .any(|r| r.method == Method::PATCH && r.path.ends_with("/inferencemodels/chat")),
        "spec is never written"
    );
}

#[tokio::test]
async fn a_healthy_canary_keeps_its_weight() {
    let sidecars = Arc::new(FakeSidecars::default());
    sidecars.set("chat-stable-0", 1000, 0);
    sidecars.set("chat-canary-0", 100, 0);
    let (model, d) = settled(model_from_yaml(MODEL), fresh(1));
    let (ctx, server) = context(sidecars.clone());
    let mut steps = steady_lists(&d);
    steps.extend(steady_lists(&d));
    let verifier = server.run(steps);
    reconcile(Arc::new(model.clone()), ctx.clone())
        .await
        .expect("reconciles");
    sidecars.set("chat-stable-0", 1400, 1);
    sidecars.set("chat-canary-0", 199, 1);
    reconcile(Arc::new(model.clone()), ctx)
        .await
        .expect("reconciles");
    let seen = verifier.await.expect("verifier");
    assert!(
        seen.iter().all(Recorded::changes_nothing),
        "a healthy canary changes nothing: {seen:#?}"
    );
}

#[tokio::test]
async fn a_new_generation_resets_the_verdict_and_restores_the_weights() {
    let sidecars = Arc::new(FakeSidecars::default());
    sidecars.set("chat-stable-0", 1400, 0);
    sidecars.set("chat-canary-0", 135, 5);
    let rolled_back = RolloutStatus {
        generation: 1,
        rolled_back: vec![RolledBackVariant {
            name: "canary".into(),
            reason: "error rate 12.5% > 5.0% over 40 requests in 5m".into(),
        }],
        ..Default::default()
    };
    let (mut model, d) = settled(model_from_yaml(MODEL), rolled_back);
    assert_eq!(
        model.status.as_ref().and_then(|s| s.weights.as_deref()),
        Some("stable=90/100,canary=10/0")
    );
    // The user edits the canary (a fixed model file): generation 2.
    model.spec.variants[1].model.url = Some("https://e.com/b2.gguf".into());
    model.metadata.generation = Some(2);

    let (ctx, server) = context(sidecars);
    let mut steps = steady_lists(&d);
    // The canary's Deployment changes for the new file; the config gets its weight back.
    steps.insert(CONFIG_MAP_LIST + 1, Step::apply(CONFIG_MAP));
    // After the Services list and the forwarding Secret read.
    steps.insert(
        CONFIG_MAP_LIST + 4,
        Step::apply(&format!("{APPS}/deployments/chat-canary")),
    );
    steps.push(Step::apply_status(&model));
    // Degraded=False (AsExpected) again.
    steps.push(Step::event("ns"));
    let seen = run(&ctx, server, &[&model], steps).await;
    assert_eq!(
        weights_in(&seen[CONFIG_MAP_LIST + 1]),
        "stable=90,canary=10"
    );
    let status = &seen[seen.len() - 2].body["status"];
    assert_eq!(status["weights"], "stable=90/90,canary=10/10");
    assert_eq!(status["rollout"]["generation"], 2);
    assert!(status["rollout"].get("rolledBack").is_none(), "{status}");
    let event = &seen[seen.len() - 1].body;
    assert_eq!(event["reason"], "AsExpected");
}

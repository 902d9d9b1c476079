//! Against a mocked API server: policy rules reach the model's ConfigMap (and the key Secret
//! its pods), a deleted policy's rules leave it without a restart, and the policy status says
//! Accepted / Conflict / Converged with the pods counted from their metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use kube::runtime::controller::Action;
use serde_json::{Value, json};
use sluice_crds::{InferenceModel, RateLimitPolicy, SidecarConfig};

use super::{PolicyContext, reconcile_policy};
use crate::controller::{Context, reconcile};
use crate::desired::Desired;
use crate::fixtures::{Recorded, Step, desired_with, test_now, weights_for};
use crate::observe::{Observed, ReadyCounts};
use crate::policy::{self, KeysSecrets};
use crate::scrape::{self, MetricsSource, PodEndpoint, Sample, ScrapeError};

const NS: &str = "/api/v1/namespaces/ns";
const APPS: &str = "/apis/apps/v1/namespaces/ns";
const RBAC: &str = "/apis/rbac.authorization.k8s.io/v1/namespaces/ns";
const HPA: &str = "/apis/autoscaling/v2/namespaces/ns/horizontalpodautoscalers";
const SLUICE: &str = "/apis/sluice.dev/v1alpha1/namespaces/ns";

fn example(name: &str) -> String {
    std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples")
            .join(name),
    )
    .expect("example exists")
}

fn model() -> InferenceModel {
    let mut m: InferenceModel =
        serde_yaml::from_str(&example("inferencemodel.yaml")).expect("model");
    m.metadata.namespace = Some("ns".into());
    m.metadata.uid = Some("uid-1".into());
    m.metadata.generation = Some(1);
    m
}

fn policy(file: &str, second: i64) -> RateLimitPolicy {
    let mut p: RateLimitPolicy = serde_yaml::from_str(&example(file)).expect("policy");
    p.metadata.namespace = Some("ns".into());
    p.metadata.generation = Some(1);
    p.metadata.uid = Some(format!("uid-{file}"));
    p.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(1_600_000_000 + second).expect("time"),
    ));
    p
}

fn free() -> RateLimitPolicy {
    policy("ratelimitpolicy-free.yaml", 0)
}

fn paid() -> RateLimitPolicy {
    policy("ratelimitpolicy-paid.yaml", 60)
}

fn secret() -> Value {
    let mut v: Value = serde_yaml::from_str(&example("api-keys-secret.yaml")).expect("secret");
    v["metadata"]["namespace"] = json!("ns");
    v
}

fn list(kind: &str, items: Vec<Value>) -> Option<Value> {
    Some(json!({"apiVersion": "sluice.dev/v1alpha1", "kind": kind, "metadata": {}, "items": items}))
}

fn policies_step(policies: &[RateLimitPolicy]) -> Step {
    let items = policies
        .iter()
        .map(|p| serde_json::to_value(p).expect("encodes"))
        .collect();
    Step::get(
        &format!("{SLUICE}/ratelimitpolicies"),
        list("RateLimitPolicyList", items),
    )
}

/// What a first reconcile of `smollm2` applies once its limits are resolved: its objects,
/// the forwarding Secret, status and events.
fn first_apply() -> Vec<Step> {
    vec![
        Step::list(&format!("{NS}/serviceaccounts"), vec![]),
        Step::apply(&format!("{NS}/serviceaccounts/smollm2-sidecar")),
        Step::list(&format!("{RBAC}/roles"), vec![]),
        Step::apply(&format!("{RBAC}/roles/smollm2-sidecar")),
        Step::list(&format!("{RBAC}/rolebindings"), vec![]),
        Step::apply(&format!("{RBAC}/rolebindings/smollm2-sidecar")),
        Step::list(&format!("{NS}/configmaps"), vec![]),
        Step::apply(&format!("{NS}/configmaps/smollm2-sidecar-config")),
        Step::list(&format!("{NS}/services"), vec![]),
        Step::apply(&format!("{NS}/services/smollm2")),
        Step::apply(&format!("{NS}/services/smollm2-default")),
        Step::create(&format!("{NS}/secrets")),
        Step::apply(&format!("{APPS}/deployments/smollm2-default")),
        Step::list(HPA, vec![]),
        Step::apply_status(&model()),
        Step::event("ns"),
        Step::event("ns"),
    ]
}

fn secret_step() -> Step {
    Step::get(&format!("{NS}/secrets/sluice-api-keys"), Some(secret()))
}

/// The limits and desired objects for the example model under `policies`, `ready` pods.
fn desired(policies: &[RateLimitPolicy], ready: i32) -> (policy::ModelLimits, Desired) {
    let mut secrets = KeysSecrets::default();
    secrets.insert("sluice-api-keys", ["keys.yaml".to_owned()]);
    let m = model();
    let r = policy::resolve(
        std::slice::from_ref(&m),
        policies,
        &secrets,
        &BTreeMap::new(),
    );
    let limits = r.models["smollm2"].clone();
    let ready: ReadyCounts = [("default", ready)].into_iter().collect();
    let d = desired_with(&m, &limits, &ready).expect("renders");
    (limits, d)
}

fn live<T: serde::Serialize>(obj: &T) -> Value {
    let mut v = serde_json::to_value(obj).expect("encodes");
    v["metadata"]["uid"] = json!("child-uid");
    v["metadata"]["resourceVersion"] = json!("5");
    v
}

fn sidecar_yaml(seen: &[Recorded]) -> SidecarConfig {
    let cm = seen
        .iter()
        .find(|r| r.path.ends_with("/configmaps/smollm2-sidecar-config"))
        .expect("ConfigMap applied");
    SidecarConfig::from_yaml(cm.body["data"]["sidecar.yaml"].as_str().expect("document"))
        .expect("the sidecar accepts it")
}

#[tokio::test]
async fn policy_rules_reach_the_config_map_and_the_keys_secret_the_pods() {
    let (ctx, server) = Context::test();
    let mut steps = vec![
        Step::list(&format!("{APPS}/deployments"), vec![]),
        Step::list(&format!("{NS}/pods"), vec![]),
        Step::models("ns", vec![]),
        policies_step(&[paid(), free()]),
        // One read for the Secret both tiers name.
        secret_step(),
    ];
    steps.extend(first_apply());
    let verifier = server.run(steps);
    reconcile(Arc::new(model()), ctx).await.expect("reconciles");
    let seen = verifier.await.expect("verifier");

    let config = sidecar_yaml(&seen);
    let names: Vec<&str> = config.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "free-tier/free-per-key",
            "free-tier/free-sheddable",
            "free-tier/free-tier-total",
            "paid-tier/paid-per-tenant",
            "paid-tier/paid-tokens-trial",
        ]
    );
    assert_eq!(
        config.identity.keys_file.as_deref(),
        Some("/etc/sluice/keys/free-tier/keys.yaml")
    );
    let pod = &seen[17].body["spec"]["template"]["spec"];
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == "api-keys")
        .expect("keys volume");
    assert_eq!(volume["secret"]["secretName"], "sluice-api-keys");
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["name"] == "api-keys")
        .expect("keys mount");
    assert_eq!(mount["mountPath"], "/etc/sluice/keys/free-tier");
    assert_eq!(mount["readOnly"], true);
}

/// Lists answered with everything already applied as `d` says.
fn steady(d: &Desired, policies: &[RateLimitPolicy], with_secret: bool) -> Vec<Step> {
    let mut steps = vec![
        Step::list(
            &format!("{APPS}/deployments"),
            d.deployments.iter().map(live).collect(),
        ),
        Step::list(&format!("{NS}/pods"), vec![]),
        Step::models("ns", vec![]),
        policies_step(policies),
    ];
    if with_secret {
        steps.push(secret_step());
    }
    steps.extend([
        Step::list(
            &format!("{NS}/serviceaccounts"),
            vec![live(&d.service_account)],
        ),
        Step::list(&format!("{RBAC}/roles"), vec![live(&d.role)]),
        Step::list(&format!("{RBAC}/rolebindings"), vec![live(&d.role_binding)]),
        Step::list(&format!("{NS}/configmaps"), vec![live(&d.config_map)]),
        Step::list(
            &format!("{NS}/services"),
            d.services.iter().map(live).collect(),
        ),
        Step::forwarding_secret_exists("ns"),
        Step::list(HPA, vec![]),
    ]);
    steps
}

/// A policy like the paid tier but with no identity of its own (so removing it cannot change
/// the key mount).
fn plain_paid() -> RateLimitPolicy {
    let mut p = paid();
    p.spec.identity = None;
    p
}

#[tokio::test]
async fn deleting_a_policy_rewrites_only_the_config_map() {
    let (ctx, server) = Context::test();
    let (_, before) = desired(&[free(), plain_paid()], 0);
    let (_, after) = desired(&[free()], 0);
    let mut model = model();
    model.status = Some(crate::status::compute(
        &model,
        "ns",
        &Observed {
            deployments: serde_json::from_value(json!(
                before.deployments.iter().map(live).collect::<Vec<_>>()
            ))
            .expect("deployments"),
            pods: vec![],
            ..Default::default()
        },
        &weights_for(&model, &ReadyCounts::none()),
        test_now(),
    ));
    // The paid tier is gone from the list (deleted); the same objects are live.
    let mut steps = steady(&before, &[free()], true);
    steps.insert(
        9,
        Step::apply(&format!("{NS}/configmaps/smollm2-sidecar-config")),
    );
    let verifier = server.run(steps);
    reconcile(Arc::new(model), ctx).await.expect("reconciles");
    let seen = verifier.await.expect("verifier");

    let config = sidecar_yaml(&seen);
    assert!(
        config
            .rules
            .iter()
            .all(|r| r.name.starts_with("free-tier/"))
    );
    assert_eq!(config.generation, after.sidecar_config.generation);
    assert!(
        !seen.iter().any(|r| r.path.contains("/deployments/")),
        "a limits change must not touch the pod template"
    );
    assert_eq!(
        serde_json::to_value(&before.deployments).expect("encodes"),
        serde_json::to_value(&after.deployments).expect("encodes")
    );
}

/// Sidecars answering `/metrics` with the generation each enforces (by admin URL).
struct FakeSidecars(BTreeMap<String, u64>);

impl MetricsSource for FakeSidecars {
    fn scrape<'a>(
        &'a self,
        pod: &'a PodEndpoint,
    ) -> BoxFuture<'a, Result<Vec<Sample>, ScrapeError>> {
        Box::pin(async move {
            let g = self
                .0
                .get(&pod.admin_url)
                .ok_or_else(|| ScrapeError::Http("connection refused".into()))?;
            scrape::parse_prometheus_text(&format!(
                "# TYPE sluice_config_generation gauge\nsluice_config_generation {g}\n# EOF\n"
            ))
        })
    }
}

fn pod(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("smollm2-default-{i}"), "namespace": "ns",
                     "labels": {"sluice.dev/model": "smollm2"}},
        "status": {"phase": "Running", "podIP": format!("10.0.0.{i}")},
    })
}

fn policy_ctx(generations: &[u64]) -> (Arc<PolicyContext>, crate::fixtures::ApiServerVerifier) {
    let (ctx, server) = Context::test();
    let source = FakeSidecars(
        generations
            .iter()
            .enumerate()
            .map(|(i, g)| (format!("http://10.0.0.{i}:9090"), *g))
            .collect(),
    );
    let pctx = PolicyContext::new(ctx.client.clone(), ctx.recorder.clone(), Arc::new(source))
        .with_clock(test_now);
    (Arc::new(pctx), server)
}

/// The reads of a policy status reconcile for the example model, with `config` live.
fn status_reads(policies: &[RateLimitPolicy], config: &Desired) -> Vec<Step> {
    vec![
        Step::get(
            &format!("{SLUICE}/inferencemodels"),
            list(
                "InferenceModelList",
                vec![serde_json::to_value(model()).expect("encodes")],
            ),
        ),
        policies_step(policies),
        secret_step(),
        Step::get(
            &format!("{NS}/configmaps/smollm2-sidecar-config"),
            Some(live(&config.config_map)),
        ),
    ]
}

/// The status patch of `policy`, answered with the policy.
fn status_patch(policy: &RateLimitPolicy) -> Step {
    Step::apply_replying(
        &format!(
            "{SLUICE}/ratelimitpolicies/{}/status",
            policy.metadata.name.as_deref().unwrap_or_default()
        ),
        serde_json::to_value(policy).expect("encodes"),
    )
}

fn conditions(status: &Value) -> BTreeMap<String, (String, String)> {
    status["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap_or_default().to_owned(),
                (
                    c["status"].as_str().unwrap_or_default().to_owned(),
                    c["reason"].as_str().unwrap_or_default().to_owned(),
                ),
            )
        })
        .collect()
}

#[tokio::test]
async fn status_counts_pods_until_all_enforce_the_policy() {
    let policies = [free(), paid()];
    let (_, d) = desired(&policies, 3);
    let g = d.sidecar_config.generation;

    // Two of three pods enforce the new generation.
    let (ctx, server) = policy_ctx(&[g, g, 17]);
    let mut steps = status_reads(&policies, &d);
    steps.push(Step::list(
        &format!("{NS}/pods"),
        vec![pod(0), pod(1), pod(2)],
    ));
    steps.push(status_patch(&free()));
    steps.push(Step::event("ns"));
    let verifier = server.run(steps);
    let action = reconcile_policy(Arc::new(free()), ctx)
        .await
        .expect("reconciles");
    let seen = verifier.await.expect("verifier");
    assert_eq!(action, Action::requeue(Duration::from_secs(2)));
    let status = &seen[5].body["status"];
    assert_eq!(status["converged"], "2/3");
    assert_eq!(status["target"], "smollm2");
    assert_eq!(status["rules"], 3);
    assert_eq!(
        status["targets"],
        json!([{"model": "smollm2", "desiredGeneration": g, "podsApplied": 2, "podsTotal": 3}])
    );
    let c = conditions(status);
    assert_eq!(c["Accepted"], ("True".into(), "Accepted".into()));
    assert_eq!(c["Converged"], ("False".into(), "Progressing".into()));
    assert_eq!(seen[6].body["reason"], "Accepted");

    // All three: 3/3, Converged=True and one Event for it.
    let mut before = free();
    before.status = Some(serde_json::from_value(status.clone()).expect("status"));
    let (ctx, server) = policy_ctx(&[g, g, g]);
    let mut steps = status_reads(&[before.clone(), paid()], &d);
    steps.push(Step::list(
        &format!("{NS}/pods"),
        vec![pod(0), pod(1), pod(2)],
    ));
    steps.push(status_patch(&free()));
    steps.push(Step::event("ns"));
    let verifier = server.run(steps);
    let action = reconcile_policy(Arc::new(before), ctx)
        .await
        .expect("reconciles");
    let seen = verifier.await.expect("verifier");
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    assert_eq!(seen[5].body["status"]["converged"], "3/3");
    let c = conditions(&seen[5].body["status"]);
    assert_eq!(c["Converged"], ("True".into(), "Converged".into()));
    assert_eq!(
        (&seen[6].body["type"], &seen[6].body["reason"]),
        (&json!("Normal"), &json!("Converged"))
    );
}

#[tokio::test]
async fn status_is_pending_until_the_config_map_carries_the_rules() {
    let policies = [free(), paid()];
    // The live ConfigMap predates the paid tier.
    let (_, old) = desired(&[free()], 1);
    let (ctx, server) = policy_ctx(&[old.sidecar_config.generation]);
    let mut steps = status_reads(&policies, &old);
    steps.push(Step::list(&format!("{NS}/pods"), vec![pod(0)]));
    steps.push(status_patch(&paid()));
    steps.push(Step::event("ns"));
    let verifier = server.run(steps);
    reconcile_policy(Arc::new(paid()), ctx)
        .await
        .expect("reconciles");
    let seen = verifier.await.expect("verifier");
    let status = &seen[5].body["status"];
    assert_eq!(status["converged"], "0/1");
    assert_eq!(
        conditions(status)["Converged"],
        ("False".into(), "Pending".into())
    );
}

#[tokio::test]
async fn a_newer_policy_with_another_identity_is_a_conflict() {
    let mut rival = paid();
    rival.metadata.name = Some("rival".into());
    let identity = rival.spec.identity.as_mut().expect("identity");
    identity.source = sluice_crds::rate_limit_policy::IdentitySource::Header;
    identity.header = Some("x-api-key".into());
    let policies = [free(), rival.clone()];
    let rival_policy = rival.clone();
    let (_, d) = desired(&policies, 1);

    let (ctx, server) = policy_ctx(&[]);
    let mut steps = status_reads(&policies, &d);
    // Not applied anywhere: no pods to read.
    steps.push(status_patch(&rival_policy));
    steps.push(Step::event("ns"));
    let verifier = server.run(steps);
    let action = reconcile_policy(Arc::new(rival), ctx)
        .await
        .expect("reconciles");
    let seen = verifier.await.expect("verifier");
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let status = &seen[4].body["status"];
    let c = conditions(status);
    assert_eq!(c["Accepted"], ("False".into(), "Conflict".into()));
    assert_eq!(c["Converged"], ("False".into(), "NotApplied".into()));
    let message = status["conditions"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(message.contains("free-tier"), "{message}");
    assert_eq!(
        (&seen[5].body["type"], &seen[5].body["reason"]),
        (&json!("Warning"), &json!("Conflict"))
    );
    // And the rival's rules are not in the model's config.
    assert!(
        d.sidecar_config
            .rules
            .iter()
            .all(|r| !r.name.starts_with("rival/"))
    );
}

#[tokio::test]
async fn a_missing_keys_secret_is_reported_and_changes_nothing() {
    let (ctx, server) = policy_ctx(&[]);
    let policies = [free()];
    let (_, d) = desired(&[], 1);
    let mut steps = status_reads(&policies, &d);
    steps[2] = Step::get(&format!("{NS}/secrets/sluice-api-keys"), None);
    steps.push(status_patch(&free()));
    steps.push(Step::event("ns"));
    let verifier = server.run(steps);
    reconcile_policy(Arc::new(free()), ctx)
        .await
        .expect("reconciles");
    let seen = verifier.await.expect("verifier");
    let c = conditions(&seen[4].body["status"]);
    assert_eq!(c["Accepted"], ("False".into(), "KeysSecretNotFound".into()));
    assert_eq!(seen[5].body["type"], "Warning");
}

#[tokio::test]
async fn an_unreadable_keys_secret_is_not_checked_and_the_policy_applies() {
    // No `get` granted on the Secret (not in the chart's apiKeySecrets): the API server says
    // 403. The policy is accepted; the pods' mount of the Secret is the check.
    let policies = [free(), paid()];
    let (_, d) = desired(&policies, 1);
    let (ctx, server) = policy_ctx(&[d.sidecar_config.generation]);
    let mut steps = status_reads(&policies, &d);
    steps[2] = secret_step().fails_with(403);
    steps.push(Step::list(&format!("{NS}/pods"), vec![pod(0)]));
    steps.push(status_patch(&free()));
    steps.push(Step::event("ns"));
    let verifier = server.run(steps);
    reconcile_policy(Arc::new(free()), ctx)
        .await
        .expect("reconciles");
    let seen = verifier.await.expect("verifier");
    let c = conditions(&seen[5].body["status"]);
    assert_eq!(c["Accepted"], ("True".into(), "Accepted".into()));
    assert_eq!(c["Converged"], ("True".into(), "Converged".into()));
}

#[tokio::test]
async fn an_unreadable_keys_secret_is_still_mounted_and_named_in_the_config() {
    let (ctx, server) = Context::test();
    let mut steps = vec![
        Step::list(&format!("{APPS}/deployments"), vec![]),
        Step::list(&format!("{NS}/pods"), vec![]),
        Step::models("ns", vec![]),
        policies_step(&[paid(), free()]),
        secret_step().fails_with(403),
    ];
    // Then what a first reconcile applies, as with a readable Secret.
    steps.extend(first_apply());
    let verifier = server.run(steps);
    reconcile(Arc::new(model()), ctx).await.expect("reconciles");
    let seen = verifier.await.expect("verifier");
    let config = sidecar_yaml(&seen);
    assert_eq!(config.rules.len(), 5, "both tiers apply");
    assert_eq!(
        config.identity.keys_file.as_deref(),
        Some("/etc/sluice/keys/free-tier/keys.yaml")
    );
    let pod = &seen[17].body["spec"]["template"]["spec"];
    assert!(
        pod["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .any(|v| v["secret"]["secretName"] == "sluice-api-keys"),
        "{pod}"
    );
}

#[tokio::test]
async fn any_other_error_reading_a_keys_secret_fails_the_reconcile() {
    let (ctx, server) = Context::test();
    let verifier = server.run(vec![
        Step::list(&format!("{APPS}/deployments"), vec![]),
        Step::list(&format!("{NS}/pods"), vec![]),
        Step::models("ns", vec![]),
        policies_step(&[free()]),
        secret_step().fails_with(500),
    ]);
    reconcile(Arc::new(model()), ctx)
        .await
        .expect_err("an API error is not a missing Secret");
    verifier.await.expect("verifier");
}

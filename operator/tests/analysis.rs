//! Canary analysis end to end without a cluster: a fake metrics source plays the sidecars'
//! `/metrics`, and the sidecar config, weights and conditions a user sees are checked.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use sluice_crds::InferenceModel;
use sluice_operator::desired::sidecar_config::desired_sidecar_config;
use sluice_operator::desired::weights::for_plan;
use sluice_operator::observe::{Observed, ReadyCounts};
use sluice_operator::policy::ModelLimits;
use sluice_operator::rollout::{self, History, REASON_ROLLED_BACK, route_plan};
use sluice_operator::scrape::{
    MetricsSource, PodEndpoint, Sample, ScrapeError, parse_prometheus_text, scrape_variants,
};
use sluice_operator::status::{self, DEGRADED};

const MODEL: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: InferenceModel
metadata: {name: chat, namespace: ns, uid: u1, generation: 1}
spec:
  variants:
    - {name: stable, weight: 90, model: {url: "https://example.com/a.gguf"}}
    - {name: canary, weight: 10, model: {url: "https://example.com/b.gguf"}}
  rollout:
    analysis: {interval: 30s, window: 5m, maxErrorRate: 0.05, maxTtftP95: 2s, minRequests: 20}
"#;

/// Plays each pod's `/metrics`: what `prometheus_client` writes for the sidecar's counters.
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
            let (ok, err) = found.ok_or_else(|| ScrapeError::Http("connection refused".into()))?;
            let n = ok + err;
            parse_prometheus_text(&format!(
                "# TYPE sluice_requests counter\n\
                 sluice_requests_total{{route=\"/v1/chat/completions\",status=\"200\"}} {ok}\n\
                 sluice_requests_total{{route=\"/v1/chat/completions\",status=\"503\"}} {err}\n\
                 # TYPE sluice_time_to_first_token_seconds histogram\n\
                 sluice_time_to_first_token_seconds_bucket{{le=\"0.16\"}} {n}\n\
                 sluice_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {n}\n\
                 sluice_time_to_first_token_seconds_sum 1.0\n\
                 sluice_time_to_first_token_seconds_count {n}\n\
                 sluice_config_generation 7\n# EOF\n"
            ))
        })
    }
}

fn pod(name: &str, variant: &str, ip: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"sluice.dev/model": "chat", "sluice.dev/variant": variant}},
        "status": {"phase": "Running", "podIP": ip},
    }))
    .expect("pod")
}

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + s).expect("valid")
}

fn routed(model: &InferenceModel) -> Vec<(String, u32)> {
    let ready: ReadyCounts = [("stable", 1), ("canary", 1)].into_iter().collect();
    let weights = for_plan(&route_plan(model), &ready);
    desired_sidecar_config(model, "ns", &ModelLimits::default(), &weights, &ready, &[])
        .expect("config")
        .variants
        .into_iter()
        .map(|v| (v.name, v.weight))
        .collect()
}

fn degraded(model: &InferenceModel) -> (String, String, String) {
    let ready: ReadyCounts = [("stable", 1), ("canary", 1)].into_iter().collect();
    let w = for_plan(&route_plan(model), &ready);
    let s = status::compute(model, "ns", &Observed::default(), &w, at(0));
    let d = s
        .conditions
        .iter()
        .find(|c| c.type_ == DEGRADED)
        .expect("Degraded")
        .clone();
    (d.status, d.reason, s.weights.unwrap_or_default())
}

/// One reconcile's worth of analysis; the returned model carries the new `status.rollout`, as
/// the controller persists it.
async fn reconcile(
    sidecars: &FakeSidecars,
    history: &History,
    model: &InferenceModel,
    now: Timestamp,
) -> InferenceModel {
    let pods = [
        pod("chat-stable-0", "stable", "10.0.0.1"),
        pod("chat-stable-1", "stable", "10.0.0.2"),
        pod("chat-canary-0", "canary", "10.0.0.3"),
    ];
    let scraped = scrape_variants(sidecars, ["stable", "canary"], &pods).await;
    rollout::analyze(history, model, &scraped, now).0
}

#[tokio::test]
async fn a_breaching_canary_is_rolled_back_in_the_config_and_status_only() {
    let sidecars = FakeSidecars::default();
    let history = History::default();
    let model: InferenceModel = serde_yaml::from_str(MODEL).expect("model");
    let spec = model.spec.clone();
    for p in ["chat-stable-0", "chat-stable-1", "chat-canary-0"] {
        sidecars.set(p, 1000, 0);
    }
    let model = reconcile(&sidecars, &history, &model, at(0)).await;
    assert_eq!(
        routed(&model),
        [("stable".into(), 90), ("canary".into(), 10)]
    );

    // 30s later the canary answered 35 more, 5 of them 503; stable is fine.
    sidecars.set("chat-stable-0", 1300, 0);
    sidecars.set("chat-stable-1", 1300, 1);
    sidecars.set("chat-canary-0", 1035, 5);
    let model = reconcile(&sidecars, &history, &model, at(30)).await;
    assert_eq!(
        routed(&model),
        [("stable".into(), 100), ("canary".into(), 0)]
    );
    let (status, reason, weights) = degraded(&model);
    assert_eq!(
        (status.as_str(), reason.as_str()),
        ("True", REASON_ROLLED_BACK)
    );
    assert_eq!(weights, "stable=90/100,canary=10/0");
    let rollout = model
        .status
        .as_ref()
        .and_then(|s| s.rollout.clone())
        .expect("state");
    assert_eq!(
        rollout.rolled_back[0].reason,
        "error rate 12.5% > 5.0% over 40 requests in 5m"
    );
    assert_eq!(model.spec, spec, "spec is never touched");

    // The canary gets no traffic any more: it stays rolled back.
    let model = reconcile(&sidecars, &history, &model, at(60)).await;
    assert_eq!(
        routed(&model),
        [("stable".into(), 100), ("canary".into(), 0)]
    );

    // The user ships a fix: a new generation analyses it afresh, from its traffic after the edit.
    let mut edited = model.clone();
    edited.metadata.generation = Some(2);
    let model = reconcile(&sidecars, &history, &edited, at(90)).await;
    assert_eq!(
        routed(&model),
        [("stable".into(), 90), ("canary".into(), 10)]
    );
    let (status, _, weights) = degraded(&model);
    assert_eq!(status, "False");
    assert_eq!(weights, "stable=90/90,canary=10/10");
    sidecars.set("chat-canary-0", 1075, 5);
    let model = reconcile(&sidecars, &history, &model, at(120)).await;
    assert_eq!(
        routed(&model),
        [("stable".into(), 90), ("canary".into(), 10)]
    );
}

#[tokio::test]
async fn a_healthy_canary_keeps_its_weight_and_unscrapable_pods_do_not_count() {
    let sidecars = FakeSidecars::default();
    let history = History::default();
    let model: InferenceModel = serde_yaml::from_str(MODEL).expect("model");
    sidecars.set("chat-stable-0", 0, 0);
    sidecars.set("chat-canary-0", 0, 0);
    let model = reconcile(&sidecars, &history, &model, at(0)).await;
    sidecars.set("chat-stable-0", 500, 2);
    sidecars.set("chat-canary-0", 60, 1);
    let model = reconcile(&sidecars, &history, &model, at(30)).await;
    assert_eq!(
        routed(&model),
        [("stable".into(), 90), ("canary".into(), 10)]
    );
    assert_eq!(degraded(&model).0, "False");
}

#[test]
fn without_rollout_nothing_is_changed() {
    let history = History::default();
    let mut model: InferenceModel = serde_yaml::from_str(MODEL).expect("model");
    model.spec.rollout = None;
    let (planned, decision) = rollout::analyze(&history, &model, &[], at(0));
    assert_eq!(decision.rollout, None);
    assert_eq!(planned, model);
}

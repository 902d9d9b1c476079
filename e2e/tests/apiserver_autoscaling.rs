//! The operator's HorizontalPodAutoscalers get their metrics, against a real API server and the
//! real HPA controller (scripts/cluster.sh): the chart's operator and a model's sidecar on the
//! demo model run by the stand-in kubelet; the custom metrics API is served through the
//! aggregation layer by the stand-in prometheus-adapter (`sluice_e2e::metrics_adapter`), driven
//! by the chart's own `prometheus-adapter-rules.yaml`. Every metric the HPA asks for must be
//! read without error (a name the rules do not serve would show as a failure in the HPA's
//! status: the check that the rules and the operator's metric names agree), idle at 0; then,
//! under more concurrent streams than the engine has slots, the HPA's observed in-flight
//! requests and queue depth, read from the HPA's status through the API, go above 0 and it
//! scales the Deployment up.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sluice_crds::contract::{
    COMPLETION_TOKENS_PER_SECOND_SERIES, QUEUE_DEPTH_SERIES, REQUESTS_IN_FLIGHT_SERIES,
};
use sluice_e2e::metrics_adapter::{API_SERVICE, MetricsAdapter};
use sluice_e2e::{Cluster, http, objects, wait};
use sluice_operator::names::{API_PORT, LABEL_MODEL, variant_object_name};

const MODEL: &str = "chat";
const VARIANT: &str = "main";
/// The engine's slots: more streams than this at once queue in front of the engine.
const SLOTS: u32 = 2;
/// Concurrent streams the load keeps going: `SLOTS` run, the next ones queue (up to the
/// sidecar's shedding mark, twice the slots by default; those beyond it are refused and retry).
const STREAMS: usize = 6;
const MINUTE: Duration = Duration::from_secs(60);

/// What the HPA controller last wrote to the HPA's status.
#[derive(Debug)]
struct Observed {
    /// Each Pods metric's `current.averageValue`, by metric name.
    metrics: BTreeMap<String, String>,
    /// The Pods metrics the HPA's spec asks for.
    wanted: Vec<String>,
    /// `ScalingActive`: status, reason, message.
    scaling_active: Option<(String, String, String)>,
    desired_replicas: i32,
}

impl Observed {
    /// Every metric read (an averageValue for each), and `ScalingActive` True; else an error
    /// saying what the HPA reports instead.
    fn complete(&self) -> anyhow::Result<bool> {
        if let Some((status, reason, message)) = &self.scaling_active
            && status != "True"
        {
            bail!("ScalingActive {status} ({reason}): {message}");
        }
        Ok(self.scaling_active.is_some()
            && self.wanted.iter().all(|m| self.metrics.contains_key(m)))
    }

    /// A metric's value (a Kubernetes quantity, e.g. `2` or `1500m`) as a number.
    fn value(&self, metric: &str) -> Option<f64> {
        let text = self.metrics.get(metric)?;
        match text.strip_suffix('m') {
            Some(milli) => milli.parse::<f64>().ok().map(|v| v / 1000.0),
            None => text.parse().ok(),
        }
    }
}

async fn observe(hpas: &Api<HorizontalPodAutoscaler>, name: &str) -> anyhow::Result<Observed> {
    let hpa = hpas.get(name).await?;
    let wanted = hpa
        .spec
        .and_then(|s| s.metrics)
        .into_iter()
        .flatten()
        .filter_map(|m| Some(m.pods?.metric.name))
        .collect();
    let status = hpa.status.unwrap_or_default();
    let metrics = status
        .current_metrics
        .into_iter()
        .flatten()
        .filter_map(|m| {
            let pods = m.pods?;
            Some((pods.metric.name, pods.current.average_value?.0))
        })
        .collect();
    let scaling_active = status
        .conditions
        .into_iter()
        .flatten()
        .find(|c| c.type_ == "ScalingActive")
        .map(|c| {
            (
                c.status,
                c.reason.unwrap_or_default(),
                c.message.unwrap_or_default(),
            )
        });
    Ok(Observed {
        metrics,
        wanted,
        scaling_active,
        desired_replicas: status.desired_replicas,
    })
}

/// One long streaming chat completion after another at `ip` until aborted (each ends at its
/// `max_tokens`, the model's end of text, or the harness client's 60 s limit). One the sidecar
/// refuses (it sheds load beyond a mark with 503) is sent again after a pause, not in a hot
/// loop.
async fn keep_streaming(ip: Ipv4Addr, stream: usize) {
    for n in 0.. {
        let body = json!({
            "model": MODEL,
            "messages": [{
                "role": "user",
                "content": format!("Stream {stream}, request {n}: count from 1 to 2000, one number a line."),
            }],
            "max_tokens": 1024,
            "stream": true,
        });
        let response = http::request(
            ip,
            API_PORT as u16,
            "POST",
            "/v1/chat/completions",
            &[],
            Some(&body),
        )
        .await;
        if !matches!(response, Ok(r) if r.status == 200) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

#[tokio::test]
async fn load_raises_the_hpa_metrics_the_charts_adapter_rules_serve() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let adapter = MetricsAdapter::start(cluster.control_plane, cluster.admin.clone()).await?;
    let result = scenario(&cluster, &adapter).await;
    if result.is_err() {
        let Cluster {
            admin,
            kubelet,
            models,
            control_plane,
            ..
        } = &cluster;
        kubelet.print_logs(12);
        let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(admin.clone(), models);
        if let Ok(list) = hpas.list(&ListParams::default()).await {
            for hpa in list {
                eprintln!("--- HPA {}: {:?}", hpa.name_any(), hpa.status);
            }
        }
        let api_services: Api<APIService> = Api::all(admin.clone());
        if let Ok(s) = api_services.get(API_SERVICE).await {
            eprintln!("--- APIService {API_SERVICE}: {:?}", s.status);
        }
        let log = control_plane.dir().join("kube-controller-manager.log");
        let log = std::fs::read_to_string(log).unwrap_or_default();
        eprintln!("--- kube-controller-manager.log, its last HPA lines, newest first:");
        log.lines()
            .filter(|l| l.contains("horizontal") || l.contains("HPA") || l.contains("metric"))
            .rev()
            .take(20)
            .for_each(|l| eprintln!("{l}"));
    }
    result
}

async fn scenario(c: &Cluster, adapter: &MetricsAdapter) -> anyhow::Result<()> {
    let (admin, kubelet) = (&c.admin, &c.kubelet);
    let (system, models) = (c.system.as_str(), c.models.as_str());
    eprintln!(
        "metrics adapter at {} serving {:?}",
        adapter.address(),
        adapter.rules()
    );
    // Registered before the model exists, so the HPA never reads a missing API.
    adapter.register(admin, system).await?;
    c.install_operator()?;
    let model = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": MODEL},
        "spec": {
            "servedName": MODEL,
            "resources": {"cpu": "1", "memory": "1Gi"},
            "variants": [{
                "name": VARIANT,
                "weight": 100,
                "model": {"url": "https://example.invalid/chat.gguf"},
                "engine": {"maxConcurrentSequences": SLOTS},
            }],
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 2,
                "metrics": [
                    {"type": "InFlightRequests", "target": 1},
                    {"type": "QueueDepth", "target": 1},
                    {"type": "TokensPerSecond", "target": 1000},
                ],
            },
        },
    });
    objects::apply(admin, models, &model, "kubectl", false).await?;
    let name = variant_object_name(MODEL, VARIANT);
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(admin.clone(), models);

    // Idle: every metric read through the API, each pod at 0 in flight and 0 queued.
    let idle = wait::until("the HPA reading every metric", 5 * MINUTE, || async {
        let observed = observe(&hpas, &name).await?;
        Ok(observed.complete()?.then_some(observed))
    })
    .await?;
    eprintln!("idle: the HPA observes {:?}", idle.metrics);
    for metric in [
        REQUESTS_IN_FLIGHT_SERIES,
        QUEUE_DEPTH_SERIES,
        COMPLETION_TOKENS_PER_SECOND_SERIES,
    ] {
        assert!(
            idle.wanted.iter().any(|m| m == metric),
            "the HPA does not ask for {metric}: {:?}",
            idle.wanted
        );
    }
    assert_eq!(idle.value(REQUESTS_IN_FLIGHT_SERIES), Some(0.0), "{idle:?}");
    assert_eq!(idle.value(QUEUE_DEPTH_SERIES), Some(0.0), "{idle:?}");

    // Load: more streams than slots, kept going, at the one pod.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), models);
    let pod = pods
        .list(&ListParams::default().labels(&format!("{LABEL_MODEL}={MODEL}")))
        .await?
        .items
        .into_iter()
        .next()
        .context("no pod")?
        .name_any();
    let ip = kubelet
        .pod_ip(models, &pod)
        .context("the pod is not running")?;
    let load: Vec<_> = (0..STREAMS)
        .map(|stream| tokio::spawn(keep_streaming(ip, stream)))
        .collect();
    let result = under_load(admin, models, &hpas, &name).await;
    load.iter().for_each(|task| task.abort());
    result
}

async fn under_load(
    admin: &Client,
    models: &str,
    hpas: &Api<HorizontalPodAutoscaler>,
    name: &str,
) -> anyhow::Result<()> {
    let busy = wait::until(
        "the HPA observing requests in flight and queued",
        5 * MINUTE,
        || async {
            let observed = observe(hpas, name).await?;
            let busy = observed.complete()?
                && observed.value(REQUESTS_IN_FLIGHT_SERIES) > Some(0.0)
                && observed.value(QUEUE_DEPTH_SERIES) > Some(0.0);
            Ok(busy.then_some(observed))
        },
    )
    .await?;
    eprintln!(
        "under load: the HPA observes {:?}, desires {} replicas",
        busy.metrics, busy.desired_replicas
    );
    let tokens = wait::until(
        "the HPA observing completion tokens per second",
        5 * MINUTE,
        || async {
            let observed = observe(hpas, name).await?;
            let busy = observed.complete()?
                && observed.value(COMPLETION_TOKENS_PER_SECOND_SERIES) > Some(0.0);
            Ok(busy.then_some(observed))
        },
    )
    .await?;
    eprintln!("under load: the HPA observes {:?}", tokens.metrics);

    // Above the targets (1 in flight, 1 queued per pod): scaled to maxReplicas, a second pod.
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), models);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), models);
    let scaled = wait::until(
        "the HPA scaling the Deployment to 2",
        5 * MINUTE,
        || async {
            let observed = observe(hpas, name).await?;
            let replicas = deployments.get(name).await?.spec.and_then(|s| s.replicas);
            let pods = pods
                .list(&ListParams::default().labels(&format!("{LABEL_MODEL}={MODEL}")))
                .await?
                .items
                .len();
            Ok(
                (observed.desired_replicas == 2 && replicas == Some(2) && pods == 2)
                    .then_some(observed),
            )
        },
    )
    .await?;
    eprintln!(
        "scaled: desiredReplicas {}, the HPA observes {:?}",
        scaled.desired_replicas, scaled.metrics
    );
    Ok(())
}

//! A canary rolled back for real, against a real API server (scripts/cluster.sh): the chart's
//! operator and two variants' sidecars on the demo model run by the stand-in kubelet; traffic
//! goes through the stable pod, which forwards the canary's share to the canary's Service; the
//! harness then kills the canary's sidecar mid-window while its pod still looks Ready. The
//! operator must see it in the sidecars' real `/metrics` (the stable pod's failed forwards),
//! roll the canary back (status `CanaryRolledBack`, an Event), report the stable pod's open
//! breaker for the canary (`status.variants[].breakerOpenPods`), and the stable pod must stop
//! sending it traffic.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sluice_crds::InferenceModel;
use sluice_crds::contract::{CONFIG_GENERATION_SERIES, REQUESTS_TOTAL_SERIES};
use sluice_crds::sidecar_config::{SIDECAR_CONFIG_KEY, SidecarConfig};
use sluice_e2e::Cluster;
use sluice_e2e::{http, objects, wait};
use sluice_operator::names::{ADMIN_PORT, API_PORT, LABEL_MODEL, LABEL_VARIANT, config_map_name};
use sluice_operator::rollout::plan::REASON_ROLLED_BACK;

const MODEL: &str = "chat";
const MINUTE: Duration = Duration::from_secs(60);

async fn pod_of(client: &Client, ns: &str, variant: &str) -> anyhow::Result<String> {
    let selector = format!("{LABEL_MODEL}={MODEL},{LABEL_VARIANT}={variant}");
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&selector))
        .await?;
    Ok(pods.items.first().context("no pod")?.name_any())
}

/// One short chat completion through `ip`; its status.
async fn chat(ip: Ipv4Addr) -> anyhow::Result<u16> {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 2,
    });
    let response = http::request(
        ip,
        API_PORT as u16,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(&body),
    )
    .await?;
    Ok(response.status)
}

/// Requests the stable pod's sidecar counted as served by the canary (itself or forwarded).
async fn canary_requests(ip: Ipv4Addr) -> anyhow::Result<f64> {
    let text = http::request(ip, ADMIN_PORT as u16, "GET", "/metrics", &[], None)
        .await?
        .body;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(REQUESTS_TOTAL_SERIES) && l.contains("variant=\"canary\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum())
}

#[tokio::test]
async fn a_canary_whose_sidecar_dies_is_rolled_back_from_real_metrics_and_gets_no_more_traffic()
-> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let result = scenario(&cluster).await;
    if result.is_err() {
        let Cluster {
            admin,
            kubelet,
            models,
            ..
        } = &cluster;
        kubelet.print_logs(12);
        for (ns, pod) in kubelet.pods() {
            if let Some(ip) = kubelet.pod_ip(&ns, &pod)
                && let Ok(r) =
                    http::request(ip, ADMIN_PORT as u16, "GET", "/metrics", &[], None).await
            {
                eprintln!("--- routing metrics of pod {ns}/{pod}:");
                for line in r.body.lines().filter(|l| {
                    l.starts_with("sluice_forward")
                        || l.starts_with("sluice_requests_total")
                        || l.starts_with("sluice_routed")
                }) {
                    eprintln!("{line}");
                }
            }
        }
        if let Ok(im) = Api::<InferenceModel>::namespaced(admin.clone(), models)
            .get(MODEL)
            .await
        {
            eprintln!("--- status: {:?}", im.status);
        }
    }
    result
}

async fn scenario(c: &Cluster) -> anyhow::Result<()> {
    let (admin, kubelet, models) = (&c.admin, &c.kubelet, c.models.as_str());
    c.install_operator()?;
    let model = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": MODEL},
        "spec": {
            "servedName": MODEL,
            "replicas": 1,
            "resources": {"cpu": "1", "memory": "1Gi"},
            "variants": [
                {"name": "stable", "weight": 50, "model": {"url": "https://example.invalid/stable.gguf"}},
                {"name": "canary", "weight": 50, "model": {"url": "https://example.invalid/canary.gguf"}},
            ],
            "rollout": {
                "autoRollback": true,
                "analysis": {"interval": "2s", "window": "1m", "maxErrorRate": 0.2, "minRequests": 4},
            },
            // Opened by the second failed forward, before the analysis can judge (it needs 4
            // requests), and held open long after the test: the status must show it.
            "routing": {"breaker": {"consecutiveFailures": 2, "openFor": "10m"}},
        },
    });
    objects::apply(admin, models, &model, "kubectl", false).await?;
    let ims: Api<InferenceModel> = Api::namespaced(admin.clone(), models);
    wait::until("the model Ready", 3 * MINUTE, || async {
        let im = ims.get(MODEL).await?;
        let ready = im.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        Ok(ready.then_some(()))
    })
    .await?;
    let stable = pod_of(admin, models, "stable").await?;
    let canary = pod_of(admin, models, "canary").await?;
    let stable_ip = kubelet
        .pod_ip(models, &stable)
        .context("stable pod not running")?;

    // Healthy: both variants answer through the stable pod.
    for _ in 0..6 {
        ensure!(
            chat(stable_ip).await? == 200,
            "a request failed before the fault"
        );
    }
    ensure!(
        canary_requests(stable_ip).await? > 0.0,
        "no request reached the canary"
    );

    // The fault: the canary's sidecar dies mid-window, before its kubelet reports it (a kubelet
    // slow or cut off from the API server): its Service still sends traffic there, and every
    // forward from the stable pod fails to connect (users still get answers: stable falls
    // back to itself). Only the stable pod's metrics can tell.
    kubelet.hold(models, &canary)?;
    kubelet.signal(models, &canary, "KILL")?;
    // The stable pod's breaker for the canary opens after a few failed forwards, and the
    // operator reports it in the canary's status (whichever comes first, that or the rollback).
    let breaker_seen = std::sync::atomic::AtomicBool::new(false);
    let breaker_open = |status: &sluice_crds::InferenceModelStatus| {
        status
            .variants
            .iter()
            .any(|v| v.name == "canary" && v.breaker_open_pods > 0)
    };
    let rolled_back = wait::until("the canary rolled back", 3 * MINUTE, || async {
        let _ = chat(stable_ip).await;
        let im = ims.get(MODEL).await?;
        let status = im.status.unwrap_or_default();
        if breaker_open(&status) {
            breaker_seen.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let back = status
            .rollout
            .as_ref()
            .is_some_and(|r| r.rolled_back.iter().any(|v| v.name == "canary"));
        let condition = status
            .conditions
            .iter()
            .any(|c| c.reason == REASON_ROLLED_BACK);
        Ok((back && condition).then_some(status))
    })
    .await?;
    if !breaker_seen.load(std::sync::atomic::Ordering::Relaxed) {
        wait::until(
            "the stable pod's open breaker in the canary's status",
            2 * MINUTE,
            || async {
                let status = ims.get(MODEL).await?.status.unwrap_or_default();
                Ok(breaker_open(&status).then_some(()))
            },
        )
        .await?;
    }
    let canary_weight = rolled_back
        .variants
        .iter()
        .find(|v| v.name == "canary")
        .map(|v| v.effective_weight);
    assert_eq!(
        canary_weight,
        Some(0),
        "the rolled-back canary keeps traffic"
    );
    let events: Api<Event> = Api::namespaced(admin.clone(), models);
    wait::until("a CanaryRolledBack Event", MINUTE, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .iter()
            .any(|e| e.reason.as_deref() == Some(REASON_ROLLED_BACK))
            .then_some(()))
    })
    .await?;

    // The stable pod runs the rolled-back config, then sends the canary nothing.
    let configs: Api<ConfigMap> = Api::namespaced(admin.clone(), models);
    let config = configs.get(&config_map_name(MODEL)).await?;
    let text = config
        .data
        .unwrap_or_default()
        .remove(SIDECAR_CONFIG_KEY)
        .unwrap_or_default();
    let config = SidecarConfig::from_yaml(&text)?;
    let weight = config
        .variants
        .iter()
        .find(|v| v.name == "canary")
        .map(|v| v.weight);
    assert_eq!(weight, Some(0), "the ConfigMap still routes to the canary");
    wait::until(
        "the stable pod on the rolled-back config",
        MINUTE,
        || async {
            let text = http::request(stable_ip, ADMIN_PORT as u16, "GET", "/metrics", &[], None)
                .await?
                .body;
            let generation = http::sample(&text, CONFIG_GENERATION_SERIES);
            Ok((generation == Some(config.generation as f64)).then_some(()))
        },
    )
    .await?;
    let before = canary_requests(stable_ip).await?;
    for _ in 0..8 {
        assert_eq!(
            chat(stable_ip).await?,
            200,
            "a request failed after the rollback"
        );
    }
    assert_eq!(
        canary_requests(stable_ip).await?,
        before,
        "traffic still reached the rolled-back canary"
    );
    Ok(())
}

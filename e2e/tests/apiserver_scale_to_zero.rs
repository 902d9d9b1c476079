//! Scale to zero for real, against a real API server (scripts/cluster.sh): the chart's operator
//! and the demo model with `autoscaling.minReplicas: 0`, run by the stand-in kubelet. Idle for
//! `idleAfter`, the model's Deployment goes to 0 replicas, its pod stops, the status says
//! `ScaledToZero` with the time of the last request, and the model's Service selects the
//! activator. Requests sent to the activator are held while it scales the Deployment up, and
//! each gets its answer from the pod that starts: the time from the request to its first
//! token from zero is printed (the weights are on the node already, as a warm node cache).
//! Then the model goes back to zero on its own. (That the Service selects the pods again
//! once one is ready is the desired state's unit test: with `idleAfter` this short, the window
//! is too narrow to catch here.)

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sluice_crds::InferenceModel;
use sluice_e2e::{Cluster, http, objects, wait};
use sluice_operator::names::{
    ADMIN_PORT, API_PORT, LABEL_ACTIVATOR, LABEL_MODEL, activator_name, variant_object_name,
};
use sluice_operator::status::REASON_SCALED_TO_ZERO;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MODEL: &str = "sleepy";
const MINUTE: Duration = Duration::from_secs(60);
/// Requests sent at once to the model at zero.
const HELD: usize = 3;

#[tokio::test]
async fn an_idle_model_scales_to_zero_and_held_requests_wake_it() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let result = scenario(&cluster).await;
    if result.is_err() {
        cluster.kubelet.print_logs(20);
        if let Ok(im) = Api::<InferenceModel>::namespaced(cluster.admin.clone(), &cluster.models)
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
            "resources": {"cpu": "1", "memory": "1Gi"},
            "autoscaling": {
                "minReplicas": 0,
                "maxReplicas": 1,
                "idleAfter": "4s",
                "activationTimeout": "90s",
                "metrics": [{"type": "QueueDepth", "target": 4}],
            },
            "variants": [
                {"name": "a", "weight": 100, "model": {"url": "https://example.invalid/a.gguf"}},
            ],
        },
    });
    objects::apply(admin, models, &model, "kubectl", false).await?;
    let ims: Api<InferenceModel> = Api::namespaced(admin.clone(), models);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), models);
    let services: Api<Service> = Api::namespaced(admin.clone(), models);
    let deployment = variant_object_name(MODEL, "a");

    // It starts with a pod, and goes to zero once idle.
    wait::until("the model's first pod ready", 3 * MINUTE, || async {
        Ok(c.ready_pod_ip(&format!("{LABEL_MODEL}={MODEL}"))
            .await?
            .is_some()
            .then_some(()))
    })
    .await?;
    let at_zero = wait::until("the model scaled to zero", 3 * MINUTE, || async {
        let im = ims.get(MODEL).await?;
        let replicas = deployments
            .get(&deployment)
            .await?
            .spec
            .and_then(|s| s.replicas);
        let status = im.status.unwrap_or_default();
        let reason = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True" && c.reason == REASON_SCALED_TO_ZERO);
        let pods = model_pods(admin, models).await?;
        Ok((status.scaled_to_zero && reason && replicas == Some(0) && pods == 0).then_some(status))
    })
    .await?;
    ensure!(
        at_zero.last_request_time.is_some(),
        "the status shows when the model last served"
    );
    let selector = services
        .get(MODEL)
        .await?
        .spec
        .and_then(|s| s.selector)
        .unwrap_or_default();
    ensure!(
        selector.get(LABEL_ACTIVATOR).map(String::as_str) == Some(MODEL),
        "at zero, the model's Service selects the activator: {selector:?}"
    );

    // Requests sent to the model at zero (its Service: the activator) are held, wake it, and
    // are answered by the pod that starts.
    let activator = activator_ip(admin, models, kubelet).await?;
    let started = Instant::now();
    let mut held = tokio::task::JoinSet::new();
    for i in 0..HELD {
        held.spawn(async move { (i, stream_chat(activator, i).await) });
    }
    let mut first_tokens = Vec::new();
    while let Some(joined) = held.join_next().await {
        let (i, answer) = joined?;
        let (status, first_token, text) = answer.with_context(|| format!("held request {i}"))?;
        ensure!(status == 200, "held request {i} answered {status}: {text}");
        ensure!(!text.is_empty(), "held request {i} got no text");
        first_tokens.push(first_token.context("no token streamed")?);
    }
    first_tokens.sort();
    println!(
        "scale to zero: {HELD} requests held at zero; request to first token {:.2?} (first) .. {:.2?} (last); all answered after {:.2?}",
        first_tokens[0],
        first_tokens[HELD - 1],
        started.elapsed()
    );
    let metrics = http::request(activator, ADMIN_PORT as u16, "GET", "/metrics", &[], None)
        .await?
        .body;
    let forwarded = http::sample(
        &metrics,
        "sluice_activator_requests_total{outcome=\"forwarded\"}",
    );
    ensure!(
        forwarded == Some(HELD as f64),
        "the activator counts {HELD} held requests forwarded: {forwarded:?}"
    );
    ensure!(
        http::sample(&metrics, "sluice_activator_requests_held") == Some(0.0),
        "nothing stays held"
    );

    // Idle again, the model goes back to zero (a later request time than before).
    wait::until("the model back at zero", 2 * MINUTE, || async {
        let status = ims.get(MODEL).await?.status.unwrap_or_default();
        let last = status.last_request_time.clone();
        Ok((status.scaled_to_zero
            && last > at_zero.last_request_time
            && model_pods(admin, models).await? == 0)
            .then_some(()))
    })
    .await?;
    ensure!(
        deployments
            .get(&activator_name(MODEL))
            .await?
            .status
            .and_then(|s| s.ready_replicas)
            == Some(1),
        "the activator stays"
    );
    Ok(())
}

/// Pods of the model (not the activator's) that exist.
async fn model_pods(client: &Client, ns: &str) -> anyhow::Result<usize> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("{LABEL_MODEL}={MODEL}")))
        .await?;
    Ok(pods.items.len())
}

/// The activator's pod, once ready.
async fn activator_ip(
    client: &Client,
    ns: &str,
    kubelet: &sluice_e2e::kubelet::Kubelet,
) -> anyhow::Result<Ipv4Addr> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    wait::until("the activator ready", MINUTE, || async {
        let list = pods
            .list(&ListParams::default().labels(&format!("{LABEL_ACTIVATOR}={MODEL}")))
            .await?;
        for pod in list {
            if let Some(ip) = kubelet.pod_ip(ns, &pod.name_any())
                && http::request(ip, ADMIN_PORT as u16, "GET", "/readyz", &[], None)
                    .await
                    .is_ok_and(|r| r.status == 200)
            {
                return Ok(Some(ip));
            }
        }
        Ok(None)
    })
    .await
}

/// A streamed chat completion through `ip`: its status, the time from sending it to its first
/// content delta, and the text.
async fn stream_chat(ip: Ipv4Addr, i: usize) -> anyhow::Result<(u16, Option<Duration>, String)> {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": format!("Say hello to person number {i}.")}],
        "max_tokens": 8,
        "stream": true,
    })
    .to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let sent = Instant::now();
    let mut stream = tokio::net::TcpStream::connect((ip, API_PORT as u16)).await?;
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    let mut raw = Vec::new();
    let mut first_token = None;
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if first_token.is_none() && String::from_utf8_lossy(&raw).contains("\"content\":\"") {
                first_token = Some(sent.elapsed());
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(2 * MINUTE, read)
        .await
        .context("the answer took over 2 minutes")??;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    let content: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    Ok((
        status,
        first_token,
        if status == 200 { content } else { text },
    ))
}

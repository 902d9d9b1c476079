//! Against a real cluster (kind or the current kubeconfig): install the CRDs, run the operator
//! in-process (or use one already deployed), apply an example, wait for Ready, change a weight,
//! and check the ConfigMap changed while no pod restarted.
//!
//! Runs only under `make e2e` (SLUICE_E2E=1) so `cargo test` never touches a cluster someone
//! happens to have configured; skips with a message when no cluster is reachable.
//!
//! Environment: `SLUICE_E2E_EXAMPLE` (default examples/inferencemodel-canary.yaml, two variants),
//! `SLUICE_E2E_SIDECAR_IMAGE` (default the released sidecar image; `kind load` a local build),
//! `SLUICE_E2E_EXTERNAL_OPERATOR=1` (an operator is already installed, e.g. by Helm),
//! `SLUICE_E2E_TIMEOUT_SECS` (default 900, for weight downloads).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;
use kube::{Client, ResourceExt};
use sluice_crds::sidecar_config::SIDECAR_CONFIG_KEY;
use sluice_crds::{InferenceModel, SidecarConfig};
use sluice_operator::controller::{self, Context};
use sluice_operator::desired::Settings;
use sluice_operator::metrics::Metrics;
use sluice_operator::names::{LABEL_MODEL, config_map_name};

const MANAGER: &str = "sluice-e2e";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

async fn cluster() -> Option<Client> {
    if std::env::var("SLUICE_E2E").as_deref() != Ok("1") {
        eprintln!("SKIPPED e2e: runs only under `make e2e` (SLUICE_E2E=1)");
        return None;
    }
    let reach = async {
        let client = Client::try_default().await?;
        client.apiserver_version().await?;
        anyhow::Ok(client)
    };
    match tokio::time::timeout(Duration::from_secs(10), reach).await {
        Ok(Ok(client)) => Some(client),
        Ok(Err(e)) => {
            eprintln!(
                "SKIPPED e2e: no Kubernetes cluster reachable ({e}); create one with `kind create cluster` or set KUBECONFIG"
            );
            None
        }
        Err(_) => {
            eprintln!(
                "SKIPPED e2e: no Kubernetes cluster answered within 10s; create one with `kind create cluster` or set KUBECONFIG"
            );
            None
        }
    }
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    loop {
        if check().await? {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

fn pod_restarts(pods: &[Pod]) -> BTreeMap<String, (String, i32)> {
    pods.iter()
        .map(|p| {
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map_or(0, |cs| cs.iter().map(|c| c.restart_count).sum());
            (p.name_any(), (p.uid().unwrap_or_default(), restarts))
        })
        .collect()
}

#[tokio::test]
async fn weight_change_reconfigures_without_restarts() -> anyhow::Result<()> {
    let Some(client) = cluster().await else {
        return Ok(());
    };
    let timeout = Duration::from_secs(
        std::env::var("SLUICE_E2E_TIMEOUT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(900),
    );
    let apply = PatchParams::apply(MANAGER).force();

    // CRDs.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (_, crd) in sluice_crds::crds() {
        crds.patch(&crd.name_any(), &apply, &Patch::Apply(&crd))
            .await?;
        let name = crd.name_any();
        wait_until(
            &format!("CRD {name} established"),
            Duration::from_secs(60),
            || {
                let crds = crds.clone();
                let name = name.clone();
                async move {
                    let crd = crds.get(&name).await?;
                    Ok(crd
                        .status
                        .and_then(|s| s.conditions)
                        .unwrap_or_default()
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True"))
                }
            },
        )
        .await?;
    }

    // A namespace of our own.
    let ns_name = format!("sluice-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": ns_name}}))?;
    namespaces.create(&PostParams::default(), &ns).await?;
    let result = scenario(&client, &ns_name, timeout, &apply).await;
    let _ = namespaces
        .delete(&ns_name, &DeleteParams::background())
        .await;
    result
}

async fn scenario(
    client: &Client,
    ns: &str,
    timeout: Duration,
    apply: &PatchParams,
) -> anyhow::Result<()> {
    // The operator, in-process unless one is installed.
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    if std::env::var("SLUICE_E2E_EXTERNAL_OPERATOR").as_deref() != Ok("1") {
        let image = std::env::var("SLUICE_E2E_SIDECAR_IMAGE").unwrap_or_else(|_| {
            format!(
                "ghcr.io/sluice-dev/sluice-sidecar:{}",
                env!("CARGO_PKG_VERSION")
            )
        });
        let settings = Settings {
            sidecar_image: image.clone(),
            sidecar_cuda_image: image,
            tracing_env: Vec::new(),
        };
        let reporter = Reporter {
            controller: "sluice-operator".into(),
            instance: Some("e2e".into()),
        };
        let ctx = Arc::new(Context::new(
            client.clone(),
            settings,
            Metrics::default(),
            reporter,
        ));
        tokio::spawn(controller::run(ctx, async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));
    }

    let example = std::env::var("SLUICE_E2E_EXAMPLE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("examples/inferencemodel-canary.yaml"));
    let text = std::fs::read_to_string(&example)
        .with_context(|| format!("reading {}", example.display()))?;
    let mut model = sluice_operator::models_from_yaml(&text)?
        .into_iter()
        .next()
        .context("no InferenceModel in the example")?;
    ensure!(
        model.spec.variants.len() >= 2,
        "{} needs two variants to shift weight",
        example.display()
    );
    model.metadata.namespace = Some(ns.to_owned());
    let name = model.name_any();
    let models: Api<InferenceModel> = Api::namespaced(client.clone(), ns);
    models.patch(&name, apply, &Patch::Apply(&model)).await?;

    wait_until(&format!("InferenceModel {name} Ready"), timeout, || {
        let models = models.clone();
        let name = name.clone();
        async move {
            let m = models.get(&name).await?;
            let status = m.status.unwrap_or_default();
            if let Some(d) = status
                .conditions
                .iter()
                .find(|c| c.type_ == "Degraded" && c.status == "True")
            {
                eprintln!("  degraded: {} {}", d.reason, d.message);
            }
            Ok(status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"))
        }
    })
    .await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let selector = ListParams::default().labels(&format!("{LABEL_MODEL}={name}"));
    let before = pod_restarts(&pods.list(&selector).await?.items);
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm_name = config_map_name(&name);
    let old_config = configs.get(&cm_name).await?.data.unwrap_or_default();

    // Shift 10 points of weight from the first variant to the second.
    let mut changed = model.clone();
    changed.spec.variants[0].weight -= 10;
    changed.spec.variants[1].weight += 10;
    models.patch(&name, apply, &Patch::Apply(&changed)).await?;
    let want: Vec<u32> = changed
        .spec
        .variants
        .iter()
        .map(|v| u32::try_from(v.weight).unwrap_or(0))
        .collect();
    wait_until(
        "the ConfigMap to carry the new weights",
        Duration::from_secs(60),
        || {
            let configs = configs.clone();
            let cm_name = cm_name.clone();
            let old_config = old_config.clone();
            let want = want.clone();
            async move {
                let data = configs.get(&cm_name).await?.data.unwrap_or_default();
                let weights = data
                    .get(SIDECAR_CONFIG_KEY)
                    .and_then(|text| SidecarConfig::from_yaml(text).ok())
                    .map(|c| c.variants.iter().map(|v| v.weight).collect::<Vec<_>>());
                Ok(data != old_config && weights.as_ref() == Some(&want))
            }
        },
    )
    .await?;

    // Give a (wrong) rollout time to start, then compare pods.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let after = pod_restarts(&pods.list(&selector).await?.items);
    ensure!(
        before == after,
        "pods changed or restarted after a weight change:\n before {before:?}\n after  {after:?}"
    );
    let _ = stop_tx.send(true);
    Ok(())
}

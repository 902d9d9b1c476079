//! The operator as users install it, against a real API server (scripts/cluster.sh): the chart
//! installed by Helm (two replicas, leader election, its own ServiceAccount and RBAC), its pods
//! and every pod it creates run by the stand-in kubelet (real `sluice-operator` and
//! `sluice-sidecar` processes on the demo model). One scenario, in the order a user meets it:
//! every example reconciles with no 403 and only the Secrets it was granted readable; children
//! are owned, idempotent, not fighting an autoscaler's scale or Argo CD's dry run; a policy edit
//! converges on the running sidecars; each model's sidecars answer for the namespace's other
//! models, and a model added or deleted reaches them; killing the leader hands over; deleting a
//! model collects its children and drains its pods within their grace period.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use sluice_crds::{InferenceModel, RateLimitPolicy, SidecarConfig};
use sluice_e2e::Cluster;
use sluice_e2e::{control_plane, helm, http, objects, wait, workspace};
use sluice_operator::names::{ADMIN_PORT, API_PORT, LABEL_MODEL, config_map_name};

const RELEASE: &str = "sluice";
/// The chart's ServiceAccount and Deployment for release `sluice`.
const OPERATOR: &str = "sluice-operator";
/// The operator's Lease (its `--lease-name` default).
const LEASE: &str = "sluice-operator";
/// The API-key Secret of examples/api-keys-secret.yaml.
const KEYS_SECRET: &str = "sluice-api-keys";
const MINUTE: Duration = Duration::from_secs(60);

/// The examples a user applies (all but Argo CD's Application and the sidecar's own file).
fn examples() -> anyhow::Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(workspace().join("examples"))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    paths.sort();
    for path in paths {
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        for object in objects::documents(&std::fs::read_to_string(&path)?)? {
            let api_version = object["apiVersion"].as_str().unwrap_or_default();
            if !api_version.is_empty() && !api_version.starts_with("argoproj.io") {
                out.push(object);
            }
        }
    }
    Ok(out)
}

async fn metrics(ip: Ipv4Addr) -> anyhow::Result<String> {
    let response = http::request(ip, ADMIN_PORT as u16, "GET", "/metrics", &[], None).await?;
    ensure!(
        response.status == 200,
        "/metrics answered {}",
        response.status
    );
    Ok(response.body)
}

fn condition(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> Option<(String, String)> {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.message.clone()))
}

/// The operator's pods and which one holds the Lease.
async fn leader(client: &Client, system: &str) -> anyhow::Result<Option<(String, Lease)>> {
    let lease = Api::<Lease>::namespaced(client.clone(), system)
        .get_opt(LEASE)
        .await?;
    Ok(lease.and_then(|l| {
        let holder = l.spec.as_ref()?.holder_identity.clone()?;
        Some((holder, l))
    }))
}

/// The `sluice-operator` field manager's entries on every object labelled with a model:
/// unchanged entries mean the operator wrote nothing.
async fn operator_writes(client: &Client, ns: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let params = ListParams::default().labels(LABEL_MODEL);
    for (api_version, kind) in [
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("v1", "ConfigMap"),
        ("v1", "ServiceAccount"),
        ("rbac.authorization.k8s.io/v1", "Role"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding"),
        ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ] {
        let api = objects::api_for(
            client,
            ns,
            &json!({"apiVersion": api_version, "kind": kind}),
        );
        for object in api.list(&params).await? {
            for entry in object.metadata.managed_fields.iter().flatten() {
                if entry.manager.as_deref() == Some(OPERATOR) {
                    out.insert(
                        format!("{kind}/{}/{:?}", object.name_any(), entry.subresource),
                        format!(
                            "{:?} {}",
                            entry.time,
                            serde_json::to_string(&entry.fields_v1)?
                        ),
                    );
                }
            }
        }
    }
    Ok(out)
}

/// Whether every model's ConfigMap lists exactly the namespace's other models (one endpoint for
/// all models): each by the name clients send for it, at its model Service.
async fn every_config_lists_the_others(client: &Client, ns: &str) -> anyhow::Result<bool> {
    let models = Api::<InferenceModel>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await?
        .items;
    let configs: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    for model in &models {
        let mut want: Vec<(String, String)> = models
            .iter()
            .filter(|m| m.name_any() != model.name_any())
            .map(|m| {
                let address = format!("http://{}.{ns}.svc:{API_PORT}", m.name_any());
                (m.served_name(), address)
            })
            .collect();
        want.sort();
        let Some(config) = configs.get_opt(&config_map_name(&model.name_any())).await? else {
            return Ok(false);
        };
        let text = config
            .data
            .unwrap_or_default()
            .remove(sluice_crds::sidecar_config::SIDECAR_CONFIG_KEY)
            .unwrap_or_default();
        let mut got: Vec<(String, String)> = SidecarConfig::from_yaml(&text)?
            .models
            .into_iter()
            .map(|m| (m.name, m.address))
            .collect();
        got.sort();
        if got != want {
            return Ok(false);
        }
    }
    Ok(true)
}

#[tokio::test]
async fn the_chart_installed_operator_reconciles_converges_hands_over_and_cleans_up()
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
        kubelet.print_logs(15);
        if let Ok(list) = Api::<InferenceModel>::namespaced(admin.clone(), models)
            .list(&ListParams::default())
            .await
        {
            for model in list {
                eprintln!("--- status of {}: {:?}", model.name_any(), model.status);
            }
        }
    }
    result
}

async fn scenario(c: &Cluster) -> anyhow::Result<()> {
    let (cluster, admin, kubelet) = (c.control_plane, &c.admin, &c.kubelet);
    let (system, models) = (c.system.as_str(), c.models.as_str());
    // --- The chart, as a user installs it; the key Secret named as readable ---------------
    helm::install(
        &cluster.kubeconfig(),
        RELEASE,
        system,
        &json!({
            "replicaCount": 2,
            "leaderElection": {"enabled": true},
            "apiKeySecrets": [{"namespace": models, "name": KEYS_SECRET}],
        }),
    )?;
    let (first_leader, _) = wait::until("an operator replica to lead", 3 * MINUTE, || async {
        leader(admin, system).await
    })
    .await?;

    // --- Every example reconciles, as the chart's ServiceAccount ----------------------------
    for object in examples()? {
        objects::apply(admin, models, &object, "kubectl", false)
            .await
            .with_context(|| format!("applying {}", object["metadata"]["name"]))?;
    }
    let ims: Api<InferenceModel> = Api::namespaced(admin.clone(), models);
    // There is no GPU here: the GPU example's pods are told to compute on one (and below, stop).
    let on_gpu = |m: &InferenceModel| {
        m.spec
            .resources
            .as_ref()
            .and_then(|r| r.gpu.as_ref())
            .is_some_and(|g| g.count > 0)
    };
    wait::until(
        "every CPU example InferenceModel Ready",
        5 * MINUTE,
        || async {
            let list = ims.list(&ListParams::default()).await?;
            let not_ready: Vec<_> = list
                .iter()
                .filter(|m| !on_gpu(m))
                .filter(|m| {
                    let conditions = m
                        .status
                        .as_ref()
                        .map(|s| s.conditions.as_slice())
                        .unwrap_or_default();
                    condition(conditions, "Ready").is_none_or(|(s, _)| s != "True")
                })
                .map(|m| m.name_any())
                .collect();
            Ok((!list.items.is_empty() && not_ready.is_empty()).then_some(()))
        },
    )
    .await?;
    // --- One endpoint for all models: each config lists the other models; a model added, then
    // deleted, reaches the others' configs and their running sidecars' /v1/models ----------
    let listing = || async {
        Ok(every_config_lists_the_others(admin, models)
            .await?
            .then_some(()))
    };
    wait::until("every config listing the other models", MINUTE, listing).await?;
    // No pods: nothing to run, only a name and a Service to list.
    let extra = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": "extra"},
        "spec": {
            "servedName": "extra-served",
            "replicas": 0,
            "variants": [{"name": "a", "weight": 100, "model": {"url": "https://example.com/x.gguf"}}],
        },
    });
    objects::apply(admin, models, &extra, "kubectl", false).await?;
    wait::until("the configs listing the added model", MINUTE, listing).await?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), models);
    let demo_pod = pods
        .list(&ListParams::default().labels(&format!("{LABEL_MODEL}=smollm2")))
        .await?
        .items
        .first()
        .context("a pod of smollm2")?
        .name_any();
    let demo_ip = kubelet
        .pod_ip(models, &demo_pod)
        .context("smollm2's pod not running")?;
    let lists_extra = || async {
        let r = http::request(demo_ip, API_PORT as u16, "GET", "/v1/models", &[], None).await?;
        ensure!(r.status == 200, "/v1/models answered {}", r.status);
        Ok(r.body.contains("\"extra-served\""))
    };
    wait::until(
        "smollm2's sidecar to list the added model",
        MINUTE,
        || async { Ok(lists_extra().await?.then_some(())) },
    )
    .await?;
    ims.delete("extra", &DeleteParams::background()).await?;
    wait::until("the configs dropping the deleted model", MINUTE, listing).await?;
    wait::until(
        "smollm2's sidecar to drop the deleted model",
        MINUTE,
        || async { Ok((!lists_extra().await?).then_some(())) },
    )
    .await?;

    // --- A GPU model where no GPU is: its pods stop at start-up and their status says why ----
    let gpu_model = ims
        .list(&ListParams::default())
        .await?
        .into_iter()
        .find(|m| on_gpu(m))
        .context("the GPU example")?
        .name_any();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), models);
    let message = wait::until(
        "the GPU model's pod to stop with its reason",
        MINUTE,
        || async {
            let selector = ListParams::default().labels(&format!("{LABEL_MODEL}={gpu_model}"));
            Ok(pods.list(&selector).await?.items.iter().find_map(|pod| {
                let status = pod.status.as_ref()?.container_statuses.as_ref()?.first()?;
                let terminated = status.state.as_ref()?.terminated.as_ref()?;
                terminated.message.clone().filter(|m| !m.is_empty())
            }))
        },
    )
    .await?;
    // The one line `sluice-sidecar serve` ends with (the stand-in kubelet runs the CPU build
    // for the CUDA image, as a CPU-only build would be run on a node without a GPU).
    ensure!(
        message
            .contains("sluice-sidecar: error: --device cuda: this sidecar was built without CUDA"),
        "the GPU pod's termination message does not say why it stopped:\n{message}"
    );
    let gpu_status = ims.get(&gpu_model).await?.status.unwrap_or_default();
    ensure!(
        condition(&gpu_status.conditions, "Ready").is_some_and(|(s, _)| s == "False"),
        "the GPU model reports Ready with no pod running: {:?}",
        gpu_status.conditions
    );

    for (ns, pod) in kubelet.pods().into_iter().filter(|(ns, _)| ns == system) {
        let log = kubelet.log(&ns, &pod);
        ensure!(
            // The API server's 403 reads `... is forbidden: User ... (Forbidden)`.
            !log.to_lowercase().contains("forbidden"),
            "operator pod {pod} was refused something:\n{log}"
        );
    }

    // Least privilege: the operator's own token reads the Secret it was granted, no other.
    let as_operator = control_plane::client_from(
        &cluster
            .service_account_kubeconfig(admin, system, OPERATOR)
            .await?,
    )
    .await?;
    let secrets: Api<Secret> = Api::namespaced(as_operator.clone(), models);
    secrets
        .get(KEYS_SECRET)
        .await
        .context("the granted key Secret")?;
    let forwarding = format!("{}-forwarding", "chat");
    for refused in [
        secrets.get(&forwarding).await.map(drop),
        secrets.list(&ListParams::default()).await.map(drop),
        Api::<Pod>::namespaced(as_operator.clone(), models)
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await
            .map(drop),
    ] {
        match refused {
            Err(kube::Error::Api(s)) if s.code == 403 => {}
            other => bail!("expected 403 for the operator's ServiceAccount, got {other:?}"),
        }
    }

    // --- Children are owned, and a second pass writes nothing -------------------------------
    for object in [
        objects::api_for(
            admin,
            models,
            &json!({"apiVersion": "apps/v1", "kind": "Deployment"}),
        ),
        objects::api_for(
            admin,
            models,
            &json!({"apiVersion": "v1", "kind": "ConfigMap"}),
        ),
    ] {
        for child in object
            .list(&ListParams::default().labels(LABEL_MODEL))
            .await?
        {
            let owner = child
                .owner_references()
                .iter()
                .find(|o| o.controller == Some(true));
            ensure!(
                owner.is_some_and(|o| o.kind == "InferenceModel"),
                "{} has no InferenceModel controller owner",
                child.name_any()
            );
        }
    }
    let leader_ip = |name: &str| {
        kubelet
            .pod_ip(system, name)
            .with_context(|| format!("operator pod {name} not running"))
    };
    let reconciles = |text: &str| http::sum(text, "sluice_operator_reconciles_total");
    let applies = |text: &str| http::sum(text, "sluice_operator_applies_total");
    let model_names: Vec<String> = ims
        .list(&ListParams::default())
        .await?
        .iter()
        .map(|m| m.name_any())
        .collect();
    // A pod turning Ready between two passes legitimately changes a ConfigMap's weights, so a
    // pass that wrote is retried; a hot loop writes on every pass and fails all of them.
    let mut passes_that_wrote = Vec::new();
    for pass in 1..=3 {
        let before = metrics(leader_ip(&first_leader)?).await?;
        let writes_before = operator_writes(admin, models).await?;
        for name in &model_names {
            let poke =
                json!({"metadata": {"annotations": {"e2e.sluice.dev/poke": pass.to_string()}}});
            ims.patch(name, &PatchParams::default(), &Patch::Merge(&poke))
                .await?;
        }
        let target = reconciles(&before) + model_names.len() as f64;
        let after = wait::until(
            "a reconcile of every model after the poke",
            MINUTE,
            || async {
                let now = metrics(leader_ip(&first_leader)?).await?;
                Ok((reconciles(&now) >= target).then_some(now))
            },
        )
        .await?;
        let writes_after = operator_writes(admin, models).await?;
        let changed: Vec<&String> = writes_after
            .iter()
            .filter(|(k, v)| writes_before.get(*k) != Some(*v))
            .map(|(k, _)| k)
            .collect();
        if applies(&after) == applies(&before) && changed.is_empty() {
            passes_that_wrote.clear();
            break;
        }
        passes_that_wrote.push(format!(
            "pass {pass}: {} applies, changed {changed:?}",
            applies(&after) - applies(&before)
        ));
    }
    ensure!(
        passes_that_wrote.is_empty(),
        "every pass over an unchanged cluster wrote something: {passes_that_wrote:?}"
    );

    // An autoscaler's scale through the scale subresource is not reverted.
    let autoscaled = ims
        .list(&ListParams::default())
        .await?
        .into_iter()
        .find(|m| m.spec.autoscaling.is_some())
        .context("an example with autoscaling")?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), models);
    let scaled = deployments
        .list(&ListParams::default().labels(&format!("{LABEL_MODEL}={}", autoscaled.name_any())))
        .await?
        .items
        .first()
        .context("a Deployment of the autoscaled model")?
        .name_any();
    let scale = json!({"spec": {"replicas": 2}});
    deployments
        .patch_scale(&scaled, &PatchParams::default(), &Patch::Merge(&scale))
        .await?;
    let poke = json!({"metadata": {"annotations": {"e2e.sluice.dev/poke": "2"}}});
    let now = metrics(leader_ip(&first_leader)?).await?;
    ims.patch(
        &autoscaled.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&poke),
    )
    .await?;
    let target = reconciles(&now) + 1.0;
    wait::until("a reconcile after the scale", MINUTE, || async {
        let now = metrics(leader_ip(&first_leader)?).await?;
        Ok((reconciles(&now) >= target).then_some(()))
    })
    .await?;
    let replicas = deployments
        .get(&scaled)
        .await?
        .spec
        .and_then(|s| s.replicas);
    assert_eq!(
        replicas,
        Some(2),
        "the operator reverted the autoscaler's scale"
    );

    // Argo CD's server-side dry run of the same manifests under its own manager: no diff.
    for object in examples()?.iter().filter(|o| o["kind"] == "InferenceModel") {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let live = objects::api_for(admin, models, object).get(name).await?;
        let dry = objects::apply(admin, models, object, "argocd-controller", true).await?;
        assert_eq!(
            dry.metadata.generation, live.metadata.generation,
            "{name}: Argo CD's dry run would change the spec"
        );
        assert_eq!(
            dry.data["spec"], live.data["spec"],
            "{name}: Argo CD's dry run shows a diff"
        );
    }

    // --- A policy edit converges on the running sidecars ------------------------------------
    let policies: Api<RateLimitPolicy> = Api::namespaced(admin.clone(), models);
    let mut edited = examples()?
        .into_iter()
        .find(|o| o["kind"] == "RateLimitPolicy")
        .context("an example RateLimitPolicy")?;
    let policy_name = edited["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let first_rule = edited["spec"]["rules"][0]
        .as_object_mut()
        .context("a rule")?;
    first_rule.insert("requestsPerMinute".into(), json!(4242));
    objects::apply(admin, models, &edited, "kubectl", false).await?;
    let generation = policies.get(&policy_name).await?.metadata.generation;
    let converged = wait::until("the edited policy Converged", 3 * MINUTE, || async {
        let policy = policies.get(&policy_name).await?;
        let status = policy.status.clone().unwrap_or_default();
        let done = status.observed_generation == generation
            && condition(&status.conditions, "Converged").is_some_and(|(s, _)| s == "True");
        Ok(done.then_some(status))
    })
    .await?;
    let configs: Api<ConfigMap> = Api::namespaced(admin.clone(), models);
    for target in &converged.targets {
        let config = configs
            .get(&sluice_operator::names::config_map_name(&target.model))
            .await?;
        let text = config
            .data
            .unwrap_or_default()
            .remove(sluice_crds::sidecar_config::SIDECAR_CONFIG_KEY)
            .unwrap_or_default();
        ensure!(
            text.contains("4242"),
            "{}'s ConfigMap lacks the edit:\n{text}",
            target.model
        );
        // Every pod of the model reports the generation the status counts.
        let pods = Api::<Pod>::namespaced(admin.clone(), models)
            .list(&ListParams::default().labels(&format!("{LABEL_MODEL}={}", target.model)))
            .await?;
        for pod in pods {
            let ip = kubelet
                .pod_ip(models, &pod.name_any())
                .context("pod not running")?;
            let text = metrics(ip).await?;
            let seen = http::sample(&text, sluice_crds::contract::CONFIG_GENERATION_SERIES);
            assert_eq!(
                seen,
                Some(target.desired_generation as f64),
                "pod {} runs another config generation",
                pod.name_any()
            );
        }
    }

    // --- Leader election: the follower wrote nothing; killing the leader hands over ---------
    let operator_pods: Vec<String> = kubelet
        .pods()
        .into_iter()
        .filter(|(ns, _)| ns == system)
        .map(|(_, p)| p)
        .collect();
    let (holder, lease) = leader(admin, system).await?.context("a leader")?;
    let follower = operator_pods
        .iter()
        .find(|p| **p != holder)
        .context("a second operator replica")?
        .clone();
    let standby = metrics(leader_ip(&follower)?).await?;
    assert_eq!(http::sample(&standby, "sluice_operator_leader"), Some(0.0));
    assert_eq!(reconciles(&standby), 0.0, "the follower reconciled");
    assert_eq!(applies(&standby), 0.0, "the follower wrote objects");
    kubelet.signal(system, &holder, "KILL")?;
    let (_, taken) = wait::until("the follower to take the Lease", 2 * MINUTE, || async {
        Ok(leader(admin, system).await?.filter(|(h, _)| *h == follower))
    })
    .await?;
    let last_renewal = lease
        .spec
        .as_ref()
        .and_then(|s| s.renew_time.clone())
        .context("renewTime")?;
    let acquired = taken
        .spec
        .as_ref()
        .and_then(|s| s.acquire_time.clone())
        .context("acquireTime")?;
    let duration = taken
        .spec
        .as_ref()
        .and_then(|s| s.lease_duration_seconds)
        .unwrap_or(15);
    let gap = acquired.0.duration_since(last_renewal.0);
    assert!(
        gap.as_secs() <= 2 * i64::from(duration),
        "the Lease stood unclaimed for {gap:?} (duration {duration} s)"
    );
    wait::until("the new leader to report it", MINUTE, || async {
        let text = metrics(leader_ip(&follower)?).await?;
        Ok((http::sample(&text, "sluice_operator_leader") == Some(1.0)).then_some(()))
    })
    .await?;

    // --- Deleting a model collects its children and drains its pods in their grace ----------
    let victim = "smollm2";
    let victim_pods: Vec<String> = Api::<Pod>::namespaced(admin.clone(), models)
        .list(&ListParams::default().labels(&format!("{LABEL_MODEL}={victim}")))
        .await?
        .iter()
        .map(|p| p.name_any())
        .collect();
    ensure!(!victim_pods.is_empty(), "{victim} has no pods");
    ims.delete(victim, &DeleteParams::background()).await?;
    wait::until(
        &format!("{victim}'s children collected"),
        3 * MINUTE,
        || async {
            let selector = ListParams::default().labels(&format!("{LABEL_MODEL}={victim}"));
            let left = deployments.list(&selector).await?.items.len()
                + configs.list(&selector).await?.items.len()
                + Api::<Pod>::namespaced(admin.clone(), models)
                    .list(&selector)
                    .await?
                    .items
                    .len();
            Ok((left == 0).then_some(()))
        },
    )
    .await?;
    for pod in victim_pods {
        let ended = kubelet
            .termination(models, &pod)
            .with_context(|| format!("pod {pod} was not terminated by the kubelet"))?;
        assert!(
            ended.within_grace && ended.exit_code == Some(0),
            "pod {pod} did not drain within its grace period: {ended:?}"
        );
    }
    Ok(())
}

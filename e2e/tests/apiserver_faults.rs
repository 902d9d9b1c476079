//! The operator against faults of the API server it lives on (scripts/cluster.sh): the chart's
//! operator (one replica, leader election) and the model's sidecar run by the stand-in kubelet,
//! which starts a container again when it exits, as a kubelet does for a Deployment's pods (the
//! operator exits on losing its Lease and counts on that). One scenario, the faults in turn,
//! since the first restarts this test binary's API server under everything else:
//!
//! 1. kube-apiserver killed (SIGKILL) while reconciles are in flight, and started again with
//!    the same flags on the same etcd; this also cuts every watch stream (3.), which must
//!    resume: a child deleted afterwards comes back long before any resync would bring it;
//! 2. a competing writer editing the operator's objects, getting 409s (field conflicts and
//!    stale resourceVersions) and overwriting the operator's fields in between;
//! 3. (covered by 1.);
//! 4. the leader Lease stolen by another identity, which renews it for a while, then stops.
//!
//! After each: the model's objects are exactly the ones before the faults (no duplicate, no
//! extra ReplicaSet or pod), each carries what the operator renders for the model
//! (`sluice-operator render`'s library function, compared as the operator compares before
//! applying), the model's conditions are as before, and the operator then writes nothing and
//! reconciles a bounded number of times over a window (no hot loop). Timeouts only bound waits;
//! the time each fault took to converge is printed, never asserted.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use sluice_crds::InferenceModel;
use sluice_crds::sidecar_config::SIDECAR_CONFIG_KEY;
use sluice_e2e::Cluster;
use sluice_e2e::{http, objects, wait};
use sluice_operator::controller::apply::is_subset;
use sluice_operator::desired::Settings;
use sluice_operator::names::{ADMIN_PORT, LABEL_MODEL, config_map_name, variant_object_name};

const MODEL: &str = "faults";
const VARIANT: &str = "main";
/// The chart's operator Deployment for release `sluice`, and its Lease (`--lease-name`).
const OPERATOR: &str = "sluice-operator";
const LEASE: &str = "sluice-operator";
const THIEF: &str = "e2e-lease-thief";
/// The field managers of the competing writer: its read-modify-write updates, and its
/// server-side applies (not forced: the API server answers 409 while another manager owns the
/// field).
const COMPETITOR: &str = "e2e-competitor";
const COMPETITOR_APPLY: &str = "e2e-competitor-apply";
const MINUTE: Duration = Duration::from_secs(60);
/// The hot-loop check: reconciles counted over this window once the model has converged.
const QUIET_WINDOW: Duration = Duration::from_secs(10);
/// A settled model is requeued every 10 minutes; what reconciles it in between is a watch event
/// of one of its objects or pods (the kubelet's and the controllers' status writes, a few per
/// window at most). A hot loop reconciles hundreds of times a second, and a requeue loop on an
/// error at least every 5 s (the first backoff) for each of its watch triggers: 20 in 10 s
/// leaves room for the former and none for either loop.
const MAX_RECONCILES_PER_WINDOW: f64 = 20.0;

/// The kinds the operator creates for a model, and what the controllers make of them: each
/// listed by the model's label, their names compared before and after every fault.
const KINDS: [(&str, &str); 10] = [
    ("apps/v1", "Deployment"),
    ("apps/v1", "ReplicaSet"),
    ("v1", "Pod"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("v1", "Secret"),
    ("v1", "ServiceAccount"),
    ("rbac.authorization.k8s.io/v1", "Role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"),
];

/// What converged looks like: the model's objects by kind, and its conditions (type, status,
/// reason), as they were before the first fault.
#[derive(Debug, PartialEq)]
struct Snapshot {
    objects: BTreeMap<&'static str, BTreeSet<String>>,
    conditions: Vec<(String, String, String)>,
}

#[tokio::test]
async fn the_operator_converges_after_an_api_server_restart_a_competing_writer_and_a_stolen_lease()
-> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let result = scenario(&cluster).await;
    if result.is_err() {
        cluster.kubelet.print_logs(20);
        if let Ok(im) = Api::<InferenceModel>::namespaced(cluster.admin.clone(), &cluster.models)
            .get(MODEL)
            .await
        {
            eprintln!("--- status of {MODEL}: {:?}", im.status);
        }
    }
    result
}

async fn scenario(c: &Cluster) -> anyhow::Result<()> {
    let (admin, models) = (&c.admin, c.models.as_str());
    // The operator exits on losing its Lease (or on not renewing it in time, which a long
    // enough API-server outage causes) and is started again by its kubelet.
    c.kubelet.restart_exited_containers(&c.system);
    c.install_operator()?;
    // One variant on the demo model, autoscaled (an HPA) on a metric no adapter serves here,
    // so the HPA never scales and the replica count stays where the faults leave it.
    let model = json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": MODEL},
        "spec": {
            "servedName": MODEL,
            "variants": [{"name": VARIANT, "weight": 100, "model": {"url": "https://example.invalid/m.gguf"}}],
            "autoscaling": {
                "minReplicas": 1,
                "maxReplicas": 2,
                "metrics": [{"type": "InFlightRequests", "target": 4}],
            },
        },
    });
    objects::apply(admin, models, &model, "kubectl", false).await?;
    let ims: Api<InferenceModel> = Api::namespaced(admin.clone(), models);
    wait::until("the model Ready", 5 * MINUTE, || async {
        let ready = ims.get(MODEL).await?.status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        Ok(ready.then_some(()))
    })
    .await?;
    let settings = operator_settings(c).await?;
    let baseline = wait::until("the model settled", 2 * MINUTE, || async {
        Ok(rendered_is_live(c, &settings)
            .await?
            .is_none()
            .then_some(snapshot(c).await?))
    })
    .await?;
    eprintln!("baseline: {baseline:?}");
    for (kind, names) in &baseline.objects {
        // The model's Service and its variant's; one of everything else.
        let expected = if *kind == "Service" { 2 } else { 1 };
        ensure!(
            names.len() == expected,
            "expected {expected} {kind} of the model, found {names:?}"
        );
    }
    quiet(c, "before any fault").await?;

    // --- 1 and 3: the API server killed mid-reconcile, every watch cut; started again ------
    let poking = Arc::new(AtomicBool::new(true));
    // Every poke of the model starts a reconcile, so reconciles are in flight when the API
    // server dies (the failures they end in are counted below).
    let poker = tokio::spawn({
        let (ims, poking) = (ims.clone(), poking.clone());
        async move {
            let mut n = 0u32;
            while poking.load(Ordering::Relaxed) && n < 3000 {
                n += 1;
                let poke =
                    json!({"metadata": {"annotations": {"e2e.sluice.dev/poke": n.to_string()}}});
                let _ = ims
                    .patch(MODEL, &PatchParams::default(), &Patch::Merge(&poke))
                    .await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let (pod, _) = operator(c)?;
    let before = operator_metrics(c).await?;
    wait::until("reconciles of the pokes", MINUTE, || async {
        let now = operator_metrics(c).await?;
        Ok((reconciles(&now) >= reconciles(&before) + 3.0).then_some(()))
    })
    .await?;
    let restarts_before = c.kubelet.restarts(&c.system, &pod).unwrap_or(0);
    let start = Instant::now();
    c.control_plane.restart_apiserver().await?;
    let outage = start.elapsed();
    poking.store(false, Ordering::Relaxed);
    poker.await?;
    let converged = converge(c, &settings, &baseline, "after the API server restart").await?;
    let restarts = c.kubelet.restarts(&c.system, &pod).unwrap_or(0) - restarts_before;
    let now = operator_metrics(c).await?;
    eprintln!(
        "API server restart: down and up again in {outage:?}; converged {converged:?} after; the \
         operator restarted {restarts} time(s) (it exits when it cannot renew its Lease for \
         {:?}); failed reconciles since: {}",
        sluice_operator::leader::RENEW_DEADLINE,
        if restarts == 0 {
            (failures(&now) - failures(&before)).to_string()
        } else {
            "(counters reset)".to_owned()
        }
    );
    // The watches resumed: a deleted child is back within a minute, where without its watch it
    // would wait for the model's resync (10 minutes).
    let configs: Api<ConfigMap> = Api::namespaced(admin.clone(), models);
    let config = configs.get(&config_map_name(MODEL)).await?;
    configs
        .delete(&config_map_name(MODEL), &Default::default())
        .await?;
    let deleted = Instant::now();
    wait::until("the deleted ConfigMap recreated", MINUTE, || async {
        let again = configs.get_opt(&config_map_name(MODEL)).await?;
        Ok(again.filter(|a| a.uid() != config.uid()).map(drop))
    })
    .await?;
    eprintln!(
        "the ConfigMap deleted after the restart was back {:?} later",
        deleted.elapsed()
    );
    converge(c, &settings, &baseline, "after the ConfigMap deletion").await?;
    quiet(c, "after the API server restart").await?;

    // --- 2: a competing writer on the operator's objects -----------------------------------
    let competitor = Competitor::new(admin.clone(), models);
    let start = Instant::now();
    let rounds = 40;
    for _ in 0..rounds {
        competitor.round().await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let converged = converge(c, &settings, &baseline, "after the competing writer").await?;
    let (overwrites, conflicts) = (
        competitor.overwrites.load(Ordering::Relaxed),
        competitor.conflicts.load(Ordering::Relaxed),
    );
    eprintln!(
        "competing writer: {rounds} rounds in {:?}, {overwrites} overwrites landed, {conflicts} \
         answered 409; converged {converged:?} after it stopped",
        start.elapsed().saturating_sub(converged)
    );
    ensure!(
        overwrites > 0,
        "the competitor never changed the operator's objects"
    );
    ensure!(conflicts > 0, "the competitor never got a 409");
    quiet(c, "after the competing writer").await?;

    // --- 4: the leader Lease stolen ---------------------------------------------------------
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &c.system);
    let (pod, _) = operator(c)?;
    let restarts_before = c.kubelet.restarts(&c.system, &pod).unwrap_or(0);
    let transitions_before = lease_transitions(&leases.get(LEASE).await?);
    let thief = Thief::new(leases.clone());
    wait::until("the thief holding the Lease", MINUTE, || async {
        Ok(thief.renew().await?.then_some(()))
    })
    .await?;
    let stolen = Instant::now();
    // The leader sees the thief's renewal at its next one, stops and exits; its kubelet starts
    // it again, and it follows while the thief renews.
    wait::until("the operator following the thief", 2 * MINUTE, || async {
        thief.renew().await?;
        let restarted = c.kubelet.restarts(&c.system, &pod).unwrap_or(0) > restarts_before;
        let following = operator_metrics(c)
            .await
            .is_ok_and(|m| leader(&m) == Some(0.0));
        Ok((restarted && following).then_some(()))
    })
    .await?;
    let stepped_down = stolen.elapsed();
    // The thief renews for twice the Lease's duration: the operator must neither take the
    // Lease (the thief's read-modify-write would get 409s) nor reconcile.
    let follower = operator_metrics(c).await?;
    let held_until = Instant::now() + 2 * sluice_operator::leader::LEASE_DURATION;
    while Instant::now() < held_until {
        ensure!(
            thief.renew().await?,
            "the operator took the Lease while the thief renewed it"
        );
        let now = operator_metrics(c).await?;
        ensure!(
            leader(&now) == Some(0.0),
            "the operator reports leading while the thief holds the Lease"
        );
        ensure!(
            reconciles(&now) == reconciles(&follower) && applies(&now) == 0.0,
            "the operator reconciled or wrote without the Lease"
        );
        tokio::time::sleep(sluice_operator::leader::RETRY_PERIOD).await;
    }
    ensure!(
        thief.lost.load(Ordering::Relaxed) == 0,
        "another writer updated the Lease while the thief held it"
    );
    // The thief stops renewing: once its Lease expires the operator takes it back.
    let released = Instant::now();
    let (pod, _) = operator(c)?;
    wait::until("the operator leading again", 2 * MINUTE, || async {
        let lease = leases.get(LEASE).await?;
        let holder = lease.spec.and_then(|s| s.holder_identity);
        let leading = operator_metrics(c)
            .await
            .is_ok_and(|m| leader(&m) == Some(1.0));
        Ok((holder.as_deref() == Some(pod.as_str()) && leading).then_some(()))
    })
    .await?;
    let retaken = released.elapsed();
    let transitions = lease_transitions(&leases.get(LEASE).await?) - transitions_before;
    ensure!(
        transitions == 2,
        "expected the Lease to change hands twice (to the thief and back), saw {transitions}"
    );
    let converged = converge(c, &settings, &baseline, "after the stolen Lease").await?;
    eprintln!(
        "stolen Lease: the operator followed {stepped_down:?} after the theft, led again \
         {retaken:?} after the thief stopped renewing, converged {converged:?} after that"
    );
    quiet(c, "after the stolen Lease").await?;
    Ok(())
}

/// The operator's pod (one replica) and its address as the kubelet runs it now (a restarted
/// container gets a new one).
fn operator(c: &Cluster) -> anyhow::Result<(String, Ipv4Addr)> {
    let pods: Vec<String> = c
        .kubelet
        .pods()
        .into_iter()
        .filter(|(ns, _)| *ns == c.system)
        .map(|(_, pod)| pod)
        .collect();
    let [pod] = pods.as_slice() else {
        bail!("expected one operator pod, the kubelet runs {pods:?}");
    };
    let ip = c
        .kubelet
        .pod_ip(&c.system, pod)
        .with_context(|| format!("operator pod {pod} not running"))?;
    Ok((pod.clone(), ip))
}

async fn operator_metrics(c: &Cluster) -> anyhow::Result<String> {
    let (_, ip) = operator(c)?;
    let response = http::request(ip, ADMIN_PORT as u16, "GET", "/metrics", &[], None).await?;
    ensure!(
        response.status == 200,
        "/metrics answered {}",
        response.status
    );
    Ok(response.body)
}

fn reconciles(metrics: &str) -> f64 {
    http::sum(metrics, "sluice_operator_reconciles_total")
}

fn applies(metrics: &str) -> f64 {
    http::sum(metrics, "sluice_operator_applies_total")
}

fn failures(metrics: &str) -> f64 {
    http::sum(metrics, "sluice_operator_reconcile_failures_total")
}

fn leader(metrics: &str) -> Option<f64> {
    http::sample(metrics, "sluice_operator_leader")
}

/// The images the chart started the operator with, which it renders into the model's pods.
async fn operator_settings(c: &Cluster) -> anyhow::Result<Settings> {
    let deployment = Api::<Deployment>::namespaced(c.admin.clone(), &c.system)
        .get(OPERATOR)
        .await?;
    let args = deployment
        .spec
        .and_then(|s| s.template.spec)
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.args)
        .unwrap_or_default();
    let arg = |name: &str| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("--{name}=")))
            .map(str::to_owned)
            .with_context(|| format!("the operator runs without --{name}: {args:?}"))
    };
    Ok(Settings {
        sidecar_image: arg("sidecar-image")?,
        sidecar_cuda_image: arg("sidecar-cuda-image")?,
        // The chart passes no OpenTelemetry settings on unless tracing is configured.
        tracing_env: Vec::new(),
    })
}

/// Where the live objects differ from what the operator renders for the model, if anywhere:
/// each rendered object must exist and carry every rendered field with the rendered value, as
/// the operator itself decides whether to apply.
async fn rendered_is_live(c: &Cluster, settings: &Settings) -> anyhow::Result<Option<String>> {
    let ims: Api<InferenceModel> = Api::namespaced(c.admin.clone(), &c.models);
    let model = ims.get(MODEL).await?;
    let namespace_models = ims.list(&ListParams::default()).await?.items;
    let desired = sluice_operator::controller::render(
        &model,
        &c.models,
        settings,
        &[],
        &[],
        &namespace_models,
    )?;
    for object in desired.to_values()? {
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let live = objects::api_for(&c.admin, &c.models, &object)
            .get_opt(name)
            .await?;
        match live {
            None => return Ok(Some(format!("{kind} {name} is missing"))),
            Some(live) if !is_subset(&object, &serde_json::to_value(&live)?) => {
                return Ok(Some(format!(
                    "{kind} {name} differs from the rendered one:\nrendered: {object}\nlive: {}",
                    serde_json::to_value(&live)?
                )));
            }
            Some(_) => {}
        }
    }
    Ok(None)
}

/// The model's objects by kind (pods being deleted too) and its conditions.
async fn snapshot(c: &Cluster) -> anyhow::Result<Snapshot> {
    let mut out = BTreeMap::new();
    let params = ListParams::default().labels(&format!("{LABEL_MODEL}={MODEL}"));
    for (api_version, kind) in KINDS {
        let api = objects::api_for(
            &c.admin,
            &c.models,
            &json!({"apiVersion": api_version, "kind": kind}),
        );
        let names = api
            .list(&params)
            .await?
            .iter()
            .map(|o| o.name_any())
            .collect();
        out.insert(kind, names);
    }
    let status = Api::<InferenceModel>::namespaced(c.admin.clone(), &c.models)
        .get(MODEL)
        .await?
        .status
        .unwrap_or_default();
    let mut conditions: Vec<_> = status
        .conditions
        .into_iter()
        .map(|c| (c.type_, c.status, c.reason))
        .collect();
    conditions.sort();
    Ok(Snapshot {
        objects: out,
        conditions,
    })
}

/// Waits until the model is back where it was before the faults, with the operator leading;
/// returns how long that took.
async fn converge(
    c: &Cluster,
    settings: &Settings,
    baseline: &Snapshot,
    when: &str,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    wait::until(
        &format!("the model converged {when}"),
        3 * MINUTE,
        || async {
            let metrics = operator_metrics(c).await?;
            ensure!(leader(&metrics) == Some(1.0), "the operator does not lead");
            if let Some(difference) = rendered_is_live(c, settings).await? {
                bail!("{difference}");
            }
            let now = snapshot(c).await?;
            ensure!(
                now == *baseline,
                "the model's objects or conditions differ:\nnow:    {now:?}\nbefore: {baseline:?}"
            );
            Ok(Some(()))
        },
    )
    .await?;
    Ok(start.elapsed())
}

/// The hot-loop check: over [`QUIET_WINDOW`] after convergence the operator (the same process
/// throughout) writes nothing and reconciles at most [`MAX_RECONCILES_PER_WINDOW`] times.
async fn quiet(c: &Cluster, when: &str) -> anyhow::Result<()> {
    let (pod, ip) = operator(c)?;
    let restarts = c.kubelet.restarts(&c.system, &pod);
    let before = operator_metrics(c).await?;
    tokio::time::sleep(QUIET_WINDOW).await;
    let after = operator_metrics(c).await?;
    ensure!(
        operator(c)? == (pod.clone(), ip) && c.kubelet.restarts(&c.system, &pod) == restarts,
        "the operator restarted during the quiet window {when}"
    );
    let reconciled = reconciles(&after) - reconciles(&before);
    let applied = applies(&after) - applies(&before);
    let failed = failures(&after) - failures(&before);
    eprintln!(
        "{when}: {reconciled} reconciles, {applied} applies, {failed} failures in {QUIET_WINDOW:?} \
         (total since the operator started: {} reconciles)",
        reconciles(&after)
    );
    ensure!(
        reconciled <= MAX_RECONCILES_PER_WINDOW,
        "{when}: {reconciled} reconciles in {QUIET_WINDOW:?}: a hot loop"
    );
    ensure!(
        applied == 0.0 && failed == 0.0,
        "{when}: the converged operator applied {applied} objects and failed {failed} reconciles in {QUIET_WINDOW:?}"
    );
    Ok(())
}

/// A second writer on the operator's objects, as a person with `kubectl edit` and a script
/// with `kubectl apply --server-side` would be: each round it applies its own value of a field
/// the operator owns without forcing (409: a field conflict), then reads, edits and updates
/// the Deployment's and the Service's labels, the sidecar config and the HPA's bound (409 when
/// the object changed since its read, otherwise its value lands and the operator must put its
/// own back).
struct Competitor {
    deployments: Api<Deployment>,
    services: Api<Service>,
    configs: Api<ConfigMap>,
    autoscalers: Api<HorizontalPodAutoscaler>,
    overwrites: AtomicU32,
    conflicts: AtomicU32,
}

impl Competitor {
    fn new(client: Client, ns: &str) -> Self {
        Self {
            deployments: Api::namespaced(client.clone(), ns),
            services: Api::namespaced(client.clone(), ns),
            configs: Api::namespaced(client.clone(), ns),
            autoscalers: Api::namespaced(client, ns),
            overwrites: AtomicU32::new(0),
            conflicts: AtomicU32::new(0),
        }
    }

    async fn round(&self) {
        let variant = variant_object_name(MODEL, VARIANT);
        let relabel = |meta: &mut kube::api::ObjectMeta| {
            meta.labels
                .get_or_insert_with(Default::default)
                .insert("app.kubernetes.io/part-of".into(), COMPETITOR.into());
        };
        let apply = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": config_map_name(MODEL)},
            "data": {SIDECAR_CONFIG_KEY: "{}"},
        });
        let applied = self
            .configs
            .patch(
                &config_map_name(MODEL),
                &PatchParams::apply(COMPETITOR_APPLY),
                &Patch::Apply(&apply),
            )
            .await;
        self.count(applied.map(drop));
        let edited = edit(&self.deployments, &variant, |d| relabel(&mut d.metadata)).await;
        self.count(edited);
        let edited = edit(&self.services, MODEL, |s| relabel(&mut s.metadata)).await;
        self.count(edited);
        // The same document, pretty-printed: it parses alike (the sidecars reload nothing new)
        // and is not the operator's text.
        let edited = edit(&self.configs, &config_map_name(MODEL), |c| {
            if let Some(text) = c.data.as_mut().and_then(|d| d.get_mut(SIDECAR_CONFIG_KEY))
                && let Ok(value) = serde_json::from_str::<serde_json::Value>(text)
                && let Ok(pretty) = serde_json::to_string_pretty(&value)
            {
                *text = pretty;
            }
        })
        .await;
        self.count(edited);
        let edited = edit(&self.autoscalers, &variant, |h| {
            if let Some(spec) = h.spec.as_mut() {
                spec.max_replicas = 7;
            }
        })
        .await;
        self.count(edited);
    }

    fn count(&self, result: kube::Result<()>) {
        match result {
            Ok(()) => {
                self.overwrites.fetch_add(1, Ordering::Relaxed);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                self.conflicts.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => eprintln!("competitor: {error}"),
        }
    }
}

/// Read, edit, update (with the resourceVersion read: 409 if it changed since).
async fn edit<K>(api: &Api<K>, name: &str, change: impl FnOnce(&mut K)) -> kube::Result<()>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let mut object = api.get(name).await?;
    change(&mut object);
    let params = PostParams {
        field_manager: Some(COMPETITOR.into()),
        ..Default::default()
    };
    api.replace(name, &params, &object).await.map(drop)
}

/// Another identity taking the operator's Lease and renewing it, as a second operator
/// installation or a stuck old replica might.
struct Thief {
    leases: Api<Lease>,
    /// Renewals refused with 409 after the thief first held the Lease: someone else wrote it.
    lost: AtomicU32,
    held: AtomicBool,
}

impl Thief {
    fn new(leases: Api<Lease>) -> Self {
        Self {
            leases,
            lost: AtomicU32::new(0),
            held: AtomicBool::new(false),
        }
    }

    /// Takes or renews the Lease (read, then update with that resourceVersion); whether the
    /// thief holds it now.
    async fn renew(&self) -> anyhow::Result<bool> {
        let mut lease = self.leases.get(LEASE).await?;
        let spec = lease.spec.get_or_insert_with(Default::default);
        let now = MicroTime(Timestamp::now());
        if spec.holder_identity.as_deref() != Some(THIEF) {
            if self.held.load(Ordering::Relaxed) {
                return Ok(false);
            }
            spec.holder_identity = Some(THIEF.into());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds =
            Some(sluice_operator::leader::LEASE_DURATION.as_secs() as i32);
        match self
            .leases
            .replace(LEASE, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.held.store(true, Ordering::Relaxed);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                if self.held.load(Ordering::Relaxed) {
                    self.lost.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }
}

fn lease_transitions(lease: &Lease) -> i32 {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.lease_transitions)
        .unwrap_or(0)
}

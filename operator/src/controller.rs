//! The controller: observes what exists for an InferenceModel, applies what differs from the
//! desired state (server-side apply, one field manager, forced), prunes what no longer belongs,
//! and patches status.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_crds::{InferenceModel, InferenceModelStatus, RateLimitPolicy};
use tracing::{debug, info, instrument, warn};

use crate::metrics::Metrics;
use crate::policy::{HttpMetricsSource, MetricsSource};
use crate::resources::{self, Desired, FIELD_MANAGER, LABEL_MODEL, MANAGED_BY, Settings};
use crate::status::{self, Observed, Transition};
use crate::{Error, Result};

/// Requeue a model that is ready and settled this often (watches catch changes sooner).
const RESYNC: Duration = Duration::from_secs(600);
/// Requeue a model that is still rolling out or unready this often (pod problems do not
/// trigger a watch event on the model's own objects).
const PROGRESS_POLL: Duration = Duration::from_secs(15);
/// First and longest error backoff.
const BACKOFF_MIN: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Reconciles that run at once unless configured otherwise (`--reconcile-concurrency`). A cold
/// start lists every model and queues each; unbounded, every reconcile would hold its observed
/// objects and desired state at the same time, and send its requests to the API server at once.
pub const DEFAULT_RECONCILE_CONCURRENCY: u16 = 16;

/// What every reconcile shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// Images to render.
    pub settings: Settings,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Publishes Events on condition transitions.
    pub recorder: Recorder,
    /// Consecutive failures per model, for exponential backoff.
    failures: Mutex<HashMap<ObjectRef<InferenceModel>, u32>>,
    /// The clock conditions are stamped with (fixed in tests).
    now: fn() -> Timestamp,
    /// Reads the sidecars' `/metrics` for the canary analysis (faked in tests).
    metrics_source: Arc<dyn MetricsSource>,
    /// The counters the canary analysis read from each pod, over one window.
    analysis: crate::analysis::History,
    /// At most this many reconciles run at once, per controller (0: unbounded).
    reconcile_concurrency: u16,
}

// === impl Context ===

impl Context {
    /// A context for the running operator.
    pub fn new(client: Client, settings: Settings, metrics: Metrics, reporter: Reporter) -> Self {
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            failures: Mutex::default(),
            now: Timestamp::now,
            metrics_source: Arc::new(HttpMetricsSource::new()),
            analysis: crate::analysis::History::default(),
            reconcile_concurrency: DEFAULT_RECONCILE_CONCURRENCY,
        }
    }

    /// Runs at most `n` reconciles at once in each controller of [`run`] (0: unbounded).
    pub fn with_reconcile_concurrency(mut self, n: u16) -> Self {
        self.reconcile_concurrency = n;
        self
    }

    /// Replaces the source of sidecar metrics the canary analysis reads (tests).
    pub fn with_metrics_source(mut self, source: Arc<dyn MetricsSource>) -> Self {
        self.metrics_source = source;
        self
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, now: fn() -> Timestamp) -> Self {
        self.now = now;
        self
    }

    fn backoff(&self, key: ObjectRef<InferenceModel>, reset: bool) -> Duration {
        // A poisoned lock only means another reconcile panicked; the map is still usable.
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if reset {
            failures.remove(&key);
            return BACKOFF_MIN;
        }
        let n = failures.entry(key).or_insert(0);
        let delay = BACKOFF_MIN
            .saturating_mul(1 << (*n).min(8))
            .min(BACKOFF_MAX);
        *n += 1;
        delay
    }
}

/// Reconciles one InferenceModel. Idempotent: a second call on an unchanged model and cluster
/// only reads (lists), and writes nothing.
#[instrument(skip_all, fields(model = %model.name_any(), namespace = model.namespace().unwrap_or_default()))]
pub async fn reconcile(model: Arc<InferenceModel>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    if model.metadata.deletion_timestamp.is_some() {
        // Owner references: the garbage collector deletes every child.
        ctx.analysis.forget(&format!(
            "{}/{}",
            model.namespace().unwrap_or_default(),
            model.name_any()
        ));
        return Ok(Action::await_change());
    }
    let ns = model
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = model.name_any();
    let now = (ctx.now)();

    if let Err(reason) = resources::validate(&model) {
        warn!(%reason, "invalid spec; nothing applied");
        let status = status::invalid(&model, &reason, now);
        write_status(&ctx, &model, &ns, status).await?;
        ctx.backoff(ObjectRef::from_obj(&*model), true);
        return Ok(Action::await_change());
    }

    // Observe.
    let owned = ListParams::default().labels(&format!(
        "{LABEL_MODEL}={name},app.kubernetes.io/managed-by={MANAGED_BY}"
    ));
    let client = &ctx.client;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let live_deployments = owned_by(&model, deployments.list(&owned).await?.items);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let live_pods = pods
        .list(&ListParams::default().labels(&format!("{LABEL_MODEL}={name}")))
        .await?
        .items;
    let observed = Observed {
        deployments: live_deployments,
        pods: live_pods,
    };
    let ready = observed.ready_counts();

    // The limits of the RateLimitPolicies that target the model (read fresh: a deleted policy's
    // rules leave the sidecars at this reconcile).
    let limits =
        crate::policy::controller::model_limits(client, &model, &ns, &observed.deployments).await?;

    // Canary analysis: rollbacks and steps, decided into `status.rollout` (never spec). The
    // planned model carries them; the desired state and the status are computed from it.
    let (planned, _) = crate::analysis::analyze(
        ctx.metrics_source.as_ref(),
        &ctx.analysis,
        &model,
        &observed.pods,
        now,
    )
    .await;

    // Desired.
    let desired = resources::desired(&planned, &ns, &ctx.settings, &limits, &ready)?;

    // Apply what differs; prune what no longer belongs.
    let mut applied = 0;
    applied += sync(
        client,
        &ns,
        &model,
        &owned,
        std::slice::from_ref(&desired.service_account),
        false,
    )
    .await?;
    applied += sync(
        client,
        &ns,
        &model,
        &owned,
        std::slice::from_ref(&desired.role),
        false,
    )
    .await?;
    applied += sync(
        client,
        &ns,
        &model,
        &owned,
        std::slice::from_ref(&desired.role_binding),
        false,
    )
    .await?;
    applied += sync(
        client,
        &ns,
        &model,
        &owned,
        std::slice::from_ref(&desired.config_map),
        false,
    )
    .await?;
    applied += sync(client, &ns, &model, &owned, &desired.services, true).await?;
    // The pods mount the forwarding Secret: it exists before they do.
    applied += u64::from(crate::forwarding::ensure(client, &model, &ns).await?);
    applied += apply_all(&deployments, &desired.deployments, &observed.deployments).await?;
    prune(&deployments, &desired.deployments, &observed.deployments).await?;
    applied += sync(client, &ns, &model, &owned, &desired.autoscalers, true).await?;
    ctx.metrics.applies.inc_by(applied);

    // Status.
    let weights = crate::routing::model_effective_weights(&planned, &ready);
    let status = status::compute(&planned, &ns, &observed, &weights, now);
    let settled = status.conditions.iter().all(|c| match c.type_.as_str() {
        status::READY => c.status == "True",
        _ => c.status == "False",
    });
    write_status(&ctx, &model, &ns, status).await?;
    ctx.backoff(ObjectRef::from_obj(&*model), true);
    debug!(applied, settled, "reconciled");
    let mut requeue = if settled { RESYNC } else { PROGRESS_POLL };
    if let Some(every) = crate::analysis::requeue(&model) {
        // The analysis reads metrics every interval (and steps wait out their pauses).
        requeue = requeue.min(every);
    }
    Ok(Action::requeue(requeue))
}

/// Requeues a failed reconcile with exponential backoff per model (5s doubling to 5 min).
pub fn error_policy(model: Arc<InferenceModel>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error.reason());
    let delay = ctx.backoff(ObjectRef::from_obj(&*model), false);
    warn!(%error, reason = error.reason(), model = %model.name_any(), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Lists the model's live objects of one kind, applies the desired ones that differ and, when
/// `prune`, deletes live ones no longer desired. Returns how many were applied.
async fn sync<K>(
    client: &Client,
    ns: &str,
    model: &InferenceModel,
    owned: &ListParams,
    desired: &[K],
    prune_extra: bool,
) -> Result<u64>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let live = owned_by(model, api.list(owned).await?.items);
    let applied = apply_all(&api, desired, &live).await?;
    if prune_extra {
        prune(&api, desired, &live).await?;
    }
    Ok(applied)
}

/// Applies each desired object unless the live one already matches it.
async fn apply_all<K>(api: &Api<K>, desired: &[K], live: &[K]) -> Result<u64>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let mut applied = 0;
    for obj in desired {
        let name = obj.name_any();
        let current = live.iter().find(|l| l.name_any() == name);
        if let Some(current) = current
            && up_to_date(obj, current)?
        {
            continue;
        }
        info!(kind = K::kind(&()).as_ref(), %name, created = current.is_none(), "applying");
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?;
        applied += 1;
    }
    Ok(applied)
}

/// Deletes live objects the desired state no longer has (a removed variant, autoscaling
/// turned off).
async fn prune<K>(api: &Api<K>, desired: &[K], live: &[K]) -> Result<()>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
{
    for obj in live {
        let name = obj.name_any();
        if desired.iter().all(|d| d.name_any() != name) {
            info!(kind = K::kind(&()).as_ref(), %name, "deleting, no longer desired");
            match api.delete(&name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// The live objects this model controls (never touch what someone else labelled alike).
fn owned_by<K: Resource>(model: &InferenceModel, objects: Vec<K>) -> Vec<K> {
    let uid = model.uid();
    objects
        .into_iter()
        .filter(|o| {
            o.meta()
                .owner_references
                .iter()
                .flatten()
                .any(|r| Some(&r.uid) == uid.as_ref() && r.controller == Some(true))
        })
        .collect()
}

/// Whether the live object carries everything the desired one says, with the same values
/// (defaults and other managers' fields are ignored) and the same rendered hash (so a field the
/// desired state dropped is noticed too).
pub fn up_to_date<K: Serialize>(desired: &K, live: &K) -> Result<bool> {
    Ok(is_subset(
        &serde_json::to_value(desired)?,
        &serde_json::to_value(live)?,
    ))
}

/// `desired ⊆ live`: objects by key, arrays element-wise with equal length, scalars equal.
pub fn is_subset(desired: &serde_json::Value, live: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (desired, live) {
        (Value::Object(d), Value::Object(l)) => d
            .iter()
            .all(|(k, v)| v.is_null() || l.get(k).is_some_and(|lv| is_subset(v, lv))),
        (Value::Array(d), Value::Array(l)) => {
            d.len() == l.len() && d.iter().zip(l).all(|(a, b)| is_subset(a, b))
        }
        (a, b) => a == b,
    }
}

/// Patches status (server-side apply on the status subresource) when it changed, and publishes
/// one Event per condition transition.
async fn write_status(
    ctx: &Context,
    model: &InferenceModel,
    ns: &str,
    status: InferenceModelStatus,
) -> Result<()> {
    if model.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let old = model
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let api: Api<InferenceModel> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": InferenceModel::api_version(&()),
        "kind": InferenceModel::kind(&()),
        "status": status,
    });
    api.patch_status(
        &model.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    for t in status::transitions(&old, &status.conditions) {
        publish(ctx, model, &t).await;
    }
    Ok(())
}

async fn publish(ctx: &Context, model: &InferenceModel, t: &Transition) {
    let event = Event {
        type_: if t.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: t.reason.clone(),
        note: Some(format!("{} is {}: {}", t.type_, t.status, t.message)),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &model.object_ref(&())).await {
        // Events are best effort: the status already says the same.
        warn!(%error, "cannot publish event");
    }
}

/// Runs the controller until `shutdown` resolves, then finishes in-flight reconciles.
/// Runs the RateLimitPolicy status controller beside it (same shutdown). Each runs at most
/// [`Context::with_reconcile_concurrency`] reconciles at once.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    use futures::FutureExt;
    let shutdown = shutdown.shared();
    let client = ctx.client.clone();
    let children =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={MANAGED_BY}"));
    let policy_ctx = Arc::new(
        crate::policy::controller::PolicyContext::new(
            client.clone(),
            ctx.recorder.clone(),
            Arc::new(crate::policy::HttpMetricsSource::new()),
        )
        .with_clock(ctx.now),
    );
    let config =
        kube::runtime::controller::Config::default().concurrency(ctx.reconcile_concurrency);
    let policies = crate::policy::controller::run(policy_ctx, config.clone(), shutdown.clone());
    let controller = Controller::new(
        Api::<InferenceModel>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .with_config(config);
    // A policy change (or deletion) reconciles every model of its namespace: the ones it
    // targets now and the ones it targeted before (the mapper cannot know those).
    let store = controller.store();
    let models = controller
        .watches(
            Api::<RateLimitPolicy>::all(client.clone()),
            watcher::Config::default(),
            move |policy: RateLimitPolicy| {
                let ns = policy.namespace();
                store
                    .state()
                    .into_iter()
                    .filter(|m| m.namespace() == ns)
                    .map(|m| ObjectRef::from_obj(&*m))
                    .collect::<Vec<_>>()
            },
        )
        .owns(Api::<Deployment>::all(client.clone()), children.clone())
        .owns(Api::<Service>::all(client.clone()), children.clone())
        .owns(
            Api::<HorizontalPodAutoscaler>::all(client.clone()),
            children.clone(),
        )
        .owns(Api::<ConfigMap>::all(client.clone()), children.clone())
        .owns(Api::<ServiceAccount>::all(client.clone()), children.clone())
        .owns(Api::<Role>::all(client.clone()), children.clone())
        // The forwarding Secret: recreated at once if someone deletes it.
        .owns(Api::<Secret>::all(client.clone()), children.clone())
        .owns(Api::<RoleBinding>::all(client), children)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(model = %obj.name, "reconciled"),
                Err(error) => {
                    debug!(%error, "reconcile error (counted and logged by error_policy)")
                }
            }
        });
    futures::join!(models, policies);
}

/// Renders what `desired` would apply for one model without a cluster (`render`): with the
/// limits the controller would compute from the RateLimitPolicies among `policies` (the key
/// Secrets among `secrets` exist, no others; no live config to keep), and every desired
/// replica ready. Objects that name no namespace are in `default_namespace`.
pub fn render(
    model: &InferenceModel,
    default_namespace: &str,
    settings: &Settings,
    policies: &[RateLimitPolicy],
    secrets: &[k8s_openapi::api::core::v1::Secret],
) -> Result<Desired> {
    use crate::policy::{KeysSecrets, resolve};
    let ns_of = |o: Option<String>| o.unwrap_or_else(|| default_namespace.to_owned());
    let ns = ns_of(model.namespace());
    let policies: Vec<RateLimitPolicy> = policies
        .iter()
        .filter(|p| ns_of(p.namespace()) == ns)
        .cloned()
        .collect();
    let secrets = KeysSecrets::from_secrets(secrets.iter().filter(|s| ns_of(s.namespace()) == ns));
    let limits = resolve(
        std::slice::from_ref(model),
        &policies,
        &secrets,
        &Default::default(),
    )
    .models
    .remove(&model.name_any())
    .unwrap_or_default();
    let replicas = match &model.spec.autoscaling {
        Some(a) => a.min_replicas,
        None => model.spec.replicas.unwrap_or(1),
    };
    let ready = model
        .spec
        .variants
        .iter()
        .map(|v| (v.name.clone(), replicas))
        .collect();
    resources::desired(model, &ns, settings, &limits, &ready)
}

#[cfg(test)]
mod tests;

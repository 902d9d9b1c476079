//! The controller: observes what exists for an InferenceModel, applies what differs from the
//! desired state (server-side apply, one field manager, forced), prunes what no longer belongs,
//! and patches status.
//!
//! A reconcile reads top-down: observe (the cluster, then the sidecars' `/metrics`) → limits →
//! canary analysis → weights → desired → apply → status. The effective weights are computed
//! once ([`desired_state`]) and given to both the sidecar config and the status, so the two
//! never disagree.

pub mod apply;
mod listing;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use sluice_crds::{InferenceModel, InferenceModelStatus, RateLimitPolicy};
use tracing::{debug, info, instrument, warn};

use crate::conditions::Transition;
use crate::controller::apply::{apply_desired, owned_by};
use crate::controller::listing::Listings;
use crate::desired::weights::{self, EffectiveWeights};
use crate::desired::{self, Desired, Inputs, Settings};
use crate::idle::{self, RequestCounts};
use crate::metrics::Metrics;
use crate::names::{FIELD_MANAGER, LABEL_MODEL, MANAGED_BY, variant_object_name};
use crate::observe::{Observed, ReadyCounts};
use crate::policy::controller::{PolicyContext, model_limits};
use crate::policy::merge::{KeysSecrets, ModelLimits, resolve};
use crate::rollout::analyze::{History, analyze};
use crate::rollout::plan::{requeue, route_plan};
use crate::scrape::{self, HttpMetricsSource, MetricsSource, scrape_variants};
use crate::status;
use crate::{Error, Result};

/// Requeue a model that is ready and settled this often (watches catch changes sooner).
const RESYNC: Duration = Duration::from_secs(600);
/// Requeue a model that is still rolling out or unready this often (pod problems do not
/// trigger a watch event on the model's own objects).
const PROGRESS_POLL: Duration = Duration::from_secs(15);
/// Requeue a model whose variants forward to each other at least this often, so the breakers
/// the sidecars open and close reach the status (and its Event) within about this long, not at
/// the next resync. A model with an open breaker is unsettled and polled every
/// [`PROGRESS_POLL`].
const BREAKER_POLL: Duration = Duration::from_secs(60);
/// First and longest error backoff.
const BACKOFF_MIN: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// First and longest pause of the model controller's watches after a watch error (see
/// [`WatchBackoff`]).
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(200);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(1);
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
    /// Reads the sidecars' `/metrics` for the canary analysis and the breakers (faked in tests).
    metrics_source: Arc<dyn MetricsSource>,
    /// The counters the canary analysis read from each pod, over one window.
    analysis: History,
    /// Each pod's answered requests at the previous reconcile, for scale to zero.
    requests: RequestCounts,
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
            analysis: History::default(),
            requests: RequestCounts::default(),
            reconcile_concurrency: DEFAULT_RECONCILE_CONCURRENCY,
        }
    }

    /// Runs at most `n` reconciles at once in each controller of [`run`] (0: unbounded).
    pub fn with_reconcile_concurrency(mut self, n: u16) -> Self {
        self.reconcile_concurrency = n;
        self
    }

    /// Replaces the source of sidecar metrics the canary analysis and the breaker counts read
    /// (tests).
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
/// only reads (lists) and asks to create the forwarding Secret, which the API server refuses
/// (it exists): nothing changes.
#[instrument(skip_all, fields(model = %model.name_any(), namespace = model.namespace().unwrap_or_default()))]
pub async fn reconcile(model: Arc<InferenceModel>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile_started();
    if model.metadata.deletion_timestamp.is_some() {
        // Owner references: the garbage collector deletes every child.
        ctx.analysis.forget(&model);
        ctx.requests.forget(&model);
        return Ok(Action::await_change());
    }
    let ns = model
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = model.name_any();
    let now = (ctx.now)();

    if let Err(reason) = model.validate() {
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
    // The sidecars' metrics, scraped once for every reader: the canary analysis and the
    // breakers the pods hold open.
    let scraped = if reads_sidecar_metrics(&model) {
        let variants = model.spec.variants.iter().map(|v| v.name.as_str());
        scrape_variants(ctx.metrics_source.as_ref(), variants, &live_pods).await
    } else {
        Vec::new()
    };
    // The models of the namespace: the sidecars answer for the others, so their names and
    // Services go into the sidecar config. Read fresh, not from the controller's cache: a
    // reconcile that another model's change started must see that change. The fallback model
    // is only named (its Service address and Secret name derive from its name); whether it
    // exists is reported, not required.
    let namespace_models = Api::<InferenceModel>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let fallback_missing = model
        .spec
        .fallback
        .as_ref()
        .is_some_and(|f| !namespace_models.iter().any(|m| m.name_any() == f.model));
    let observed = Observed {
        deployments: live_deployments,
        pods: live_pods,
        breakers: scrape::breakers(&scraped),
        fallback_missing,
    };
    let ready = observed.ready_counts();

    // The limits of the RateLimitPolicies that target the model (read fresh: a deleted policy's
    // rules leave the sidecars at this reconcile).
    let limits = model_limits(client, &model, &ns, &observed.deployments).await?;

    // Canary analysis: rollbacks and steps, decided into `status.rollout` (never spec). The
    // planned model carries them; the weights, the desired state and the status are computed
    // from it.
    let (mut planned, _) = analyze(&ctx.analysis, &model, &scraped, now);

    // Scale to zero: whether the model served a request lately, decided into status (the
    // desired state routes the model's Service to the activator while it is at zero).
    let scale_to_zero = model.spec.scale_to_zero();
    let idle = scale_to_zero.map(|a| {
        let active = ctx.requests.active(&model, &scraped);
        let replicas = idle::variant_replicas(&observed.deployments);
        idle::decide(
            &planned,
            a.idle_after(),
            active,
            replicas,
            ready.total(),
            now,
        )
    });
    if let Some(idle) = &idle {
        let status = planned.status.get_or_insert_with(Default::default);
        status.last_request_time = Some(Time(idle.last_request));
        status.scaled_to_zero = idle.scaled_to_zero;
    }

    // Weights and desired state.
    let (weights, desired) = desired_state(
        &planned,
        &ns,
        &ctx.settings,
        &limits,
        &ready,
        &namespace_models,
    )?;

    // Apply what differs; prune what no longer belongs.
    let applied =
        apply_desired(client, &ns, &model, &owned, &desired, &observed.deployments).await?;
    ctx.metrics.applies.inc_by(applied);
    if idle.as_ref().is_some_and(|i| i.scale_down) {
        scale_to_zero_now(client, &ns, &planned).await?;
    }

    // Status, with the weights the ConfigMap carries.
    let status = status::compute(&planned, &ns, &observed, &weights, now);
    let settled = status.conditions.iter().all(|c| match c.type_.as_str() {
        status::READY => c.status == "True",
        _ => c.status == "False",
    });
    write_status(&ctx, &model, &ns, status).await?;
    ctx.backoff(ObjectRef::from_obj(&*model), true);
    debug!(applied, settled, "reconciled");
    let mut requeue_in = if settled { RESYNC } else { PROGRESS_POLL };
    if let Some(every) = requeue(&model) {
        // The analysis reads metrics every interval (and steps wait out their pauses).
        requeue_in = requeue_in.min(every);
    }
    if weights.weights.iter().filter(|(_, _, w)| *w > 0).count() > 1 {
        requeue_in = requeue_in.min(BREAKER_POLL);
    }
    if let (Some(a), Some(idle)) = (scale_to_zero, &idle)
        && !idle.scaled_to_zero
    {
        // Awake: look for requests often enough to notice idleness. At zero, the activator's
        // scale-up (a Deployment change) starts the next reconcile.
        requeue_in = requeue_in.min(idle::poll(a.idle_after()));
    }
    Ok(Action::requeue(requeue_in))
}

/// Scales every variant's Deployment of `model` to 0 through the `scale` subresource (the
/// apply never owns `replicas` of an autoscaled Deployment; an HPA leaves one at 0 alone).
async fn scale_to_zero_now(client: &Client, ns: &str, model: &InferenceModel) -> Result<()> {
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let zero = serde_json::json!({"spec": {"replicas": 0}});
    for v in &model.spec.variants {
        let name = variant_object_name(&model.name_any(), &v.name);
        info!(deployment = %name, "idle: scaling to zero");
        deployments
            .patch_scale(&name, &PatchParams::default(), &Patch::Merge(&zero))
            .await?;
    }
    Ok(())
}

/// Whether a reconcile of `model` reads its sidecars' `/metrics`: for the canary analysis, and
/// for the breakers of forwards between its variants (a model with one variant forwards
/// nowhere, so it has none).
fn reads_sidecar_metrics(model: &InferenceModel) -> bool {
    let analysis = model
        .spec
        .rollout
        .as_ref()
        .is_some_and(|r| r.analysis.is_some());
    analysis || model.spec.scale_to_zero().is_some() || model.spec.variants.len() > 1
}

/// The effective weights and the desired state of `planned` (the model with this reconcile's
/// rollout state), given the policies' `limits`, the `ready` pods and the `models` of the
/// namespace. The weights are computed here once: the sidecar config in [`Desired`] and the
/// status both take this value.
pub fn desired_state(
    planned: &InferenceModel,
    ns: &str,
    settings: &Settings,
    limits: &ModelLimits,
    ready: &ReadyCounts,
    models: &[InferenceModel],
) -> Result<(EffectiveWeights, Desired)> {
    let weights = weights::for_plan(&route_plan(planned), ready);
    let desired = desired::desired(
        planned,
        ns,
        settings,
        &Inputs {
            limits,
            ready,
            weights: &weights,
            models,
        },
    )?;
    Ok((weights, desired))
}

/// Requeues a failed reconcile with exponential backoff per model (5s doubling to 5 min).
pub fn error_policy(model: Arc<InferenceModel>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error.reason());
    let delay = ctx.backoff(ObjectRef::from_obj(&*model), false);
    warn!(%error, reason = error.reason(), model = %model.name_any(), retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Patches status (server-side apply on the status subresource) when it changed, and publishes
/// its Events ([`status::events`]: condition transitions, breakers that opened).
async fn write_status(
    ctx: &Context,
    model: &InferenceModel,
    ns: &str,
    status: InferenceModelStatus,
) -> Result<()> {
    if model.status.as_ref() == Some(&status) {
        return Ok(());
    }
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
    for t in status::events(model.status.as_ref(), &status) {
        publish(ctx, model, &t).await;
    }
    Ok(())
}

async fn publish(ctx: &Context, model: &InferenceModel, t: &Transition) {
    if let Err(error) = ctx
        .recorder
        .publish(&t.event(), &model.object_ref(&()))
        .await
    {
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
        PolicyContext::new(
            client.clone(),
            ctx.recorder.clone(),
            Arc::new(HttpMetricsSource::new()),
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
    .with_config(config)
    .trigger_backoff(WatchBackoff::default());
    // A policy change (or deletion) reconciles every model of its namespace: the ones it
    // targets now and the ones it targeted before (the mapper cannot know those).
    let store = controller.store();
    // A model added, deleted or listed under another name re-renders the configs of the other
    // models of its namespace, which list it (one endpoint for all models).
    let others_of = {
        let store = controller.store();
        let listings = Listings::default();
        move |model: InferenceModel| {
            if !listings.changed(&model) {
                return Vec::new();
            }
            let (ns, name) = (model.namespace(), model.name_any());
            store
                .state()
                .into_iter()
                .filter(|m| m.namespace() == ns && m.name_any() != name)
                .map(|m| ObjectRef::from_obj(&*m))
                .collect::<Vec<_>>()
        }
    };
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
        .watches(
            Api::<InferenceModel>::all(client.clone()),
            watcher::Config::default().any_semantic(),
            others_of,
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
        // Not the forwarding Secret: watching Secrets takes list/watch on every Secret in the
        // cluster. A deleted one is recreated by the next reconcile, which every model gets
        // within RESYNC (PROGRESS_POLL while unsettled), and sooner once a new pod that cannot
        // mount it changes its Deployment's status (watched above).
        .owns(Api::<RoleBinding>::all(client), children)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(model = %obj.name, "reconciled"),
                // Not a reconcile's: no error_policy sees it, and while a watch fails the
                // operator misses changes.
                Err(kube::runtime::controller::Error::QueueError(error)) => {
                    warn!(%error, "watch failed; retrying")
                }
                Err(error) => {
                    debug!(%error, "reconcile error (counted and logged by error_policy)")
                }
            }
        });
    futures::join!(models, policies);
}

/// The pause after a watch error, for all of the model controller's watches at once: kube merges
/// every watch of a controller (the models, the policies, seven kinds of children) into one
/// stream with one backoff, which pauses them all. Its default (client-go's for one watch: 0.8 s
/// doubling to 30 s, reset by the next event) grows with every error of any watch, so an API
/// server restart, which cuts all eleven at once (then each re-watch may answer 410 Gone),
/// paused every watch for several minutes after the API server was back: children deleted or
/// overwritten meanwhile stayed so until the model's resync. Capped at 1 s, all the watches
/// together retry about once a second while the API server is down (eleven client-go
/// reflectors at their 30 s cap retry about as often) and resume within seconds after.
#[derive(Debug, Default)]
struct WatchBackoff {
    failures: u32,
}

impl Iterator for WatchBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let delay = WATCH_BACKOFF_MIN
            .saturating_mul(1 << self.failures.min(8))
            .min(WATCH_BACKOFF_MAX);
        self.failures = self.failures.saturating_add(1);
        Some(delay)
    }
}

impl kube::runtime::utils::Backoff for WatchBackoff {
    fn reset(&mut self) {
        self.failures = 0;
    }
}

/// Renders what [`reconcile`] would apply for one model without a cluster (`render`): with the
/// limits the controller would compute from the RateLimitPolicies among `policies` (the key
/// Secrets among `secrets` exist, no others; no live config to keep), every desired replica
/// ready, and the InferenceModels among `models` as the namespace's models. Objects that name
/// no namespace are in `default_namespace`.
pub fn render(
    model: &InferenceModel,
    default_namespace: &str,
    settings: &Settings,
    policies: &[RateLimitPolicy],
    secrets: &[Secret],
    models: &[InferenceModel],
) -> Result<Desired> {
    let ns_of = |o: Option<String>| o.unwrap_or_else(|| default_namespace.to_owned());
    let ns = ns_of(model.namespace());
    let policies: Vec<RateLimitPolicy> = policies
        .iter()
        .filter(|p| ns_of(p.namespace()) == ns)
        .cloned()
        .collect();
    let secrets = KeysSecrets::from_secrets(secrets.iter().filter(|s| ns_of(s.namespace()) == ns));
    let models: Vec<InferenceModel> = models
        .iter()
        .filter(|m| ns_of(m.namespace()) == ns)
        .cloned()
        .collect();
    let limits = resolve(
        std::slice::from_ref(model),
        &policies,
        &secrets,
        &Default::default(),
    )
    .models
    .remove(&model.name_any())
    .unwrap_or_default();
    let ready = ReadyCounts::settled(model);
    desired_state(model, &ns, settings, &limits, &ready, &models).map(|(_, desired)| desired)
}

#[cfg(test)]
mod tests;

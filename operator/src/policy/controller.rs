//! The I/O around the pure policy layer: reading a namespace's policies, key Secrets and live
//! sidecar configs for the model reconcile ([`model_limits`]), and the RateLimitPolicy status
//! reconcile ([`reconcile_policy`]): acceptance, then convergence read from every pod's
//! `sluice_config_generation`, patched as status (server-side apply) with an Event per change.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Recorder;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use sluice_crds::sidecar_config::SIDECAR_CONFIG_KEY;
use sluice_crds::{InferenceModel, RateLimitPolicy, SidecarConfig};
use tracing::{debug, info, instrument, warn};

use crate::names::{FIELD_MANAGER, LABEL_MODEL, config_map_name};
use crate::policy::convergence::pod_generations;
use crate::policy::merge::{
    KeysSecrets, ModelLimits, Previous, REASON_INVALID, REASON_KEYS_SECRET, Resolution,
    keys_mount_in, resolve, targets,
};
use crate::policy::status::{CONVERGED, TargetObservation, policy_status, transitions};
use crate::scrape::{MetricsSource, pod_endpoints};
use crate::{Error, Result};

/// Poll a policy this often until every pod enforces it (pods reload within a second or two).
const CONVERGE_POLL: Duration = Duration::from_secs(2);
/// Re-check a converged or rejected policy this often (scaling adds pods; Secrets appear).
const SETTLED_POLL: Duration = Duration::from_secs(30);
/// Retry after an API error.
const ERROR_RETRY: Duration = Duration::from_secs(10);

/// What the policy status reconcile shares.
pub struct PolicyContext {
    /// The API client.
    pub client: Client,
    /// Publishes Events on condition changes.
    pub recorder: Recorder,
    /// Reads the pods' metrics.
    pub source: Arc<dyn MetricsSource>,
    now: fn() -> Timestamp,
}

// === impl PolicyContext ===

impl PolicyContext {
    /// A context for the running operator.
    pub fn new(client: Client, recorder: Recorder, source: Arc<dyn MetricsSource>) -> Self {
        Self {
            client,
            recorder,
            source,
            now: Timestamp::now,
        }
    }

    /// Replaces the clock (tests).
    pub fn with_clock(mut self, now: fn() -> Timestamp) -> Self {
        self.now = now;
        self
    }
}

/// Every RateLimitPolicy in `ns`.
async fn list_policies(client: &Client, ns: &str) -> Result<Vec<RateLimitPolicy>> {
    let api: Api<RateLimitPolicy> = Api::namespaced(client.clone(), ns);
    Ok(api.list(&ListParams::default()).await?.items)
}

/// The key Secrets `policies` name that exist, with their entry names, and those the operator
/// may not read.
///
/// The operator reads only the Secrets the cluster admin granted it `get` on by name (the
/// chart's `apiKeySecrets`), never Secrets at large. For any other, the API server answers 403:
/// its existence is not checked (the policy is not rejected for it) and a missing Secret or
/// entry shows where the kubelet mounts it, as pods that do not start. Logged at info once per
/// Secret, then at debug.
async fn read_secrets(
    client: &Client,
    ns: &str,
    policies: &[&RateLimitPolicy],
) -> Result<KeysSecrets> {
    let names: BTreeSet<&str> = policies
        .iter()
        .filter_map(|p| p.spec.identity.as_ref()?.keys.as_ref())
        .map(|k| k.secret_name.as_str())
        .collect();
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let mut found = Vec::new();
    let mut unreadable = Vec::new();
    for name in names {
        match api.get_opt(name).await {
            Ok(Some(secret)) => found.push(secret),
            Ok(None) => {}
            Err(kube::Error::Api(s)) if s.code == 403 => unreadable.push(name),
            Err(e) => return Err(e.into()),
        }
    }
    let mut secrets = KeysSecrets::from_secrets(&found);
    for name in unreadable {
        if first_time_unreadable(ns, name) {
            info!(
                namespace = ns,
                secret = name,
                "no permission to read the API-key Secret (grant it with the chart's \
                 apiKeySecrets); its existence is not checked, the pods' mount of it is"
            );
        } else {
            debug!(
                namespace = ns,
                secret = name,
                "API-key Secret not readable; not checked"
            );
        }
        secrets.insert_unreadable(name);
    }
    Ok(secrets)
}

/// Whether `ns/name` is reported unreadable for the first time in this process.
fn first_time_unreadable(ns: &str, name: &str) -> bool {
    static SEEN: Mutex<BTreeSet<(String, String)>> = Mutex::new(BTreeSet::new());
    // A poisoned lock only means another reconcile panicked; the set is still usable.
    SEEN.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert((ns.to_owned(), name.to_owned()))
}

/// The sidecar config in `model`'s ConfigMap, if there is a valid one.
async fn live_config(client: &Client, ns: &str, model: &str) -> Result<Option<SidecarConfig>> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = api.get_opt(&config_map_name(model)).await?;
    Ok(cm
        .and_then(|cm| cm.data?.remove(SIDECAR_CONFIG_KEY))
        .and_then(|text| SidecarConfig::from_yaml(&text).ok()))
}

/// The effective limits of `model` (for its sidecar config and key mount): reads the
/// namespace's policies and the key Secrets they name; when a policy is rejected for being
/// invalid or missing its Secret, also the live config (`deployments` give the live key
/// mount), so what was in force stays in force. One list and no other request when no
/// policy exists.
pub async fn model_limits(
    client: &Client,
    model: &InferenceModel,
    ns: &str,
    deployments: &[Deployment],
) -> Result<ModelLimits> {
    let name = model.name_any();
    let policies = list_policies(client, ns).await?;
    if policies.is_empty() {
        return Ok(ModelLimits::default());
    }
    let models = std::slice::from_ref(model);
    let relevant: Vec<&RateLimitPolicy> = policies
        .iter()
        .filter(|p| !targets(p, models).is_empty())
        .collect();
    let secrets = read_secrets(client, ns, &relevant).await?;
    let mut resolution = resolve(models, &policies, &secrets, &BTreeMap::new());
    let keeps = |r: &Resolution| {
        r.policies.values().any(|v| {
            v.rejection
                .as_ref()
                .is_some_and(|r| matches!(r.reason, REASON_INVALID | REASON_KEYS_SECRET))
        })
    };
    if keeps(&resolution) {
        let previous = Previous {
            config: live_config(client, ns, &name).await?,
            keys: deployments
                .iter()
                .filter_map(|d| d.spec.as_ref()?.template.spec.as_ref())
                .find_map(keys_mount_in),
        };
        resolution = resolve(
            models,
            &policies,
            &secrets,
            &BTreeMap::from([(name.clone(), previous)]),
        );
    }
    Ok(resolution.models.remove(&name).unwrap_or_default())
}

/// Reconciles one RateLimitPolicy's status: accepted or why not, and how many pods of each
/// model it applies to enforce it. Writes only status (and Events); the model reconcile writes
/// the sidecar configs.
#[instrument(skip_all, fields(policy = %policy.name_any(), namespace = policy.namespace().unwrap_or_default()))]
pub async fn reconcile_policy(
    policy: Arc<RateLimitPolicy>,
    ctx: Arc<PolicyContext>,
) -> Result<Action> {
    if policy.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = policy
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = policy.name_any();
    let client = &ctx.client;

    let models_api: Api<InferenceModel> = Api::namespaced(client.clone(), &ns);
    let models = models_api.list(&ListParams::default()).await?.items;
    let policies = list_policies(client, &ns).await?;
    let all: Vec<&RateLimitPolicy> = policies.iter().collect();
    let secrets = read_secrets(client, &ns, &all).await?;
    let mut previous = BTreeMap::new();
    for model in targets(&policy, &models) {
        let config = live_config(client, &ns, &model).await?;
        previous.insert(model, Previous { config, keys: None });
    }
    let resolution = resolve(&models, &policies, &secrets, &previous);
    // The policy as listed may be newer than the one the watch handed us.
    let current = policies
        .iter()
        .find(|p| p.name_any() == name)
        .unwrap_or(&policy);
    let Some(verdict) = resolution.policies.get(&name) else {
        return Ok(Action::await_change());
    };

    let prefix = format!("{name}/");
    let mine = |rules: &[sluice_crds::rate_limit_policy::RateLimitRule]| {
        rules
            .iter()
            .filter(|r| r.name.starts_with(&prefix))
            .cloned()
            .collect::<Vec<_>>()
    };
    let pods_api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let mut observations = Vec::new();
    for model in &verdict.applied_to {
        let live = previous.get(model).and_then(|p| p.config.as_ref());
        let wanted = resolution.models.get(model).map(|l| mine(&l.rules));
        let desired_generation = live
            .filter(|c| Some(mine(&c.rules)) == wanted)
            .map(|c| c.generation);
        let pods = pods_api
            .list(&ListParams::default().labels(&format!("{LABEL_MODEL}={model}")))
            .await?
            .items;
        let endpoints = pod_endpoints(&pods);
        observations.push(TargetObservation {
            model: model.clone(),
            desired_generation,
            pods: pod_generations(ctx.source.as_ref(), &endpoints).await,
        });
    }

    let status = policy_status(current, verdict, &observations, (ctx.now)());
    let converged = status
        .conditions
        .iter()
        .any(|c| c.type_ == CONVERGED && c.status == "True");
    if current.status.as_ref() != Some(&status) {
        let api: Api<RateLimitPolicy> = Api::namespaced(client.clone(), &ns);
        let patch = serde_json::json!({
            "apiVersion": RateLimitPolicy::api_version(&()),
            "kind": RateLimitPolicy::kind(&()),
            "status": status,
        });
        api.patch_status(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        let old = current
            .status
            .as_ref()
            .map(|s| s.conditions.clone())
            .unwrap_or_default();
        for t in transitions(&old, &status.conditions) {
            if let Err(error) = ctx
                .recorder
                .publish(&t.event(), &current.object_ref(&()))
                .await
            {
                // Best effort: the status says the same.
                warn!(%error, "cannot publish event");
            }
        }
    }
    let waiting = !verdict.applied_to.is_empty() && !converged;
    debug!(converged, "policy status reconciled");
    Ok(Action::requeue(if waiting {
        CONVERGE_POLL
    } else {
        SETTLED_POLL
    }))
}

/// Retries a failed policy status reconcile.
pub fn policy_error_policy(
    policy: Arc<RateLimitPolicy>,
    error: &Error,
    _ctx: Arc<PolicyContext>,
) -> Action {
    warn!(%error, reason = error.reason(), policy = %policy.name_any(), "policy status reconcile failed");
    Action::requeue(ERROR_RETRY)
}

/// Runs the policy status controller until `shutdown` resolves, with `config`'s concurrency.
pub async fn run(
    ctx: Arc<PolicyContext>,
    config: kube::runtime::controller::Config,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    Controller::new(
        Api::<RateLimitPolicy>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .with_config(config)
    .graceful_shutdown_on(shutdown)
    .run(reconcile_policy, policy_error_policy, ctx)
    .for_each(|result| async move {
        if let Err(error) = result {
            debug!(%error, "policy reconcile error (logged by the error policy)");
        }
    })
    .await;
}

#[cfg(test)]
mod tests;

//! What the controller observed in the cluster for one model: its Deployments and pods, the
//! ready pods per variant, the most pressing problem on them, and the circuit breakers the
//! sidecars hold open. Read by the desired state (ready counts), the status and the canary
//! analysis; pure.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::ResourceExt;
use sluice_crds::InferenceModel;

use crate::names::LABEL_VARIANT;

/// What the controller saw in the cluster for one model.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// The variants' Deployments (owned by the model).
    pub deployments: Vec<Deployment>,
    /// The model's pods.
    pub pods: Vec<Pod>,
    /// The breakers the sidecars of those pods hold open, as this reconcile's scrape found them
    /// (none when nothing was scraped).
    pub breakers: Breakers,
    /// `spec.fallback` names an InferenceModel the namespace does not have.
    pub fallback_missing: bool,
}

/// The sidecars' circuit breakers of forwards, as one scrape of a model's pods found them: per
/// destination variant, the pods whose breaker holds their forwards to it back. A pod that
/// could not be scraped counts nowhere.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Breakers {
    /// Pods scraped, per variant of the pod.
    scraped: BTreeMap<String, i32>,
    /// Per destination variant: the pods holding its breaker open.
    open: BTreeMap<String, i32>,
}

/// A problem found on the model's pods or Deployments: the Degraded reason and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Stable, CamelCase (`Unschedulable`, `WeightsFetchFailed`, ...).
    pub reason: &'static str,
    /// What happened and where, for `kubectl describe`.
    pub message: String,
}

/// Ready pods per variant name, as observed on the variants' Deployments. A variant that is
/// absent counts as 0 ready pods.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadyCounts(BTreeMap<String, i32>);

// === impl ReadyCounts ===

impl ReadyCounts {
    /// No observation at all (e.g. `render` without a cluster): every variant has 0 ready pods,
    /// so the effective weights are the desired ones.
    pub fn none() -> Self {
        Self::default()
    }

    /// Every variant of `model` with its [`wanted_replicas`] ready: what `render` assumes
    /// without a cluster.
    pub fn settled(model: &InferenceModel) -> Self {
        let replicas = wanted_replicas(model);
        model
            .spec
            .variants
            .iter()
            .map(|v| (v.name.clone(), replicas))
            .collect()
    }

    /// Records `ready` pods for `variant`.
    pub fn set(&mut self, variant: impl Into<String>, ready: i32) {
        self.0.insert(variant.into(), ready);
    }

    /// Ready pods of `variant` (0 when unknown).
    pub fn get(&self, variant: &str) -> i32 {
        self.0.get(variant).copied().unwrap_or(0)
    }

    /// Ready pods over all variants.
    pub fn total(&self) -> i32 {
        self.0.values().copied().filter(|n| *n > 0).sum()
    }
}

impl<S: Into<String>> FromIterator<(S, i32)> for ReadyCounts {
    fn from_iter<T: IntoIterator<Item = (S, i32)>>(iter: T) -> Self {
        Self(iter.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
}

// === impl Breakers ===

impl Breakers {
    /// Records one scraped pod of `variant` whose breakers of forwards to `open` are open.
    pub fn record<'a>(&mut self, variant: &str, open: impl IntoIterator<Item = &'a str>) {
        *self.scraped.entry(variant.to_owned()).or_default() += 1;
        for destination in open {
            *self.open.entry(destination.to_owned()).or_default() += 1;
        }
    }

    /// Pods whose breaker holds forwards to `variant` back.
    pub fn open(&self, variant: &str) -> i32 {
        self.open.get(variant).copied().unwrap_or(0)
    }

    /// Pods scraped that forward to `variant`: those of the other variants (a pod serves its
    /// own variant itself, so it holds no breaker for it).
    pub fn forwarding_to(&self, variant: &str) -> i32 {
        self.scraped
            .iter()
            .filter(|(v, _)| *v != variant)
            .map(|(_, n)| n)
            .sum()
    }
}

// === impl Observed ===

impl Observed {
    /// Ready pods per variant, from the Deployments' status.
    pub fn ready_counts(&self) -> ReadyCounts {
        self.deployments
            .iter()
            .filter_map(|d| {
                let variant = d.labels().get(LABEL_VARIANT)?.clone();
                let ready = d
                    .status
                    .as_ref()
                    .and_then(|s| s.ready_replicas)
                    .unwrap_or(0);
                Some((variant, ready))
            })
            .collect()
    }

    /// The Deployment named `name`, if observed.
    pub fn deployment(&self, name: &str) -> Option<&Deployment> {
        self.deployments
            .iter()
            .find(|d| d.metadata.name.as_deref() == Some(name))
    }

    /// The most pressing problem, if any (the order is the order a user should fix them in).
    pub fn problem(&self) -> Option<Problem> {
        let mut found: Vec<(u8, Problem)> = Vec::new();
        for pod in &self.pods {
            let pod_name = pod.name_any();
            let variant = pod.labels().get(LABEL_VARIANT).cloned().unwrap_or_default();
            let at = |m: &str| format!("variant {variant}, pod {pod_name}: {m}");
            let Some(status) = &pod.status else { continue };
            for c in status.init_container_statuses.iter().flatten() {
                if c.name == "fetch"
                    && let Some(msg) = failed_message(c)
                {
                    found.push((
                        0,
                        Problem {
                            reason: "WeightsFetchFailed",
                            message: at(&msg),
                        },
                    ));
                }
            }
            for c in status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten())
            {
                let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
                if let Some(w) = waiting
                    && matches!(
                        w.reason.as_deref(),
                        Some("ErrImagePull" | "ImagePullBackOff" | "InvalidImageName")
                    )
                {
                    let msg = w
                        .message
                        .clone()
                        .unwrap_or_else(|| "cannot pull image".into());
                    found.push((
                        1,
                        Problem {
                            reason: "ImagePullFailed",
                            message: at(&msg),
                        },
                    ));
                }
            }
            for c in status.conditions.iter().flatten() {
                if c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
                {
                    let msg = c.message.clone().unwrap_or_else(|| "no node fits".into());
                    found.push((
                        2,
                        Problem {
                            reason: "Unschedulable",
                            message: at(&msg),
                        },
                    ));
                }
            }
            for c in status.container_statuses.iter().flatten() {
                if c.name == "sidecar"
                    && let Some(msg) = failed_message(c)
                {
                    found.push((
                        3,
                        Problem {
                            reason: "SidecarCrashLooping",
                            message: at(&msg),
                        },
                    ));
                }
            }
        }
        for d in &self.deployments {
            for c in d
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
            {
                let msg = || {
                    format!(
                        "deployment {}: {}",
                        d.name_any(),
                        c.message.clone().unwrap_or_default()
                    )
                };
                if c.type_ == "Progressing"
                    && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
                {
                    found.push((
                        4,
                        Problem {
                            reason: "ProgressDeadlineExceeded",
                            message: msg(),
                        },
                    ));
                }
                if c.type_ == "ReplicaFailure" && c.status == "True" {
                    found.push((
                        5,
                        Problem {
                            reason: "ReplicaFailure",
                            message: msg(),
                        },
                    ));
                }
            }
        }
        found.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.message.cmp(&b.1.message)));
        found.into_iter().next().map(|(_, p)| p)
    }
}

/// Why a container failed (terminated non-zero now, or crash-looping after doing so).
fn failed_message(c: &ContainerStatus) -> Option<String> {
    let describe = |t: &k8s_openapi::api::core::v1::ContainerStateTerminated| {
        let detail = t
            .message
            .as_deref()
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .or(t.reason.as_deref())
            .unwrap_or("no message");
        format!(
            "container {} exited with code {}: {detail}",
            c.name, t.exit_code
        )
    };
    let state = c.state.as_ref()?;
    if let Some(t) = &state.terminated
        && t.exit_code != 0
    {
        return Some(describe(t));
    }
    let crash_looping =
        state.waiting.as_ref().and_then(|w| w.reason.as_deref()) == Some("CrashLoopBackOff");
    if crash_looping && let Some(t) = c.last_state.as_ref().and_then(|s| s.terminated.as_ref()) {
        return Some(describe(t));
    }
    None
}

/// Pods each variant should run (the HPA's minimum when autoscaled; 1 for a model that scales
/// to zero while it is awake).
pub fn wanted_replicas(model: &InferenceModel) -> i32 {
    match &model.spec.autoscaling {
        Some(a) => a.min_replicas.max(1),
        None => model.spec.replicas.unwrap_or(1),
    }
}

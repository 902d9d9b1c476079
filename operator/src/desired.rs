//! Desired state: pure functions from an InferenceModel to every object the operator applies.
//!
//! No I/O here, and nothing read from the cluster or from the model's status: what the
//! controller observed and decided (the policies' limits, the ready pods, the effective
//! weights) comes in as [`Inputs`]. The controller applies exactly what these functions return,
//! and `sluice-operator render` prints it, so GitOps users preview what a change does and the
//! golden tests pin it down.

mod activator;
pub mod auth;
mod autoscaler;
mod meta;
mod rbac;
mod service;
pub mod sidecar_config;
pub mod weights;
pub mod workload;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use sluice_crds::{InferenceModel, SidecarConfig};

use self::meta::{Renderer, stamp};
pub use self::meta::{Settings, content_hash};
use self::sidecar_config::desired_sidecar_config;
use self::weights::EffectiveWeights;
use crate::observe::ReadyCounts;
use crate::policy::merge::ModelLimits;
use crate::{Error, Result};

/// What the desired state depends on besides the model and the operator's settings.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// The effective limits of the RateLimitPolicies that target the model (identity, rules,
    /// the key Secret to mount).
    pub limits: &'a ModelLimits,
    /// The observed ready pods per variant (each pod's share of cluster-scoped limits).
    pub ready: &'a ReadyCounts,
    /// The weights the sidecars route with (see [`weights::for_plan`]).
    pub weights: &'a EffectiveWeights,
    /// The InferenceModels of the model's namespace (it among them or not): its sidecars answer
    /// for the others (see [`sidecar_config::other_models`]).
    pub models: &'a [InferenceModel],
}

/// Every object the operator applies for one InferenceModel, in apply order.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// Identity of the sidecar pods.
    pub service_account: ServiceAccount,
    /// Lets the sidecars read (only) their ConfigMap.
    pub role: Role,
    /// Binds [`Desired::role`] to [`Desired::service_account`].
    pub role_binding: RoleBinding,
    /// The sidecar config document (routing, limits).
    pub config_map: ConfigMap,
    /// The parsed document inside [`Desired::config_map`].
    pub sidecar_config: SidecarConfig,
    /// The model Service (all variants) first, then one per variant.
    pub services: Vec<Service>,
    /// One per variant.
    pub deployments: Vec<Deployment>,
    /// One per variant when `spec.autoscaling` is set.
    pub autoscalers: Vec<HorizontalPodAutoscaler>,
    /// Holds requests and wakes the model while it has no ready pod, when it scales to zero.
    pub activator: Option<Deployment>,
}

// === impl Desired ===

impl Desired {
    /// Every object as JSON, in apply order (for `render` and the tests).
    pub fn to_values(&self) -> Result<Vec<serde_json::Value>> {
        let mut out = vec![
            serde_json::to_value(&self.service_account)?,
            serde_json::to_value(&self.role)?,
            serde_json::to_value(&self.role_binding)?,
            serde_json::to_value(&self.config_map)?,
        ];
        for s in &self.services {
            out.push(serde_json::to_value(s)?);
        }
        for d in &self.deployments {
            out.push(serde_json::to_value(d)?);
        }
        for h in &self.autoscalers {
            out.push(serde_json::to_value(h)?);
        }
        if let Some(a) = &self.activator {
            out.push(serde_json::to_value(a)?);
        }
        Ok(out)
    }

    /// Every object as a YAML stream (`---` before each document).
    pub fn to_yaml(&self) -> Result<String> {
        let mut out = String::new();
        for v in self.to_values()? {
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&v)?);
        }
        Ok(out)
    }
}

/// Everything the operator applies for `model` in `namespace`, given [`Inputs`]. Owner
/// references are set when the model has a UID (it came from the cluster), so deleting the
/// model deletes them.
pub fn desired(
    model: &InferenceModel,
    namespace: &str,
    settings: &Settings,
    inputs: &Inputs<'_>,
) -> Result<Desired> {
    model.validate().map_err(Error::InvalidSpec)?;
    let name = model
        .metadata
        .name
        .as_deref()
        .ok_or(Error::MissingField("metadata.name"))?;
    let sidecar_config = desired_sidecar_config(
        model,
        namespace,
        inputs.limits,
        inputs.weights,
        inputs.ready,
        inputs.models,
    )?;
    let r = Renderer {
        model,
        name,
        namespace,
        settings,
        limits: inputs.limits,
    };

    let mut services = vec![r.service(None, inputs.ready)];
    let mut deployments = Vec::with_capacity(model.spec.variants.len());
    let mut autoscalers = Vec::new();
    for v in &model.spec.variants {
        services.push(r.service(Some(v), inputs.ready));
        deployments.push(r.deployment(v)?);
        if let Some(hpa) = r.autoscaler(v) {
            autoscalers.push(hpa);
        }
    }
    let mut out = Desired {
        service_account: r.service_account(),
        role: r.role(),
        role_binding: r.role_binding(),
        config_map: r.config_map(&sidecar_config)?,
        sidecar_config,
        services,
        deployments,
        autoscalers,
        activator: r.activator(),
    };
    stamp(&mut out.service_account)?;
    stamp(&mut out.role)?;
    stamp(&mut out.role_binding)?;
    stamp(&mut out.config_map)?;
    for s in &mut out.services {
        stamp(s)?;
    }
    for d in &mut out.deployments {
        stamp(d)?;
    }
    for h in &mut out.autoscalers {
        stamp(h)?;
    }
    if let Some(a) = &mut out.activator {
        stamp(a)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests;

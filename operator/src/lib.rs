//! `sluice-operator`: turns each InferenceModel into Deployments, Services, autoscalers and the
//! sidecar config, drift-free under GitOps (server-side apply, one field manager).
//!
//! Modules by layer, lowest first; a module imports only from its own layer or below, and the
//! imports form no cycle (`tests/layering.rs` holds the same table and checks both):
//!
//! 1. Foundation: [`names`] (labels, ports, object names), [`conditions`], [`observe`] (what
//!    the controller saw: Deployments, pods, ready counts, the breakers the sidecars hold
//!    open).
//! 2. One concern each: [`scrape`] (the sidecars' `/metrics`), [`policy::merge`]
//!    (RateLimitPolicy targeting and limits), [`policy::convergence`],
//!    [`rollout::judge`](mod@rollout::judge) and [`rollout::plan`] (canary verdicts, steps,
//!    rollbacks).
//! 3. Pure state: [`desired`] (every object to apply, as pure functions of the model and its
//!    inputs: what `render` prints), [`status`] (conditions and transitions),
//!    [`policy::status`].
//! 4. I/O beside the controller: [`rollout::analyze`](mod@rollout::analyze),
//!    [`policy::controller`], [`forwarding`] (the per-model forwarding Secret, created once,
//!    never rendered), [`leader`], [`admin`], [`metrics`], [`telemetry`].
//! 5. [`controller`]: observe → limits → analyze → weights → desired → apply → status.
//! 6. Process: [`app`] (`run`: admin server, leader election, graceful shutdown).

pub mod admin;
pub mod app;
pub mod conditions;
pub mod controller;
pub mod desired;
pub mod forwarding;
pub mod idle;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod observe;
pub mod policy;
pub mod rollout;
pub mod scrape;
pub mod status;

mod error;
#[cfg(test)]
mod fixtures;

pub use self::error::{Error, Result};

use sluice_crds::InferenceModel;

/// What `render` takes into account from its files.
#[derive(Clone, Debug, Default)]
pub struct Manifests {
    /// The models to render.
    pub models: Vec<InferenceModel>,
    /// The policies whose limits apply to them.
    pub policies: Vec<sluice_crds::RateLimitPolicy>,
    /// Secrets (API-key Secrets the policies name count as existing).
    pub secrets: Vec<k8s_openapi::api::core::v1::Secret>,
}

/// Reads every InferenceModel, RateLimitPolicy and Secret from a YAML stream (other kinds are
/// skipped; `---` separated).
pub fn manifests_from_yaml(text: &str) -> Result<Manifests> {
    use serde::Deserialize;
    let mut out = Manifests::default();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc)?;
        match value.get("kind").and_then(|k| k.as_str()) {
            Some("InferenceModel") => out.models.push(serde_yaml::from_value(value)?),
            Some("RateLimitPolicy") => out.policies.push(serde_yaml::from_value(value)?),
            Some("Secret") => out.secrets.push(serde_yaml::from_value(value)?),
            _ => {}
        }
    }
    Ok(out)
}

/// Reads every InferenceModel from a YAML stream (other kinds are skipped; `---` separated).
pub fn models_from_yaml(text: &str) -> Result<Vec<InferenceModel>> {
    use serde::Deserialize;
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        if value.get("kind").and_then(|k| k.as_str()) == Some("InferenceModel") {
            out.push(serde_yaml::from_value(value)?);
        }
    }
    Ok(out)
}

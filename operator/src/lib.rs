//! `sluice-operator`: turns each InferenceModel into Deployments, Services, autoscalers and the
//! sidecar config, drift-free under GitOps (server-side apply, one field manager).
//!
//! - [`resources`]: the desired state, as pure functions (what `render` prints).
//! - [`routing`]: effective weights and the sidecar config document.
//! - [`status`]: conditions and transitions.
//! - [`analysis`]: canary analysis (sidecar metrics → verdict → rollback, progressive steps).
//! - [`policy`]: RateLimitPolicy targeting, merging, shares and convergence.
//! - [`controller`]: observe, apply, prune, patch status.
//! - [`forwarding`]: the per-model forwarding Secret (created once, never rendered).
//! - [`app`]: `run` (admin server, leader election, graceful shutdown).

pub mod admin;
pub mod analysis;
pub mod app;
pub mod controller;
pub mod forwarding;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod resources;
pub mod routing;
pub mod status;
pub mod telemetry;

mod error;
#[cfg(test)]
mod fixtures;

pub use error::{Error, Result};

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

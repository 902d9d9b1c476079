//! The sluice API: the two custom resources users write (`InferenceModel`, `RateLimitPolicy`)
//! and the sidecar config document, the single contract between the operator and the sidecars,
//! plus the names of the sidecar metrics the operator reads ([`contract`]) and how a sidecar pod
//! stops ([`lifecycle`]).
//!
//! The Rust types are the source of truth: the CRD YAML in `crds/` is generated from them
//! (`make crds`) and a test fails when the committed YAML is stale.

pub mod activation;
pub mod auth;
pub mod contract;
pub mod device;
pub mod inference_model;
pub mod lifecycle;
pub mod quantity;
pub mod rate_limit_policy;
pub mod sidecar_config;

mod error;

pub use error::{Error, Result};
pub use inference_model::{InferenceModel, InferenceModelSpec, InferenceModelStatus};
pub use rate_limit_policy::{RateLimitPolicy, RateLimitPolicySpec, RateLimitPolicyStatus};
pub use sidecar_config::SidecarConfig;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The API group of every sluice kind.
pub const GROUP: &str = "sluice.dev";
/// The served (and stored) API version.
pub const VERSION: &str = "v1alpha1";

/// Every CRD this crate defines, with the file name it is committed under in `crds/`.
pub fn crds() -> Vec<(&'static str, CustomResourceDefinition)> {
    vec![
        ("inferencemodels.yaml", InferenceModel::crd()),
        ("ratelimitpolicies.yaml", RateLimitPolicy::crd()),
    ]
}

/// Renders a CRD as the YAML committed in `crds/` (one document, with a generated-file header).
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String> {
    let body = serde_yaml::to_string(crd)?;
    Ok(format!(
        "# Generated from the Rust types in crds/src by `make crds`. Do not edit.\n{body}"
    ))
}

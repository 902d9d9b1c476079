//! What every object of one model shares: the [`Renderer`] (the model, its namespace, the
//! operator's [`Settings`] and the inputs its objects are rendered from), the labels, selector and owner reference each object
//! carries, and the content hashes that decide what to apply. Each kind's `impl Renderer`
//! block lives in that kind's module.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sluice_crds::InferenceModel;
use sluice_crds::inference_model::Variant;

use crate::Result;
use crate::names::{ANNOTATION_APPLIED_HASH, LABEL_MODEL, LABEL_VARIANT, MANAGED_BY};
use crate::policy::merge::ModelLimits;

/// How the operator renders pods: the images it was started with, and what it passes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// Sidecar image for CPU variants.
    pub sidecar_image: String,
    /// Sidecar image for variants with `gpu.count > 0`.
    pub sidecar_cuda_image: String,
    /// The OpenTelemetry variables every sidecar and activator gets: the operator's own
    /// ([`sluice_telemetry::passed_on`]), so one setting traces the whole path.
    pub tracing_env: Vec<(String, String)>,
}

/// Renders one model's objects; holds what every function needs.
pub(super) struct Renderer<'a> {
    pub(super) model: &'a InferenceModel,
    pub(super) name: &'a str,
    pub(super) namespace: &'a str,
    pub(super) settings: &'a Settings,
    pub(super) limits: &'a ModelLimits,
}

// === impl Renderer ===

impl Renderer<'_> {
    pub(super) fn labels(&self, variant: Option<&Variant>) -> BTreeMap<String, String> {
        let mut l = BTreeMap::from([
            (
                "app.kubernetes.io/name".to_owned(),
                "sluice-sidecar".to_owned(),
            ),
            (
                "app.kubernetes.io/instance".to_owned(),
                self.name.to_owned(),
            ),
            (
                "app.kubernetes.io/component".to_owned(),
                "inference".to_owned(),
            ),
            ("app.kubernetes.io/part-of".to_owned(), "sluice".to_owned()),
            (
                "app.kubernetes.io/managed-by".to_owned(),
                MANAGED_BY.to_owned(),
            ),
            (LABEL_MODEL.to_owned(), self.name.to_owned()),
        ]);
        if let Some(v) = variant {
            l.insert(LABEL_VARIANT.to_owned(), v.name.clone());
        }
        l
    }

    pub(super) fn selector(&self, variant: Option<&Variant>) -> BTreeMap<String, String> {
        let mut s = BTreeMap::from([(LABEL_MODEL.to_owned(), self.name.to_owned())]);
        if let Some(v) = variant {
            s.insert(LABEL_VARIANT.to_owned(), v.name.clone());
        }
        s
    }

    pub(super) fn meta(&self, name: String, variant: Option<&Variant>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_owned()),
            labels: Some(self.labels(variant)),
            owner_references: self.model.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        }
    }
}

/// Hex SHA-256 (first 16 digits) of a value's JSON encoding.
pub fn content_hash(value: &impl Serialize) -> Result<String> {
    let bytes = serde_json::to_vec(value)?;
    let digest = Sha256::digest(&bytes);
    Ok(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
}

/// Sets [`ANNOTATION_APPLIED_HASH`] to the hash of the object without it.
pub(super) fn stamp<K: Resource + Serialize>(obj: &mut K) -> Result<()> {
    obj.annotations_mut().remove(ANNOTATION_APPLIED_HASH);
    let hash = content_hash(obj)?;
    obj.annotations_mut()
        .insert(ANNOTATION_APPLIED_HASH.to_owned(), hash);
    Ok(())
}

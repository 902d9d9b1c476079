//! Services: one for the model (every variant's pods, or the activator while a model scaled to
//! zero has none; what clients call) and one per variant (what other variants' sidecars and the
//! activator forward to).

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sluice_crds::inference_model::Variant;

use super::meta::Renderer;
use crate::names::{ADMIN_PORT, API_PORT, variant_object_name};
use crate::observe::ReadyCounts;

// === impl Renderer ===

impl Renderer<'_> {
    /// The model's Service (`variant` is `None`; it selects the activator while a model that
    /// scales to zero has no `ready` pod) or a variant's.
    pub(super) fn service(&self, variant: Option<&Variant>, ready: &ReadyCounts) -> Service {
        let name = match variant {
            Some(v) => variant_object_name(self.name, &v.name),
            None => self.name.to_owned(),
        };
        let port = |name: &str, port: i32, target: &str| ServicePort {
            name: Some(name.to_owned()),
            port,
            target_port: Some(IntOrString::String(target.to_owned())),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        };
        Service {
            metadata: self.meta(name, variant),
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".to_owned()),
                selector: Some(match variant {
                    Some(_) => self.selector(variant),
                    None => self.model_selector(ready),
                }),
                ports: Some(vec![
                    port("http", API_PORT, "http"),
                    port("metrics", ADMIN_PORT, "admin"),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

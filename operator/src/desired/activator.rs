//! Scale to zero (`autoscaling.minReplicas: 0`): the activator's Deployment, the sidecar binary
//! run as `sluice-sidecar activate` (no model, a few MiB), and the selector that points the
//! model's Service at it while no pod of the model is ready (see [`sluice_crds::activation`]).
//!
//! Why the sidecar binary in a Deployment of its own, and not the operator: the model's Service
//! can only select pods of its own namespace; the activator holds the requests of one model,
//! so a crash or a flood there touches no other model; and it runs wherever the model does,
//! with the model's own service account (which may scale only this model's Deployments).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Container, HTTPGetAction, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements,
};
use k8s_openapi::api::rbac::v1::PolicyRule;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use sluice_crds::activation::{
    COMPONENT, HOLD_TIMEOUT_SECS_FLAG, SUBCOMMAND, UPSTREAM_FLAG, WAKE_FLAG,
};

use super::meta::Renderer;
use super::workload::{
    SIDECAR_UID, container_port, pod_env, restricted_security_context, runtime_default_seccomp,
};
use crate::names::{
    ADMIN_PORT, API_PORT, LABEL_ACTIVATOR, LABEL_MODEL, activator_name, sidecar_account_name,
    variant_address, variant_object_name,
};
use crate::observe::ReadyCounts;

// === impl Renderer ===

impl Renderer<'_> {
    /// Whether the model scales to zero (and so has an activator).
    pub(super) fn scales_to_zero(&self) -> bool {
        self.model.spec.scale_to_zero().is_some()
    }

    /// The model Service's selector: its pods, or the activator while none is ready or the
    /// model is (being) scaled to zero (decided into the planned model's status, so requests
    /// go to the activator before the last pod stops).
    pub(super) fn model_selector(&self, ready: &ReadyCounts) -> BTreeMap<String, String> {
        let at_zero = self.model.status.as_ref().is_some_and(|s| s.scaled_to_zero);
        if self.scales_to_zero() && (at_zero || ready.total() == 0) {
            BTreeMap::from([(LABEL_ACTIVATOR.to_owned(), self.name.to_owned())])
        } else {
            self.selector(None)
        }
    }

    /// What the activator may do with the model's service account: scale this model's
    /// Deployments (only through their `scale` subresource, only these names).
    pub(super) fn activator_rule(&self) -> Option<PolicyRule> {
        self.scales_to_zero().then(|| PolicyRule {
            api_groups: Some(vec!["apps".to_owned()]),
            resources: Some(vec!["deployments/scale".to_owned()]),
            resource_names: Some(self.variant_deployments()),
            verbs: vec!["get".to_owned(), "patch".to_owned()],
            ..Default::default()
        })
    }

    fn variant_deployments(&self) -> Vec<String> {
        self.model
            .spec
            .variants
            .iter()
            .map(|v| variant_object_name(self.name, &v.name))
            .collect()
    }

    /// The activator's Deployment, when the model scales to zero.
    pub(super) fn activator(&self) -> Option<Deployment> {
        let autoscaling = self.model.spec.scale_to_zero()?;
        // Not the model's label: the model's Service selects every pod carrying it.
        let mut pod_labels = self.labels(None);
        pod_labels.remove(LABEL_MODEL);
        pod_labels.insert(
            "app.kubernetes.io/component".to_owned(),
            COMPONENT.to_owned(),
        );
        pod_labels.insert(LABEL_ACTIVATOR.to_owned(), self.name.to_owned());
        let mut meta = self.meta(activator_name(self.name), None);
        if let Some(labels) = meta.labels.as_mut() {
            labels.insert(
                "app.kubernetes.io/component".to_owned(),
                COMPONENT.to_owned(),
            );
        }
        let mut args = vec![SUBCOMMAND.to_owned()];
        for deployment in self.variant_deployments() {
            args.extend([format!("--{WAKE_FLAG}"), deployment]);
        }
        // Variants with traffic first: the first that answers takes a held request, and its
        // sidecars route it by weight anyway.
        let mut variants: Vec<_> = self.model.spec.variants.iter().collect();
        variants.sort_by_key(|v| std::cmp::Reverse(v.weight));
        for v in variants {
            args.extend([
                format!("--{UPSTREAM_FLAG}"),
                variant_address(self.name, &v.name, self.namespace),
            ]);
        }
        args.extend([
            format!("--{HOLD_TIMEOUT_SECS_FLAG}"),
            autoscaling.activation_timeout_secs().to_string(),
        ]);
        let probe = |path: &str| Probe {
            http_get: Some(HTTPGetAction {
                path: Some(path.to_owned()),
                port: IntOrString::String("admin".to_owned()),
                ..Default::default()
            }),
            period_seconds: Some(5),
            timeout_seconds: Some(2),
            ..Default::default()
        };
        let quantity = |s: &str| Quantity(s.to_owned());
        let container = Container {
            name: "activator".to_owned(),
            image: Some(self.settings.sidecar_image.clone()),
            args: Some(args),
            env: Some(pod_env(self.settings)),
            ports: Some(vec![
                container_port("http", API_PORT),
                container_port("admin", ADMIN_PORT),
            ]),
            // It holds requests in memory (bodies of at most 1 MiB each) and loads no model.
            resources: Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".to_owned(), quantity("50m")),
                    ("memory".to_owned(), quantity("64Mi")),
                ])),
                limits: Some(BTreeMap::from([("memory".to_owned(), quantity("512Mi"))])),
                ..Default::default()
            }),
            readiness_probe: Some(probe("/readyz")),
            liveness_probe: Some(probe("/healthz")),
            security_context: Some(restricted_security_context()),
            ..Default::default()
        };
        Some(Deployment {
            metadata: meta,
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        LABEL_ACTIVATOR.to_owned(),
                        self.name.to_owned(),
                    )])),
                    ..Default::default()
                },
                template: PodTemplateSpec {
                    metadata: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                        labels: Some(pod_labels),
                        ..Default::default()
                    }),
                    spec: Some(PodSpec {
                        service_account_name: Some(sidecar_account_name(self.name)),
                        containers: vec![container],
                        security_context: Some(PodSecurityContext {
                            run_as_non_root: Some(true),
                            run_as_user: Some(SIDECAR_UID),
                            run_as_group: Some(SIDECAR_UID),
                            seccomp_profile: Some(runtime_default_seccomp()),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                },
                ..Default::default()
            }),
            ..Default::default()
        })
    }
}

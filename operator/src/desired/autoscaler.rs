//! A HorizontalPodAutoscaler per variant when `spec.autoscaling` is set (CPU by default, or the
//! sidecar's per-pod gauges through a custom metrics adapter: the chart's
//! `prometheus-adapter-rules.yaml` serves every name used here, which the real-API-server test
//! `e2e/tests/apiserver_autoscaling.rs` checks through a live HPA).

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec,
    MetricIdentifier, MetricSpec, MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use sluice_crds::contract::{
    COMPLETION_TOKENS_PER_SECOND_SERIES, QUEUE_DEPTH_SERIES, REQUESTS_IN_FLIGHT_SERIES,
};
use sluice_crds::inference_model::{AutoscalingMetricType, Variant};

use super::meta::Renderer;
use crate::names::variant_object_name;

// === impl Renderer ===

impl Renderer<'_> {
    pub(super) fn autoscaler(&self, v: &Variant) -> Option<HorizontalPodAutoscaler> {
        let a = self.model.spec.autoscaling.as_ref()?;
        let name = variant_object_name(self.name, &v.name);
        let mut metrics: Vec<MetricSpec> = a
            .metrics
            .iter()
            .map(|m| match m.type_ {
                AutoscalingMetricType::Cpu => cpu_metric(m.target),
                AutoscalingMetricType::InFlightRequests => {
                    pods_metric(REQUESTS_IN_FLIGHT_SERIES, m.target)
                }
                AutoscalingMetricType::QueueDepth => pods_metric(QUEUE_DEPTH_SERIES, m.target),
                AutoscalingMetricType::TokensPerSecond => {
                    pods_metric(COMPLETION_TOKENS_PER_SECOND_SERIES, m.target)
                }
            })
            .collect();
        if metrics.is_empty() {
            metrics.push(cpu_metric(80));
        }
        Some(HorizontalPodAutoscaler {
            metadata: self.meta(name.clone(), Some(v)),
            spec: Some(HorizontalPodAutoscalerSpec {
                scale_target_ref: CrossVersionObjectReference {
                    api_version: Some("apps/v1".to_owned()),
                    kind: "Deployment".to_owned(),
                    name,
                },
                // An HPA cannot go below 1 (without an alpha feature gate): scaling to 0 is
                // the operator's, and an HPA leaves a Deployment at 0 replicas alone.
                min_replicas: Some(a.min_replicas.max(1)),
                max_replicas: a.max_replicas,
                metrics: Some(metrics),
                behavior: a.behavior.clone(),
            }),
            ..Default::default()
        })
    }
}

fn cpu_metric(target: i32) -> MetricSpec {
    MetricSpec {
        type_: "Resource".to_owned(),
        resource: Some(ResourceMetricSource {
            name: "cpu".to_owned(),
            target: MetricTarget {
                type_: "Utilization".to_owned(),
                average_utilization: Some(target),
                ..Default::default()
            },
        }),
        ..Default::default()
    }
}

fn pods_metric(name: &str, target: i32) -> MetricSpec {
    MetricSpec {
        type_: "Pods".to_owned(),
        pods: Some(PodsMetricSource {
            metric: MetricIdentifier {
                name: name.to_owned(),
                selector: None,
            },
            target: MetricTarget {
                type_: "AverageValue".to_owned(),
                average_value: Some(Quantity(target.to_string())),
                ..Default::default()
            },
        }),
        ..Default::default()
    }
}

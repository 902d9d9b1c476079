//! The sidecar config document (routing, limits, the other models of the namespace) and the
//! ConfigMap that carries it to the sidecars, which watch it: weight and limit changes reach
//! them without a restart.

use std::collections::{BTreeMap, HashSet};

use k8s_openapi::api::core::v1::ConfigMap;
use sluice_crds::sidecar_config::{
    BreakerConfig, CacheConfig, FallbackRoute, ModelAddress, RoutingConfig, SIDECAR_CONFIG_KEY,
    SIDECAR_CONFIG_VERSION, SaturationConfig, VariantRoute,
};
use sluice_crds::{InferenceModel, SidecarConfig};

use super::auth::auth_config;
use super::meta::Renderer;
use super::weights::EffectiveWeights;
use crate::Result;
use crate::names::{config_map_name, model_address, variant_address};
use crate::observe::ReadyCounts;
use crate::policy::merge::{ModelLimits, replica_share};

/// The sidecar config document for a model: the effective `weights`, each variant's
/// in-cluster address, routing headers, the identity and rules of the policies that target it
/// (`limits`, from [`crate::policy::merge::resolve`]), this pod's share of cluster-scoped
/// limits (from the `ready` pods), where shedding starts ([`saturation`]) and the other models
/// of the namespace its sidecars answer for (from `models`, see [`other_models`]). Sealed:
/// `generation` is the content hash, so equal inputs give byte-identical ConfigMaps.
pub fn desired_sidecar_config(
    model: &InferenceModel,
    namespace: &str,
    limits: &ModelLimits,
    weights: &EffectiveWeights,
    ready: &ReadyCounts,
    models: &[InferenceModel],
) -> Result<SidecarConfig> {
    let name = model.metadata.name.as_deref().unwrap_or_default();
    let routing = model.spec.routing.clone().unwrap_or_default();
    let config = SidecarConfig {
        version: SIDECAR_CONFIG_VERSION.to_owned(),
        generation: 0,
        model: model.served_name(),
        variants: weights
            .weights
            .iter()
            .map(|(variant, _, effective)| VariantRoute {
                name: variant.clone(),
                weight: (*effective).max(0) as u32,
                address: Some(variant_address(name, variant, namespace)),
            })
            .collect(),
        routing: RoutingConfig {
            sticky_header: routing.sticky_header,
            override_header: routing.override_header,
            breaker: routing.breaker.map(|b| {
                let default = BreakerConfig::default();
                BreakerConfig {
                    consecutive_failures: b
                        .consecutive_failures
                        .unwrap_or(default.consecutive_failures),
                    // Whole seconds, rounded up; validate() checked at least 1 s.
                    open_seconds: b.open_for.map_or(default.open_seconds, |d| {
                        let secs = std::time::Duration::from(d).as_secs_f64().ceil() as u64;
                        u32::try_from(secs).unwrap_or(u32::MAX)
                    }),
                }
            }),
        },
        identity: limits.identity.clone(),
        auth: model.spec.auth.as_ref().map(auth_config),
        rules: limits.rules.clone(),
        // Cluster-scoped limits are split over the pods that serve; recomputed as pods come and
        // go (a ConfigMap change, never a restart).
        replica_share: replica_share(ready.total()),
        saturation: saturation(model),
        fallback: model.spec.fallback.as_ref().map(|f| FallbackRoute {
            model: f.model.clone(),
            address: model_address(&f.model, namespace),
        }),
        cache: model.spec.cache.as_ref().and_then(|c| {
            // validate() checked the limits.
            let (max_bytes, ttl_seconds) = c.limits().ok()?;
            Some(CacheConfig {
                max_bytes,
                ttl_seconds,
                shared: c.shared,
            })
        }),
        models: other_models(model, namespace, models),
    };
    Ok(config.sealed()?)
}

/// The name `model` is listed under in the configs of the other models of its namespace: its
/// served name, or `None` while it is being deleted (its pods are going).
pub fn listed_name(model: &InferenceModel) -> Option<String> {
    model
        .metadata
        .deletion_timestamp
        .is_none()
        .then(|| model.served_name())
}

/// Every other model among `models` (the InferenceModels of `model`'s namespace) by the name
/// clients send for it ([`listed_name`]) and its model Service: what `model`'s sidecars send on
/// to them (one endpoint for all models). `model`'s own served name is never another's (its
/// pods serve it), and a name two others share goes to the first by object name, so the list,
/// sorted by served name, depends on nothing but the set of models.
pub fn other_models(
    model: &InferenceModel,
    namespace: &str,
    models: &[InferenceModel],
) -> Vec<ModelAddress> {
    let own = model.metadata.name.as_deref().unwrap_or_default();
    let mut others: Vec<(&str, String)> = models
        .iter()
        .filter_map(|m| {
            let name = m.metadata.name.as_deref().filter(|n| *n != own)?;
            Some((name, listed_name(m)?))
        })
        .collect();
    others.sort();
    let mut taken = HashSet::from([model.served_name()]);
    let mut out: Vec<ModelAddress> = others
        .into_iter()
        .filter(|(_, served)| taken.insert(served.clone()))
        .map(|(name, served)| ModelAddress {
            name: served,
            address: model_address(name, namespace),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Shedding starts when a pod has as many requests in flight as its engine runs at once:
/// beyond that a request only queues, so `Sheddable` traffic is refused rather than made to
/// wait in front of the rest (and `Standard` traffic once the queue is as long again).
///
/// The document is shared by every variant's pods, so with variants whose engines differ the
/// mark is the smallest concurrency of any of them: no pod queues `Sheddable` requests behind
/// a full engine, and a variant with more slots sheds some early, the safe side to err on
/// (the alternative, the largest, would let the smaller variants' queues grow unshed).
pub fn saturation(model: &InferenceModel) -> SaturationConfig {
    SaturationConfig {
        max_in_flight: model
            .spec
            .variants
            .iter()
            .map(|v| v.max_concurrent_sequences())
            .min(),
    }
}

// === impl Renderer ===

impl Renderer<'_> {
    pub(super) fn config_map(&self, config: &SidecarConfig) -> Result<ConfigMap> {
        Ok(ConfigMap {
            metadata: self.meta(config_map_name(self.name), None),
            data: Some(BTreeMap::from([(
                SIDECAR_CONFIG_KEY.to_owned(),
                config.to_json()?,
            )])),
            ..Default::default()
        })
    }
}

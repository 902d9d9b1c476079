//! Effective routing weights and the sidecar config document, as pure functions.
//!
//! Today the effective weights are the desired ones with the traffic of variants that have no
//! ready pod moved, proportionally, to the ready ones. Canary rollback (issue 7)
//! plugs in here; the limits of the RateLimitPolicies that target the model come resolved from
//! [`crate::policy`].

use std::collections::BTreeMap;

use sluice_crds::sidecar_config::{RoutingConfig, SIDECAR_CONFIG_VERSION, VariantRoute};
use sluice_crds::{InferenceModel, SidecarConfig};

use crate::Result;
use crate::policy::{ModelLimits, replica_share};
use crate::resources::{API_PORT, variant_object_name};

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

/// Why an effective weight differs from the desired one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EffectiveWeights {
    /// Per variant, in spec order: (name, desired, effective).
    pub weights: Vec<(String, i32, i32)>,
    /// Variants whose traffic was moved to others because they have no ready pod.
    pub redistributed_from: Vec<String>,
}

/// Effective weights: desired weights, except that variants with 0 ready pods get 0 and their
/// share goes to the ready variants in proportion to their desired weights (largest remainder,
/// so the result still sums to the desired total). Only when some ready variant has a positive
/// desired weight; otherwise the desired weights are kept (there is nowhere better to send
/// traffic).
pub fn effective_weights(desired: &[(&str, i32)], ready: &ReadyCounts) -> EffectiveWeights {
    let is_ready = |name: &str| ready.get(name) > 0;
    let ready_total: i64 = desired
        .iter()
        .filter(|(n, _)| is_ready(n))
        .map(|(_, w)| i64::from((*w).max(0)))
        .sum();
    let total: i64 = desired.iter().map(|(_, w)| i64::from((*w).max(0))).sum();
    let unready_with_traffic: Vec<String> = desired
        .iter()
        .filter(|(n, w)| !is_ready(n) && *w > 0)
        .map(|(n, _)| (*n).to_owned())
        .collect();

    if ready_total == 0 || unready_with_traffic.is_empty() {
        return EffectiveWeights {
            weights: desired
                .iter()
                .map(|(n, w)| ((*n).to_owned(), *w, *w))
                .collect(),
            redistributed_from: Vec::new(),
        };
    }

    // Largest remainder: floor shares first, then one point each to the largest remainders
    // (ties go to the variant listed first).
    let mut shares: Vec<(i64, i64)> = desired
        .iter()
        .map(|(n, w)| {
            if is_ready(n) {
                let scaled = i64::from((*w).max(0)) * total;
                (scaled / ready_total, scaled % ready_total)
            } else {
                (0, -1)
            }
        })
        .collect();
    let assigned: i64 = shares.iter().map(|(s, _)| s).sum();
    let mut order: Vec<usize> = (0..shares.len()).filter(|i| shares[*i].1 >= 0).collect();
    order.sort_by(|a, b| shares[*b].1.cmp(&shares[*a].1).then(a.cmp(b)));
    for i in order
        .into_iter()
        .cycle()
        .take((total - assigned).max(0) as usize)
    {
        shares[i].0 += 1;
    }
    EffectiveWeights {
        weights: desired
            .iter()
            .zip(shares)
            .map(|((n, w), (s, _))| ((*n).to_owned(), *w, s as i32))
            .collect(),
        redistributed_from: unready_with_traffic,
    }
}

/// Effective weights of a model's variants given what is ready and what the canary analysis
/// decided (`status.rollout` of the current generation, see [`crate::analysis`]): the step
/// weights in force replace the desired ones, rolled-back variants get 0 (their share goes to
/// the others in proportion), then unready variants' share moves to the ready ones. The
/// reported desired weight is always spec's.
pub fn model_effective_weights(model: &InferenceModel, ready: &ReadyCounts) -> EffectiveWeights {
    let (plan, rolled_back) = crate::analysis::route_plan(model);
    let targets: Vec<(&str, i32)> = plan.iter().map(|(n, _, t)| (n.as_str(), *t)).collect();
    let after_rollback = effective_weights_excluding(&targets, &rolled_back);
    let routed: Vec<(&str, i32)> = after_rollback
        .iter()
        .map(|(n, w)| (n.as_str(), *w))
        .collect();
    let mut weights = effective_weights(&routed, ready);
    for ((_, desired, _), (_, d, _)) in plan.iter().zip(weights.weights.iter_mut()) {
        *d = *desired;
    }
    weights
}

/// `desired` with the `excluded` variants at 0 and their share moved to the others in proportion
/// to their weights (unless no other variant has a positive weight: then nothing moves).
pub fn effective_weights_excluding(
    desired: &[(&str, i32)],
    excluded: &std::collections::BTreeSet<String>,
) -> Vec<(String, i32)> {
    // The readiness redistribution with "excluded = no ready pod" is exactly this.
    let available: ReadyCounts = desired
        .iter()
        .map(|(n, _)| (*n, i32::from(!excluded.contains(*n))))
        .collect();
    effective_weights(desired, &available)
        .weights
        .into_iter()
        .map(|(n, _, e)| (n, e))
        .collect()
}

/// The sidecar config document for a model: effective weights, each variant's in-cluster
/// address, routing headers, the identity and rules of the policies that target it (`limits`,
/// from [`crate::policy::resolve`]) and this pod's share of cluster-scoped limits.
/// Sealed: `generation` is the content hash, so equal inputs give byte-identical ConfigMaps.
pub fn desired_sidecar_config(
    model: &InferenceModel,
    namespace: &str,
    limits: &ModelLimits,
    ready: &ReadyCounts,
) -> Result<SidecarConfig> {
    let name = model.metadata.name.as_deref().unwrap_or_default();
    let weights = model_effective_weights(model, ready);
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
                address: Some(format!(
                    "http://{}.{namespace}.svc:{API_PORT}",
                    variant_object_name(name, variant)
                )),
            })
            .collect(),
        routing: RoutingConfig {
            sticky_header: routing.sticky_header,
            override_header: routing.override_header,
        },
        identity: limits.identity.clone(),
        rules: limits.rules.clone(),
        // Cluster-scoped limits are split over the pods that serve; recomputed as pods come and
        // go (a ConfigMap change, never a restart).
        replica_share: replica_share(ready.total()),
        saturation: Default::default(),
    };
    Ok(config.sealed()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eff(desired: &[(&str, i32)], ready: &[(&str, i32)]) -> Vec<i32> {
        let ready: ReadyCounts = ready.iter().map(|(n, r)| (*n, *r)).collect();
        effective_weights(desired, &ready)
            .weights
            .into_iter()
            .map(|(_, _, e)| e)
            .collect()
    }

    #[test]
    fn all_ready_keeps_desired() {
        assert_eq!(
            eff(&[("a", 90), ("b", 10)], &[("a", 1), ("b", 2)]),
            [90, 10]
        );
    }

    #[test]
    fn none_ready_keeps_desired() {
        assert_eq!(eff(&[("a", 90), ("b", 10)], &[]), [90, 10]);
    }

    #[test]
    fn unready_share_moves_proportionally_and_sums_to_100() {
        assert_eq!(eff(&[("a", 90), ("b", 10)], &[("a", 1)]), [100, 0]);
        assert_eq!(eff(&[("a", 90), ("b", 10)], &[("b", 1)]), [0, 100]);
        // 50 from c split 30:20 over a and b → 33.33 and 66.67 scaled: 100*20/60, 100*40/60.
        let w = eff(&[("a", 20), ("b", 40), ("c", 40)], &[("a", 1), ("b", 3)]);
        assert_eq!(w, [33, 67, 0]);
        assert_eq!(w.iter().sum::<i32>(), 100);
        let w = eff(
            &[("a", 1), ("b", 1), ("c", 1), ("d", 97)],
            &[("a", 1), ("b", 1), ("c", 1)],
        );
        assert_eq!(w, [34, 33, 33, 0]);
    }

    #[test]
    fn ready_variants_with_zero_weight_do_not_take_traffic() {
        assert_eq!(eff(&[("a", 100), ("b", 0)], &[("b", 1)]), [100, 0]);
    }

    #[test]
    fn redistribution_is_reported() {
        let ready: ReadyCounts = [("a", 1)].into_iter().collect();
        let w = effective_weights(&[("a", 50), ("b", 50)], &ready);
        assert_eq!(w.redistributed_from, ["b"]);
    }
}

//! Effective routing weights: the weights the sidecars route with, from the rollout plan
//! (desired weights, progressive steps, rollbacks) and the ready pods. Computed once per
//! reconcile and given to both the sidecar config and the status, so the two never disagree.
//!
//! Variants without a ready pod get 0 and their traffic moves, proportionally, to the ready
//! ones; rolled-back variants get 0 the same way before that.

use std::collections::BTreeSet;

use crate::observe::ReadyCounts;
use crate::rollout::plan::RoutePlan;

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

/// Effective weights of a model's variants given its rollout plan ([`RoutePlan`], from
/// `status.rollout` of the current generation) and what is ready: the step weights in force
/// replace the desired ones, rolled-back variants get 0 (their share goes to the others in
/// proportion), then unready variants' share moves to the ready ones. The reported desired
/// weight is always spec's.
pub fn for_plan(plan: &RoutePlan, ready: &ReadyCounts) -> EffectiveWeights {
    let targets: Vec<(&str, i32)> = plan
        .variants
        .iter()
        .map(|(n, _, t)| (n.as_str(), *t))
        .collect();
    let after_rollback = effective_weights_excluding(&targets, &plan.rolled_back);
    let routed: Vec<(&str, i32)> = after_rollback
        .iter()
        .map(|(n, w)| (n.as_str(), *w))
        .collect();
    let mut weights = effective_weights(&routed, ready);
    for ((_, desired, _), (_, d, _)) in plan.variants.iter().zip(weights.weights.iter_mut()) {
        *d = *desired;
    }
    weights
}

/// `desired` with the `excluded` variants at 0 and their share moved to the others in proportion
/// to their weights (unless no other variant has a positive weight: then nothing moves).
pub fn effective_weights_excluding(
    desired: &[(&str, i32)],
    excluded: &BTreeSet<String>,
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

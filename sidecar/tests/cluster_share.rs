//! Cluster-wide limits split over replicas, with the sidecar's own limiter: N pods (N = 1..=10),
//! each a real `Limiter` enforcing the sidecar config the operator writes for the example
//! policies (operator/tests/golden/policy/) with the `replicaShare` the operator writes for N
//! ready pods (golden `replica-shares.yaml`), together admit within 10% of the free tier's
//! cluster limit (`free-tier/free-tier-total`: 5 requests/s, burst 10) while four times that
//! is offered round-robin, as the model Service spreads it. Without the split they would admit
//! N times the limit. Simulated clock, no sleeps.

use std::{collections::BTreeMap, path::Path, sync::Arc};

use sluice_crds::SidecarConfig;
use sluice_sidecar::limits::{Identity, LimitMetrics, Limiter, Policy, Request};

const SECOND: u64 = 1_000_000_000;
/// The free tier's cluster limit, requests per second (ratelimitpolicy-free.yaml).
const LIMIT: f64 = 5.0;

fn golden(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../operator/tests/golden/policy")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// N pods, each with its own limiter and the config compiled at `share`.
fn pods(config: &SidecarConfig, n: usize, share: f64) -> Vec<(Limiter, Arc<Policy>)> {
    let mut config = config.clone();
    config.replica_share = share;
    config.validate().expect("valid share");
    let config = Arc::new(config);
    (0..n)
        .map(|_| {
            let policy =
                Policy::compile(config.clone(), Arc::new(Identity::open()), None, 0, 1 << 20);
            (
                Limiter::with_metrics(LimitMetrics::default()),
                Arc::new(policy),
            )
        })
        .collect()
}

/// Offers `rps` free-tier requests for `seconds`, round-robin over the pods, each from one of
/// many keys (so the per-key rules never bind); returns the requests admitted after `warmup`
/// seconds and in total.
fn offer(pods: &[(Limiter, Arc<Policy>)], rps: u64, seconds: u64, warmup: u64) -> (u64, u64) {
    let keys: Vec<String> = (0..2000).map(|i| format!("sk-free-{i:04}")).collect();
    let (mut steady, mut total) = (0, 0);
    for i in 0..rps * seconds {
        let now = i * (SECOND / rps);
        let (limiter, policy) = &pods[i as usize % pods.len()];
        let request = Request {
            tenant: "free",
            key: &keys[i as usize % keys.len()],
            roles: &[],
            variant: "default",
            prompt_tokens: 10,
            max_tokens: 10,
            request_bytes: 100,
        };
        if let Ok(ticket) = limiter.admit_at(policy, &request, now) {
            ticket.settle_at(20, 200, now);
            total += 1;
            if now >= warmup * SECOND {
                steady += 1;
            }
        }
    }
    (steady, total)
}

#[test]
fn cluster_total_stays_within_ten_percent_at_every_replica_count() {
    let config = SidecarConfig::from_yaml(&golden("smollm2-free-paid.sidecar.yaml"))
        .expect("the operator's config parses");
    let rule = config
        .rules
        .iter()
        .find(|r| r.name == "free-tier/free-tier-total")
        .expect("the cluster rule");
    assert_eq!(rule.requests_per_second, Some(LIMIT as u32));
    let shares: BTreeMap<usize, f64> =
        serde_yaml::from_str(&golden("replica-shares.yaml")).expect("shares");
    assert_eq!(
        shares.keys().copied().collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );

    let (seconds, warmup) = (120, 20);
    for (&n, &share) in &shares {
        let (steady, total) = offer(&pods(&config, n, share), 20, seconds, warmup);
        let steady_rate = steady as f64 / (seconds - warmup) as f64;
        let overall_rate = total as f64 / seconds as f64;
        for (what, rate) in [("steady", steady_rate), ("overall", overall_rate)] {
            assert!(
                (rate - LIMIT).abs() <= 0.1 * LIMIT,
                "{n} pods at share {share}: {what} cluster rate {rate:.3}/s is not within 10% of {LIMIT}/s"
            );
        }
        if n > 1 {
            let (unsplit, _) = offer(&pods(&config, n, 1.0), 20, seconds, warmup);
            assert!(
                unsplit as f64 / (seconds - warmup) as f64 > 1.5 * LIMIT,
                "{n} pods without the split should admit well over the limit"
            );
        }
    }
}

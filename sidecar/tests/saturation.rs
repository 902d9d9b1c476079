//! Priority shedding with the sidecar config the operator writes (operator/tests/golden/policy/,
//! the example model under both example tiers): its `saturation.maxInFlight` is the engine's
//! concurrency (`maxConcurrentSequences` of examples/inferencemodel.yaml), and the sidecar's own
//! limiter, once that many requests are in flight, refuses the free tier's `Sheddable` requests
//! with 503 `overloaded` and a `Retry-After`, while the paid tier's `Critical` ones and
//! unprioritised `Standard` ones (up to twice the mark) still get in. Simulated clock.

use std::{path::Path, sync::Arc};

use http::StatusCode;
use sluice_crds::rate_limit_policy::Priority;
use sluice_crds::{InferenceModel, SidecarConfig};
use sluice_sidecar::limits::{
    Cause, Identity, LimitMetrics, Limiter, Policy, Request, SATURATION_RULE, Ticket,
};
use sluice_sidecar::openai::ApiError;

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A request of `tenant` (free: Sheddable, acme: Critical, anyone else: Standard); a key of its
/// own, so the free tier's per-key concurrency never binds.
fn request<'a>(tenant: &'a str, key: &'a str) -> Request<'a> {
    Request {
        tenant,
        key,
        variant: "default",
        prompt_tokens: 10,
        max_tokens: 10,
        request_bytes: 100,
    }
}

#[test]
fn shedding_engages_when_in_flight_reaches_the_engines_concurrency() {
    let config = SidecarConfig::from_yaml(&read(
        "operator/tests/golden/policy/smollm2-free-paid.sidecar.yaml",
    ))
    .expect("the operator's config parses");
    let model: InferenceModel =
        serde_yaml::from_str(&read("examples/inferencemodel.yaml")).expect("the example model");
    let engine = model
        .spec
        .variants
        .iter()
        .map(|v| v.max_concurrent_sequences())
        .min()
        .expect("a variant");
    assert_eq!(engine, 8, "examples/inferencemodel.yaml runs 8 sequences");
    assert_eq!(config.saturation.max_in_flight, Some(engine));
    let mark = u64::from(engine);

    let limiter = Limiter::with_metrics(LimitMetrics::default());
    let policy = Arc::new(Policy::compile(
        Arc::new(config),
        Arc::new(Identity::open()),
        None,
        0,
        1 << 20,
    ));
    let keys: Vec<String> = (0..64).map(|i| format!("sk-{i}")).collect();
    let admit = |tenant: &str, i: usize| limiter.admit_at(&policy, &request(tenant, &keys[i]), 0);

    // One slot short of the engine's concurrency, a free request still gets in.
    let mut held: Vec<Ticket> = (0..mark - 1)
        .map(|i| admit("acme", i as usize).expect("paid traffic"))
        .collect();
    let free = admit("free", 10).expect("below the mark");
    assert_eq!(free.priority, Priority::Sheddable);
    held.push(free);
    assert_eq!(limiter.in_flight(), mark);

    // At the mark: the free tier is shed, with the status and body clients are told.
    let refused = admit("free", 11).expect_err("shed at the mark");
    assert_eq!(refused.cause, Cause::Saturated);
    assert_eq!(refused.rule.as_deref(), Some(SATURATION_RULE));
    let error = ApiError::Limited(refused);
    assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error.body().error.code, Some("overloaded"));
    assert_eq!(error.retry_after(), Some(1));

    // Critical traffic is never shed; Standard traffic until twice the mark.
    let paid = admit("acme", 20).expect("critical");
    assert_eq!(paid.priority, Priority::Critical);
    held.push(paid);
    while limiter.in_flight() < 2 * mark {
        let i = held.len() + 20;
        let standard = admit("team", i).expect("standard below twice the mark");
        assert_eq!(standard.priority, Priority::Standard);
        held.push(standard);
    }
    let refused = admit("team", 60).expect_err("standard at twice the mark");
    assert_eq!(refused.cause, Cause::Saturated);

    // Below the mark again, the free tier is served.
    held.truncate(mark as usize - 1);
    assert!(admit("free", 12).is_ok());
}

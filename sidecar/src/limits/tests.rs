//! Admission against compiled policies, on a clock the tests control (no sleeps). These assert on
//! what the limiter decides ([`Cause`], waits, windows); `crate::openai`'s tests assert on the
//! statuses and headers those become.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use sluice_crds::SidecarConfig;

use super::{bucket::SECOND, *};

const MINUTE: u64 = 60 * SECOND;

fn config(rules: &str, extra: &str) -> Arc<SidecarConfig> {
    let text = format!(
        "version: v1alpha1\nmodel: m\nvariants:\n  - name: default\n    weight: 60\n  - name: canary\n    weight: 40\n{extra}\nrules:\n{rules}"
    );
    Arc::new(SidecarConfig::from_yaml(&text).unwrap_or_else(|e| panic!("{e}\n{text}")))
}

fn policy(rules: &str) -> Arc<Policy> {
    compile(config(rules, ""), None, 0)
}

fn compile(config: Arc<SidecarConfig>, prev: Option<&Policy>, now: u64) -> Arc<Policy> {
    Arc::new(Policy::compile(
        config,
        Arc::new(Identity::open()),
        prev,
        now,
        1 << 20,
    ))
}

fn limiter() -> Limiter {
    Limiter::with_metrics(LimitMetrics::default())
}

fn req<'a>(tenant: &'a str, prompt: u64, max: u64) -> Request<'a> {
    Request {
        tenant,
        key: tenant,
        roles: &[],
        variant: "default",
        prompt_tokens: prompt,
        max_tokens: max,
        request_bytes: 100,
    }
}

#[test]
fn third_request_in_a_minute_is_refused_with_exact_retry_and_windows() {
    let p = policy("  - name: demo/per-key\n    per: Key\n    requestsPerMinute: 2\n");
    let l = limiter();
    let t1 = l.admit_at(&p, &req("a", 10, 10), 0).unwrap();
    assert_eq!(
        t1.rate
            .requests
            .map(|w| (w.limit, w.remaining, w.reset_ns())),
        Some((2, 1, 30 * SECOND))
    );
    t1.settle_at(20, 0, 0);
    l.admit_at(&p, &req("a", 10, 10), 10 * SECOND)
        .unwrap()
        .settle_at(20, 0, 10 * SECOND);
    let r = l.admit_at(&p, &req("a", 10, 10), 20 * SECOND).unwrap_err();
    assert_eq!(r.cause, Cause::RateLimited(Unit::Requests));
    // Two used at 0 s and 10 s; one has drained 30 s after the first: at 30 s, 10 s from now.
    assert_eq!(r.retry_after_ns, Some(10 * SECOND));
    assert_eq!(r.retry_after_secs(), Some(10));
    assert!(
        r.message.contains("requests per minute")
            && r.message.contains("Limit 2, Used 2, Requested 1")
            && r.message.contains("demo/per-key")
            && r.message.contains("try again in 10s"),
        "{}",
        r.message
    );
    assert_eq!(r.rule.as_deref(), Some("demo/per-key"));
    assert_eq!(r.rate.requests.map(|w| w.remaining), Some(0));
    // Other keys have their own buckets.
    l.admit_at(&p, &req("b", 10, 10), 20 * SECOND).unwrap();
    // One nanosecond early is still refused; on time passes.
    assert!(l.admit_at(&p, &req("a", 1, 1), 30 * SECOND - 1).is_err());
    l.admit_at(&p, &req("a", 1, 1), 30 * SECOND).unwrap();
}

#[test]
fn tokens_are_reserved_then_settled_to_actual_usage() {
    let p = policy("  - name: tpm\n    tokensPerMinute: 150\n");
    let l = limiter();
    let first = l.admit_at(&p, &req("a", 30, 50), 0).unwrap();
    assert_eq!(first.rate.tokens.map(|w| w.remaining), Some(70));
    // 30 + 50 more do not fit while the first holds its reservation.
    let r = l.admit_at(&p, &req("a", 30, 50), 0).unwrap_err();
    assert_eq!(r.cause, Cause::RateLimited(Unit::Tokens));
    assert!(
        r.message.contains("Limit 150, Used 80, Requested 80"),
        "{}",
        r.message
    );
    // It used 30 + 10: 40 come back, and the second fits at once.
    first.settle_at(40, 0, 0);
    let second = l.admit_at(&p, &req("a", 30, 50), 0).unwrap();
    assert_eq!(second.rate.tokens.map(|w| w.remaining), Some(30));
    // A client that disconnects after 5 completion tokens is settled the same way.
    second.settle_at(35, 0, 0);
    let third = l.admit_at(&p, &req("a", 40, 35), 0).unwrap();
    assert_eq!(third.rate.tokens.map(|w| w.remaining), Some(0));
}

#[test]
fn a_cost_above_the_burst_is_a_400_at_once() {
    let p = policy("  - name: tpm\n    tokensPerMinute: 100\n");
    let r = limiter().admit_at(&p, &req("a", 60, 41), 0).unwrap_err();
    assert_eq!(
        r.cause,
        Cause::TooLarge {
            param: Some("max_tokens")
        }
    );
    assert!(
        r.message.contains("at most 100 tokens") && r.message.contains("needs 101"),
        "{}",
        r.message
    );
    assert_eq!(r.retry_after_ns, None);
}

#[test]
fn concurrency_counts_requests_in_flight() {
    let p = policy("  - name: one-at-a-time\n    per: Pod\n    maxConcurrent: 1\n");
    let l = limiter();
    let t = l.admit_at(&p, &req("a", 1, 1), 0).unwrap();
    assert_eq!(l.in_flight(), 1);
    let r = l.admit_at(&p, &req("b", 1, 1), 0).unwrap_err();
    assert_eq!(r.cause, Cause::RateLimited(Unit::Requests));
    assert!(r.message.contains("concurrent requests"), "{}", r.message);
    assert_eq!(r.retry_after_ns, Some(SECOND));
    drop(t); // a dropped (never settled) ticket still releases its slot
    assert_eq!(l.in_flight(), 0);
    l.admit_at(&p, &req("b", 1, 1), 0).unwrap();
}

#[test]
fn a_request_must_pass_every_matching_rule_and_refusal_takes_nothing() {
    let p = policy(
        "  - name: rpm\n    requestsPerMinute: 10\n  - name: tpm\n    tokensPerMinute: 100\n  - name: conc\n    per: Pod\n    maxConcurrent: 1\n",
    );
    let l = limiter();
    let held = l.admit_at(&p, &req("a", 10, 10), 0).unwrap();
    let r = l.admit_at(&p, &req("a", 10, 10), 0).unwrap_err();
    assert_eq!(r.rule.as_deref(), Some("conc"));
    // The refused request's request and tokens were given back.
    let ok = {
        drop(held);
        l.admit_at(&p, &req("a", 10, 10), 0).unwrap()
    };
    assert_eq!(ok.rate.requests.map(|w| w.remaining), Some(8));
    assert_eq!(ok.rate.tokens.map(|w| w.remaining), Some(60));
}

#[test]
fn retry_after_is_when_every_refusing_limit_passes() {
    let p = policy(
        "  - name: fast\n    requestsPerSecond: 1\n  - name: slow\n    tokensPerMinute: 60\n",
    );
    let l = limiter();
    l.admit_at(&p, &req("a", 30, 30), 0)
        .unwrap()
        .settle_at(60, 0, 0);
    let r = l.admit_at(&p, &req("a", 30, 30), 0).unwrap_err();
    assert_eq!(
        r.rule.as_deref(),
        Some("fast"),
        "the first refusing rule is named"
    );
    assert_eq!(
        r.retry_after_ns,
        Some(MINUTE),
        "but the wait is the longest one"
    );
    assert_eq!(r.rate.tokens.map(|w| w.remaining), Some(0));
}

#[test]
fn rules_match_tenants_variants_and_priorities() {
    let p = policy(
        "  - name: free\n    match:\n      tenants: [free]\n    requestsPerMinute: 1\n  - name: canary\n    per: Variant\n    match:\n      variants: [canary]\n    requestsPerMinute: 1\n",
    );
    let l = limiter();
    for _ in 0..3 {
        l.admit_at(&p, &req("paid", 1, 1), 0).unwrap();
    }
    l.admit_at(&p, &req("free", 1, 1), 0).unwrap();
    assert_eq!(
        l.admit_at(&p, &req("free", 1, 1), 0)
            .unwrap_err()
            .rule
            .as_deref(),
        Some("free")
    );
    let mut canary = req("paid", 1, 1);
    canary.variant = "canary";
    l.admit_at(&p, &canary, 0).unwrap();
    assert_eq!(
        l.admit_at(&p, &canary, 0).unwrap_err().rule.as_deref(),
        Some("canary")
    );
}

#[test]
fn saturation_sheds_sheddable_first_and_never_critical() {
    let c = config(
        "  - name: batch\n    match:\n      tenants: [batch]\n    priority: Sheddable\n  - name: ops\n    match:\n      tenants: [ops]\n    priority: Critical\n  - name: ops-also-batch\n    match:\n      tenants: [ops]\n    priority: Sheddable\n",
        "saturation:\n  maxInFlight: 2",
    );
    let p = compile(c, None, 0);
    let l = limiter();
    let mut held = vec![l.admit_at(&p, &req("x", 1, 1), 0).unwrap()];
    held.push(l.admit_at(&p, &req("batch", 1, 1), 0).unwrap());
    assert_eq!(held[1].priority, Priority::Sheddable);
    // 2 in flight: sheddable refused, standard admitted up to 4.
    let r = l.admit_at(&p, &req("batch", 1, 1), 0).unwrap_err();
    assert_eq!(r.cause, Cause::Saturated);
    assert_eq!(r.rule.as_deref(), Some(SATURATION_RULE));
    held.push(l.admit_at(&p, &req("x", 1, 1), 0).unwrap());
    held.push(l.admit_at(&p, &req("x", 1, 1), 0).unwrap());
    assert!(l.admit_at(&p, &req("x", 1, 1), 0).is_err());
    // The highest assigned priority wins: ops is critical and still gets through.
    let ops = l.admit_at(&p, &req("ops", 1, 1), 0).unwrap();
    assert_eq!(ops.priority, Priority::Critical);
    held.clear();
    l.admit_at(&p, &req("batch", 1, 1), 0).unwrap();
}

#[test]
fn shadow_rules_count_but_refuse_nothing() {
    let p = policy("  - name: trial\n    requestsPerMinute: 1\n    shadow: true\n");
    let l = limiter();
    for _ in 0..3 {
        l.admit_at(&p, &req("a", 1, 1), 0).unwrap();
    }
    let c = l
        .metrics()
        .shadow
        .get_or_create(&metrics::RuleLabels {
            rule: "trial".into(),
        })
        .get();
    assert_eq!(c, 2);
}

#[test]
fn day_quota_answers_insufficient_quota() {
    let p = policy("  - name: daily\n    tokensPerDay: 1000\n");
    let l = limiter();
    l.admit_at(&p, &req("a", 500, 400), 0)
        .unwrap()
        .settle_at(900, 0, 0);
    let r = l.admit_at(&p, &req("a", 100, 100), 0).unwrap_err();
    assert_eq!(r.cause, Cause::Quota);
    assert!(r.retry_after_ns.unwrap() > 60 * SECOND);
}

#[test]
fn bytes_count_request_bodies_at_admission_and_responses_at_the_end() {
    let p = policy("  - name: bw\n    bytesPerSecond: 1000\n");
    let l = limiter();
    let mut r = req("a", 1, 1);
    r.request_bytes = 400;
    l.admit_at(&p, &r, 0).unwrap().settle_at(2, 1600, 0);
    // 2000 bytes used of 1000 per second: the next 400-byte request waits 1.4 s.
    let refusal = l.admit_at(&p, &r, 0).unwrap_err();
    assert_eq!(refusal.retry_after_ns, Some(1_400_000_000));
    r.request_bytes = 1001;
    assert_eq!(
        l.admit_at(&p, &r, 10 * SECOND).unwrap_err().cause,
        Cause::TooLarge { param: None }
    );
}

#[test]
fn cluster_rules_enforce_the_pods_share() {
    let c = config(
        "  - name: global\n    per: Pod\n    scope: Cluster\n    requestsPerMinute: 4\n  - name: local\n    per: Pod\n    requestsPerMinute: 4\n",
        "replicaShare: 0.5",
    );
    let p = compile(c, None, 0);
    let l = limiter();
    l.admit_at(&p, &req("a", 1, 1), 0).unwrap();
    l.admit_at(&p, &req("a", 1, 1), 0).unwrap();
    let r = l.admit_at(&p, &req("a", 1, 1), 0).unwrap_err();
    assert_eq!(r.rule.as_deref(), Some("global"));
    assert_eq!(
        r.retry_after_ns,
        Some(30 * SECOND),
        "2 per minute on this pod"
    );
}

#[test]
fn reloads_keep_buckets_by_name_and_rerate_them() {
    let l = limiter();
    let v1 = compile(
        config(
            "  - name: rpm\n    requestsPerMinute: 2\n  - name: conc\n    maxConcurrent: 1\n",
            "",
        ),
        None,
        0,
    );
    l.admit_at(&v1, &req("a", 1, 1), 0)
        .unwrap()
        .settle_at(2, 0, 0);
    let in_flight = l.admit_at(&v1, &req("a", 1, 1), 0).unwrap();
    assert!(l.admit_at(&v1, &req("a", 1, 1), 0).is_err());

    // Same names, raised rate: what was used stays used; the higher capacity is free at once.
    let v2 = compile(
        config(
            "  - name: rpm\n    requestsPerMinute: 4\n  - name: conc\n    maxConcurrent: 2\n",
            "",
        ),
        Some(&v1),
        10 * SECOND,
    );
    assert!(Arc::ptr_eq(
        &v1.rules[0].limits[0].table,
        &v2.rules[0].limits[0].table
    ));
    let t = l.admit_at(&v2, &req("a", 1, 1), 10 * SECOND).unwrap();
    // 2 used at 0 s, 10 s drained at 2/min = 0.333: 1.667 + 1 = 2.667 of 4.
    assert_eq!(t.rate.requests.map(|w| w.remaining), Some(1));
    // The concurrency slot of the request admitted under v1 is still counted.
    assert!(l.admit_at(&v2, &req("a", 1, 1), 10 * SECOND).is_err());
    drop(t);
    // The old request settles into the kept table.
    in_flight.settle_at(2, 0, 10 * SECOND);
    l.admit_at(&v2, &req("a", 1, 1), 10 * SECOND).unwrap();

    // A renamed rule starts empty.
    let v3 = compile(
        config("  - name: rpm2\n    requestsPerMinute: 4\n", ""),
        Some(&v2),
        10 * SECOND,
    );
    for _ in 0..4 {
        l.admit_at(&v3, &req("a", 1, 1), 10 * SECOND).unwrap();
    }
}

#[test]
fn idle_buckets_are_swept() {
    let p = policy("  - name: rpm\n    per: Key\n    requestsPerMinute: 60\n");
    let l = limiter();
    for i in 0..100 {
        let k = format!("k{i}");
        l.admit_at(&p, &req(&k, 1, 1), 0).unwrap();
    }
    assert_eq!(p.rules[0].limits[0].table.len(), 100);
    // A request takes 1 s to drain at 60 per minute.
    assert_eq!(l.sweep_at(&p, SECOND - 1), 0);
    assert_eq!(l.metrics().buckets.get(), 100);
    assert_eq!(l.sweep_at(&p, SECOND), 100);
    assert_eq!(l.metrics().buckets.get(), 0);
}

#[test]
fn durations_render_like_openai() {
    assert_eq!(format_duration(0), "0ms");
    assert_eq!(format_duration(20_000_001), "21ms");
    assert_eq!(format_duration(SECOND), "1s");
    assert_eq!(format_duration(1_500_000_000), "1.5s");
    assert_eq!(format_duration(6 * MINUTE), "6m0s");
    assert_eq!(format_duration(3_723 * SECOND), "1h2m3s");
}

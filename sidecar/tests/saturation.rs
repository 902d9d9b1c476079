//! Priority shedding with the sidecar config the operator writes (operator/tests/golden/policy/,
//! the example model under both example tiers): its `saturation.maxInFlight` is the engine's
//! concurrency (`maxConcurrentSequences` of examples/inferencemodel.yaml), and the sidecar's own
//! limiter, once that many requests are in flight, refuses the free tier's `Sheddable` requests
//! with 503 `overloaded` and a `Retry-After`, while the paid tier's `Critical` ones and
//! unprioritised `Standard` ones (up to twice the mark) still get in.
//!
//! Twice: on the library's limiter with a simulated clock (every priority, both marks), and on
//! the real binary and the real model over real HTTP, started as the operator starts it (the
//! golden document as its `--config`, with the keys file its `identity` names, and the example
//! model's `--max-seqs`): the paid tier's streams fill the engine to the mark, a free request is
//! answered 503 in OpenAI's shape and counted in `sluice_ratelimit_refused_total` while a paid one
//! sent at the same moment is admitted (it queues for the engine and is served), and once the
//! streams go away the free tier is served again. No wall-clock assertions: the real test waits
//! on the sidecar's own gauges.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use common::{Sidecar, TempDir, counting_stream, metric, post_as, read_json};
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};
use sluice_crds::rate_limit_policy::Priority;
use sluice_crds::{InferenceModel, SidecarConfig};
use sluice_sidecar::limits::{
    Cause, Identity, LimitMetrics, Limiter, Policy, Request, SATURATION_RULE, Ticket,
};
use sluice_sidecar::openai::ApiError;

/// The operator's sidecar config for the example model under the free and paid tiers.
const GOLDEN: &str = "operator/tests/golden/policy/smollm2-free-paid.sidecar.yaml";

fn read(path: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The sequences the example model's engine runs at once (the smallest of its variants), which
/// the operator passes as `--max-seqs`.
fn engine_sequences() -> u32 {
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
    engine
}

/// A request of `tenant` (free: Sheddable, acme: Critical, anyone else: Standard); a key of its
/// own, so the free tier's per-key concurrency never binds.
fn request<'a>(tenant: &'a str, key: &'a str) -> Request<'a> {
    Request {
        tenant,
        key,
        roles: &[],
        variant: "default",
        prompt_tokens: 10,
        max_tokens: 10,
        request_bytes: 100,
    }
}

#[test]
fn shedding_engages_when_in_flight_reaches_the_engines_concurrency() {
    let config = SidecarConfig::from_yaml(&read(GOLDEN)).expect("the operator's config parses");
    let engine = engine_sequences();
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

/// Test keys, in the format of examples/api-keys-secret.yaml: one for each tier.
const FREE_KEY: &str = "sk-free-saturation-test";
const PAID_KEY: &str = "sk-acme-saturation-test";

/// POSTs `body` with `key` as its bearer token; the response with its body unread.
async fn send(url: &str, key: &str, body: &Value) -> http::Response<Incoming> {
    post_as(url, Some(key), &[], body).await
}

/// [`send`], whole answer: status, headers and JSON body.
async fn call(url: &str, key: &str, body: &Value) -> (StatusCode, HeaderMap, Value) {
    read_json(send(url, key, body).await).await
}

/// A short greedy completion.
fn short() -> Value {
    json!({"model": "smollm2", "prompt": "Say hi", "max_tokens": 2, "temperature": 0})
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
        .to_str()
        .unwrap()
}

/// Waits until every metric of `want` has its value (bounded: a failure names what it saw).
async fn wait_metrics(sidecar: &Sidecar, want: &[(&str, f64)]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = sidecar.metrics().await;
        if want.iter().all(|(name, v)| metric(&text, name) == Some(*v)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never {want:?}:\n{text}\n{}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `sluice_ratelimit_refused_total` for saturation shedding (0 before the first).
const SHED: &str = "sluice_ratelimit_refused_total{rule=\"saturation\",reason=\"saturated\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_sidecar_sheds_the_free_tier_at_the_engines_concurrency() {
    // The operator's document as mounted, its keys file beside it instead of the Secret mount.
    let text = read(GOLDEN);
    let config = SidecarConfig::from_yaml(&text).expect("the operator's config parses");
    let mark = config.saturation.max_in_flight.expect("a saturation mark");
    let engine = engine_sequences();
    assert_eq!(mark, engine);
    let mounted = config
        .identity
        .keys_file
        .as_deref()
        .expect("the tiers' keys Secret");
    let dir = TempDir::new("saturation-real");
    let keys = dir.write(
        "keys.yaml",
        &format!("- key: {FREE_KEY}\n  tenant: free\n- key: {PAID_KEY}\n  tenant: acme\n"),
    );
    let local = text.replace(mounted, keys.to_str().unwrap());
    assert_ne!(local, text, "the keys file is named in the document");
    let path = dir.write("sidecar.yaml", &local);
    // The default queue (64) takes the paid request that waits for an engine slot.
    let mut sidecar = Sidecar::spawn(&[
        "--config",
        path.to_str().unwrap(),
        "--max-seqs",
        &engine.to_string(),
    ]);
    sidecar.wait_ready().await;
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "sluice_config_generation"),
        Some(config.generation as f64),
        "the golden document is in force:\n{m}\n{}",
        sidecar.log()
    );
    let url = format!("{}/v1/completions", sidecar.api);

    // Below the mark, the free tier is served.
    let (status, _, body) = call(&url, FREE_KEY, &short()).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // The paid tier fills the engine: `mark` streams, each held open after its first chunk.
    let holders: Vec<_> = (0..mark)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let res = send(&url, PAID_KEY, &counting_stream("smollm2")).await;
                assert_eq!(res.status(), StatusCode::OK);
                let mut body = res.into_body();
                let chunk = body.frame().await.unwrap().unwrap().into_data().unwrap();
                assert!(chunk.starts_with(b"data: "), "{chunk:?}");
                body
            })
        })
        .collect();
    let mut held = Vec::new();
    for holder in holders {
        held.push(holder.await.unwrap());
    }
    let full = f64::from(mark);
    wait_metrics(
        &sidecar,
        &[
            ("sluice_requests_in_flight", full),
            ("sluice_queue_depth", 0.0),
        ],
    )
    .await;
    let shed_before = metric(&sidecar.metrics().await, SHED).unwrap_or(0.0);

    // A paid (Critical) request is admitted at the mark: it waits in the engine's queue.
    let paid = tokio::spawn({
        let url = url.clone();
        async move { call(&url, PAID_KEY, &short()).await }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric(&sidecar.metrics().await, "sluice_queue_depth") != Some(1.0) {
        if paid.is_finished() {
            let (status, _, body) = paid.await.unwrap();
            panic!("the paid request was answered {status} instead of queued: {body}");
        }
        assert!(
            Instant::now() < deadline,
            "never queued:\n{}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // What the mark is compared with: the eight streams and the queued request.
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "sluice_ratelimit_in_flight"),
        Some(full + 1.0),
        "{m}"
    );

    // At the same moment a free (Sheddable) request is shed: 503 in OpenAI's shape. (Were it
    // admitted, it would wait for an engine slot until the streams end: bounded, so that such a
    // failure says so instead of hanging for the request timeout.)
    let (status, headers, body) =
        tokio::time::timeout(Duration::from_secs(60), call(&url, FREE_KEY, &short()))
            .await
            .expect("the free request was not shed: it waits for the full engine");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert!(body["error"]["param"].is_null(), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("shedding Sheddable requests"), "{message}");
    assert_eq!(header(&headers, "retry-after"), "1");
    assert_eq!(header(&headers, "retry-after-ms"), "1000");
    assert_eq!(header(&headers, "x-sluice-rule"), SATURATION_RULE);
    let m = sidecar.metrics().await;
    assert_eq!(metric(&m, SHED), Some(shed_before + 1.0), "{m}");
    assert_eq!(
        metric(&m, "sluice_queue_depth"),
        Some(1.0),
        "the paid request still waits: {m}"
    );

    // The streams go away: the paid request is served, the engine empties.
    drop(held);
    let (status, _, body) = paid.await.unwrap();
    assert_eq!(
        status,
        StatusCode::OK,
        "the paid request was admitted: {body}"
    );
    assert!(body["choices"][0]["text"].is_string(), "{body}");
    wait_metrics(
        &sidecar,
        &[
            ("sluice_requests_in_flight", 0.0),
            ("sluice_queue_depth", 0.0),
        ],
    )
    .await;

    // Below the mark again, the free tier is served; nothing more was shed.
    let (status, _, body) = call(&url, FREE_KEY, &short()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let m = sidecar.metrics().await;
    assert_eq!(metric(&m, SHED), Some(shed_before + 1.0), "{m}");
}

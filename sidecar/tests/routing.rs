//! Traffic split between variants of one model (issue 7), with real sidecars on loopback: each
//! runs the real binary on the real model with `--variant` and a config listing every variant's
//! address, the way the operator deploys them. Requests enter through any sidecar (as the model
//! Service spreads them) and the `x-sluice-variant` response header says which variant served.
#![allow(clippy::unwrap_used)]

mod common;

use std::{collections::HashMap, path::Path, time::Instant};

use common::*;
use futures::{StreamExt, stream};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};
use sluice_sidecar::{
    auth::Caller,
    model::convert::Quant,
    route::{
        CALLER_HEADER, FORWARDED_HEADER, ForwardAuth, ForwardToken, VARIANT_HEADER, caller_header,
    },
};

const TOKEN: &str = "test-forwarding-token-0123456789abcdef";
const COMPLETIONS: &str = "/v1/completions";

/// A sidecar config listing `variants` as (name, weight, api port).
fn config_yaml(variants: &[(&str, u32, u16)]) -> String {
    let mut y = String::from("version: v1alpha1\nmodel: smollm2\nvariants:\n");
    for (name, weight, port) in variants {
        y.push_str(&format!(
            "  - name: {name}\n    weight: {weight}\n    address: http://127.0.0.1:{port}\n"
        ));
    }
    y.push_str("routing:\n  stickyHeader: x-user-id\n  overrideHeader: x-sluice-variant\n");
    y
}

/// Converts the model to Q8_0 once into `cache` (the tests send thousands of requests; Q8_0 has
/// fast CPU kernels), so the sidecars started on it do not race to convert.
fn q8_cache(scratch: &TempDir) -> String {
    let cache = scratch.0.join("cache");
    sluice_sidecar::model::convert::ensure_converted(&model_path(), Quant::Q8_0, &cache).unwrap();
    cache.to_str().unwrap().to_owned()
}

fn spawn_variant(
    variant: &str,
    api: u16,
    config: &Path,
    token: Option<&Path>,
    cache: &str,
) -> Sidecar {
    spawn_variant_with(variant, api, config, token, cache, &[])
}

/// [`spawn_variant`] with `extra` flags.
fn spawn_variant_with(
    variant: &str,
    api: u16,
    config: &Path,
    token: Option<&Path>,
    cache: &str,
    extra: &[&str],
) -> Sidecar {
    let config = config.to_str().unwrap().to_owned();
    let mut args = vec![
        "--variant",
        variant,
        "--config",
        &config,
        "--convert",
        "q8_0",
        "--cache-dir",
        cache,
    ];
    let token = token.map(|t| t.to_str().unwrap().to_owned());
    if let Some(t) = &token {
        args.extend(["--forward-token-file", t.as_str()]);
    }
    args.extend(extra);
    Sidecar::spawn_at(api, free_port(), &args)
}

/// One cheap generation through routing: 1 token of a tiny prompt. Returns status, the variant
/// that served it and the body.
async fn complete(
    client: &Client,
    entry: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, String, Value) {
    let body = json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 1, "temperature": 0});
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("{entry}{COMPLETIONS}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
        .unwrap();
    let res = client.request(req).await.unwrap();
    let status = res.status();
    let variant = res
        .headers()
        .get(VARIANT_HEADER)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, variant, json)
}

type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// Sends `n` requests spread round-robin over `entries` (as the model Service would), 16 at a
/// time; returns how many each variant served.
async fn split(client: &Client, entries: &[&str], n: usize) -> HashMap<String, usize> {
    let results: Vec<(StatusCode, String, Value)> = stream::iter(0..n)
        .map(|i| complete(client, entries[i % entries.len()], &[]))
        .buffer_unordered(16)
        .collect()
        .await;
    let mut counts = HashMap::new();
    for (status, variant, body) in results {
        assert_eq!(status, StatusCode::OK, "{body}");
        *counts.entry(variant).or_insert(0) += 1;
    }
    counts
}

/// Which variant serves each of `keys` sticky users, entering through `entries` in turn.
async fn sticky(client: &Client, entries: &[&str], keys: &[String]) -> Vec<String> {
    stream::iter(keys.iter().enumerate())
        .map(|(i, key)| async move {
            let (status, variant, body) =
                complete(client, entries[i % entries.len()], &[("x-user-id", key)]).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            variant
        })
        .buffered(16)
        .collect()
        .await
}

fn share(counts: &HashMap<String, usize>, variant: &str, n: usize) -> f64 {
    counts.get(variant).copied().unwrap_or(0) as f64 * 100.0 / n as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_split_sticky_override_and_forwarding_auth() {
    let scratch = TempDir::new("routing-split");
    let token = scratch.write("token", &format!("{TOKEN}\n"));
    let (stable, canary, stable2, dead) = (free_port(), free_port(), free_port(), free_port());
    // Two variants with pods, and "blue" with none (the operator writes weight 0 for it).
    let config1 = scratch.write(
        "config1.yaml",
        &config_yaml(&[
            ("stable", 70, stable),
            ("canary", 30, canary),
            ("blue", 0, dead),
        ]),
    );
    // The same model after a weight change, as a second stable pod sees it.
    let config2 = scratch.write(
        "config2.yaml",
        &config_yaml(&[
            ("stable", 50, stable),
            ("canary", 50, canary),
            ("blue", 0, dead),
        ]),
    );
    let cache = q8_cache(&scratch);
    let mut pods = [
        spawn_variant("stable", stable, &config1, Some(&token), &cache),
        spawn_variant("canary", canary, &config1, Some(&token), &cache),
        spawn_variant("stable", stable2, &config2, Some(&token), &cache),
    ];
    for pod in &mut pods {
        pod.wait_ready().await;
    }
    let [s, c, s2] = [&pods[0].api, &pods[1].api, &pods[2].api].map(String::as_str);
    let client = client();

    // --- the split over 2,000 requests entering through both pods follows the weights ---
    let started = Instant::now();
    let n = 2000;
    let counts = split(&client, &[s, c], n).await;
    let (p_stable, p_canary) = (share(&counts, "stable", n), share(&counts, "canary", n));
    eprintln!(
        "split of {n} requests: stable {p_stable:.2}%, canary {p_canary:.2}% ({:?})",
        started.elapsed()
    );
    assert!((p_stable - 70.0).abs() <= 3.0, "{counts:?}");
    assert!((p_canary - 30.0).abs() <= 3.0, "{counts:?}");
    assert!(
        !counts.contains_key("blue"),
        "a variant without pods got traffic: {counts:?}"
    );
    assert_eq!(counts.values().sum::<usize>(), n, "{counts:?}");

    // --- sticky users stay on their variant, whichever pod they enter through ---
    let keys: Vec<String> = (0..200).map(|i| format!("user-{i}")).collect();
    let first = sticky(&client, &[s, c], &keys).await;
    let again = sticky(&client, &[c, s], &keys).await;
    assert_eq!(first, again, "sticky users moved under unchanged weights");
    let on_canary = first.iter().filter(|v| *v == "canary").count();
    assert!(
        (40..=80).contains(&on_canary),
        "~30% of users on canary: {on_canary}"
    );

    // --- a weight change (canary 30% -> 50%) moves only about its fair share, stable->canary ---
    let after = sticky(&client, &[s2], &keys).await;
    let moved: Vec<(&String, &String)> = first.iter().zip(&after).filter(|(a, b)| a != b).collect();
    assert!(
        moved.iter().all(|(a, b)| *a == "stable" && *b == "canary"),
        "users only move from the variant that lost weight: {moved:?}"
    );
    let fraction = moved.len() as f64 / keys.len() as f64;
    eprintln!(
        "weight change 70/30 -> 50/50 moved {:.1}% of sticky users",
        fraction * 100.0
    );
    assert!(
        fraction <= 0.20 + 0.08,
        "moved {fraction} (fair share 0.20)"
    );

    // --- the override header pins a request, even to a weight-0 variant ---
    for entry in [s, c] {
        for want in ["stable", "canary"] {
            let (status, served, body) =
                complete(&client, entry, &[("x-sluice-variant", want)]).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(served, want, "override via {entry}");
        }
    }
    let (status, _, body) = complete(&client, s, &[("x-sluice-variant", "nope")]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["param"], "x-sluice-variant", "{body}");
    // "blue" has no pods: pinned to it, the request cannot be served elsewhere.
    let (status, _, body) = complete(&client, s, &[("x-sluice-variant", "blue")]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "variant_unavailable", "{body}");

    // --- streaming through a forward: chunks arrive as generated, [DONE] last ---
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{s}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-sluice-variant", "canary")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(&json!({
                "model": "smollm2",
                "messages": [{"role": "user", "content": "Count from one to ten."}],
                "max_tokens": 12,
                "temperature": 0,
                "stream": true,
                "stream_options": {"include_usage": true},
            }))
            .unwrap(),
        )))
        .unwrap();
    let res = client.request(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[VARIANT_HEADER], "canary");
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut body = res.into_body();
    let (mut frames, mut text) = (0, String::new());
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            frames += 1;
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert!(
        usage["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{usage}"
    );
    assert!(
        frames > 2,
        "the stream was relayed in {frames} frame(s), not as generated"
    );

    // --- internal headers cannot be forged ---
    let wrong = ForwardAuth::new(&ForwardToken::new("not-the-model-token"));
    for forged in [
        "1".to_owned(),
        "true".to_owned(),
        wrong.sign(COMPLETIONS, b"").to_str().unwrap().to_owned(),
    ] {
        for entry in [s, c] {
            let (status, _, body) = complete(&client, entry, &[(FORWARDED_HEADER, &forged)]).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{forged}: {body}");
            assert_eq!(body["error"]["code"], "forbidden", "{body}");
            assert!(body["error"]["message"].is_string() && body["error"]["type"].is_string());
        }
    }
    // A genuine signature (only pods hold the token) is served where it lands, unrouted.
    let genuine = ForwardAuth::new(&ForwardToken::new(TOKEN));
    let named = caller_header(&Caller::new(String::new(), "anonymous".into()));
    let signed = genuine.sign(COMPLETIONS, named.as_bytes());
    let (signed, named) = (signed.to_str().unwrap(), named.to_str().unwrap());
    let (status, served, body) = complete(
        &client,
        c,
        &[
            (FORWARDED_HEADER, signed),
            (CALLER_HEADER, named),
            ("x-sluice-variant", "stable"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(served, "canary", "a forwarded request is not routed again");

    // --- the pods' metrics count forwards ---
    let (_, metrics) = get(&format!("{}/metrics", pods[0].admin)).await.unwrap();
    let forwarded = metric(
        &metrics,
        "sluice_routed_requests_total{variant=\"canary\",decision=\"forward\"}",
    )
    .unwrap_or(0.0);
    assert!(forwarded > 100.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_variant_falls_back_and_no_token_means_local_only() {
    let scratch = TempDir::new("routing-fallback");
    let token = scratch.write("token", TOKEN);
    let (solo, ghost, lone) = (free_port(), free_port(), free_port());
    // "ghost" still has weight (the operator has not caught up) but nothing listens there.
    let config = scratch.write(
        "config.yaml",
        &config_yaml(&[("solo", 50, solo), ("ghost", 50, ghost)]),
    );
    let cache = q8_cache(&scratch);
    let mut with_token = spawn_variant("solo", solo, &config, Some(&token), &cache);
    // The same config without a forwarding token: other variants are out of reach.
    let mut without = spawn_variant("solo", lone, &config, None, &cache);
    with_token.wait_ready().await;
    without.wait_ready().await;
    let client = client();

    let n = 200;
    let counts = split(&client, &[with_token.api.as_str()], n).await;
    assert_eq!(
        counts.get("solo"),
        Some(&n),
        "every request is served: {counts:?}"
    );
    let (_, metrics) = get(&format!("{}/metrics", with_token.admin)).await.unwrap();
    let failures = metric(
        &metrics,
        "sluice_forward_failures_total{variant=\"ghost\",kind=\"connect\"}",
    )
    .unwrap_or(0.0);
    // Ghost's breaker opened after 5 failed forwards in a row (the default): the requests in
    // flight then (16 at a time) still tried it, the rest were served here without trying.
    assert!(
        (5.0..=20.0).contains(&failures),
        "the breaker stopped forwards to ghost: {failures}"
    );
    assert_eq!(
        metric(&metrics, "sluice_forward_breaker_open{variant=\"ghost\"}"),
        Some(1.0),
        "{metrics}"
    );

    // All the weight on ghost, none here to fall back to: 503, counted as ghost's failure (the
    // canary analysis must not blame this pod's variant for another variant's outage).
    let (all_ghost, to_ghost) = (free_port(), free_port());
    let config = scratch.write(
        "ghost-only.yaml",
        &config_yaml(&[("solo", 0, all_ghost), ("ghost", 100, to_ghost)]),
    );
    let mut entry = spawn_variant("solo", all_ghost, &config, Some(&token), &cache);
    entry.wait_ready().await;
    let (status, variant, body) = complete(&client, &entry.api, &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(variant, "ghost", "the 503 names the variant that failed");
    assert_eq!(body["error"]["code"], "variant_unavailable", "{body}");
    let (_, metrics) = get(&format!("{}/metrics", entry.admin)).await.unwrap();
    assert_eq!(
        metric(
            &metrics,
            "sluice_requests_total{route=\"/v1/completions\",variant=\"ghost\",status=\"503\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        !metrics.contains("variant=\"solo\",status=\"503\""),
        "{metrics}"
    );

    // --- the breaker lets a variant back once it answers again ---
    let (entry_port, back_port) = (free_port(), free_port());
    let mut yaml = config_yaml(&[("solo", 50, entry_port), ("ghost", 50, back_port)]);
    yaml.push_str("  breaker: {consecutiveFailures: 2, openSeconds: 1}\n");
    let config = scratch.write("breaker.yaml", &yaml);
    let mut entry = spawn_variant("solo", entry_port, &config, Some(&token), &cache);
    entry.wait_ready().await;
    let counts = split(&client, &[entry.api.as_str()], 40).await;
    assert_eq!(counts.get("solo"), Some(&40), "{counts:?}");
    let mut ghost = spawn_variant("ghost", back_port, &config, Some(&token), &cache);
    ghost.wait_ready().await;
    // Once the breaker half-opens, a forward reaches ghost and closes it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (status, variant, body) = complete(&client, &entry.api, &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        if variant == "ghost" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "ghost never got traffic back:\n{}",
            entry.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let (_, metrics) = get(&format!("{}/metrics", entry.admin)).await.unwrap();
    assert_eq!(
        metric(&metrics, "sluice_forward_breaker_open{variant=\"ghost\"}"),
        Some(0.0),
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "sluice_forward_breaker_opened_total{variant=\"ghost\"}"
        )
        .unwrap()
            >= 1.0,
        "{metrics}"
    );

    let counts = split(&client, &[without.api.as_str()], 50).await;
    assert_eq!(counts.get("solo"), Some(&50), "{counts:?}");
    assert!(
        without.log().contains("no --forward-token-file"),
        "{}",
        without.log()
    );
    // Without the token it accepts no forwarded requests either.
    let signed = ForwardAuth::new(&ForwardToken::new(TOKEN))
        .sign(COMPLETIONS, b"")
        .to_str()
        .unwrap()
        .to_owned();
    let (status, _, _) = complete(&client, &without.api, &[(FORWARDED_HEADER, &signed)]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_stream_still_running_when_the_entry_pod_drains_ends_with_an_error_event() {
    let scratch = TempDir::new("routing-drain");
    let token = scratch.write("token", TOKEN);
    let (entry_port, serving_port) = (free_port(), free_port());
    // All the weight on "serving": the entry pod relays its stream.
    let config = scratch.write(
        "config.yaml",
        &config_yaml(&[("entry", 0, entry_port), ("serving", 100, serving_port)]),
    );
    let cache = q8_cache(&scratch);
    let mut serving = spawn_variant("serving", serving_port, &config, Some(&token), &cache);
    let mut entry = spawn_variant_with(
        "entry",
        entry_port,
        &config,
        Some(&token),
        &cache,
        &["--drain-grace-secs", "1"],
    );
    serving.wait_ready().await;
    entry.wait_ready().await;

    let res = post_stream(
        &format!("{}{COMPLETIONS}", entry.api),
        &counting_stream("smollm2"),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[VARIANT_HEADER], "serving");
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    entry.sigterm();
    assert_stream_ends_with_error(first.to_vec(), body, "shutting_down").await;
}

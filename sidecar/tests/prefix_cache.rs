//! The prefix cache on the real binary and model: with default flags, resident memory levels
//! off however many distinct prompts arrive (it grew by one sequence's KV cache, ~23 MB, per
//! request), the cache reports what it holds in `/metrics`, and the budget the operator renders
//! from `engine.prefixCacheMemory` is the one the sidecar enforces.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

const CONCURRENCY: usize = 4;

/// Anonymous resident memory of `pid` in bytes (`RssAnon`: the heap, not the mapped files).
fn rss_anon(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// `count` chats with distinct prompts (the template's system turn is shared), `concurrency`
/// at a time, numbered from `first`.
async fn chats(sidecar: &Sidecar, first: usize, count: usize, concurrency: usize) {
    let url = format!("{}/v1/chat/completions", sidecar.api);
    for batch in (first..first + count)
        .collect::<Vec<_>>()
        .chunks(concurrency)
    {
        let requests = batch.iter().map(|i| {
            let body = json!({
                "model": sidecar.name,
                "messages": [{"role": "user", "content": format!("Request {i}: name a colour.")}],
                "max_tokens": 4,
                "temperature": 0,
            });
            let url = url.clone();
            async move { post_json(&url, &body).await }
        });
        for (status, body) in futures::future::join_all(requests).await {
            assert_eq!(status, StatusCode::OK, "{body}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resident_memory_levels_off_with_default_flags() {
    let mut sidecar = Sidecar::spawn(&[]);
    sidecar.wait_ready().await;
    let pid = sidecar.child.id();
    // The engine's own warm-up request at load already looked the cache up once.
    let at_ready = sidecar.metrics().await;

    // Warm-up: the cache fills (16 entries by default) and the allocator finds its size.
    chats(&sidecar, 0, 50, CONCURRENCY).await;
    let warm = rss_anon(pid);
    chats(&sidecar, 50, 250, CONCURRENCY).await;
    let after = rss_anon(pid);
    let text = sidecar.metrics().await;
    eprintln!(
        "RssAnon: {} MB after 50 requests, {} MB after 300",
        warm >> 20,
        after >> 20
    );

    // Before the fix, 250 more requests added about 5.7 GB. An absolute margin: RssAnon holds
    // no weights (they are mapped from the file), so a share of it is a few tens of MB, within
    // what a busy machine's allocator arenas swing by.
    assert!(
        after <= warm + (64 << 20),
        "RssAnon grew from {} MB after 50 requests to {} MB after 300\n{text}",
        warm >> 20,
        after >> 20
    );
    let value =
        |text: &str, name| metric(text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"));
    let since_ready = |name| value(&text, name) - value(&at_ready, name);
    assert!(
        value(&text, "sluice_prefix_cache_entries") <= 16.0,
        "{text}"
    );
    assert!(
        since_ready("sluice_prefix_cache_evictions_total") >= 300.0 - 16.0,
        "{text}"
    );
    // Every chat shares the template's system turn: each one after the first batch (which
    // found the cache empty) starts from it.
    let first_batch = CONCURRENCY as f64;
    assert!(
        since_ready("sluice_prefix_cache_misses_total") <= first_batch,
        "{text}"
    );
    assert!(
        since_ready("sluice_prefix_cache_hits_total") >= 300.0 - first_batch,
        "{text}"
    );
    let bytes = value(&text, "sluice_prefix_cache_bytes");
    assert!(bytes > 0.0, "{text}");
    assert!(
        bytes <= value(&text, "sluice_prefix_cache_limit_bytes"),
        "{text}"
    );
}

/// The engine flags the operator renders for the demo example (golden file), on the binary.
fn rendered_engine_args() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../operator/tests/golden/inferencemodel.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let deployment = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap())
        .find(|doc| doc["kind"] == "Deployment")
        .unwrap();
    let args: Vec<String> = deployment["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "sidecar")
        .map(|c| serde_yaml::from_value(c["args"].clone()).unwrap())
        .unwrap();
    // The engine's flags follow the pod's own (paths, ports) after `--cache-dir DIR`.
    let engine = args.iter().position(|a| a == "--cache-dir").unwrap() + 2;
    args[engine..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_budget_the_operator_renders_is_the_one_enforced() {
    let args = rendered_engine_args();
    let flag = args
        .iter()
        .position(|a| a == "--prefix-cache-bytes")
        .unwrap();
    // examples/inferencemodel.yaml: `prefixCacheMemory: 128Mi`.
    assert_eq!(args[flag + 1], (128u64 << 20).to_string());

    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut sidecar = Sidecar::spawn(&args);
    sidecar.wait_ready().await;
    let text = sidecar.metrics().await;
    assert_eq!(
        metric(&text, "sluice_prefix_cache_limit_bytes"),
        Some((128u64 << 20) as f64),
        "{text}"
    );
}

#[tokio::test]
async fn a_budget_that_is_not_a_byte_size_stops_the_start_with_the_reason() {
    let mut sidecar = Sidecar::spawn(&["--prefix-cache-bytes", "12XB"]);
    let status = sidecar.child.wait().unwrap();
    assert!(!status.success());
    let log = sidecar.log();
    assert!(
        log.contains("--prefix-cache-bytes") && log.contains("\"12XB\" is not a byte size"),
        "{log}"
    );
}

/// Sequences the cache has taken in since the start: each one either is held or was evicted
/// (the prompts here are distinct, so no entry replaces another).
fn sequences_cached(text: &str) -> f64 {
    let value = |name| metric(text, name).unwrap_or_else(|| panic!("no {name} in\n{text}"));
    value("sluice_prefix_cache_entries") + value("sluice_prefix_cache_evictions_total")
}

/// Concurrent requests of different lengths, some ending in their prompt step: each finished
/// request is cached once, holding the positions it wrote. Upstream's engine set every
/// sequence that ran its prompt step running again, so one that had already finished there
/// (`max_tokens: 1`) decoded once more and was cached a second time; and its scheduler made
/// the decoding sequences it had parked prompts again, which, after a prefix-cache hit,
/// prefilled the whole sequence again on top of its own KV cache. Entries grew to hold several
/// sequences' positions and resident memory grew by gigabytes in the soak.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_is_cached_once_with_the_positions_it_wrote() {
    let mut sidecar = Sidecar::spawn(&[]);
    sidecar.wait_ready().await;
    let url = format!("{}/v1/chat/completions", sidecar.api);
    let chat = |prompt: String, max_tokens: u64| {
        let url = url.clone();
        let body = json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
        });
        async move {
            let (status, body) = post_json(&url, &body).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["usage"]["prompt_tokens"].as_u64().unwrap() as f64
        }
    };
    let wait_for_sequences = |target: f64| {
        let sidecar = &sidecar;
        async move {
            for _ in 0..3000 {
                let text = sidecar.metrics().await;
                if sequences_cached(&text) >= target {
                    return text;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            panic!("the cache never took in {target} sequences");
        }
    };

    // One request alone: the size of one cached position.
    let before = sidecar.metrics().await;
    let prompt_tokens = chat("Say one word.".into(), 1).await;
    let alone = wait_for_sequences(sequences_cached(&before) + 1.0).await;
    let bytes = |text: &str| metric(text, "sluice_prefix_cache_bytes").unwrap();
    let position_bytes = (bytes(&alone) - bytes(&before)) / prompt_tokens;
    assert!(position_bytes > 0.0, "{alone}");

    // Rounds of 8 at once, prompts of five lengths, half of them ending in the prompt step.
    let mut requests = 0.0;
    let mut longest: f64 = 0.0;
    for round in 0..5 {
        let prompts = (0..8).map(|i| {
            let n = round * 8 + i;
            let prompt = format!("Request {n}: {}name a colour.", "please ".repeat(n % 5));
            chat(prompt, 1 + 2 * (n as u64 % 2))
        });
        for tokens in futures::future::join_all(prompts).await {
            longest = longest.max(tokens);
            requests += 1.0;
        }
    }
    // A last request alone: the engine has stepped every sequence before it by its end.
    chat("Say one more word.".into(), 1).await;
    requests += 1.0;
    let target = sequences_cached(&alone) + requests;
    wait_for_sequences(target).await;
    let text = sidecar.metrics().await;
    assert_eq!(
        sequences_cached(&text),
        target,
        "{requests} requests were cached this many times\n{text}"
    );
    let entries = metric(&text, "sluice_prefix_cache_entries").unwrap();
    // The prompt and at most two generated tokens (the last one is never written).
    let most = entries * position_bytes * (longest + 2.0);
    assert!(
        bytes(&text) <= most,
        "{entries} entries hold {} bytes, more than {most}: \
         entries of {longest}-token prompts hold more positions than they wrote\n{text}",
        bytes(&text)
    );
}

//! The response cache (`spec.cache`, the config's `cache`) on the real binary and model over real
//! HTTP: a greedy request asked again is answered from the cache (the same text, JSON or
//! streamed, `x-sluice-cache: hit`, usage marked `cached`) without the engine generating
//! again, still charged against request limits; tenants do not share entries unless the cache is
//! shared; sampled requests are never cached; identical requests arriving together share one
//! generation; and a reload that removes `cache` turns it off.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};

/// POSTs `body` to `url` with a bearer `key`: status, headers and body text.
async fn post(url: &str, key: &str, body: &Value) -> (StatusCode, http::HeaderMap, String) {
    let res = post_as(url, Some(key), &[], body).await;
    let (status, headers) = (res.status(), res.headers().clone());
    let text = res.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(text.to_vec()).unwrap())
}

fn config(cache: &str) -> String {
    format!(
        "version: v1alpha1\nmodel: smollm2\nvariants:\n  - name: default\n    weight: 100\n\
         rules:\n  - name: t/per-key\n    per: Key\n    requestsPerMinute: 1000\n{cache}"
    )
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

fn count(metrics: &str, name: &str) -> f64 {
    metric(metrics, name).unwrap_or(0.0)
}

fn chat(content: &str, temperature: f64, stream: bool) -> Value {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 12,
        "temperature": temperature,
        "stream": stream,
        "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
    })
}

/// The text of a streamed chat answer, and its usage chunk.
fn streamed(body: &str) -> (String, Value) {
    let mut text = String::new();
    let mut usage = Value::Null;
    for event in sse_data(body) {
        if event == "[DONE]" {
            continue;
        }
        let chunk: Value = serde_json::from_str(&event).unwrap();
        if let Some(piece) = chunk["choices"][0]["delta"]["content"].as_str() {
            text.push_str(piece);
        }
        if chunk["usage"].is_object() {
            usage = chunk["usage"].clone();
        }
    }
    (text, usage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_greedy_requests_are_answered_from_the_cache() {
    let dir = std::env::temp_dir().join(format!("sluice-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let file = write(
        &dir,
        "sidecar.yaml",
        &config("cache:\n  maxBytes: 1048576\n  ttlSeconds: 600\n"),
    );
    let mut sidecar = Sidecar::spawn(&["--config", file.to_str().unwrap()]);
    sidecar.wait_ready().await;
    let url = format!("{}/v1/chat/completions", sidecar.api);
    let tokens = |m: &str| count(m, "sluice_completion_tokens_total");

    // First time: generated.
    let ask = chat("Name three colours.", 0.0, false);
    let (status, headers, first) = post(&url, "alice", &ask).await;
    assert_eq!(status, StatusCode::OK, "{first}");
    assert!(headers.get("x-sluice-cache").is_none());
    let first: Value = serde_json::from_str(&first).unwrap();
    assert!(first["usage"].get("cached").is_none(), "{first}");
    let generated = tokens(&sidecar.metrics().await);
    assert!(generated >= 1.0);

    // Again, spelled differently (field order, an explicit default): from the cache, the
    // engine untouched, the request still charged.
    let again = json!({
        "temperature": 0,
        "max_tokens": 12,
        "messages": [{"content": "Name three colours.", "role": "user"}],
        "model": "smollm2",
        "stream": false,
    });
    let (status, headers, hit) = post(&url, "alice", &again).await;
    assert_eq!(status, StatusCode::OK, "{hit}");
    assert_eq!(headers["x-sluice-cache"], "hit");
    let remaining: u32 = headers["x-ratelimit-remaining-requests"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(remaining < 1000, "charged: {remaining} left");
    let hit: Value = serde_json::from_str(&hit).unwrap();
    assert_eq!(
        hit["choices"][0]["message"]["content"],
        first["choices"][0]["message"]["content"]
    );
    assert_eq!(hit["usage"]["cached"], true);
    assert_eq!(
        hit["usage"]["completion_tokens"],
        first["usage"]["completion_tokens"]
    );
    assert_ne!(hit["id"], first["id"], "a response of its own");

    // Streamed: the same text, as chunks ending in [DONE], usage marked.
    let (status, headers, body) =
        post(&url, "alice", &chat("Name three colours.", 0.0, true)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-sluice-cache"], "hit");
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    let (text, usage) = streamed(&body);
    assert_eq!(
        text,
        first["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(usage["cached"], true, "{body}");
    let m = sidecar.metrics().await;
    assert_eq!(tokens(&m), generated, "no generation for hits");
    assert_eq!(count(&m, "sluice_response_cache_hits_total"), 2.0, "{m}");

    // Another tenant does not see alice's entry; sampled requests are not cached at all.
    let (_, headers, _) = post(&url, "bob", &ask).await;
    assert!(headers.get("x-sluice-cache").is_none());
    for _ in 0..2 {
        let (_, headers, _) = post(&url, "alice", &chat("Name three colours.", 0.8, false)).await;
        assert!(headers.get("x-sluice-cache").is_none());
    }

    // Identical requests arriving together: one generation between them.
    let before = sidecar.metrics().await;
    let together = chat("Count to five.", 0.0, false);
    let answers = futures::future::join_all((0..4).map(|_| post(&url, "carol", &together))).await;
    let texts: Vec<Value> = answers
        .iter()
        .map(|(status, _, body)| {
            assert_eq!(*status, StatusCode::OK, "{body}");
            serde_json::from_str::<Value>(body).unwrap()["choices"][0]["message"]["content"].clone()
        })
        .collect();
    assert!(texts.iter().all(|t| *t == texts[0]), "{texts:?}");
    let after = sidecar.metrics().await;
    let delta = |name: &str| count(&after, name) - count(&before, name);
    assert_eq!(delta("sluice_response_cache_misses_total"), 1.0, "{after}");
    assert_eq!(
        delta("sluice_response_cache_hits_total") + delta("sluice_response_cache_coalesced_total"),
        3.0,
        "{after}"
    );
    assert!(
        count(&after, "sluice_response_cache_bytes") > 0.0,
        "{after}"
    );

    // A reload without `cache` turns it off: the repeated request is generated again.
    write(&dir, "sidecar.yaml", &config(""));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, headers, _) = post(&url, "alice", &ask).await;
        if headers.get("x-sluice-cache").is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the reload never took"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let m = sidecar.metrics().await;
    assert_eq!(
        count(&m, "sluice_response_cache_bytes"),
        0.0,
        "memory given back: {m}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

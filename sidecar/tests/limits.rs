//! Rate limits on the real binary and the real model, over real HTTP, with the config file
//! edited while the sidecar runs (laid out as Kubernetes mounts a ConfigMap: `sidecar.yaml ->
//! ..data/sidecar.yaml`, `..data -> ..<version>`, swapped atomically). One sidecar process
//! serves every scenario; each scenario uses its own API key, so their buckets are separate.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use common::*;
use http::{HeaderMap, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};

/// A directory laid out like a mounted ConfigMap, updated the way the kubelet does it.
struct ConfigDir {
    dir: PathBuf,
    version: u32,
}

impl ConfigDir {
    fn new(name: &str, text: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-limits-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut this = Self { dir, version: 0 };
        this.swap(text);
        std::os::unix::fs::symlink("..data/sidecar.yaml", this.path()).unwrap();
        this
    }

    fn path(&self) -> PathBuf {
        self.dir.join("sidecar.yaml")
    }

    /// Writes `text` into a new version directory and swaps `..data` to it atomically.
    fn swap(&mut self, text: &str) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir_all(self.dir.join(&version)).unwrap();
        std::fs::write(self.dir.join(&version).join("sidecar.yaml"), text).unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    /// Overwrites the current version in place (what an editor does to a plain file).
    fn write_in_place(&self, text: &str) {
        std::fs::write(self.dir.join("..data").join("sidecar.yaml"), text).unwrap();
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for ConfigDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(generation: u32, reload_rpm: u32, extra: &str) -> String {
    format!(
        r#"version: v1alpha1
generation: {generation}
model: smollm2
variants:
  - name: default
    weight: 100
{extra}
rules:
  - name: t/two-per-minute
    per: Key
    match:
      tenants: [rpm-key]
    requestsPerMinute: 2
  - name: t/generous-tokens
    per: Key
    match:
      tenants: [rpm-key]
    tokensPerMinute: 100000
  - name: t/small-budget
    per: Key
    match:
      tenants: [budget-key]
    tokensPerMinute: 100
  - name: t/one-stream
    per: Key
    match:
      tenants: [conc-key]
    maxConcurrent: 1
  - name: t/refund
    per: Key
    match:
      tenants: [refund-key]
    tokensPerMinute: 700
  - name: t/reload
    per: Key
    match:
      tenants: [reload-key]
    requestsPerMinute: {reload_rpm}
  - name: t/shadow
    per: Key
    match:
      tenants: [shadow-key]
    requestsPerMinute: 1
    shadow: true
  - name: t/python
    per: Key
    match:
      tenants: [python-key, good-key]
    requestsPerMinute: 20
    burst: 1
"#
    )
}

fn chat(content: &str, max_tokens: u64) -> Value {
    json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

fn stream(content: &str, max_tokens: u64) -> Value {
    let mut body = chat(content, max_tokens);
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    body
}

async fn send(url: &str, key: Option<&str>, body: &Value) -> http::Response<Incoming> {
    post_as(url, key, &[], body).await
}

async fn call(url: &str, key: Option<&str>, body: &Value) -> (StatusCode, HeaderMap, Value) {
    read_json(send(url, key, body).await).await
}

fn h<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {headers:?}"))
        .to_str()
        .unwrap()
}

async fn is_ready(sidecar: &Sidecar) -> bool {
    get(&format!("{}/readyz", sidecar.admin))
        .await
        .is_ok_and(|(s, _)| s == StatusCode::OK)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_end_to_end() {
    let mut dir = ConfigDir::new("e2e", &config(1, 1, ""));
    let mut sidecar = Sidecar::spawn(&["--config", dir.path().to_str().unwrap()]);
    sidecar.wait_ready().await;
    let url = format!("{}/v1/chat/completions", sidecar.api);
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "sluice_config_generation"),
        Some(1.0),
        "{}",
        sidecar.log()
    );

    // --- 2 requests per minute: the third is a 429 with every header and OpenAI's body ---
    for remaining in ["1", "0"] {
        let (status, headers, body) = call(&url, Some("rpm-key"), &chat("Say hi", 2)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(h(&headers, "x-ratelimit-limit-requests"), "2");
        assert_eq!(h(&headers, "x-ratelimit-remaining-requests"), remaining);
        assert!(h(&headers, "x-ratelimit-reset-requests").ends_with('s'));
        assert_eq!(h(&headers, "x-ratelimit-limit-tokens"), "100000");
        assert!(
            h(&headers, "x-ratelimit-remaining-tokens")
                .parse::<u64>()
                .unwrap()
                < 100000
        );
        assert!(h(&headers, "x-ratelimit-reset-tokens").ends_with('s'));
    }
    let (status, headers, body) = call(&url, Some("rpm-key"), &chat("Say hi", 2)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    let retry: u64 = h(&headers, "retry-after").parse().unwrap();
    let retry_ms: u64 = h(&headers, "retry-after-ms").parse().unwrap();
    assert!(
        (1..=30).contains(&retry),
        "one request drains in 30 s: {retry}"
    );
    assert!(
        retry_ms <= retry * 1000 && retry_ms > (retry - 1) * 1000,
        "{retry_ms} vs {retry}"
    );
    assert_eq!(h(&headers, "x-sluice-rule"), "t/two-per-minute");
    assert_eq!(h(&headers, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(h(&headers, "x-ratelimit-limit-requests"), "2");
    assert!(headers.contains_key("x-ratelimit-remaining-tokens"));
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("Limit 2")
            && message.contains("Used 2")
            && message.contains("Requested 1"),
        "{message}"
    );

    // --- a token budget below prompt + max_tokens refuses before any generation ---
    let before = sidecar.metrics().await;
    let (status, headers, body) = call(&url, Some("budget-key"), &chat("Say hi", 200)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "request_too_large");
    assert_eq!(body["error"]["param"], "max_tokens");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 100 tokens"),
        "{body}"
    );
    assert_eq!(h(&headers, "x-sluice-rule"), "t/small-budget");
    assert!(
        !headers.contains_key("retry-after"),
        "waiting would not help"
    );
    let after = sidecar.metrics().await;
    for name in [
        "sluice_prompt_tokens_total",
        "sluice_completion_tokens_total",
    ] {
        assert_eq!(
            metric(&before, name),
            metric(&after, name),
            "{name}: nothing was generated"
        );
    }

    // --- concurrency 1: a second simultaneous stream is refused, the first completes ---
    let first = send(&url, Some("conc-key"), &stream("Count from 1 to 50.", 40)).await;
    assert_eq!(first.status(), StatusCode::OK);
    let mut first_body = first.into_body();
    let chunk = first_body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert!(chunk.starts_with(b"data: "));
    let second = send(&url, Some("conc-key"), &stream("Say hi", 4)).await;
    assert_eq!(second.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(h(second.headers(), "x-sluice-rule"), "t/one-stream");
    let rest = first_body.collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&rest)
            .trim_end()
            .ends_with("data: [DONE]")
    );
    let (status, _, body) = call(&url, Some("conc-key"), &chat("Say hi", 2)).await;
    assert_eq!(status, StatusCode::OK, "the slot is free again: {body}");

    // --- a stream's unused reservation is refunded: a following request fits ---
    // 700 tokens per minute; prompt + 400 is reserved for each request.
    let held = send(
        &url,
        Some("refund-key"),
        &stream("Count from 1 to 500.", 400),
    )
    .await;
    assert_eq!(held.status(), StatusCode::OK);
    assert!(
        held.headers().contains_key("x-ratelimit-remaining-tokens"),
        "stream headers too"
    );
    let mut held_body = held.into_body();
    held_body.frame().await.unwrap().unwrap();
    let (status, _, body) = call(&url, Some("refund-key"), &chat("Say hi", 400)).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the stream holds its reservation: {body}"
    );
    assert_eq!(body["error"]["type"], "tokens");
    drop(held_body); // the client goes away after one chunk
    let refunded = Instant::now();
    loop {
        let (status, _, body) = call(&url, Some("refund-key"), &chat("Say hi", 400)).await;
        if status == StatusCode::OK {
            break;
        }
        // Without the refund the bucket would take ~15 s to refill that far.
        assert!(
            refunded.elapsed() < Duration::from_secs(5),
            "never refunded: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // --- editing the config raises a limit within 1 s while a stream in flight completes ---
    let (status, _, _) = call(&url, Some("reload-key"), &chat("Say hi", 2)).await;
    assert_eq!(status, StatusCode::OK);
    let in_flight = send(&url, Some("reload-key"), &stream("Say hi", 4)).await;
    assert_eq!(
        in_flight.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "1 per minute"
    );
    let long = send(&url, Some("conc-key"), &stream("Count from 1 to 50.", 40)).await;
    assert_eq!(long.status(), StatusCode::OK);
    let mut long_body = long.into_body();
    long_body.frame().await.unwrap().unwrap();
    dir.swap(&config(2, 100, ""));
    let edited = Instant::now();
    sidecar
        .wait_for_metric("sluice_config_generation", 2.0)
        .await;
    let took = edited.elapsed();
    eprintln!("the edited config was in force {took:?} after the edit");
    assert!(
        took < Duration::from_secs(1),
        "the new config took {took:?}"
    );
    let (status, _, body) = call(&url, Some("reload-key"), &chat("Say hi", 2)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the raised limit admits at once: {body}"
    );
    let rest = long_body.collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&rest)
            .trim_end()
            .ends_with("data: [DONE]"),
        "the stream in flight completed across the reload"
    );
    assert!(sidecar.log().contains("config applied"));

    // --- an invalid edit keeps the old limits and bumps the error counter ---
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "sluice_config_reload_errors_total"),
        Some(0.0),
        "{m}"
    );
    dir.write_in_place(
        &config(3, 100, "").replace("requestsPerMinute: 2", "requestsPerMinute: -2"),
    );
    sidecar
        .wait_for_metric("sluice_config_reload_errors_total", 1.0)
        .await;
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "sluice_config_generation"),
        Some(2.0),
        "the good generation stays"
    );
    let (status, _, _) = call(&url, Some("rpm-key"), &chat("Say hi", 2)).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "the old 2/min rule is still enforced"
    );
    let (status, _, _) = call(&url, Some("reload-key"), &chat("Say hi", 2)).await;
    assert_eq!(status, StatusCode::OK, "and the raised one too");
    assert!(
        sidecar.log().contains("config rejected"),
        "the reason is logged"
    );
    assert!(
        is_ready(&sidecar).await,
        "still ready on the last good config"
    );

    // --- a shadow rule refuses nothing and counts ---
    for _ in 0..3 {
        let (status, _, body) = call(&url, Some("shadow-key"), &chat("Say hi", 2)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let m = sidecar.metrics().await;
    assert_eq!(
        metric(&m, "sluice_ratelimit_shadow_total{rule=\"t/shadow\"}"),
        Some(2.0),
        "{m}"
    );

    // --- the official openai client, with its default retries, succeeds once the window allows ---
    openai_client_retries(&sidecar.api);

    // --- with a key list, an unknown key gets 401 in OpenAI's shape and is never logged ---
    let keys = dir.file("keys.yaml", "- key: good-key\n  tenant: good-key\n");
    let with_keys = format!("identity:\n  keysFile: {}", keys.display());
    dir.swap(&config(4, 100, &with_keys));
    sidecar
        .wait_for_metric("sluice_config_generation", 4.0)
        .await;
    let (status, headers, body) = call(&url, Some("sk-not-a-real-key"), &chat("Say hi", 2)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(body["error"]["param"].is_null());
    assert!(!headers.contains_key("retry-after"));
    let (status, _, _) = call(&url, None, &chat("Say hi", 2)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "no key at all");
    let (status, _, body) = call(&url, Some("good-key"), &chat("Say hi", 2)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let log = sidecar.log();
    assert!(
        !log.contains("sk-not-a-real-key") && !log.contains("good-key"),
        "keys leaked:\n{log}"
    );
}

/// Three calls in a row against one request per 3 s: later ones get a 429 and the client,
/// reading `retry-after-ms`, waits and retries on its own.
fn openai_client_retries(api: &str) {
    let script = r#"
import sys, time, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="python-key")  # default retries
start = time.monotonic()
retries = []
for _ in range(3):
    raw = client.chat.completions.with_raw_response.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hi"}], max_tokens=2, temperature=0)
    r = raw.parse()
    assert r.choices[0].message.content is not None
    retries.append(raw.retries_taken)
elapsed = time.monotonic() - start
assert retries[0] == 0 and sum(retries) >= 1 and max(retries) <= 2, retries
assert elapsed >= 0.3, elapsed
print("second call retried", retries[1], "time(s); both done in", round(elapsed, 2), "s")
"#;
    run_openai_client(script, &[api]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_valid_config_the_sidecar_is_not_ready_unless_unlimited_is_allowed() {
    let dir = ConfigDir::new(
        "unready",
        "version: v1alpha1\nmodel: smollm2\nvariants: []\n",
    );
    let mut strict = Sidecar::spawn(&["--config", dir.path().to_str().unwrap()]);
    let mut open = Sidecar::spawn(&[
        "--config",
        dir.path().to_str().unwrap(),
        "--allow-unlimited",
    ]);
    open.wait_ready().await;
    let (status, _, body) = call(
        &format!("{}/v1/chat/completions", open.api),
        None,
        &chat("Say hi", 2),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "served without limits: {body}");
    // The strict one loads the model but stays unready, and says why.
    let deadline = Instant::now() + Duration::from_secs(120);
    while metric(&strict.metrics().await, "sluice_model_load_seconds").unwrap_or(0.0) == 0.0 {
        assert!(Instant::now() < deadline, "{}", strict.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = get(&format!("{}/readyz", strict.admin)).await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("config"), "{body}");
    let m = strict.metrics().await;
    assert_eq!(
        metric(&m, "sluice_config_reload_errors_total"),
        Some(1.0),
        "{m}"
    );
    let url = format!("{}/v1/chat/completions", strict.api);
    let (status, headers, body) = call(&url, None, &chat("Say hi", 2)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "config_invalid");
    assert!(headers.contains_key("retry-after"));
    // A valid document arrives: it becomes ready.
    dir.write_in_place(
        "version: v1alpha1\nmodel: smollm2\nvariants:\n  - name: default\n    weight: 100\n",
    );
    strict.wait_ready().await;
    let _ = &mut strict;
}

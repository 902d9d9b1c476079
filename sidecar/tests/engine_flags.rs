//! The engine settings the operator renders from an InferenceModel's `engine` block, on the real
//! binary and model: `--default-max-tokens`, `--context-length`, `--default-temperature`.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::StatusCode;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_defaults_apply_to_requests_that_set_none() {
    let mut sidecar = Sidecar::spawn(&[
        "--default-max-tokens",
        "3",
        "--context-length",
        "64",
        "--default-temperature",
        "0",
    ]);
    sidecar.wait_ready().await;
    let chat = format!("{}/v1/chat/completions", sidecar.api);
    let model = sidecar.name.clone();

    // No max_tokens: the default caps the completion.
    let (status, body) = post_json(
        &chat,
        &json!({"model": model, "messages": [{"role": "user", "content": "Tell me a long story."}]}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let completion = body["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=3).contains(&completion), "{body}");

    // A prompt that fits the model's window but not --context-length 64.
    let long = "hello ".repeat(100);
    let (status, body) = post_json(
        &chat,
        &json!({"model": model, "messages": [{"role": "user", "content": long}], "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("maximum context length is 64 tokens"),
        "{message}"
    );
}

//! The OpenAI API of the real binary on the real model, over real HTTP. One sidecar process
//! serves every scenario here (the model loads once); each scenario says what it checks.
#![allow(clippy::unwrap_used)]

mod common;

use std::{process::Command, time::Duration};

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};

fn chat_body(model: &str, content: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_api_end_to_end() {
    let mut sidecar = Sidecar::spawn(&["--max-body-bytes", "200000"]);
    sidecar.wait_ready().await;
    let api = sidecar.api.clone();
    let chat = format!("{api}/v1/chat/completions");
    let completions = format!("{api}/v1/completions");
    let model = sidecar.name.clone();

    // --- /v1/models lists the served model ---
    let (status, body) = get(&format!("{api}/v1/models")).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    let models: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "smollm2");
    assert_eq!(models["data"][0]["object"], "model");

    // --- a chat completion: non-empty content, consistent usage ---
    let (status, done) = post_json(
        &chat,
        &chat_body(&model, "What is the capital of France?", 12),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["object"], "chat.completion");
    assert_eq!(done["model"], "smollm2");
    let content = done["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(!content.trim().is_empty(), "empty content: {done}");
    assert_eq!(done["choices"][0]["message"]["role"], "assistant");
    let usage = &done["usage"];
    let (p, c) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert!(p > 5, "prompt tokens include the chat template: {usage}");
    assert!(
        (1..=12).contains(&c),
        "completion tokens within max_tokens: {usage}"
    );
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), p + c);
    let finish = done["choices"][0]["finish_reason"].as_str().unwrap();
    assert!(finish == "stop" || finish == "length", "{finish}");
    if finish == "length" {
        assert_eq!(c, 12, "a length stop used the whole budget");
    }

    // --- the same prompt streamed: chunks concatenate to that content, [DONE] last, usage ---
    let mut req = chat_body(&model, "What is the capital of France?", 12);
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let res = post_stream(&chat, &req).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    // Server-Timing says where the time to the first token went, in ms.
    let timing = res.headers()["server-timing"].to_str().unwrap().to_owned();
    let timing_ms = |name: &str| -> f64 {
        timing
            .split(", ")
            .find_map(|m| m.strip_prefix(name)?.strip_prefix(";dur=")?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {timing}"))
    };
    let (admit, tokenize, engine_ttft) = (
        timing_ms("admit"),
        timing_ms("tokenize"),
        timing_ms("engine-ttft"),
    );
    assert!(
        0.0 < tokenize && tokenize <= admit && engine_ttft > 0.0,
        "{timing}"
    );
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let events = sse_data(std::str::from_utf8(&body).unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]", "{events:?}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.len() >= 2, "{events:?}");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(
        streamed, content,
        "stream and non-stream agree at temperature 0"
    );
    let usage_chunk = chunks.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    assert_eq!(usage_chunk["usage"], done["usage"], "same usage streamed");
    let finishes: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finishes, vec![finish], "exactly one finish_reason");

    // --- /v1/completions, JSON and SSE ---
    let (status, done) = post_json(
        &completions,
        &json!({"model": model, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(done["object"], "text_completion");
    let text = done["choices"][0]["text"].as_str().unwrap();
    // A completion continues its prompt: the space before its next word is kept, as OpenAI's
    // text has it (a chat answer starts at its first word).
    assert!(text.starts_with(' ') && text.trim().len() > 1, "{text:?}");
    assert_eq!(done["usage"]["completion_tokens"], 5);
    assert_eq!(done["choices"][0]["finish_reason"], "length");
    let res = post_stream(
        &completions,
        &json!({"model": model, "prompt": "The capital of France is", "max_tokens": 5,
                "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let events = sse_data(std::str::from_utf8(&body).unwrap());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(
        usage["usage"]["prompt_tokens"],
        done["usage"]["prompt_tokens"]
    );
    assert_eq!(usage["usage"]["completion_tokens"], 5);
    let streamed: String = events[..events.len() - 2]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|e| e["choices"][0]["text"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(streamed, text, "the stream's text is the JSON answer's");

    // --- errors: OpenAI's shape, the right 4xx ---
    let check = |status: StatusCode, body: &Value, want: StatusCode, what: &str| {
        assert_eq!(status, want, "{what}: {body}");
        let err = &body["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
        assert!(err["type"].is_string(), "{what}: {body}");
        assert!(
            err.get("param").is_some() && err.get("code").is_some(),
            "{what}: {body}"
        );
    };
    let (s, _, text) = post_raw(&chat, "{\"model\": \"smollm2\", \"messages\": [").await;
    check(
        s,
        &serde_json::from_str(&text).unwrap(),
        StatusCode::BAD_REQUEST,
        "malformed JSON",
    );
    let (s, b) = post_json(&chat, &json!({"model": model, "messages": "hi"})).await;
    check(s, &b, StatusCode::BAD_REQUEST, "messages of the wrong type");
    let (s, b) = post_json(
        &chat,
        &json!({"model": model, "messages": [{"role":"user","content":"x"}], "max_tokens": "ten"}),
    )
    .await;
    check(
        s,
        &b,
        StatusCode::BAD_REQUEST,
        "max_tokens of the wrong type",
    );
    let (s, b) = post_json(&chat, &chat_body("gpt-4o", "hi", 4)).await;
    check(s, &b, StatusCode::NOT_FOUND, "unknown model");
    assert_eq!(b["error"]["code"], "model_not_found");
    let (s, b) = post_json(&chat, &json!({"model": model, "messages": []})).await;
    check(s, &b, StatusCode::BAD_REQUEST, "empty messages");
    assert_eq!(b["error"]["param"], "messages");
    let (s, b) = post_json(
        &chat,
        &json!({"model": model, "messages": [{"role":"user","content":"x"}], "n": 17}),
    )
    .await;
    check(s, &b, StatusCode::BAD_REQUEST, "n > 16");
    assert_eq!(b["error"]["param"], "n");
    let long = "hello ".repeat(9000);
    let (s, b) = post_json(&chat, &chat_body(&model, &long, 4)).await;
    check(
        s,
        &b,
        StatusCode::BAD_REQUEST,
        "prompt longer than the context",
    );
    assert_eq!(b["error"]["code"], "context_length_exceeded");
    let huge = format!(
        "{{\"model\":\"smollm2\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "a".repeat(300_000)
    );
    let (s, _, text) = post_raw(&chat, huge).await;
    check(
        s,
        &serde_json::from_str(&text).unwrap(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "oversized body",
    );
    let (s, text) = get(&chat).await.unwrap();
    check(
        s,
        &serde_json::from_str(&text).unwrap(),
        StatusCode::METHOD_NOT_ALLOWED,
        "GET on a POST route",
    );
    let (s, text) = get(&format!("{api}/v1/nope")).await.unwrap();
    check(
        s,
        &serde_json::from_str(&text).unwrap(),
        StatusCode::NOT_FOUND,
        "unknown route",
    );

    // --- a client that disconnects mid-stream cancels its generation ---
    let mut req = chat_body(&model, "Write a very long story about a dragon.", 2000);
    req["stream"] = json!(true);
    req["temperature"] = json!(0.8);
    let res = post_stream(&chat, &req).await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert!(first.data_ref().is_some());
    drop(body);
    let metrics_url = format!("{}/metrics", sidecar.admin);
    let mut cancelled = false;
    for _ in 0..200 {
        let (_, text) = get(&metrics_url).await.unwrap();
        if metric(&text, "sluice_generations_cancelled_total") >= Some(1.0)
            && metric(&text, "sluice_requests_in_flight") == Some(0.0)
        {
            cancelled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        cancelled,
        "disconnect did not cancel:\n{}",
        get(&metrics_url).await.unwrap().1
    );
    // The engine is free again: a new request is answered promptly.
    let (status, _) = tokio::time::timeout(
        Duration::from_secs(30),
        post_json(&chat, &chat_body(&model, "Hi", 2)),
    )
    .await
    .expect("engine still busy with the cancelled generation");
    assert_eq!(status, StatusCode::OK);

    // --- metrics reflect the traffic ---
    let (status, text) = get(&metrics_url).await.unwrap();
    assert_eq!(status, StatusCode::OK);
    for name in [
        "sluice_requests_total{route=\"/v1/chat/completions\",variant=\"default\",status=\"200\"}",
        "sluice_requests_total{route=\"/v1/chat/completions\",variant=\"default\",status=\"400\"}",
        "sluice_prompt_tokens_total",
        "sluice_completion_tokens_total",
        "sluice_time_to_first_token_seconds_count",
        "sluice_time_per_output_token_seconds_count",
        "sluice_model_load_seconds",
        "sluice_cold_start_seconds",
        "sluice_queue_depth",
        "sluice_engine_occupancy_ratio",
    ] {
        assert!(
            metric(&text, name)
                .is_some_and(|v| v > 0.0 || name.contains("queue") || name.contains("occupancy")),
            "{name} in\n{text}"
        );
    }
    assert_eq!(
        get(&format!("{}/healthz", sidecar.admin)).await.unwrap().0,
        StatusCode::OK
    );

    // --- logit_bias moves the greedy choice; ids outside the vocabulary get 400 ---
    let banana = token_id(" banana");
    let fruit = json!({
        "model": model,
        "prompt": "My favourite fruit is the",
        "max_tokens": 1,
        "temperature": 0,
    });
    let (status, plain) = post_json(&completions, &fruit).await;
    assert_eq!(status, StatusCode::OK, "{plain}");
    assert_ne!(
        plain["choices"][0]["text"].as_str().map(str::trim),
        Some("banana"),
        "{plain}"
    );
    let mut biased = fruit.clone();
    biased["logit_bias"] = json!({ banana.to_string(): 100 });
    let (status, done) = post_json(&completions, &biased).await;
    assert_eq!(status, StatusCode::OK, "{done}");
    assert_eq!(
        done["choices"][0]["text"].as_str().map(str::trim),
        Some("banana"),
        "{done}"
    );
    biased["logit_bias"] = json!({ "4000000": 5 });
    let (status, e) = post_json(&completions, &biased).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
    assert_eq!(e["error"]["param"], "logit_bias", "{e}");

    // --- a user message without content, a tool message without tool_call_id: 400 ---
    for (messages, param) in [
        (
            json!([{"role": "user", "content": null}]),
            "messages[0].content",
        ),
        (
            json!([{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]),
            "messages[1].tool_call_id",
        ),
    ] {
        let (status, e) = post_json(&chat, &json!({"model": model, "messages": messages})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{e}");
        assert_eq!(e["error"]["param"], param, "{e}");
    }

    // --- the official openai Python client works unchanged, streaming included ---
    openai_python_client(&api, &model);

    // The log never carries prompt text.
    assert!(
        !sidecar.log().contains("capital of France"),
        "prompt text leaked into the log"
    );
}

/// The id of `text`'s one token in the demo model's vocabulary (its GGUF's token list, where
/// a leading space is spelled `Ġ`).
fn token_id(text: &str) -> u32 {
    let spelled = text.replace(' ', "\u{120}");
    let mut file = std::fs::File::open(model_path()).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut file).unwrap();
    let tokens = content.metadata["tokenizer.ggml.tokens"].to_vec().unwrap();
    let id = tokens
        .iter()
        .position(|t| t.to_string().is_ok_and(|t| *t == spelled))
        .unwrap_or_else(|| panic!("{spelled:?} is not one token of the demo model"));
    u32::try_from(id).unwrap()
}

fn openai_python_client(api: &str, model: &str) {
    let script = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="unused", max_retries=0)
model = sys.argv[2]
assert [m.id for m in client.models.list()] == [model]
r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}],
                                   max_tokens=8, temperature=0)
assert r.choices[0].message.content, r
assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 0, r.usage
parts, usage = [], None
for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi"}],
                                            max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
    if chunk.usage:
        usage = chunk.usage
    for c in chunk.choices:
        parts.append(c.delta.content or "")
assert "".join(parts) == r.choices[0].message.content, (parts, r.choices[0].message.content)
assert usage is not None and usage.total_tokens == r.usage.total_tokens, usage
c = client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=4, temperature=0)
assert c.choices[0].text and c.usage.completion_tokens == 4, c
try:
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
try:
    client.chat.completions.create(model=model, messages=[])
    raise SystemExit("expected BadRequestError")
except openai.BadRequestError:
    pass
print("openai client ok")
"#;
    run_openai_client(script, &[api, model]);
}

#[test]
fn bad_flags_exit_before_binding_with_one_line() {
    let bin = env!("CARGO_BIN_EXE_sluice-sidecar");
    let port = free_port();
    let not_gguf = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let listen = format!("127.0.0.1:{port}");
    for (args, want) in [
        (
            vec![
                "serve",
                "--model",
                "/nonexistent/model.gguf",
                "--listen",
                &listen,
            ],
            "cannot read --model",
        ),
        (
            vec!["serve", "--model", not_gguf, "--listen", &listen],
            "not a GGUF file",
        ),
        (
            vec!["serve", "--model", "x.gguf", "--listen", "not-an-address"],
            "invalid value",
        ),
        (
            vec!["serve", "--model", "x.gguf", "--max-seqs", "many"],
            "invalid value",
        ),
    ] {
        let out = Command::new(bin).args(&args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        // Nothing was bound: the port is still free.
        std::net::TcpListener::bind(&listen).unwrap();
    }
    let out = Command::new(bin)
        .args(["serve", "--model", "/nonexistent/model.gguf"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    // Environment variables work like flags.
    let out = Command::new(bin)
        .arg("serve")
        .env("SLUICE_MODEL", "/nonexistent/env.gguf")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/env.gguf"));
}

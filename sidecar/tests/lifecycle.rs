//! Process lifecycle of the real binary: readiness false while loading and true after, a full
//! queue answered with 503, and graceful drain on SIGTERM (the request in flight completes,
//! readiness goes false, the process exits 0).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_overload_and_graceful_drain() {
    // One engine slot and no queue, so a second concurrent request is refused.
    let mut sidecar = Sidecar::spawn(&[
        "--max-seqs",
        "1",
        "--max-queue",
        "0",
        "--drain-grace-secs",
        "60",
    ]);

    // --- readiness: false during load, true after ---
    let before = sidecar.wait_ready().await;
    assert!(
        before
            .iter()
            .any(|(s, b)| *s == 503 && b.contains("loading")),
        "readiness was never observed false during load: {before:?}"
    );
    let log = sidecar.log();
    assert!(
        log.contains("ready") && log.contains("cold_start_ms"),
        "cold start is logged:\n{log}"
    );

    let chat = format!("{}/v1/chat/completions", sidecar.api);
    let long = json!({
        "model": sidecar.name,
        "messages": [{"role": "user", "content": "Count from 1 to 100, one number per line."}],
        "max_tokens": 60,
        "temperature": 0,
        "stream": true,
    });

    // --- a request in flight holds the only slot ---
    let res = post_stream(&chat, &long).await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let mut received = Vec::new();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    received.extend_from_slice(&first);

    // --- overload: the queue is full, a clean 503 with Retry-After, not a hang ---
    let started = Instant::now();
    let (status, headers, text) = post_raw(
        &chat,
        serde_json::to_vec(&json!({"model": sidecar.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(headers.contains_key("retry-after"));
    assert!(text.contains("\"code\":\"overloaded\""), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // --- SIGTERM while the stream is in flight ---
    sidecar.sigterm();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(&format!("{}/readyz", sidecar.admin)).await;
        if matches!(&r, Ok((s, b)) if *s == StatusCode::SERVICE_UNAVAILABLE && b.contains("draining"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readiness did not go false on SIGTERM: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The in-flight request completes normally.
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            received.extend_from_slice(&data);
        }
    }
    let text = String::from_utf8(received).unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().unwrap(), "[DONE]", "{text}");
    assert!(
        text.contains("\"finish_reason\":\"length\"")
            || text.contains("\"finish_reason\":\"stop\""),
        "{text}"
    );

    // --- and the process exits 0 ---
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = sidecar.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "did not exit after drain:\n{}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status}:\n{}", sidecar.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_first_token_in_time_gets_a_timeout_not_a_hang() {
    // One engine slot: a second request waits in the queue, past its first-token timeout. (Two
    // seconds: ample for the first request's first token on a loaded machine, and far shorter
    // than its 2,000-token stream the second one queues behind.)
    let mut sidecar = Sidecar::spawn(&["--max-seqs", "1", "--first-token-timeout-secs", "2"]);
    sidecar.wait_ready().await;
    let completions = format!("{}/v1/completions", sidecar.api);
    let res = post_stream(&completions, &counting_stream(&sidecar.name)).await;
    assert_eq!(res.status(), StatusCode::OK);
    let mut long = res.into_body();
    // The stream is under way: its first token came in time, so only the request timeout
    // applies to it from here.
    long.frame().await.unwrap().unwrap();

    let (status, headers, text) = post_raw(
        &format!("{}/v1/chat/completions", sidecar.api),
        serde_json::to_vec(&json!({"model": sidecar.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{text}");
    assert!(headers.contains_key("retry-after"));
    let e: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(e["error"]["code"], "timeout", "{text}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no first token"),
        "{text}"
    );
    // The stream that was under way goes on.
    let next = long.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(String::from_utf8_lossy(&next).starts_with("data: "));
}

//! The per-pod metrics the operator's autoscalers name (`crds/src/contract.rs`), on the real
//! binary's admin `/metrics` after real generations: both exist as gauges under the names the
//! HorizontalPodAutoscalers use, and the token rate counts the tokens just generated.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::json;
use sluice_crds::contract::{COMPLETION_TOKENS_PER_SECOND_SERIES, REQUESTS_IN_FLIGHT_SERIES};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaler_metrics_are_gauges_that_follow_the_traffic() {
    let mut sidecar = Sidecar::spawn(&[]);
    sidecar.wait_ready().await;
    let metrics_url = format!("{}/metrics", sidecar.admin);
    let scrape = || async { get(&metrics_url).await.unwrap().1 };

    // Before any request: both exported, as gauges, at 0.
    let text = scrape().await;
    for name in [
        REQUESTS_IN_FLIGHT_SERIES,
        COMPLETION_TOKENS_PER_SECOND_SERIES,
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} gauge\n")),
            "{name} is not exported as a gauge:\n{text}"
        );
        assert_eq!(metric(&text, name), Some(0.0), "{name}:\n{text}");
    }

    // One streamed and one whole answer: the rate counts their tokens (as they stream, and
    // all at once for the other).
    let chat = format!("{}/v1/chat/completions", sidecar.api);
    let body = |stream: bool| {
        json!({
            "model": sidecar.name,
            "messages": [{"role": "user", "content": "Count from 1 to 20."}],
            "max_tokens": 12,
            "temperature": 0,
            "stream": stream,
        })
    };
    let res = post_stream(&chat, &body(true)).await;
    assert_eq!(res.status(), StatusCode::OK);
    res.into_body().collect().await.unwrap();
    let (status, answer) = post_json(&chat, &body(false)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");

    // The window is 30 s and the span it is divided by at least 1 s: right after the
    // requests the rate is above 0 and at most every token generated so far. Only the
    // engine's speed decides how soon the scrape comes, so it waits for the value rather than
    // for a time.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape().await;
        let rate = metric(&text, COMPLETION_TOKENS_PER_SECOND_SERIES).unwrap();
        let total = metric(&text, "sluice_completion_tokens_total").unwrap();
        assert!(total > 0.0, "{text}");
        assert!(
            rate <= total,
            "{rate} tokens/s from {total} tokens:\n{text}"
        );
        if rate > 0.0 && metric(&text, REQUESTS_IN_FLIGHT_SERIES) == Some(0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the token rate never counted the generations:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

//! Traces on the real binary: two sidecars (variants `stable` and `canary`) export spans over
//! OTLP/HTTP to a receiver here (`common/otlp.rs`, the `opentelemetry-proto` types). A client's
//! request carries a W3C `traceparent` and is pinned to the canary, so the entry pod forwards it:
//! both pods' spans join the client's trace, the canary's request span under the entry pod's
//! `forward` span, with the GenAI attributes and the engine's phases as children.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/otlp.rs"]
mod otlp;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use serde_json::json;

const TOKEN: &str = "test-forwarding-token-0123456789abcdef";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_is_one_trace_with_genai_attributes() {
    let receiver = otlp::Receiver::start().await;
    let scratch = TempDir::new("traces");
    let ports = (free_port(), free_port());
    let config = scratch.write(
        "config.yaml",
        &format!(
            "version: v1alpha1\nmodel: smollm2\nvariants:\n  - name: stable\n    weight: 100\n    address: http://127.0.0.1:{}\n  - name: canary\n    weight: 0\n    address: http://127.0.0.1:{}\nrouting:\n  overrideHeader: x-sluice-variant\n",
            ports.0, ports.1
        ),
    );
    let token = scratch.write("token", TOKEN);
    let endpoint = receiver.endpoint();
    // Export every 100 ms (the SDK's variable) instead of every 5 s.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let (config, token) = (config.to_str().unwrap(), token.to_str().unwrap());
    let spawn = |variant: &str, port: u16| {
        let args = [
            "--variant",
            variant,
            "--config",
            config,
            "--forward-token-file",
            token,
        ];
        Sidecar::spawn_at_with_env(port, free_port(), &args, &env)
    };
    let mut stable = spawn("stable", ports.0);
    let mut canary = spawn("canary", ports.1);
    stable.wait_ready().await;
    canary.wait_ready().await;

    let traceparent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    let body = json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "stream": true,
    });
    let res = post_as(
        &format!("{}/v1/chat/completions", stable.api),
        None,
        &[
            ("traceparent", traceparent.as_str()),
            ("x-sluice-variant", "canary"),
        ],
        &body,
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-sluice-variant"], "canary");
    let text = String::from_utf8(
        http_body_util::BodyExt::collect(res.into_body())
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(text.contains("[DONE]"), "{text}");

    // Both pods' spans of this trace arrive: the entry pod's request, admission and forward
    // spans, the canary's request span and its phases.
    const CHAT: &str = "POST /v1/chat/completions";
    let deadline = Instant::now() + Duration::from_secs(30);
    let spans = loop {
        let spans: Vec<otlp::Span> = receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == TRACE)
            .collect();
        let named = |name: &str| spans.iter().filter(|s| s.name == name).count();
        let phases = ["admission", "forward", "queue", "prefill", "decode"];
        if named(CHAT) == 2 && phases.iter().all(|p| named(p) == 1) {
            break spans;
        }
        assert!(
            Instant::now() < deadline,
            "spans of the trace so far: {spans:#?}\nall: {:#?}",
            receiver.spans()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let span = |name: &str| spans.iter().find(|s| s.name == name).unwrap();
    let forward = span("forward");
    let entry = spans
        .iter()
        .find(|s| s.name == CHAT && s.parent_span_id == CLIENT_SPAN)
        .unwrap_or_else(|| panic!("no request span under the client's: {spans:#?}"));
    let served = spans
        .iter()
        .find(|s| s.name == CHAT && s.parent_span_id == forward.span_id)
        .unwrap_or_else(|| panic!("no request span under the forward: {spans:#?}"));

    // One trace: the client's span → the entry pod's request → its forward → the canary's
    // request → the canary's phases.
    assert_eq!(
        (entry.kind, served.kind, forward.kind),
        (2, 2, 3),
        "server, server, client"
    );
    assert_eq!(forward.parent_span_id, entry.span_id);
    for phase in ["queue", "prefill", "decode"] {
        assert_eq!(span(phase).parent_span_id, served.span_id, "{phase}");
    }
    assert_eq!(
        span("admission").parent_span_id,
        entry.span_id,
        "admitted at the entry pod"
    );
    assert_eq!(served.attribute("sluice.variant"), Some("canary"));

    // GenAI attributes on the span of the pod that generated.
    assert_eq!(served.attribute("gen_ai.operation.name"), Some("chat"));
    assert_eq!(served.attribute("gen_ai.request.model"), Some("smollm2"));
    let tokens = |key: &str| served.attribute(key).and_then(|v| v.parse::<u64>().ok());
    assert!(
        tokens("gen_ai.usage.input_tokens").is_some_and(|n| n > 0),
        "{served:?}"
    );
    assert!(
        tokens("gen_ai.usage.output_tokens").is_some_and(|n| n > 0),
        "{served:?}"
    );
    let ttft = served
        .attribute("gen_ai.server.time_to_first_token")
        .and_then(|v| v.parse::<f64>().ok());
    assert!(ttft.is_some_and(|s| s > 0.0), "{served:?}");
    assert_eq!(served.attribute("http.response.status_code"), Some("200"));
    assert_eq!(entry.service, "sluice-sidecar");

    // A request without traceparent starts a trace of its own.
    let (status, _) = post_json(
        &format!("{}/v1/completions", stable.api),
        &json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fresh = receiver.spans().into_iter().any(|s| {
            s.name == "POST /v1/completions" && s.trace_id != TRACE && s.parent_span_id.is_empty()
        });
        if fresh {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no root span for the second request"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

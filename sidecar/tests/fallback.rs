//! The fallback model (`spec.fallback`) on the real binaries over real HTTP: a `primary`
//! sidecar with one engine slot and no queue, whose config names a `backup` sidecar as its
//! fallback (with the backup's forwarding token, as the operator mounts it). Requests primary
//! cannot serve (shed at its saturation mark, refused by its full queue, or routed to a variant
//! that cannot be reached) are answered by backup, marked `x-sluice-fallback`, charged once
//! under primary's limits (backup, which requires API keys the callers do not have, admits
//! nothing: the signed forward skips its admission); with backup gone they get primary's 503.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::{Value, json};

fn fallbacks(metrics: &str, reason: &str, outcome: &str) -> f64 {
    metric(
        metrics,
        &format!("sluice_model_fallbacks_total{{reason=\"{reason}\",outcome=\"{outcome}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_primary_cannot_serve_are_answered_by_its_fallback_and_charged_once() {
    let dir = TempDir::new("fallback");
    let backup_token = dir.write("backup.token", "backup-forwarding-token\n");
    let primary_token = dir.write("primary.token", "primary-forwarding-token\n");
    let keys = dir.write(
        "keys.yaml",
        "- key: backup-only-key\n  tenant: backup-users\n",
    );
    let backup_config = dir.write(
        "backup.yaml",
        &format!(
            "version: v1alpha1\nmodel: backup\nvariants:\n  - name: default\n    weight: 100\n\
             identity:\n  source: Bearer\n  keysFile: {}\n\
             cache:\n  maxBytes: 1048576\n  ttlSeconds: 600\n",
            keys.display()
        ),
    );
    let mut backup = Sidecar::spawn_named(
        "backup",
        &[
            "--config",
            backup_config.to_str().unwrap(),
            "--forward-token-file",
            backup_token.to_str().unwrap(),
        ],
    );
    // Nothing listens here: the `dead` variant cannot be reached.
    let dead = free_port();
    let primary_config = dir.write(
        "primary.yaml",
        &format!(
            r#"version: v1alpha1
model: primary
variants:
  - name: stable
    weight: 100
  - name: dead
    weight: 0
    address: http://127.0.0.1:{dead}
routing:
  overrideHeader: x-variant
rules:
  - name: p/batch-is-sheddable
    match:
      tenants: [batch]
    per: Tenant
    priority: Sheddable
  - name: p/per-key
    per: Key
    requestsPerMinute: 1000
saturation:
  maxInFlight: 1
fallback:
  model: backup
  address: {}
"#,
            backup.api
        ),
    );
    let mut primary = Sidecar::spawn_named(
        "primary",
        &[
            "--config",
            primary_config.to_str().unwrap(),
            "--variant",
            "stable",
            "--forward-token-file",
            primary_token.to_str().unwrap(),
            "--fallback-token-file",
            backup_token.to_str().unwrap(),
            "--max-seqs",
            "1",
            "--max-queue",
            "0",
        ],
    );
    backup.wait_ready().await;
    primary.wait_ready().await;
    let chat = format!("{}/v1/chat/completions", primary.api);
    let short = |stream: bool| {
        json!({
            "model": "primary",
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 3,
            "temperature": 0,
            "stream": stream,
        })
    };

    // The backup admits none of these callers itself.
    let direct = post_as(
        &format!("{}/v1/chat/completions", backup.api),
        Some("batch"),
        &[],
        &json!({"model": "backup", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    )
    .await;
    assert_eq!(direct.status(), StatusCode::UNAUTHORIZED);

    // Primary's one engine slot is taken, and its saturation mark (1) reached.
    let holder = post_as(
        &format!("{}/v1/completions", primary.api),
        Some("std"),
        &[],
        &counting_stream("primary"),
    )
    .await;
    assert_eq!(holder.status(), StatusCode::OK);
    assert!(holder.headers().get("x-sluice-fallback").is_none());
    let mut holder = holder.into_body();
    holder.frame().await.unwrap().unwrap();

    // Sheddable: shed at primary's mark, served by backup, charged at primary.
    let res = post_as(&chat, Some("batch"), &[], &short(false)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-sluice-fallback"], "backup");
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "999");
    let body = read_json(res).await.2;
    assert_eq!(body["model"], "backup", "{body}");
    assert!(
        body["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{body}"
    );

    // Standard, streamed: admitted (under twice the mark), refused by the full queue, streamed
    // by backup through primary.
    let res = post_as(&chat, Some("streamer"), &[], &short(true)).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-sluice-fallback"], "backup");
    // The same greedy chat as the one before, from another caller: the backup's response cache
    // (per tenant, and the tenant is known only where the request was admitted) stays out of
    // forwarded requests.
    assert!(res.headers().get("x-sluice-cache").is_none());
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "999");
    let text =
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["model"], "backup", "{text}");

    // A variant that cannot be reached (pinned here by the override header).
    let res = post_as(
        &chat,
        Some("other"),
        &[("x-variant", "dead")],
        &short(false),
    )
    .await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-sluice-fallback"], "backup");
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "999");
    assert_eq!(read_json(res).await.2["model"], "backup");

    let (_, metrics) = get(&format!("{}/metrics", primary.admin)).await.unwrap();
    for reason in ["shed", "overloaded", "unavailable"] {
        assert_eq!(
            fallbacks(&metrics, reason, "forwarded"),
            1.0,
            "{reason}\n{metrics}"
        );
    }

    // Without its fallback, primary answers as it would without one: 503, nothing relayed.
    drop(backup);
    let res = post_as(&chat, Some("batch"), &[], &short(false)).await;
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.headers().get("x-sluice-fallback").is_none());
    let body = read_json(res).await.2;
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    let (_, metrics) = get(&format!("{}/metrics", primary.admin)).await.unwrap();
    assert_eq!(fallbacks(&metrics, "shed", "failed"), 1.0, "{metrics}");

    drop(holder);
}

//! One endpoint for all models, on the real binaries over real HTTP: two sidecars on the demo
//! model, `alpha` and `bravo`; alpha's config lists bravo (and `charlie`, whose Service is
//! down) as the other models of its namespace, as the operator writes it. A client that knows
//! only alpha's address reaches bravo by naming it, with the official `openai` Python client:
//! answers (streamed or not) come from bravo, `/v1/models` lists both, an unknown model is a
//! 404 `model_not_found`. Limits are bravo's: its API keys and its per-key rule (2 requests a
//! minute) refuse what alpha sends on, while alpha charges nothing for those requests (its own
//! rule of the same shape still has its whole budget for a direct request).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use http::StatusCode;
use serde_json::json;

const CALLER: &str = "caller-1";

/// The openai client against alpha only (`argv`: alpha's URL, alpha, bravo).
const CLIENT: &str = r#"
import sys, openai
client = openai.OpenAI(base_url=sys.argv[1] + "/v1", api_key="caller-1", max_retries=0)
alpha, bravo = sys.argv[2], sys.argv[3]
listed = sorted(m.id for m in client.models.list())
assert listed == sorted([alpha, bravo, "charlie"]), listed
assert client.models.retrieve(bravo).id == bravo
say = [{"role": "user", "content": "Say hi"}]
r = client.chat.completions.create(model=bravo, messages=say, max_tokens=4, temperature=0)
assert r.model == bravo, r
assert r.choices[0].message.content, r
parts, models = [], set()
for chunk in client.chat.completions.create(model=bravo, messages=say, max_tokens=4,
                                            temperature=0, stream=True):
    models.add(chunk.model)
    for c in chunk.choices:
        parts.append(c.delta.content or "")
assert models == {bravo}, models
assert "".join(parts) == r.choices[0].message.content, (parts, r)
# Bravo's rule allows a key 2 requests a minute: the third, through alpha, is refused by it.
try:
    client.chat.completions.create(model=bravo, messages=say, max_tokens=4)
    raise SystemExit("expected RateLimitError")
except openai.RateLimitError as e:
    assert e.response.headers["x-sluice-rule"] == "bravo-limits/two-a-minute", e.response.headers
    assert e.body["code"] == "rate_limit_exceeded", e.body
for unknown in ("nope", "bravo-typo"):
    try:
        client.chat.completions.create(model=unknown, messages=say)
        raise SystemExit("expected NotFoundError")
    except openai.NotFoundError as e:
        assert e.body["code"] == "model_not_found", e.body
        # Only the model asked for: no other model's name, no address.
        message = e.body["message"]
        assert unknown in message and "127.0.0.1" not in message and "charlie" not in message, message
try:
    client.models.retrieve("nope")
    raise SystemExit("expected NotFoundError")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
print("gateway ok")
"#;

fn gateway_forwards(metrics: &str, model: &str, outcome: &str) -> f64 {
    metric(
        metrics,
        &format!("sluice_gateway_forwards_total{{model=\"{model}\",outcome=\"{outcome}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sidecar_answers_for_every_model_and_each_charges_its_own() {
    let dir = TempDir::new("gateway");
    // Bravo takes only its own callers' keys, 2 requests a minute each.
    let keys = dir.write("keys.yaml", &format!("- key: {CALLER}\n  tenant: team\n"));
    let bravo_config = dir.write(
        "bravo.yaml",
        &format!(
            "version: v1alpha1\nmodel: bravo\nvariants:\n  - name: default\n    weight: 100\n\
             identity:\n  source: Bearer\n  keysFile: {}\n\
             rules:\n  - name: bravo-limits/two-a-minute\n    per: Key\n    requestsPerMinute: 2\n",
            keys.display()
        ),
    );
    let mut bravo = Sidecar::spawn_named("bravo", &["--config", bravo_config.to_str().unwrap()]);
    // Nothing listens here: charlie's Service is down.
    let dead = free_port();
    let alpha_config = dir.write(
        "alpha.yaml",
        &format!(
            "version: v1alpha1\nmodel: alpha\nvariants:\n  - name: default\n    weight: 100\n\
             rules:\n  - name: alpha-limits/two-a-minute\n    per: Key\n    requestsPerMinute: 2\n\
             models:\n  - name: bravo\n    address: {}\n  - name: charlie\n    address: http://127.0.0.1:{dead}\n",
            bravo.api
        ),
    );
    let mut alpha = Sidecar::spawn_named("alpha", &["--config", alpha_config.to_str().unwrap()]);
    bravo.wait_ready().await;
    alpha.wait_ready().await;

    run_openai_client(CLIENT, &[&alpha.api, "alpha", "bravo"]);

    // The caller's key reached bravo: one bravo does not know is refused there.
    let chat = format!("{}/v1/chat/completions", alpha.api);
    let hi = |model: &str| json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
    let (status, headers, body) =
        read_json(post_as(&chat, Some("stranger"), &[], &hi("bravo")).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
    assert!(headers.contains_key("x-request-id"));
    // A model whose Service cannot be reached: 503, naming only the model asked for.
    let (status, headers, body) =
        read_json(post_as(&chat, Some(CALLER), &[], &hi("charlie")).await).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "model_unavailable", "{body}");
    assert_eq!(headers["retry-after"], "1");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("charlie") && !message.contains(&dead.to_string()),
        "{message}"
    );

    // Bravo admitted two, refused one and turned the stranger away.
    let (_, bravo_metrics) = get(&format!("{}/metrics", bravo.admin)).await.unwrap();
    let refused = "sluice_ratelimit_refused_total{rule=\"bravo-limits/two-a-minute\",reason=\"rate_limit_exceeded\"}";
    assert_eq!(
        metric(&bravo_metrics, refused),
        Some(1.0),
        "{bravo_metrics}"
    );
    // Alpha sent them on, charged none of them and counts none of them as its own requests.
    let (_, alpha_metrics) = get(&format!("{}/metrics", alpha.admin)).await.unwrap();
    assert_eq!(
        gateway_forwards(&alpha_metrics, "bravo", "forwarded"),
        4.0,
        "{alpha_metrics}"
    );
    assert_eq!(
        gateway_forwards(&alpha_metrics, "charlie", "connect"),
        1.0,
        "{alpha_metrics}"
    );
    assert!(
        !alpha_metrics
            .lines()
            .any(|l| l.starts_with("sluice_ratelimit_refused_total")),
        "{alpha_metrics}"
    );
    for status in [200, 401, 429, 503] {
        let series = format!(
            "sluice_requests_total{{route=\"/v1/chat/completions\",variant=\"default\",status=\"{status}\"}}"
        );
        assert_eq!(metric(&alpha_metrics, &series), None, "{alpha_metrics}");
    }
    // Alpha's own rule, of the same shape, has its whole budget for the caller's first
    // request to alpha itself.
    let res = post_as(&chat, Some(CALLER), &[], &hi("alpha")).await;
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()["x-ratelimit-remaining-requests"], "1");
    assert_eq!(read_json(res).await.2["model"], "alpha");
}

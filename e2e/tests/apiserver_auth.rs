//! `spec.auth` and traces against a real API server (scripts/cluster.sh): the chart's operator
//! mounts the model's API-key Secret and its issuer's key set (a ConfigMap) where the sidecar
//! config it writes says they are, and the sidecar, run by the stand-in kubelet, lets in a JWT
//! of that issuer and a listed key, refuses a request without a credential (401) and a caller
//! without an allowed role (403). The issuer's keys are generated here. With the chart's
//! `tracing.otlpEndpoint` set, the operator's reconciles and, through the endpoint it passes on,
//! the sidecar's requests reach an OTLP receiver here.

use std::time::Duration;

use anyhow::ensure;
use serde_json::json;
use sluice_e2e::{Cluster, http, objects, wait};
use sluice_operator::names::{API_PORT, LABEL_MODEL};

#[path = "../../sidecar/tests/common/issuer.rs"]
#[allow(dead_code, clippy::unwrap_used)]
mod issuer;
#[path = "../../sidecar/tests/common/otlp.rs"]
#[allow(dead_code, clippy::unwrap_used)]
mod otlp;

use issuer::{Alg, TestIssuer, claims};

const MODEL: &str = "guarded";
const ISSUER: &str = "https://login.example.test";

#[tokio::test]
async fn the_operator_mounts_the_keys_the_sidecar_checks_callers_against() -> anyhow::Result<()> {
    let cluster = Cluster::start().await?;
    let result = scenario(&cluster).await;
    if result.is_err() {
        cluster.kubelet.print_logs(20);
    }
    result
}

async fn scenario(c: &Cluster) -> anyhow::Result<()> {
    let (admin, models) = (&c.admin, c.models.as_str());
    let receiver = otlp::Receiver::start_on(c.kubelet.host_ip()?).await;
    c.install_operator_with(json!({"tracing": {"otlpEndpoint": receiver.endpoint()}}))?;
    let key = TestIssuer::new(Alg::ES256, "k1");
    for object in [
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "login-keys"},
            "data": {"jwks.json": TestIssuer::jwks(&[&key])},
        }),
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "guarded-keys"},
            "stringData": {"keys.yaml": "- key: sk-ops\n  tenant: ops\n  roles: [chat]\n"},
        }),
        json!({
            "apiVersion": "sluice.dev/v1alpha1",
            "kind": "InferenceModel",
            "metadata": {"name": MODEL},
            "spec": {
                "servedName": MODEL,
                "resources": {"cpu": "1", "memory": "1Gi"},
                "auth": {
                    "apiKeys": {"secretName": "guarded-keys"},
                    "jwt": [{
                        "issuer": ISSUER,
                        "audiences": ["sluice"],
                        "jwks": {"configMapName": "login-keys"},
                        "tenantClaim": "org",
                    }],
                    "allow": [{"roles": ["chat"]}],
                },
                "variants": [
                    {"name": "a", "weight": 100, "model": {"url": "https://example.invalid/a.gguf"}},
                ],
            },
        }),
    ] {
        objects::apply(admin, models, &object, "kubectl", false).await?;
    }
    let selector = format!("{LABEL_MODEL}={MODEL}");
    let ip = wait::until("the model's pod ready", Duration::from_secs(180), || {
        c.ready_pod_ip(&selector)
    })
    .await?;

    let token = |roles: &[&str]| {
        key.token(&claims(
            ISSUER,
            "sluice",
            json!({"org": "acme", "roles": roles}),
        ))
    };
    let (chat, viewer) = (token(&["chat"]), token(&["viewer"]));
    for (credential, want) in [
        (None, 401),
        (Some(chat.as_str()), 200),
        (Some("sk-ops"), 200),
        (Some("sk-someone-else"), 401),
        (Some(viewer.as_str()), 403),
    ] {
        let bearer = credential.map(|c| format!("Bearer {c}"));
        let headers: Vec<(&str, &str)> = bearer
            .as_deref()
            .map(|b| vec![("authorization", b)])
            .unwrap_or_default();
        let body = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 2,
        });
        let answer = http::request(
            ip,
            API_PORT as u16,
            "POST",
            "/v1/chat/completions",
            &headers,
            Some(&body),
        )
        .await?;
        let shown = credential.map_or("no credential", |c| &c[..c.len().min(12)]);
        ensure!(
            answer.status == want,
            "{shown}: expected {want}, got {}: {}",
            answer.status,
            answer.body
        );
    }

    // Traces: the operator's reconciles, and the sidecar's requests through the endpoint the
    // operator passed on, with the tenant the token named.
    wait::until(
        "the operator's and the sidecar's spans",
        Duration::from_secs(60),
        || async {
            let spans = receiver.spans();
            let reconciled = spans
                .iter()
                .any(|s| s.service == "sluice-operator" && s.name == "reconcile");
            let served = spans.iter().any(|s| {
                s.service == "sluice-sidecar"
                    && s.name == "POST /v1/chat/completions"
                    && s.attribute("sluice.tenant") == Some("acme")
                    && s.attribute("http.response.status_code") == Some("200")
            });
            Ok((reconciled && served).then_some(()))
        },
    )
    .await?;
    Ok(())
}

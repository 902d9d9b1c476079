//! `auth` on the real binary: two sidecars (variants `stable` and `canary`) of one model, with
//! API keys, a JWT issuer whose key set is served over HTTP (and rotated), another whose key set
//! is a mounted file, and access rules by role. Tokens come from issuers whose keys are generated
//! here (`common/issuer.rs`).
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/issuer.rs"]
mod issuer;

use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use issuer::{Alg, TestIssuer, claims, now};
use serde_json::{Value, json};

const TOKEN: &str = "test-forwarding-token-0123456789abcdef";
const REMOTE: &str = "https://issuer.test";
const FILED: &str = "https://filed.test";
const AUD: &str = "sluice";

/// Serves `jwks` (swappable) at `/jwks`, counting fetches.
async fn jwks_server(jwks: Arc<Mutex<String>>, fetches: Arc<AtomicUsize>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (jwks, fetches) = (jwks.clone(), fetches.clone());
            let service = hyper::service::service_fn(move |_req| {
                fetches.fetch_add(1, Ordering::SeqCst);
                let body = jwks.lock().unwrap().clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    format!("http://{addr}/jwks")
}

fn config(ports: (u16, u16), jwks_uri: &str, jwks_file: &str, keys_file: &str) -> String {
    format!(
        r#"version: v1alpha1
model: smollm2
variants:
  - name: stable
    weight: 100
    address: http://127.0.0.1:{}
  - name: canary
    weight: 0
    address: http://127.0.0.1:{}
routing:
  overrideHeader: x-sluice-variant
auth:
  keysFile: {keys_file}
  jwt:
    - issuer: {REMOTE}
      audiences: [{AUD}]
      jwksUri: {jwks_uri}
      tenantClaim: org.id
      rolesClaim: roles
    - issuer: {FILED}
      audiences: [other, {AUD}]
      jwksFile: {jwks_file}
      tenantClaim: sub
      rolesClaim: scope
  allow:
    - roles: [chat]
      variants: [stable]
    - roles: [tester]
      variantOverride: true
rules:
  - name: p/chat-rpm
    match:
      roles: [chat]
    requestsPerMinute: 2
"#,
        ports.0, ports.1
    )
}

/// One 1-token completion as `credential` with `extra` headers: status, serving variant, body,
/// `WWW-Authenticate`.
async fn call(
    api: &str,
    credential: Option<&str>,
    extra: &[(&str, &str)],
) -> (StatusCode, String, Value, String) {
    let body = json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 1, "temperature": 0});
    let res = post_as(&format!("{api}/v1/completions"), credential, extra, &body).await;
    let header = |name: &str| {
        res.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default()
    };
    let (variant, challenge) = (header("x-sluice-variant"), header("www-authenticate"));
    let (status, _, json) = read_json(res).await;
    (status, variant, json, challenge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_keys_and_roles_decide_who_calls_what() {
    let scratch = TempDir::new("auth");
    let remote = TestIssuer::new(Alg::RS256, "r1");
    let filed = TestIssuer::new(Alg::EdDSA, "f1");
    let jwks = Arc::new(Mutex::new(TestIssuer::jwks(&[&remote])));
    let fetches = Arc::new(AtomicUsize::new(0));
    let jwks_uri = jwks_server(jwks.clone(), fetches.clone()).await;
    let jwks_file = scratch.write("jwks.json", &TestIssuer::jwks(&[&filed]));
    let keys = scratch.write(
        "keys.yaml",
        "- key: sk-team-k\n  tenant: team-k\n  roles: [chat]\n",
    );
    let token_file = scratch.write("token", TOKEN);
    let ports = (free_port(), free_port());
    let config_path = scratch.write(
        "config.yaml",
        &config(
            ports,
            &jwks_uri,
            jwks_file.to_str().unwrap(),
            keys.to_str().unwrap(),
        ),
    );
    let (config_path, token_file) = (config_path.to_str().unwrap(), token_file.to_str().unwrap());
    let spawn = |variant: &str, port: u16| {
        Sidecar::spawn_at(
            port,
            free_port(),
            &[
                "--variant",
                variant,
                "--config",
                config_path,
                "--forward-token-file",
                token_file,
            ],
        )
    };
    let mut stable = spawn("stable", ports.0);
    let mut canary = spawn("canary", ports.1);
    stable.wait_ready().await;
    canary.wait_ready().await;
    let api = stable.api.clone();
    let chat = |org: &str| {
        remote.token(&claims(
            REMOTE,
            AUD,
            json!({"org": {"id": org}, "roles": ["chat"]}),
        ))
    };

    // --- a valid token of each issuer gets in, as its tenant ---
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, variant, body, _) = loop {
        // The remote key set is fetched at start-up; until then tokens get 401.
        let answer = call(&api, Some(&chat("acme")), &[]).await;
        if answer.0 != StatusCode::UNAUTHORIZED || Instant::now() > deadline {
            break answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (status, variant.as_str()),
        (StatusCode::OK, "stable"),
        "{body}"
    );
    let eddsa = filed.token(&claims(
        FILED,
        AUD,
        json!({"sub": "svc-x", "scope": "chat"}),
    ));
    let (status, _, body, _) = call(&api, Some(&eddsa), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _, body, _) = call(&api, Some("sk-team-k"), &[]).await;
    assert_eq!(status, StatusCode::OK, "an API key from the list: {body}");

    // --- bad credentials: 401 in OpenAI's shape, with a Bearer challenge ---
    let forger = TestIssuer::new(Alg::RS256, "r1");
    let expired = remote.token(&claims(
        REMOTE,
        AUD,
        json!({"org": {"id": "acme"}, "roles": ["chat"], "exp": now() - 3600}),
    ));
    let wrong_audience = remote.token(&claims(REMOTE, "someone-else", json!({"org": {"id": "a"}})));
    let forged = forger.token(&claims(REMOTE, AUD, json!({"org": {"id": "acme"}})));
    for (credential, code, says) in [
        (None, "invalid_api_key", "didn't provide"),
        (Some("sk-unknown"), "invalid_api_key", "Incorrect API key"),
        (Some(forged.as_str()), "invalid_token", "signature"),
        (Some(expired.as_str()), "invalid_token", "expired"),
        (Some(wrong_audience.as_str()), "invalid_token", "audience"),
    ] {
        let (status, _, body, challenge) = call(&api, credential, &[]).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{message}");
        assert!(challenge.starts_with("Bearer"), "{challenge:?}");
    }

    // --- a valid caller without a role that allows it: 403 ---
    let viewer = remote.token(&claims(
        REMOTE,
        AUD,
        json!({"org": {"id": "acme"}, "roles": ["viewer"]}),
    ));
    let (status, _, body, _) = call(&api, Some(&viewer), &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["type"], "permission_error", "{body}");
    // `chat` may not pin a variant; `tester` may, and the canary serves it after a forward that
    // carries the signed identity, not the token (the canary would refuse a second check).
    let (status, _, body, _) =
        call(&api, Some(&chat("acme")), &[("x-sluice-variant", "canary")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    let tester = remote.token(&claims(
        REMOTE,
        AUD,
        json!({"org": {"id": "qa"}, "roles": ["tester"]}),
    ));
    let (status, variant, body, _) =
        call(&api, Some(&tester), &[("x-sluice-variant", "canary")]).await;
    assert_eq!(
        (status, variant.as_str()),
        (StatusCode::OK, "canary"),
        "{body}"
    );

    // --- rate-limit rules match roles: `chat` callers get 2 a minute per tenant ---
    let (status, _, body, _) = call(&api, Some(&chat("acme")), &[]).await;
    assert_eq!(status, StatusCode::OK, "acme's second: {body}");
    let (status, _, body, _) = call(&api, Some(&chat("acme")), &[]).await;
    assert_eq!(
        status,
        StatusCode::TOO_MANY_REQUESTS,
        "acme's third: {body}"
    );
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    let (status, _, _, _) = call(&api, Some(&tester), &[]).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "tester has no chat role: not limited"
    );

    // --- rotation: the issuer replaces its key; the first token under the new key triggers a
    // refetch (at most every 30 s), after which it gets in; the old key no longer does ---
    let rotated = TestIssuer::new(Alg::ES256, "r2");
    *jwks.lock().unwrap() = TestIssuer::jwks(&[&rotated]);
    let before = fetches.load(Ordering::SeqCst);
    let new_token = rotated.token(&claims(
        REMOTE,
        AUD,
        json!({"org": {"id": "rotated"}, "roles": ["chat"]}),
    ));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, _, body, _) = call(&api, Some(&new_token), &[]).await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(
            Instant::now() < deadline,
            "the rotated key was never fetched"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(fetches.load(Ordering::SeqCst) > before);
    let (status, _, _, _) = call(&api, Some(&chat("old-key")), &[]).await;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the removed key is refused"
    );
    // The mounted key set rotates by rewriting the file.
    let refiled = TestIssuer::new(Alg::EdDSA, "f2");
    std::fs::write(&jwks_file, TestIssuer::jwks(&[&refiled])).unwrap();
    let token = refiled.token(&claims(
        FILED,
        AUD,
        json!({"sub": "svc-y", "scope": "chat"}),
    ));
    let deadline = Instant::now() + Duration::from_secs(30);
    while call(&api, Some(&token), &[]).await.0 != StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "the rewritten key file was not re-read"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // --- the official client: a token is its api_key; 401 and 403 are its typed errors ---
    let script = r#"
import sys, openai
base = sys.argv[1] + "/v1"
ok = openai.OpenAI(base_url=base, api_key=sys.argv[2], max_retries=0)
r = ok.completions.create(model="smollm2", prompt="Hi", max_tokens=1, temperature=0)
assert r.choices[0].text is not None
for key, error in [(sys.argv[3], openai.AuthenticationError), (sys.argv[4], openai.PermissionDeniedError)]:
    try:
        openai.OpenAI(base_url=base, api_key=key, max_retries=0).completions.create(
            model="smollm2", prompt="Hi", max_tokens=1)
        raise SystemExit("expected " + error.__name__)
    except error as e:
        print(error.__name__, e.status_code)
"#;
    let tester = rotated.token(&claims(
        REMOTE,
        AUD,
        json!({"org": {"id": "qa"}, "roles": ["tester"]}),
    ));
    let viewer = rotated.token(&claims(
        REMOTE,
        AUD,
        json!({"org": {"id": "acme"}, "roles": ["viewer"]}),
    ));
    let out = run_openai_client(script, &[&api, &tester, "sk-unknown", &viewer]);
    assert!(out.contains("AuthenticationError 401") && out.contains("PermissionDeniedError 403"));

    // --- no credential is ever logged ---
    for log in [stable.log(), canary.log()] {
        let signature = |token: &str| token.rsplit('.').next().unwrap().to_owned();
        for secret in [
            "sk-team-k".to_owned(),
            "sk-unknown".to_owned(),
            signature(&tester),
            signature(&viewer),
        ] {
            assert!(!log.contains(&secret), "credential in the log:\n{log}");
        }
    }
}

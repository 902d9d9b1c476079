//! What each fuzz target does with the fuzzer's bytes: the parsers that read bytes from outside
//! the process, called as the product calls them, with the promises they keep checked.
//!
//! `fuzz_targets/` runs these under libFuzzer (`make fuzz`); `tests/corpus.rs` replays the
//! committed corpora and crash reproducers through them in every `make test`. Each function
//! panics only when a promise is broken: a parser panicking, a malformed request answered
//! with anything but a 4xx, a rejected config replacing the one in force, a forged signature
//! or token accepted.

use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sluice_crds::SidecarConfig;
use sluice_sidecar::{
    auth::{jwks, jwt, keys::KeyRing},
    forward::UsageScan,
    http::validate,
    limits::Limiter,
    openai::Kind,
    readiness::Readiness,
    reload::Reloader,
    route::auth::{ForwardAuth, ForwardToken, caller_from, caller_header},
};

/// What a target does with one input.
pub type Target = fn(&[u8]);

/// Every target, by name (the corpus directories and `fuzz_targets/` use these names).
pub const TARGETS: &[(&str, Target)] = &[
    ("openai_request", openai_request),
    ("sidecar_config", sidecar_config),
    ("api_keys", api_keys),
    ("jwt", jwt),
    ("forwarding_header", forwarding_header),
    ("forwarded_stream", forwarded_stream),
    ("prometheus_text", prometheus_text),
    ("crd_manifests", crd_manifests),
];

/// The demo model's vocabulary, for the `logit_bias` check.
const VOCAB_SIZE: usize = 49_152;

/// A request body to `/v1/chat/completions` (first byte even) or `/v1/completions` (odd),
/// through the validation the server runs before the engine sees it. A refusal is a 4xx.
pub fn openai_request(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let kind = if selector % 2 == 0 {
        Kind::Chat
    } else {
        Kind::Completion
    };
    let checked = validate::parse(kind, body)
        .and_then(|request| validate::check_logit_bias(&request, VOCAB_SIZE));
    if let Err(error) = checked {
        assert!(
            error.status().is_client_error(),
            "a malformed request got {}: {error:?}",
            error.status()
        );
    }
}

/// A sidecar config document (YAML, or JSON as the operator writes it) applied over a good one,
/// as a hot reload does: a rejected document leaves the good one in force, and an accepted
/// one reads back from the JSON the operator would write.
pub fn sidecar_config(data: &[u8]) {
    const GOOD: &str = "version: v1alpha1\nmodel: m\nvariants:\n  - name: default\n    weight: 100\nrules:\n  - name: rpm\n    requestsPerMinute: 2\n";
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (policy_tx, policy_rx) = tokio::sync::watch::channel(None);
    let good = Arc::new(SidecarConfig::from_yaml(GOOD).expect("the good document parses"));
    let (config_tx, config_rx) = tokio::sync::watch::channel(good);
    let reloader = Reloader::new(
        Limiter::with_metrics(Default::default()),
        policy_tx,
        config_tx,
        Readiness::new(),
    );
    reloader
        .apply("fuzz", GOOD)
        .expect("the good document applies");
    let in_force = policy_rx.borrow().clone().expect("a policy is in force");
    match reloader.apply("fuzz", text) {
        Err(_) => {
            let now = policy_rx.borrow().clone().expect("a policy is in force");
            assert!(
                Arc::ptr_eq(&now, &in_force),
                "a rejected document replaced the policy"
            );
        }
        Ok(_) => {
            let accepted = config_rx.borrow().clone();
            let written = accepted.to_json().expect("an accepted config renders");
            let read = SidecarConfig::from_yaml(&written).expect("the rendered config parses");
            assert_eq!(read, *accepted, "the config changed through its JSON");
        }
    }
}

/// An API-key list file (`auth.keysFile`, `identity.keysFile`).
pub fn api_keys(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ring) = KeyRing::from_yaml(text) {
        let _ = ring.lookup("sk-fuzz");
        let _ = ring.lookup("");
    }
}

/// A JWKS file and a bearer token against it: the bytes are split at NUL bytes into the key
/// set, the token's header JSON, its payload JSON and its signature (base64url-encoded here, so
/// the fuzzer reaches past the encoding). No token is ever accepted: the fuzzer cannot sign one.
pub fn jwt(data: &[u8]) {
    let mut parts = data.splitn(4, |b| *b == 0);
    let (Some(key_set), Some(header), Some(payload), Some(signature)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let Ok(set) = jwks::parse(key_set) else {
        return;
    };
    let config = serde_json::from_value(serde_json::json!({
        "issuer": "https://issuer.fuzz",
        "audiences": ["sluice"],
        "jwksFile": "/etc/sluice/auth/jwks.json",
        "tenantClaim": "sub",
        "rolesClaim": "roles",
    }))
    .expect("the issuer config parses");
    let issuers = [jwt::Issuer::new(
        config,
        jwt::IssuerKeys::File(Arc::new(set)),
    )];
    let token = format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload),
        String::from_utf8_lossy(signature)
    );
    let verified = jwt::verify(&issuers, &token);
    assert!(verified.is_err(), "an unsigned token got in: {verified:?}");
}

/// The forwarding signature header and the caller header it covers, as a serving pod reads
/// them off a forwarded request: never valid without the secret, and a caller read back is the
/// caller written.
pub fn forwarding_header(data: &[u8]) {
    let auth = ForwardAuth::new(&ForwardToken::new(b"fuzz-forwarding-secret"));
    let (signature, caller) = match data.iter().position(|b| *b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    if let Ok(value) = http::HeaderValue::from_bytes(signature) {
        assert!(
            !auth.verify(&value, "/v1/chat/completions", caller),
            "a forged forwarding signature verified"
        );
    }
    if let Some(read) = caller_from(caller) {
        let again = caller_from(caller_header(&read).as_bytes());
        assert_eq!(
            again.as_ref(),
            Some(&read),
            "the caller changed through its header"
        );
    }
}

/// A forwarded response body as the entry pod relays it and reads its usage: SSE (first byte
/// odd) or JSON, split into chunks of a size the second byte gives, as they may arrive.
pub fn forwarded_stream(data: &[u8]) {
    let [mode, size, body @ ..] = data else {
        return;
    };
    let mut scan = UsageScan::new(mode % 2 == 1, 7);
    for chunk in body.chunks(usize::from(*size).max(1)) {
        scan.feed(chunk);
    }
    let _ = scan.mid_event();
    let _ = scan.usage();
}

/// A sidecar's `/metrics` page as the operator scrapes it.
pub fn prometheus_text(data: &[u8]) {
    // The operator refuses a page that is not UTF-8 before parsing (scrape.rs).
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sluice_operator::scrape::parse_prometheus_text(text);
    }
}

/// InferenceModels, RateLimitPolicies and Secrets (YAML or JSON), through what `sluice-operator
/// render` and the controller do with them: parse, validate, resolve the policies, render every
/// object. An invalid spec is an error, never a panic.
pub fn crd_manifests(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(manifests) = sluice_operator::manifests_from_yaml(text) else {
        return;
    };
    let settings = sluice_operator::desired::Settings {
        sidecar_image: "sidecar:fuzz".to_owned(),
        sidecar_cuda_image: "sidecar-cuda:fuzz".to_owned(),
        tracing_env: Vec::new(),
    };
    for policy in &manifests.policies {
        let _ = sluice_operator::policy::merge::check_policy(policy);
    }
    for model in &manifests.models {
        let rendered = sluice_operator::controller::render(
            model,
            "fuzz",
            &settings,
            &manifests.policies,
            &manifests.secrets,
            &manifests.models,
        );
        if let Ok(desired) = rendered {
            let _ = desired.to_yaml();
        }
    }
}

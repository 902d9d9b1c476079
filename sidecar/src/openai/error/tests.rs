//! Each layer's errors as clients see them: status, OpenAI body and headers.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use sluice_crds::SidecarConfig;

use super::*;
use crate::{
    auth::Forbidden,
    limits::{Identity, LimitMetrics, Limiter, Policy, Request},
    openai::rate_headers,
};

const SECOND: u64 = 1_000_000_000;

fn policy(rules: &str) -> Arc<Policy> {
    let text = format!(
        "version: v1alpha1\nmodel: m\nvariants:\n  - name: default\n    weight: 100\nrules:\n{rules}"
    );
    let config = Arc::new(SidecarConfig::from_yaml(&text).unwrap());
    Arc::new(Policy::compile(
        config,
        Arc::new(Identity::open()),
        None,
        0,
        1 << 20,
    ))
}

fn req(prompt: u64, max: u64) -> Request<'static> {
    Request {
        tenant: "a",
        key: "a",
        roles: &[],
        variant: "default",
        prompt_tokens: prompt,
        max_tokens: max,
        request_bytes: 100,
    }
}

fn header<'a>(headers: &'a [(HeaderName, HeaderValue)], name: &str) -> &'a str {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.to_str().unwrap())
        .unwrap_or_else(|| panic!("no {name} in {headers:?}"))
}

/// `(status, type, code, param, Retry-After)` of an error.
fn answer(
    e: &ApiError,
) -> (
    StatusCode,
    &'static str,
    Option<&'static str>,
    Option<String>,
    Option<u64>,
) {
    let body = e.body().error;
    (
        e.status(),
        body.kind,
        body.code,
        body.param,
        e.retry_after(),
    )
}

#[test]
fn renders_openai_shape() {
    let err = ApiError::invalid("temperature", "temperature must be between 0 and 2");
    let v: serde_json::Value = serde_json::from_slice(&err.to_json()).unwrap();
    assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["type"], "invalid_request_error");
    assert_eq!(v["error"]["param"], "temperature");
    assert!(v["error"]["code"].is_null());
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("between 0 and 2")
    );
}

#[test]
fn overload_is_retryable_503() {
    let err = ApiError::from(EngineError::Overloaded { queued: 3 });
    assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(err.retry_after(), Some(1));
    assert_eq!(err.body().error.code, Some("overloaded"));
}

#[test]
fn each_refusal_cause_has_its_status_type_and_code() {
    let refused = |cause: Cause, retry_after_ns: Option<u64>| {
        ApiError::from(AdmitError::Limited(Box::new(Refusal {
            cause,
            message: "m".into(),
            rule: Some(Arc::from("r")),
            retry_after_ns,
            rate: RateInfo::default(),
        })))
    };
    let too_many = StatusCode::TOO_MANY_REQUESTS;
    for (error, want) in [
        (
            refused(Cause::RateLimited(Unit::Requests), Some(SECOND / 2)),
            (
                too_many,
                "requests",
                Some("rate_limit_exceeded"),
                None,
                Some(1),
            ),
        ),
        (
            refused(Cause::RateLimited(Unit::Tokens), Some(3 * SECOND)),
            (
                too_many,
                "tokens",
                Some("rate_limit_exceeded"),
                None,
                Some(3),
            ),
        ),
        (
            refused(Cause::Quota, Some(3600 * SECOND)),
            (
                too_many,
                "insufficient_quota",
                Some("insufficient_quota"),
                None,
                Some(3600),
            ),
        ),
        (
            refused(
                Cause::TooLarge {
                    param: Some("max_tokens"),
                },
                None,
            ),
            (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("request_too_large"),
                Some("max_tokens".to_owned()),
                None,
            ),
        ),
        (
            refused(Cause::Saturated, Some(SECOND)),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("overloaded"),
                None,
                Some(1),
            ),
        ),
        (
            ApiError::from(AdmitError::Unauthorized(Unauthorized::Missing)),
            (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                None,
                None,
            ),
        ),
        (
            ApiError::from(AdmitError::Unauthorized(Unauthorized::Token(
                "the token has expired".into(),
            ))),
            (
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_token"),
                None,
                None,
            ),
        ),
        (
            ApiError::from(AdmitError::Forbidden(Forbidden("no".into()))),
            (
                StatusCode::FORBIDDEN,
                "permission_error",
                Some("forbidden"),
                None,
                None,
            ),
        ),
        (
            ApiError::from(AdmitError::NoPolicy),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("config_invalid"),
                None,
                Some(1),
            ),
        ),
    ] {
        assert_eq!(answer(&error), want, "{error:?}");
    }
    let unknown = ApiError::from(AdmitError::Unauthorized(Unauthorized::Unknown(
        "0a1b2c3d".into(),
    )));
    assert_eq!(
        unknown.to_string(),
        "Incorrect API key provided (key hash 0a1b2c3d)."
    );
    assert_eq!(header(&unknown.headers(), "www-authenticate"), "Bearer");
    let no_policy = ApiError::from(AdmitError::NoPolicy).headers();
    assert_eq!(header(&no_policy, "retry-after-ms"), "1000");
    assert_eq!(no_policy.len(), 1, "{no_policy:?}");
}

#[test]
fn routing_and_engine_errors_have_their_status() {
    for (error, status, param) in [
        (
            ApiError::from(RouteError::Forbidden("f".into())),
            StatusCode::FORBIDDEN,
            None,
        ),
        (
            ApiError::from(RouteError::UnknownVariant {
                header: "x-sluice-variant".into(),
                message: "m".into(),
            }),
            StatusCode::BAD_REQUEST,
            Some("x-sluice-variant"),
        ),
        (
            ApiError::from(RouteError::Unreachable("u".into())),
            StatusCode::SERVICE_UNAVAILABLE,
            None,
        ),
        (
            ApiError::from(EngineError::InvalidPrompt {
                param: "messages",
                message: "m".into(),
            }),
            StatusCode::BAD_REQUEST,
            Some("messages"),
        ),
        (
            ApiError::from(EngineError::Rejected("r".into())),
            StatusCode::BAD_REQUEST,
            None,
        ),
        (
            ApiError::from(EngineError::Draining),
            StatusCode::SERVICE_UNAVAILABLE,
            None,
        ),
        (
            ApiError::from(EngineError::Failed("x".into())),
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
        ),
    ] {
        assert_eq!(error.status(), status, "{error:?}");
        assert_eq!(error.body().error.param.as_deref(), param, "{error:?}");
    }
    assert_eq!(
        ApiError::from(EngineError::Failed("x".into())).to_string(),
        "the engine failed: x"
    );
}

#[test]
fn admitted_and_refused_requests_carry_openai_rate_limit_headers() {
    let p = policy("  - name: demo/per-key\n    per: Key\n    requestsPerMinute: 2\n");
    let l = Limiter::with_metrics(LimitMetrics::default());
    let t1 = l.admit_at(&p, &req(10, 10), 0).unwrap();
    let h = rate_headers(&t1.rate);
    assert_eq!(header(&h, "x-ratelimit-limit-requests"), "2");
    assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "1");
    assert_eq!(header(&h, "x-ratelimit-reset-requests"), "30s");
    t1.settle_at(20, 0, 0);
    l.admit_at(&p, &req(10, 10), 10 * SECOND)
        .unwrap()
        .settle_at(20, 0, 10 * SECOND);
    let r = l.admit_at(&p, &req(10, 10), 20 * SECOND).unwrap_err();
    let e = ApiError::from(AdmitError::Limited(r));
    assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(e.retry_after(), Some(10));
    let h = e.headers();
    assert_eq!(header(&h, "retry-after-ms"), "10000");
    assert_eq!(header(&h, "x-sluice-rule"), "demo/per-key");
    assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "0");

    // A wait of more than a minute: clients are told not to sit it out.
    let p = policy("  - name: daily\n    tokensPerDay: 1000\n");
    l.admit_at(&p, &req(500, 400), 0)
        .unwrap()
        .settle_at(900, 0, 0);
    let r = l.admit_at(&p, &req(100, 100), 0).unwrap_err();
    let h = ApiError::from(AdmitError::Limited(r)).headers();
    assert_eq!(header(&h, "x-should-retry"), "false");
}

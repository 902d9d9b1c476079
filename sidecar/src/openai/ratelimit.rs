//! The rate-limit headers of an answer: `x-ratelimit-*` (as OpenAI sends them) on admitted
//! requests and on refusals, and on refusals `retry-after-ms`, `x-should-retry` and
//! `x-sluice-rule` besides.

use http::{HeaderName, HeaderValue};

use crate::limits::{RateInfo, format_duration};

/// A wait longer than this tells clients not to sit it out (`x-should-retry: false`).
const LONGEST_WAIT_NS: u64 = 60 * 1_000_000_000;

/// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
pub fn rate_headers(rate: &RateInfo) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::with_capacity(6);
    for (w, [limit, remaining, reset]) in [
        (
            rate.requests,
            [
                "x-ratelimit-limit-requests",
                "x-ratelimit-remaining-requests",
                "x-ratelimit-reset-requests",
            ],
        ),
        (
            rate.tokens,
            [
                "x-ratelimit-limit-tokens",
                "x-ratelimit-remaining-tokens",
                "x-ratelimit-reset-tokens",
            ],
        ),
    ] {
        if let Some(w) = w {
            out.push((HeaderName::from_static(limit), HeaderValue::from(w.limit)));
            out.push((
                HeaderName::from_static(remaining),
                HeaderValue::from(w.remaining),
            ));
            if let Ok(v) = HeaderValue::from_str(&format_duration(w.reset_ns())) {
                out.push((HeaderName::from_static(reset), v));
            }
        }
    }
    out
}

/// Every header of a refusal but `Retry-After` (which the error renderer sets from the whole
/// seconds): the rate windows, `retry-after-ms`, `x-sluice-rule`, and `x-should-retry: false`
/// when the wait is too long for a client to sit out.
pub fn refusal_headers(
    rate: &RateInfo,
    retry_after_ns: Option<u64>,
    rule: Option<&str>,
) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = rate_headers(rate);
    if let Some(ns) = retry_after_ns {
        out.push((
            HeaderName::from_static("retry-after-ms"),
            HeaderValue::from(ns.div_ceil(1_000_000)),
        ));
        if ns > LONGEST_WAIT_NS {
            out.push((
                HeaderName::from_static("x-should-retry"),
                HeaderValue::from_static("false"),
            ));
        }
    }
    if let Some(rule) = rule
        && let Ok(v) = HeaderValue::from_str(rule)
    {
        out.push((HeaderName::from_static("x-sluice-rule"), v));
    }
    out
}

//! A refused request as the limiter sees it: why ([`Cause`]), which rule, when it would pass and
//! the rate windows as they stood. No HTTP here: [`crate::openai`] turns a refusal into a status,
//! an OpenAI error and `x-ratelimit-*` headers.

use std::sync::Arc;

use sluice_crds::rate_limit_policy::Priority;

use super::{
    bucket::{Level, SCALE, SECOND, Shortfall},
    policy::{Limit, LimitKind, Rule},
    window::RateInfo,
};

/// The rule name reported when a request is shed for saturation.
pub const SATURATION_RULE: &str = "saturation";

/// A refused request: everything its answer needs.
#[derive(Clone, Debug)]
pub struct Refusal {
    /// Why it was refused.
    pub cause: Cause,
    /// For a human: the limit, what is used and what was requested.
    pub message: String,
    /// The refusing rule (`x-sluice-rule`), if a rule refused.
    pub rule: Option<Arc<str>>,
    /// When the request would pass, in nanoseconds from now (rate limits, quotas, saturation).
    pub retry_after_ns: Option<u64>,
    /// The rate windows as they stood (`x-ratelimit-*`).
    pub rate: RateInfo,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// A rate or concurrency limit is used up until its bucket refills; `Unit` is what the
    /// answer says ran out.
    RateLimited(Unit),
    /// The day's token quota (`tokensPerDay`) is used up.
    Quota,
    /// The request costs more than the limit can ever hold: it can never pass. `param` names
    /// the request field to reduce, when one does.
    TooLarge {
        /// `max_tokens` for token limits.
        param: Option<&'static str>,
    },
    /// Requests in flight reached the saturation mark and the request's priority is shed.
    Saturated,
}

/// What a rate limit counts, as a refusal reports it: `tokens` for token limits, `requests` for
/// every other (requests, bytes, concurrency).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// `requestsPerSecond`, `requestsPerMinute`, `bytesPerSecond`, `maxConcurrent`.
    Requests,
    /// `tokensPerMinute`.
    Tokens,
}

// === impl Cause ===

impl Cause {
    /// The `reason` label of `sluice_ratelimit_refused_total`: `rate_limit_exceeded`,
    /// `insufficient_quota`, `request_too_large` or `saturated`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::RateLimited(_) => "rate_limit_exceeded",
            Self::Quota => "insufficient_quota",
            Self::TooLarge { .. } => "request_too_large",
            Self::Saturated => "saturated",
        }
    }
}

// === impl Refusal ===

impl Refusal {
    pub(super) fn limited(
        rule: &Rule,
        limit: &Limit,
        short: Shortfall,
        level: &Level,
        cost: u64,
    ) -> Self {
        let (what, unit_kind) = match limit.kind {
            LimitKind::RequestsPerSecond => ("requests per second", Unit::Requests),
            LimitKind::RequestsPerMinute => ("requests per minute", Unit::Requests),
            LimitKind::TokensPerMinute => ("tokens per minute", Unit::Tokens),
            LimitKind::TokensPerDay => ("tokens per day", Unit::Tokens),
            LimitKind::BytesPerSecond => ("bytes per second", Unit::Requests),
            LimitKind::Concurrent => ("concurrent requests", Unit::Requests),
        };
        let name = &rule.name;
        let (limit_units, used, requested) = match limit.kind {
            LimitKind::Concurrent => (limit.max_in_flight, level.used, 1),
            _ => (
                limit.spec.rate.capacity / SCALE,
                level.used.div_ceil(SCALE),
                cost.div_ceil(SCALE),
            ),
        };
        let unit = match limit.kind {
            LimitKind::TokensPerMinute | LimitKind::TokensPerDay => "tokens",
            LimitKind::BytesPerSecond => "bytes",
            _ => "requests",
        };
        match short {
            Shortfall::Never => Self {
                cause: Cause::TooLarge {
                    param: match limit.kind {
                        LimitKind::TokensPerMinute | LimitKind::TokensPerDay => Some("max_tokens"),
                        _ => None,
                    },
                },
                message: format!(
                    "Request too large for {what} (rule {name}): the limit allows at most \
                     {limit_units} {unit} at once and this request needs {requested}. It can \
                     never be admitted: reduce the prompt or max_tokens."
                ),
                rule: Some(rule.name.clone()),
                retry_after_ns: None,
                rate: RateInfo::default(),
            },
            Shortfall::Wait(wait) => {
                let quota = limit.kind == LimitKind::TokensPerDay;
                Self {
                    cause: if quota {
                        Cause::Quota
                    } else {
                        Cause::RateLimited(unit_kind)
                    },
                    message: if quota {
                        format!(
                            "You exceeded your current quota of {what} (rule {name}): Limit \
                             {limit_units}, Used {used}, Requested {requested}."
                        )
                    } else {
                        format!(
                            "Rate limit reached for {what} (rule {name}): Limit {limit_units}, \
                             Used {used}, Requested {requested}."
                        )
                    },
                    rule: Some(rule.name.clone()),
                    retry_after_ns: Some(wait),
                    rate: RateInfo::default(),
                }
            }
        }
    }

    pub(super) fn shed(priority: Priority, in_flight: u64, mark: u64) -> Self {
        Self {
            cause: Cause::Saturated,
            message: format!(
                "The server is saturated ({in_flight} requests in flight, mark {mark}) and is \
                 shedding {priority:?} requests; retry shortly."
            ),
            rule: Some(Arc::from(SATURATION_RULE)),
            retry_after_ns: Some(SECOND),
            rate: RateInfo::default(),
        }
    }

    /// Whether a bucket refused it (a rate limit or the quota): it passes once that bucket has
    /// refilled, so the answer says when.
    pub fn waits_for_refill(&self) -> bool {
        matches!(self.cause, Cause::RateLimited(_) | Cause::Quota)
    }

    /// Whole seconds to wait (`Retry-After`), rounded up.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after_ns.map(|ns| ns.div_ceil(SECOND))
    }
}

/// Formats a duration as OpenAI does in `x-ratelimit-reset-*`: `250ms`, `1s`, `6m0s`, `1h2m3s`.
/// Refusal messages say when to retry the same way.
pub fn format_duration(ns: u64) -> String {
    let ms = ns.div_ceil(1_000_000);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (m, rest) = (rest / 60_000, rest % 60_000);
    let secs = if rest % 1000 == 0 {
        format!("{}s", rest / 1000)
    } else {
        let s = format!("{}.{:03}", rest / 1000, rest % 1000);
        format!("{}s", s.trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

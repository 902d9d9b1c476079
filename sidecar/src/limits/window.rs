//! The rate windows a request was checked against, as admission saw them: what the
//! `x-ratelimit-*` headers of its answer report.

use super::{
    bucket::{self, Level, SCALE},
    policy::{Limit, LimitKind},
};

/// One `x-ratelimit-*` trio: limit, remaining and time to full (worked out only when the
/// headers are rendered, off the admission decision).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Capacity in units.
    pub limit: u64,
    /// Units left.
    pub remaining: u64,
    level: Level,
    rate: bucket::Rate,
    now: u64,
}

impl Window {
    /// Nanoseconds until the bucket is full again.
    pub fn reset_ns(&self) -> u64 {
        bucket::Spec::new(self.rate).until_full(&self.level, self.now)
    }
}

/// The tightest request and token windows among the limits a request was checked against.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateInfo {
    /// From `requestsPerSecond`/`requestsPerMinute` limits.
    pub requests: Option<Window>,
    /// From `tokensPerMinute`/`tokensPerDay` limits.
    pub tokens: Option<Window>,
}

// === impl RateInfo ===

impl RateInfo {
    /// Folds `level` (a bucket of `limit`, advanced to `now`) into the tightest windows.
    pub(super) fn observe(&mut self, limit: &Limit, level: &Level, now: u64) {
        let slot = match limit.kind {
            LimitKind::RequestsPerSecond | LimitKind::RequestsPerMinute => &mut self.requests,
            LimitKind::TokensPerMinute | LimitKind::TokensPerDay => &mut self.tokens,
            _ => return,
        };
        let w = Window {
            limit: limit.spec.rate.capacity / SCALE,
            remaining: limit.spec.remaining(level),
            level: *level,
            rate: limit.spec.rate,
            now,
        };
        if slot.is_none_or(|s| (w.remaining, w.limit) < (s.remaining, s.limit)) {
            *slot = Some(w);
        }
    }
}

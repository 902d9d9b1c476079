//! Judging a variant: the counters read from its sidecars' `/metrics`, their increase over
//! the analysis window, what that measures (requests, error rate, p95 time to first token)
//! and the [`Verdict`] against the thresholds of `spec.rollout.analysis`. Pure.

use std::collections::BTreeMap;
use std::time::Duration;

use sluice_crds::contract::{
    FORWARD_FAILURES_SERIES, LABEL_LE, LABEL_STATUS, LABEL_VARIANT, REQUESTS_TOTAL_SERIES,
    TIME_TO_FIRST_TOKEN_BUCKET_SERIES,
};
use sluice_crds::inference_model::Analysis;

use crate::scrape::Sample;

/// Cumulative counters of one pod (or their sum, or their increase over a window).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counters {
    /// Requests answered.
    pub requests: f64,
    /// Of which with a 5xx status.
    pub errors: f64,
    /// Time-to-first-token histogram: `(le, cumulative count)`, sorted by `le` (`+Inf` last).
    pub ttft: Vec<(f64, f64)>,
}

/// What was measured for a variant over the window.
#[derive(Clone, Debug, PartialEq)]
pub struct Measured {
    /// Requests in the window.
    pub requests: u64,
    /// 5xx answers / requests (0 without requests).
    pub error_rate: f64,
    /// 95th percentile time to first token in seconds, when any was observed.
    pub ttft_p95: Option<f64>,
}

/// The analysis' judgement of one variant.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Enough requests, within every threshold.
    Healthy(Measured),
    /// Enough requests, and over a threshold; `message` says which, with the numbers.
    Breach {
        /// The numbers.
        measured: Measured,
        /// E.g. `error rate 12.0% > 5.0% over 40 requests in 5m`.
        message: String,
    },
    /// Fewer requests than `minRequests`: not judged.
    NotEnoughData(Measured),
}

// === impl Counters ===

impl Counters {
    /// The counters of `variant` among one pod's samples (samples labelled with another
    /// `variant` are skipped).
    pub fn from_samples(samples: &[Sample], variant: &str) -> Self {
        let mine = |s: &Sample| s.labels.get(LABEL_VARIANT).is_none_or(|v| v == variant);
        let mut out = Self::default();
        let mut buckets: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for s in samples.iter().filter(|s| mine(s)) {
            if !s.value.is_finite() || s.value < 0.0 {
                continue;
            }
            if s.name == REQUESTS_TOTAL_SERIES {
                out.requests += s.value;
                let status = s
                    .labels
                    .get(LABEL_STATUS)
                    .and_then(|v| v.parse::<u16>().ok());
                if status.is_some_and(|c| (500..600).contains(&c)) {
                    out.errors += s.value;
                }
            } else if s.name == TIME_TO_FIRST_TOKEN_BUCKET_SERIES {
                let Some(le) = s.labels.get(LABEL_LE).and_then(|v| parse_le(v)) else {
                    continue;
                };
                // Keyed by the bit pattern of a non-negative float: ordered like the floats.
                buckets.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
            }
        }
        out.ttft = buckets.into_values().collect();
        out
    }

    /// What a pod's forwards to `variant` that failed say about `variant`: each is a request it
    /// did not answer, so a request and an error (a canary that is down serves nothing and
    /// exposes no metrics of its own; only the pods forwarding to it see it fail).
    pub fn from_forward_failures(samples: &[Sample], variant: &str) -> Self {
        let failed: f64 = samples
            .iter()
            .filter(|s| {
                s.name == FORWARD_FAILURES_SERIES
                    && s.labels.get(LABEL_VARIANT).is_some_and(|v| v == variant)
                    && s.value.is_finite()
                    && s.value >= 0.0
            })
            .map(|s| s.value)
            .sum();
        Self {
            requests: failed,
            errors: failed,
            ttft: Vec::new(),
        }
    }

    /// The increase since `start`. A counter below its start means the pod restarted: the
    /// whole current value is the increase.
    pub fn delta(&self, start: &Counters) -> Counters {
        let reset = self.requests < start.requests
            || self.errors < start.errors
            || self.ttft.iter().any(|(le, n)| {
                start
                    .ttft
                    .iter()
                    .any(|(sle, sn)| sle.to_bits() == le.to_bits() && n < sn)
            });
        if reset {
            return self.clone();
        }
        Counters {
            requests: self.requests - start.requests,
            errors: self.errors - start.errors,
            ttft: self
                .ttft
                .iter()
                .map(|(le, n)| {
                    let before = start
                        .ttft
                        .iter()
                        .find(|(sle, _)| sle.to_bits() == le.to_bits())
                        .map_or(0.0, |(_, sn)| *sn);
                    (*le, n - before)
                })
                .collect(),
        }
    }

    /// Adds `other` (another pod of the same variant).
    pub fn add(&mut self, other: &Counters) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (le, n) in &other.ttft {
            match self
                .ttft
                .iter_mut()
                .find(|(l, _)| l.to_bits() == le.to_bits())
            {
                Some(b) => b.1 += n,
                None => self.ttft.push((*le, *n)),
            }
        }
        self.ttft.sort_by(|a, b| a.0.total_cmp(&b.0));
    }

    /// What these counters (an increase over a window) measure.
    pub fn measured(&self) -> Measured {
        Measured {
            requests: self.requests.round().max(0.0) as u64,
            error_rate: if self.requests > 0.0 {
                (self.errors / self.requests).clamp(0.0, 1.0)
            } else {
                0.0
            },
            ttft_p95: histogram_quantile(0.95, &self.ttft),
        }
    }
}

fn parse_le(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" | "inf" => Some(f64::INFINITY),
        _ => v.parse::<f64>().ok().filter(|x| !x.is_nan() && *x >= 0.0),
    }
}

/// The `q` quantile of a cumulative histogram `(le, count)` sorted by `le` and ending with
/// `+Inf`, as Prometheus' `histogram_quantile` computes it: linear interpolation inside the
/// bucket the rank falls in (from 0 for the first bucket); a rank in the `+Inf` bucket gives the
/// highest finite bound. `None` without observations.
pub fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        || buckets.last()?.0 != f64::INFINITY
    {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let i = buckets.iter().position(|(_, n)| *n >= rank)?;
    let (upper, count) = buckets[i];
    if upper == f64::INFINITY {
        // Prometheus answers the highest finite bound (or NaN when there is none).
        return buckets[..i].last().map(|(le, _)| *le);
    }
    let (lower, below) = if i == 0 { (0.0, 0.0) } else { buckets[i - 1] };
    if count <= below {
        return Some(upper);
    }
    Some(lower + (upper - lower) * (rank - below) / (count - below))
}

/// Judges a variant from its counters at the end and at the start of the window.
pub fn verdict(now: &Counters, window_start: &Counters, analysis: &Analysis) -> Verdict {
    judge(&now.delta(window_start), analysis)
}

/// Judges a variant from its counters' increase over the window.
pub fn judge(window: &Counters, analysis: &Analysis) -> Verdict {
    let m = window.measured();
    if m.requests < u64::try_from(analysis.min_requests.max(1)).unwrap_or(1) {
        return Verdict::NotEnoughData(m);
    }
    let over = format!(
        "over {} requests in {}",
        m.requests,
        format_duration(analysis.window.into())
    );
    let mut breaches = Vec::new();
    if let Some(max) = analysis.max_error_rate
        && m.error_rate > max
    {
        breaches.push(format!(
            "error rate {:.1}% > {:.1}%",
            m.error_rate * 100.0,
            max * 100.0
        ));
    }
    if let (Some(max), Some(p95)) = (&analysis.max_ttft_p95, m.ttft_p95) {
        let max: Duration = (*max).into();
        if p95 > max.as_secs_f64() {
            breaches.push(format!(
                "p95 time to first token {p95:.2}s > {}",
                format_duration(max)
            ));
        }
    }
    if breaches.is_empty() {
        Verdict::Healthy(m)
    } else {
        Verdict::Breach {
            message: format!("{} {over}", breaches.join(", ")),
            measured: m,
        }
    }
}

/// `5m`, `90s`, `1h`, `1.5s`: short and exact.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        return format!("{}s", d.as_secs_f64());
    }
    let s = d.as_secs();
    if s > 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s > 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

//! Circuit breakers of forwards, one per destination variant. A variant that failed
//! `consecutiveFailures` forwards in a row gets none for `openSeconds`: routing leaves it out, so
//! its share goes where a failed forward falls back, without first paying for a failed connect
//! (each such request still counts as a failed forward to it, kind `breaker_open`).
//! Once that time is over the breaker is half-open: forwards go through again and the next
//! outcome decides (a failure opens it again, a success closes it).
//!
//! Outcomes are recorded by the forwarder; time is passed in, so the state machine is tested
//! without a clock.

use std::{collections::HashMap, sync::Mutex, time::Instant};

use sluice_crds::sidecar_config::BreakerConfig;

use super::metrics::{BreakerLabels, RoutingMetrics};

/// The breakers of one sidecar's forwards, by destination variant.
#[derive(Debug, Default)]
pub struct Breakers {
    states: Mutex<HashMap<String, State>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Forwards go through; `failures` in a row so far.
    Closed { failures: u32 },
    /// No forwards until `until`; half-open after it. `reported`: the gauge still shows it
    /// open.
    Open { until: Instant, reported: bool },
}

impl Breakers {
    /// Whether forwards to `variant` are held back at `now`. The first look after the open
    /// time is over reports the breaker half-open in `metrics` (forwards go through again),
    /// so the gauge does not wait for the next forward's outcome to drop.
    pub fn is_open(&self, variant: &str, now: Instant, metrics: &RoutingMetrics) -> bool {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        match states.get_mut(variant) {
            Some(State::Open { until, reported }) => {
                if now < *until {
                    return true;
                }
                if *reported {
                    *reported = false;
                    metrics
                        .breaker_open
                        .get_or_create(&BreakerLabels::of(variant))
                        .set(0);
                }
                false
            }
            _ => false,
        }
    }

    /// Records the outcome of a forward to `variant` that ended at `now`.
    pub fn record(
        &self,
        variant: &str,
        succeeded: bool,
        settings: BreakerConfig,
        now: Instant,
        metrics: &RoutingMetrics,
    ) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        let state = states
            .entry(variant.to_owned())
            .or_insert(State::Closed { failures: 0 });
        let next = match (*state, succeeded) {
            (State::Closed { .. }, true) => State::Closed { failures: 0 },
            (State::Open { .. }, true) => {
                tracing::info!(%variant, "forwards succeed again; breaker closed");
                State::Closed { failures: 0 }
            }
            (State::Closed { failures }, false)
                if failures + 1 >= settings.consecutive_failures =>
            {
                tracing::warn!(
                    %variant,
                    failures = failures + 1,
                    open_secs = settings.open_seconds,
                    "breaker opened: no forwards to this variant for a while"
                );
                open(variant, settings, now, metrics)
            }
            (State::Closed { failures }, false) => State::Closed {
                failures: failures + 1,
            },
            // Half-open, and the forward that tried failed: open again.
            (State::Open { until, .. }, false) if now >= until => {
                tracing::warn!(%variant, "the variant still fails; breaker open again");
                open(variant, settings, now, metrics)
            }
            // A forward sent before the breaker opened: it changes nothing.
            (open @ State::Open { .. }, false) => open,
        };
        *state = next;
        let open = i64::from(matches!(next, State::Open { .. }));
        metrics
            .breaker_open
            .get_or_create(&BreakerLabels::of(variant))
            .set(open);
    }
}

/// The open state from `now`, counted.
fn open(variant: &str, settings: BreakerConfig, now: Instant, metrics: &RoutingMetrics) -> State {
    metrics
        .breaker_opened
        .get_or_create(&BreakerLabels::of(variant))
        .inc();
    let open_for = std::time::Duration::from_secs(settings.open_seconds.max(1).into());
    State::Open {
        until: now + open_for,
        reported: true,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const SETTINGS: BreakerConfig = BreakerConfig {
        consecutive_failures: 3,
        open_seconds: 10,
    };

    #[test]
    fn opens_after_failures_in_a_row_then_half_opens_and_decides() {
        let (b, m, t0) = (
            Breakers::default(),
            RoutingMetrics::default(),
            Instant::now(),
        );
        let fail = |at: Instant| b.record("canary", false, SETTINGS, at, &m);
        fail(t0);
        fail(t0);
        // A success in between starts the count again.
        b.record("canary", true, SETTINGS, t0, &m);
        fail(t0);
        fail(t0);
        assert!(!b.is_open("canary", t0, &m));
        fail(t0);
        assert!(b.is_open("canary", t0, &m), "third failure in a row");
        assert!(!b.is_open("stable", t0, &m), "per variant");
        // Forwards already in flight when it opened change nothing.
        fail(t0 + Duration::from_secs(1));
        assert!(b.is_open("canary", t0 + Duration::from_secs(9), &m));
        // Half-open after 10 s (the gauge drops as soon as that is seen): one failure opens
        // it again at once.
        let t1 = t0 + Duration::from_secs(10);
        let gauge = || {
            m.breaker_open
                .get_or_create(&BreakerLabels::of("canary"))
                .get()
        };
        assert_eq!(gauge(), 1);
        assert!(!b.is_open("canary", t1, &m));
        assert_eq!(gauge(), 0);
        fail(t1);
        assert!(b.is_open("canary", t1 + Duration::from_secs(9), &m));
        // Half-open again: a success closes it.
        let t2 = t1 + Duration::from_secs(10);
        b.record("canary", true, SETTINGS, t2, &m);
        assert!(!b.is_open("canary", t2, &m));
        fail(t2);
        assert!(
            !b.is_open("canary", t2, &m),
            "closed: counting from zero again"
        );
        assert_eq!(
            m.breaker_opened
                .get_or_create(&BreakerLabels::of("canary"))
                .get(),
            2
        );
        assert_eq!(
            m.breaker_open
                .get_or_create(&BreakerLabels::of("canary"))
                .get(),
            0
        );
    }
}

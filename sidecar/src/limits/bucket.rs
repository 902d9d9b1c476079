//! Bucket math: continuously refilled token buckets kept as "amount used" plus "when", in
//! integer milli-units and nanoseconds so that refill, re-rating and retry-after are exact.
//!
//! A bucket of capacity `C` refilled at `r` units per period `P` is stored as the amount
//! `used` (in milli-units) at instant `at`. At a later instant `t`, `used` has drained by
//! `floor((t - at) * r / P)` (floored at zero). A cost `c` fits when `used + c <= C`; when it
//! does not, it fits after exactly `ceil((used + c - C) * P / r)` nanoseconds, which is the
//! `Retry-After` the caller is told. Storing what was used (not what is left) makes two things
//! natural: a refund is a subtraction that needs no clock, and a new rate or capacity applies to
//! the same consumption (raising a limit frees the difference at once, lowering it makes callers
//! wait), which is what "re-rate, don't reset" means.

/// Milli-units per unit: rates and capacities are kept in thousandths so that a cluster
/// share (e.g. 1/3 of 2 requests per minute) is not rounded to a whole request.
pub const SCALE: u64 = 1000;

/// Nanoseconds per second.
pub const SECOND: u64 = 1_000_000_000;

/// A refill rate and a capacity, in milli-units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    /// Milli-units added per `period_ns`.
    pub amount: u64,
    /// The period `amount` refers to.
    pub period_ns: u64,
    /// Bucket capacity (the burst), in milli-units.
    pub capacity: u64,
}

/// A rate as a table uses it: the current one, and the one it replaced (with the instant of the
/// change) so that state untouched since a reload drains at the old rate until the reload and at
/// the new one after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    /// The rate in force.
    pub rate: Rate,
    /// The previous rate and when it was replaced.
    pub prev: Option<(Rate, u64)>,
}

/// One bucket's state: milli-units used as of `at` (ns on the limiter's clock). For
/// concurrency limits `used` is the number of requests in flight and `at` the last touch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Level {
    /// Milli-units used (rate limits) or requests in flight (concurrency limits).
    pub used: u64,
    /// When `used` was last brought up to date.
    pub at: u64,
}

/// Why a cost does not fit now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shortfall {
    /// It fits after this many nanoseconds (if nothing else is taken meanwhile).
    Wait(u64),
    /// It never fits: the cost is above the capacity.
    Never,
}

// === impl Rate ===

impl Rate {
    /// `units` per `period_ns`, with a capacity of `capacity` units, both scaled by `share`
    /// (the pod's share of a cluster-wide limit; 1.0 for pod limits).
    pub fn new(units: u64, period_ns: u64, capacity: u64, share: f64) -> Self {
        let scale = |v: u64| -> u64 {
            let scaled = (v as f64) * (SCALE as f64) * share;
            // At least one milli-unit, so that a tiny share still refills.
            (scaled.round() as u64).max(1)
        };
        Self {
            amount: scale(units),
            period_ns: period_ns.max(1),
            capacity: scale(capacity),
        }
    }

    /// Milli-units drained between `from` and `to` (0 when `to <= from`).
    pub fn drained(&self, from: u64, to: u64) -> u64 {
        if to <= from {
            return 0;
        }
        // 64-bit arithmetic when it cannot overflow (the usual case: it is several times faster
        // than 128-bit division), 128-bit otherwise.
        if let Some(n) = (to - from).checked_mul(self.amount) {
            return n / self.period_ns;
        }
        let d = u128::from(to - from) * u128::from(self.amount) / u128::from(self.period_ns);
        u64::try_from(d).unwrap_or(u64::MAX)
    }

    /// Nanoseconds it takes to drain `milli` milli-units (rounded up, so that after exactly
    /// this long the amount has drained).
    pub fn ns_for(&self, milli: u64) -> u64 {
        if let Some(n) = milli.checked_mul(self.period_ns) {
            return n.div_ceil(self.amount);
        }
        let n = u128::from(milli) * u128::from(self.period_ns);
        let d = u128::from(self.amount);
        u64::try_from(n.div_ceil(d)).unwrap_or(u64::MAX)
    }
}

// === impl Spec ===

impl Spec {
    /// A rate with no history.
    pub fn new(rate: Rate) -> Self {
        Self { rate, prev: None }
    }

    /// Brings `level` up to `now`: drains at the old rate until the change, at the new one
    /// after. A `now` before `level.at` (another thread read the clock later but got the lock
    /// first) changes nothing.
    pub fn advance(&self, level: &mut Level, now: u64) {
        if now <= level.at {
            return;
        }
        let mut used = level.used;
        let mut from = level.at;
        if let Some((old, changed)) = self.prev
            && from < changed
        {
            let until = changed.min(now);
            used = used.saturating_sub(old.drained(from, until));
            from = until;
        }
        let drained = self.rate.drained(from, now);
        *level = if drained < used {
            // Keep the fraction of a milli-unit that has not drained yet: move `at` only by the
            // time the drained amount took (never past `now`).
            Level {
                used: used - drained,
                at: from.saturating_add(self.rate.ns_for(drained)).min(now),
            }
        } else {
            Level { used: 0, at: now }
        };
    }

    /// Takes `cost` milli-units at `now` if they fit.
    pub fn try_take(&self, level: &mut Level, cost: u64, now: u64) -> Result<(), Shortfall> {
        self.advance(level, now);
        match self.shortfall(level, cost, now) {
            None => {
                level.used = level.used.saturating_add(cost);
                Ok(())
            }
            Some(s) => Err(s),
        }
    }

    /// Whether `cost` would fit into `level` (advanced to `now`), and if not, how long after
    /// `now` it does.
    pub fn shortfall(&self, level: &Level, cost: u64, now: u64) -> Option<Shortfall> {
        if cost > self.rate.capacity {
            return Some(Shortfall::Never);
        }
        let need = level.used.saturating_add(cost);
        if need <= self.rate.capacity {
            None
        } else {
            let at = level
                .at
                .saturating_add(self.rate.ns_for(need - self.rate.capacity));
            Some(Shortfall::Wait(at.saturating_sub(now).max(1)))
        }
    }

    /// Nanoseconds after `now` until `level` (advanced to `now`) is full again (the
    /// `x-ratelimit-reset-*` value).
    pub fn until_full(&self, level: &Level, now: u64) -> u64 {
        if level.used == 0 {
            return 0;
        }
        level
            .at
            .saturating_add(self.rate.ns_for(level.used))
            .saturating_sub(now)
    }

    /// Whole units still available in an up-to-date `level`.
    pub fn remaining(&self, level: &Level) -> u64 {
        self.rate.capacity.saturating_sub(level.used) / SCALE
    }

    /// Whether the bucket is indistinguishable from a new one at `now` (so it may be evicted).
    pub fn is_idle(&self, level: &Level, now: u64) -> bool {
        let mut l = *level;
        self.advance(&mut l, now);
        l.used == 0
    }
}

/// Refunds `milli` milli-units. Needs no clock: draining and refunding commute (both only lower
/// `used`, floored at zero, and a refund never exceeds what was taken).
pub fn refund(level: &mut Level, milli: u64) {
    level.used = level.used.saturating_sub(milli);
}

/// Charges `milli` milli-units after the fact (usage beyond a reservation, response bytes): may
/// push `used` above the capacity, so that later requests wait.
pub fn charge(spec: &Spec, level: &mut Level, milli: u64, now: u64) {
    spec.advance(level, now);
    level.used = level.used.saturating_add(milli);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const MINUTE: u64 = 60 * SECOND;

    fn per_minute(n: u64) -> Spec {
        Spec::new(Rate::new(n, MINUTE, n, 1.0))
    }

    #[test]
    fn full_bucket_admits_its_capacity_then_refills_continuously() {
        let spec = per_minute(2);
        let mut l = Level::default();
        assert_eq!(spec.try_take(&mut l, SCALE, 0), Ok(()));
        assert_eq!(spec.try_take(&mut l, SCALE, 0), Ok(()));
        // One request drains in 30 s: the third waits exactly that long.
        assert_eq!(
            spec.try_take(&mut l, SCALE, 0),
            Err(Shortfall::Wait(30 * SECOND))
        );
        // 10 s later it is 20 s.
        assert_eq!(
            spec.try_take(&mut l, SCALE, 10 * SECOND),
            Err(Shortfall::Wait(20 * SECOND))
        );
        assert_eq!(spec.remaining(&l), 0);
        assert_eq!(spec.until_full(&l, 10 * SECOND), 50 * SECOND);
    }

    #[test]
    fn retry_after_is_exact_to_the_nanosecond() {
        // Odd numbers: 7 tokens per minute, so one token is 8.571428...s.
        let spec = Spec::new(Rate::new(7, MINUTE, 7, 1.0));
        let mut l = Level::default();
        spec.try_take(&mut l, 7 * SCALE, 0).unwrap();
        let Err(Shortfall::Wait(wait)) = spec.try_take(&mut l, 3 * SCALE, 1_234) else {
            panic!("must wait")
        };
        let mut early = l;
        assert!(
            spec.try_take(&mut early, 3 * SCALE, 1_234 + wait - 1)
                .is_err(),
            "1 ns early"
        );
        let mut on_time = l;
        assert_eq!(
            spec.try_take(&mut on_time, 3 * SCALE, 1_234 + wait),
            Ok(()),
            "on time"
        );
        assert_eq!(wait, (3 * MINUTE).div_ceil(7) - 1_234);
    }

    #[test]
    fn cost_above_capacity_never_fits() {
        let spec = Spec::new(Rate::new(4000, MINUTE, 4000, 1.0));
        let mut l = Level::default();
        assert_eq!(
            spec.try_take(&mut l, 4001 * SCALE, 0),
            Err(Shortfall::Never)
        );
        assert_eq!(spec.try_take(&mut l, 4000 * SCALE, 0), Ok(()));
    }

    #[test]
    fn refunds_free_capacity_at_once() {
        let spec = Spec::new(Rate::new(100, MINUTE, 100, 1.0));
        let mut l = Level::default();
        spec.try_take(&mut l, 90 * SCALE, 0).unwrap();
        assert!(spec.try_take(&mut l, 50 * SCALE, 0).is_err());
        // The request used 20 of its 90: 70 come back.
        refund(&mut l, 70 * SCALE);
        assert_eq!(spec.try_take(&mut l, 50 * SCALE, 0), Ok(()));
        // A refund larger than what is left (it drained meanwhile) floors at zero.
        refund(&mut l, 1_000 * SCALE);
        assert_eq!(l.used, 0);
    }

    #[test]
    fn refund_and_drain_commute() {
        let spec = Spec::new(Rate::new(60, MINUTE, 60, 1.0));
        for (taken, refunded, elapsed) in [(50, 10, 30), (50, 45, 30), (10, 10, 5), (60, 1, 59)] {
            let mut a = Level::default();
            spec.try_take(&mut a, taken * SCALE, 0).unwrap();
            let mut b = a;
            refund(&mut a, refunded * SCALE);
            spec.advance(&mut a, elapsed * SECOND);
            spec.advance(&mut b, elapsed * SECOND);
            refund(&mut b, refunded * SCALE);
            assert_eq!(a, b, "{taken} {refunded} {elapsed}");
        }
    }

    #[test]
    fn rerating_keeps_consumption_and_drains_at_each_rate_in_turn() {
        let old = per_minute(2);
        let mut l = Level::default();
        old.try_take(&mut l, 2 * SCALE, 0).unwrap();
        // At 15 s the limit becomes 60 per minute; the state is untouched until 20 s.
        let new = Spec {
            rate: Rate::new(60, MINUTE, 60, 1.0),
            prev: Some((old.rate, 15 * SECOND)),
        };
        new.advance(&mut l, 20 * SECOND);
        // 15 s at 2/min drained 0.5; 5 s at 60/min drained 5 (floored at 0).
        assert_eq!(l.used, 0);
        // Raising the capacity takes effect at once, without a reset.
        let mut l = Level::default();
        old.try_take(&mut l, 2 * SCALE, 0).unwrap();
        let new = Spec {
            rate: Rate::new(10, MINUTE, 10, 1.0),
            prev: Some((old.rate, 0)),
        };
        for _ in 0..8 {
            assert_eq!(new.try_take(&mut l, SCALE, 0), Ok(()));
        }
        assert_eq!(
            new.try_take(&mut l, SCALE, 0),
            Err(Shortfall::Wait(6 * SECOND))
        );
        // Lowering it makes callers wait for what they already used, rather than resetting.
        let lower = Spec {
            rate: Rate::new(1, MINUTE, 1, 1.0),
            prev: Some((new.rate, 0)),
        };
        assert_eq!(
            lower.try_take(&mut l, SCALE, 0),
            Err(Shortfall::Wait(10 * MINUTE))
        );
    }

    #[test]
    fn cluster_share_scales_rate_and_capacity() {
        // A third of 2 per minute: 0.667 per minute, capacity 0.667 - a whole request never fits.
        let third = Spec::new(Rate::new(2, MINUTE, 2, 1.0 / 3.0));
        assert_eq!(third.rate.capacity, 667);
        let half = Spec::new(Rate::new(4, MINUTE, 4, 0.5));
        let mut l = Level::default();
        half.try_take(&mut l, 2 * SCALE, 0).unwrap();
        assert_eq!(
            half.try_take(&mut l, SCALE, 0),
            Err(Shortfall::Wait(30 * SECOND))
        );
    }

    #[test]
    fn idle_means_fully_drained() {
        let spec = per_minute(2);
        let mut l = Level::default();
        spec.try_take(&mut l, SCALE, 0).unwrap();
        assert!(!spec.is_idle(&l, 30 * SECOND - 1));
        assert!(spec.is_idle(&l, 30 * SECOND));
    }

    #[test]
    fn clock_going_backwards_across_threads_changes_nothing() {
        let spec = per_minute(60);
        let mut l = Level {
            used: 10 * SCALE,
            at: 100 * SECOND,
        };
        spec.advance(&mut l, 99 * SECOND);
        assert_eq!(
            l,
            Level {
                used: 10 * SCALE,
                at: 100 * SECOND
            }
        );
    }

    #[test]
    fn charges_after_the_fact_can_overdraw() {
        let spec = Spec::new(Rate::new(1000, SECOND, 1000, 1.0));
        let mut l = Level::default();
        charge(&spec, &mut l, 3000 * SCALE, 0);
        assert_eq!(
            spec.try_take(&mut l, SCALE, 0),
            Err(Shortfall::Wait(2_001_000_000))
        );
    }
}

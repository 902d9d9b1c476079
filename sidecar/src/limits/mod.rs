//! Rate limits: request-, token- and byte-level limits from the sidecar config document,
//! enforced at admission with a reservation that is settled when the response ends.
//!
//! # Semantics
//!
//! - **Rules combine by conjunction.** A request must pass *every* rule that matches it (a rule
//!   matches when each of its `match` conditions holds: the tenant is listed, the variant is
//!   listed, the request's priority is listed; an absent condition always holds). A rule's
//!   limits are all checked too. When any enforced limit refuses, what the request had already
//!   taken from the other limits is given back, and the answer names the first refusing rule
//!   (`x-sluice-rule`) and the moment every refusing limit would pass (`Retry-After`).
//! - **Buckets.** Each limit keeps one bucket per tenant, API key, variant or for the whole pod
//!   (`per`). Rate limits are token buckets refilled continuously; capacity is `burst` (the
//!   first rate limit of the rule gets it) or one period's worth. `tokensPerDay` is a bucket of
//!   a day's tokens refilled over the day (a rolling quota; refusals say `insufficient_quota`).
//!   `maxConcurrent` counts requests in flight.
//! - **Reservation.** Admission reserves prompt tokens (counted exactly with the engine's
//!   tokenizer and chat template) plus the completion cap from every token limit, and the
//!   request body's bytes from byte limits. When the response ends (or the client goes away)
//!   the token reservation is settled to actual usage, refunding the rest, and the response
//!   body's bytes are charged. A cost above a bucket's capacity can never pass: it is answered
//!   400 (`request_too_large`) at once instead of an endless 429.
//! - **Priority.** Rules with `priority` assign it to the requests they match (the highest
//!   wins; default `Standard`; a `priorities` condition on an assigning rule is tested against
//!   `Standard`). When requests in flight (running or queued) reach `saturation.maxInFlight`,
//!   `Sheddable` requests are refused with 503; at twice the mark `Standard` ones too;
//!   `Critical` ones are never shed.
//! - **Shadow rules** take and settle like enforced ones but never refuse: what they would have
//!   refused is counted in `sluice_ratelimit_shadow_total{rule}` (and not taken).
//! - **Cluster scope.** A `scope: Cluster` limit is enforced per pod at `replicaShare` of its
//!   rate, capacity and concurrency (request capacities at least one request).
//! - **Reloads** swap the compiled [`Policy`] as a whole. Buckets are kept by rule name (and
//!   limit and bucket key); a changed rate re-rates the kept bucket: what was used stays used
//!   and drains at the new rate from the reload on. Requests in flight settle into the buckets
//!   they reserved from.
//! - **Memory.** Buckets live in bounded tables (see [`table`]): idle buckets are swept, and a
//!   table never holds more than [`table::DEFAULT_MAX_ENTRIES`] entries in 24-byte slots, at
//!   most half full: at most 48 MB per per-key limit for 1M keys.
//!
//! This module knows no HTTP: a refusal carries its [`Cause`], and [`crate::openai`] renders the
//! statuses, error bodies and headers named above.

pub mod bucket;
pub mod metrics;
pub mod policy;
mod prefetch;
pub mod refusal;
pub mod sweep;
pub mod table;
pub mod window;

use std::{
    cell::RefCell,
    hash::BuildHasher,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Instant,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::gauge::ConstGauge,
    registry::Registry,
};
use rustc_hash::FxBuildHasher;
use sluice_crds::rate_limit_policy::{BucketKey, Priority};
use tokio::sync::watch;

use self::{
    bucket::{Level, SCALE, SECOND, Shortfall},
    policy::{LimitKind, priority_bit},
};
pub use self::{
    metrics::LimitMetrics,
    policy::{Limit, Policy, Rule},
    refusal::{Cause, Refusal, SATURATION_RULE, Unit, format_duration},
    window::{RateInfo, Window},
};
pub use crate::auth::Identity;

/// The policy channel's value: `None` while no valid config has been seen (and unlimited
/// serving was not allowed), so requests are refused and readiness is false.
pub type PolicySlot = Option<Arc<Policy>>;

/// Shared limiter state: the clock, the key hasher, requests in flight, metrics. `Copy`: it is
/// created once per process and lives as long (leaked on purpose, so that every ticket reaches
/// it without a reference count that two cores would fight over).
#[derive(Clone, Copy, Debug)]
pub struct Limiter(&'static Shared);

#[derive(Debug)]
struct Shared {
    epoch: Instant,
    hasher: std::collections::hash_map::RandomState,
    in_flight: Striped,
    /// [`Policy::stamp`] of the policy last published (0: none).
    published: AtomicU64,
    metrics: LimitMetrics,
}

/// A policy as one thread holds it: the policy's reference count is shared by every core, so
/// counting each admission on it would move its cache line between cores twice per request;
/// a ticket counts on its thread's own handle instead (see [`local_handle`]).
pub type Handle = Arc<Arc<Policy>>;

thread_local! {
    /// The policy this thread last admitted under. Keeps it alive until the thread admits under
    /// another one (a few superseded policies at most, one per thread).
    static LOCAL: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

/// This thread's handle on `policy`.
fn local_handle(policy: &Arc<Policy>) -> Handle {
    LOCAL.with_borrow_mut(|local| match local {
        Some(h) if Arc::ptr_eq(h.as_ref(), policy) => h.clone(),
        _ => local.insert(Arc::new(policy.clone())).clone(),
    })
}

/// A counter striped over cache lines by thread: admissions on different cores do not contend;
/// only a saturation check (when configured) reads every stripe.
#[derive(Debug)]
struct Striped(Box<[Stripe]>);

#[derive(Debug, Default)]
#[repr(align(64))]
struct Stripe(AtomicI64);

impl Striped {
    fn new() -> Self {
        Self((0..16).map(|_| Stripe::default()).collect())
    }

    fn mine(&self) -> &AtomicI64 {
        use std::sync::atomic::AtomicUsize;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
        }
        let i = INDEX.with(|i| *i) % self.0.len();
        &self.0[i].0
    }

    fn add(&self) {
        self.mine().fetch_add(1, Ordering::Relaxed);
    }

    fn sub(&self) {
        self.mine().fetch_sub(1, Ordering::Relaxed);
    }

    fn sum(&self) -> u64 {
        let total: i64 = self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
        u64::try_from(total).unwrap_or(0)
    }
}

/// What admission needs to know about a request.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// The caller's tenant.
    pub tenant: &'a str,
    /// The caller's key (empty when none).
    pub key: &'a str,
    /// The caller's roles.
    pub roles: &'a [Box<str>],
    /// The variant serving it.
    pub variant: &'a str,
    /// Exact prompt tokens.
    pub prompt_tokens: u64,
    /// Most completion tokens it may generate.
    pub max_tokens: u64,
    /// Request body bytes.
    pub request_bytes: u64,
}

/// An admitted request's hold on its buckets; settle it when the response ends. Dropping it
/// unsettled releases concurrency but refunds no tokens.
#[derive(Debug)]
pub struct Ticket {
    limiter: Limiter,
    /// The policy the holds index into (`None` when nothing needs settling).
    policy: Option<Handle>,
    held: Holds,
    /// `x-ratelimit-*` values as of admission.
    pub rate: RateInfo,
    /// The priority the request was admitted at.
    pub priority: Priority,
    /// Admitted for another model to serve ([`Limiter::admit_or_overflow`]): this pod's
    /// saturation mark sheds it.
    pub shed: bool,
    done: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Held {
    rule: u32,
    limit: u8,
    key: u64,
    cost: u64,
}

/// What a ticket holds: inline for the usual handful of limits (no allocation per request),
/// spilling to the heap beyond.
#[derive(Debug, Default)]
struct Holds {
    inline: [Held; INLINE_HOLDS],
    len: usize,
    spill: Vec<Held>,
}

const INLINE_HOLDS: usize = 6;

impl Holds {
    fn push(&mut self, h: Held) {
        if self.len < INLINE_HOLDS {
            self.inline[self.len] = h;
            self.len += 1;
        } else {
            self.spill.push(h);
        }
    }

    fn iter(&self) -> impl DoubleEndedIterator<Item = &Held> {
        self.inline[..self.len].iter().chain(self.spill.iter())
    }
}

/// What the limiter did with one limit while admitting.
enum Check {
    Taken(u64, Level),
    Refused(Shortfall, Level),
}

// === impl Limiter ===

impl Limiter {
    /// A limiter whose metrics are registered in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let limiter = Self::with_metrics(LimitMetrics::register(registry));
        registry.register_collector(Box::new(AdmittedInFlight(limiter)));
        limiter
    }

    /// A limiter with the given metrics. Its shared state is leaked (see [`Limiter`]): a process
    /// creates one; tests and benches create a few.
    pub fn with_metrics(metrics: LimitMetrics) -> Self {
        Self(Box::leak(Box::new(Shared {
            epoch: Instant::now(),
            hasher: Default::default(),
            in_flight: Striped::new(),
            published: AtomicU64::new(0),
            metrics,
        })))
    }

    /// The limiter's clock: nanoseconds since it was created.
    pub fn now(&self) -> u64 {
        u64::try_from(self.0.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Its metrics.
    pub fn metrics(&self) -> &LimitMetrics {
        &self.0.metrics
    }

    /// Requests admitted and not yet settled.
    pub fn in_flight(&self) -> u64 {
        self.0.in_flight.sum()
    }

    /// Puts `policy` in force on `slot`.
    pub fn publish(&self, slot: &watch::Sender<PolicySlot>, policy: Policy) {
        let stamp = policy.stamp;
        slot.send_replace(Some(Arc::new(policy)));
        // After the send: a thread that sees the new stamp finds the new policy in the slot.
        self.0.published.store(stamp, Ordering::Release);
    }

    /// The policy in force on `slot` (published with [`Limiter::publish`]), as this thread
    /// holds it: only when it changed does this read the slot (whose lock every core shares).
    pub fn in_force(&self, slot: &watch::Receiver<PolicySlot>) -> Option<Handle> {
        let stamp = self.0.published.load(Ordering::Acquire);
        let cached = LOCAL.with_borrow(|local| {
            local
                .as_ref()
                .filter(|h| stamp != 0 && h.stamp == stamp)
                .cloned()
        });
        cached.or_else(|| slot.borrow().as_ref().map(local_handle))
    }

    /// Admits `req` under `policy` now.
    pub fn admit(&self, policy: &Arc<Policy>, req: &Request<'_>) -> Result<Ticket, Box<Refusal>> {
        self.admit_at(policy, req, self.now())
    }

    /// Admits `req` under `policy` at `now` (ns on this limiter's clock; tests pass their own).
    pub fn admit_at(
        &self,
        policy: &Arc<Policy>,
        req: &Request<'_>,
        now: u64,
    ) -> Result<Ticket, Box<Refusal>> {
        self.admit_inner(policy, req, now, false)
    }

    /// Admits `req` as [`Limiter::admit`] does, except that a request the saturation mark
    /// would shed is admitted under the rules all the same, its ticket marked
    /// [`Ticket::shed`]: another model takes it (a fallback), and its limits are charged
    /// here, once.
    pub fn admit_or_overflow(
        &self,
        policy: &Arc<Policy>,
        req: &Request<'_>,
    ) -> Result<Ticket, Box<Refusal>> {
        self.admit_inner(policy, req, self.now(), true)
    }

    fn admit_inner(
        &self,
        policy: &Arc<Policy>,
        req: &Request<'_>,
        now: u64,
        overflow: bool,
    ) -> Result<Ticket, Box<Refusal>> {
        let mut keys = Keys::new(&self.0.hasher, req);
        let priority = assigned_priority(policy, req);

        let mut shed = false;
        if let Some(mark) = policy.max_in_flight {
            let in_flight = self.0.in_flight.sum();
            shed = match priority {
                Priority::Sheddable => in_flight >= mark,
                Priority::Standard => in_flight >= mark.saturating_mul(2),
                Priority::Critical => false,
            };
            if shed && !overflow {
                let refusal = Refusal::shed(priority, in_flight, mark);
                self.0
                    .metrics
                    .refused(SATURATION_RULE, refusal.cause.reason());
                return Err(Box::new(refusal));
            }
        }

        // Every bucket this request takes starts on its way into this core's cache before the
        // first is taken: their misses overlap instead of queueing one behind another's lock.
        for ri in policy.candidates(req.tenant) {
            let rule = &policy.rules[ri as usize];
            if rule_applies(rule, req, priority) {
                let key = keys.get(rule.per);
                for limit in &rule.limits {
                    limit.table.prefetch(key);
                }
            }
        }

        let mut held = Holds::default();
        let mut rate = RateInfo::default();
        let mut refused: Option<(u32, u8, Shortfall, Level)> = None;
        for ri in policy.candidates(req.tenant) {
            let rule = &policy.rules[ri as usize];
            if !rule_applies(rule, req, priority) {
                continue;
            }
            let key = keys.get(rule.per);
            for (li, limit) in rule.limits.iter().enumerate() {
                let cost = cost_of(limit.kind, req);
                match self.check(limit, key, cost, now) {
                    Check::Taken(cost, level) => {
                        held.push(Held {
                            rule: ri,
                            limit: li as u8,
                            key,
                            cost,
                        });
                        rate.observe(limit, &level, now);
                    }
                    Check::Refused(_, _) if rule.shadow => {
                        self.0.metrics.shadow(&rule.name);
                    }
                    Check::Refused(short, level) => {
                        refused = Some((ri, li as u8, short, level));
                        break;
                    }
                }
            }
            if refused.is_some() {
                break;
            }
        }

        if let Some((ri, li, short, level)) = refused {
            // Give back what was taken, then work out when every enforced limit would pass.
            for h in held.iter().rev() {
                release(
                    &policy.rules[h.rule as usize].limits[h.limit as usize],
                    h,
                    None,
                    now,
                );
            }
            let rule = &policy.rules[ri as usize];
            let limit = &rule.limits[li as usize];
            let mut refusal =
                Refusal::limited(rule, limit, short, &level, cost_of(limit.kind, req));
            if refusal.waits_for_refill() {
                let (wait, info) = self.when_all_pass(policy, req, priority, &mut keys, now);
                refusal.retry_after_ns = Some(wait.max(refusal.retry_after_ns.unwrap_or(0)));
                refusal.rate = info;
                if let Some(w) = refusal.retry_after_ns {
                    refusal
                        .message
                        .push_str(&format!(" Please try again in {}.", format_duration(w)));
                }
            }
            self.0.metrics.refused(&rule.name, refusal.cause.reason());
            return Err(Box::new(refusal));
        }

        self.0.in_flight.add();
        // Request-rate limits need nothing at the end; only keep the policy alive for the rest.
        let settles = held.iter().any(|h| {
            !matches!(
                policy.rules[h.rule as usize].limits[h.limit as usize].kind,
                LimitKind::RequestsPerSecond | LimitKind::RequestsPerMinute
            )
        });
        Ok(Ticket {
            limiter: *self,
            policy: settles.then(|| local_handle(policy)),
            held,
            rate,
            priority,
            shed,
            done: false,
        })
    }

    /// Tries to take `cost` from `limit`'s bucket for `key`.
    fn check(&self, limit: &Limit, key: u64, cost: u64, now: u64) -> Check {
        let spec = limit.spec;
        let (result, evicted) = match limit.kind {
            LimitKind::Concurrent => {
                let max = limit.max_in_flight;
                limit.table.with(
                    key,
                    |l| l.used == 0,
                    |l| {
                        if l.used < max {
                            l.used += 1;
                            l.at = now;
                            Check::Taken(1, *l)
                        } else {
                            Check::Refused(Shortfall::Wait(SECOND), *l)
                        }
                    },
                )
            }
            _ => limit.table.with(
                key,
                |l| spec.is_idle(l, now),
                |l| match spec.try_take(l, cost, now) {
                    Ok(()) => Check::Taken(cost, *l),
                    Err(short) => Check::Refused(short, *l),
                },
            ),
        };
        if evicted > 0 {
            self.0.metrics.evicted.inc_by(evicted as u64);
        }
        result
    }

    /// The longest wait among the enforced limits `req` would be refused by now (without taking
    /// anything), and the rate windows as they stand.
    fn when_all_pass(
        &self,
        policy: &Policy,
        req: &Request<'_>,
        priority: Priority,
        keys: &mut Keys<'_>,
        now: u64,
    ) -> (u64, RateInfo) {
        let mut wait = 0;
        let mut info = RateInfo::default();
        for ri in policy.candidates(req.tenant) {
            let rule = &policy.rules[ri as usize];
            if rule.shadow || !rule_applies(rule, req, priority) {
                continue;
            }
            let key = keys.get(rule.per);
            for limit in &rule.limits {
                if limit.kind == LimitKind::Concurrent {
                    if limit
                        .table
                        .get(key)
                        .is_some_and(|l| l.used >= limit.max_in_flight)
                    {
                        wait = wait.max(SECOND);
                    }
                    continue;
                }
                let mut level = limit.table.get(key).unwrap_or_default();
                limit.spec.advance(&mut level, now);
                if let Some(Shortfall::Wait(w)) =
                    limit.spec.shortfall(&level, cost_of(limit.kind, req), now)
                {
                    wait = wait.max(w);
                }
                info.observe(limit, &level, now);
            }
        }
        (wait, info)
    }

    /// Drops idle buckets from every table of `policy`; returns how many.
    pub fn sweep(&self, policy: &Policy) -> usize {
        self.sweep_at(policy, self.now())
    }

    /// [`Limiter::sweep`] at a given instant (tests).
    pub fn sweep_at(&self, policy: &Policy, now: u64) -> usize {
        let mut dropped = 0;
        let mut entries = 0;
        for limit in policy.limits() {
            let spec = limit.spec;
            dropped += match limit.kind {
                LimitKind::Concurrent => limit.table.sweep(|l| l.used == 0),
                _ => limit.table.sweep(|l| spec.is_idle(l, now)),
            };
            entries += limit.table.len();
        }
        self.0.metrics.buckets.set(entries as i64);
        dropped
    }
}

/// The highest priority assigned by a matching rule (default `Standard`).
fn assigned_priority(policy: &Policy, req: &Request<'_>) -> Priority {
    let mut best: Option<Priority> = None;
    for &ri in &policy.assigners {
        let rule = &policy.rules[ri as usize];
        let tenant_ok = policy.any_tenant.binary_search(&ri).is_ok()
            || policy
                .by_tenant
                .get(req.tenant)
                .is_some_and(|l| l.binary_search(&ri).is_ok());
        if tenant_ok
            && rule_applies(rule, req, Priority::Standard)
            && let Some(p) = rule.assigns
        {
            best = Some(best.map_or(p, |b| b.max(p)));
        }
    }
    best.unwrap_or_default()
}

fn rule_applies(rule: &Rule, req: &Request<'_>, priority: Priority) -> bool {
    (rule.variants.is_empty() || rule.variants.iter().any(|v| v == req.variant))
        && (rule.roles.is_empty()
            || req
                .roles
                .iter()
                .any(|r| rule.roles.iter().any(|w| **w == **r)))
        && (rule.priorities == 0 || rule.priorities & priority_bit(priority) != 0)
}

/// What `req` costs against a limit of `kind`, in milli-units.
fn cost_of(kind: LimitKind, req: &Request<'_>) -> u64 {
    let units = match kind {
        LimitKind::RequestsPerSecond | LimitKind::RequestsPerMinute | LimitKind::Concurrent => 1,
        LimitKind::TokensPerMinute | LimitKind::TokensPerDay => {
            req.prompt_tokens.saturating_add(req.max_tokens)
        }
        LimitKind::BytesPerSecond => req.request_bytes,
    };
    if kind == LimitKind::Concurrent {
        units
    } else {
        units.saturating_mul(SCALE)
    }
}

/// Gives back (`tokens: None`: everything) or settles what `h` holds.
fn release(limit: &Limit, h: &Held, settle: Option<(u64, u64)>, now: u64) {
    match (limit.kind, settle) {
        (LimitKind::Concurrent, _) => {
            limit
                .table
                .update(h.key, |l| l.used = l.used.saturating_sub(1));
        }
        (LimitKind::RequestsPerSecond | LimitKind::RequestsPerMinute, Some(_)) => {}
        (LimitKind::TokensPerMinute | LimitKind::TokensPerDay, Some((tokens, _))) => {
            let actual = tokens.saturating_mul(SCALE);
            if actual < h.cost {
                limit
                    .table
                    .update(h.key, |l| bucket::refund(l, h.cost - actual));
            } else if actual > h.cost {
                let spec = limit.spec;
                limit
                    .table
                    .update(h.key, |l| bucket::charge(&spec, l, actual - h.cost, now));
            }
        }
        (LimitKind::BytesPerSecond, Some((_, bytes))) => {
            let spec = limit.spec;
            let extra = bytes.saturating_mul(SCALE);
            if extra > 0 {
                limit
                    .table
                    .update(h.key, |l| bucket::charge(&spec, l, extra, now));
            }
        }
        (_, None) => {
            limit.table.update(h.key, |l| bucket::refund(l, h.cost));
        }
    }
}

/// Bucket keys of one request, hashed once each on first use.
struct Keys<'a> {
    hasher: &'a std::collections::hash_map::RandomState,
    req: &'a Request<'a>,
    /// Tables are per limit, so a tenant and a key that are the same string (no key list) may
    /// share one hash.
    same: bool,
    tenant: Option<u64>,
    key: Option<u64>,
    variant: Option<u64>,
}

impl<'a> Keys<'a> {
    fn new(hasher: &'a std::collections::hash_map::RandomState, req: &'a Request<'a>) -> Self {
        Self {
            hasher,
            req,
            same: req.tenant == req.key,
            tenant: None,
            key: None,
            variant: None,
        }
    }

    fn get(&mut self, per: BucketKey) -> u64 {
        let (slot, value) = match per {
            BucketKey::Pod => return 0,
            // Variants are the config's, not the caller's: an unkeyed hash will do.
            BucketKey::Variant => {
                return *self
                    .variant
                    .get_or_insert_with(|| FxBuildHasher.hash_one(self.req.variant));
            }
            BucketKey::Tenant => (&mut self.tenant, self.req.tenant),
            BucketKey::Key if self.same => (&mut self.tenant, self.req.tenant),
            BucketKey::Key => (&mut self.key, self.req.key),
        };
        *slot.get_or_insert_with(|| self.hasher.hash_one(value))
    }
}

// === impl Ticket ===

impl Ticket {
    /// Settles the reservation: `tokens` actually used (prompt + completion) and `response_bytes`
    /// sent. Refunds the unused part of token reservations and releases concurrency.
    pub fn settle(mut self, tokens: u64, response_bytes: u64) {
        let now = self.limiter.now();
        self.finish(Some((tokens, response_bytes)), now);
    }

    /// [`Ticket::settle`] at a given instant (tests).
    pub fn settle_at(mut self, tokens: u64, response_bytes: u64, now: u64) {
        self.finish(Some((tokens, response_bytes)), now);
    }

    fn finish(&mut self, usage: Option<(u64, u64)>, now: u64) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        if let Some(policy) = &self.policy {
            for h in self.held.iter() {
                let limit = &policy.rules[h.rule as usize].limits[h.limit as usize];
                match usage {
                    Some(u) => release(limit, h, Some(u), now),
                    // Unsettled: tokens stay charged, concurrency is released.
                    None if limit.kind == LimitKind::Concurrent => release(limit, h, None, now),
                    None => {}
                }
            }
        }
        self.limiter.0.in_flight.sub();
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            let now = self.limiter.now();
            self.finish(None, now);
        }
    }
}

/// [`Limiter::in_flight`] as a gauge, read at each scrape (it sums the limiter's stripes, which
/// admission never does unless a saturation mark is set).
#[derive(Debug)]
struct AdmittedInFlight(Limiter);

impl Collector for AdmittedInFlight {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let gauge = ConstGauge::new(i64::try_from(self.0.in_flight()).unwrap_or(i64::MAX));
        gauge.encode(encoder.encode_descriptor(
            metrics::ADMITTED_IN_FLIGHT,
            "Requests admitted and not yet finished (running, queued or forwarded): what the \
             saturation mark is compared with",
            None,
            gauge.metric_type(),
        )?)
    }
}

#[cfg(test)]
mod tests;

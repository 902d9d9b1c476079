//! Compiling the rules of a sidecar config document into what admission runs: limits with their
//! rates in milli-units, bucket tables carried over from the previous policy by rule name, and
//! an index from tenant to the rules that name it.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use rustc_hash::FxBuildHasher;
use sluice_crds::{
    SidecarConfig,
    rate_limit_policy::{BucketKey, Priority, RateLimitRule, Scope},
};

use super::{
    bucket::{Rate, SCALE, SECOND, Spec},
    table::Table,
};
use crate::auth::Identity;

/// Nanoseconds per minute.
pub const MINUTE: u64 = 60 * SECOND;
/// Nanoseconds per day.
pub const DAY: u64 = 24 * 60 * MINUTE;

/// What one limit counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LimitKind {
    /// `requestsPerSecond`.
    RequestsPerSecond,
    /// `requestsPerMinute`.
    RequestsPerMinute,
    /// `tokensPerMinute`: prompt + completion cap reserved, settled to actual usage.
    TokensPerMinute,
    /// `tokensPerDay`: the same, answered as a quota (`insufficient_quota`).
    TokensPerDay,
    /// `bytesPerSecond`: the request body at admission, the response body when it ends.
    BytesPerSecond,
    /// `maxConcurrent`: requests in flight.
    Concurrent,
}

/// One limit of one rule, with its bucket table.
#[derive(Debug)]
pub struct Limit {
    /// What it counts.
    pub kind: LimitKind,
    /// Refill rate and capacity (unused for [`LimitKind::Concurrent`]).
    pub spec: Spec,
    /// Most requests in flight (only for [`LimitKind::Concurrent`]).
    pub max_in_flight: u64,
    /// The limit as configured, in units per its period (for messages).
    pub configured: u64,
    /// The buckets, shared with the previous and next policies while the rule keeps its name.
    pub table: Arc<Table>,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Rule {
    /// `policy/rule`, reported in `x-sluice-rule`.
    pub name: Arc<str>,
    /// What a bucket counts.
    pub per: BucketKey,
    /// Variants the rule applies to (empty: all).
    pub variants: Vec<String>,
    /// Roles it applies to, any one of them (empty: all callers).
    pub roles: Vec<String>,
    /// Priorities it applies to, as a bit set over [`priority_bit`] (0: all).
    pub priorities: u8,
    /// The priority it assigns to the requests it matches.
    pub assigns: Option<Priority>,
    /// Count, never refuse.
    pub shadow: bool,
    /// Its limits.
    pub limits: Vec<Limit>,
}

/// A compiled document: what one admission decision reads. Immutable; a reload builds a new one
/// and hands it over as a whole, so a request sees the old rules or the new, never a mix.
#[derive(Debug)]
pub struct Policy {
    /// Unique in the process (from 1), so that a thread can tell whether the policy it holds is
    /// the one in force without reading the slot it is published in.
    pub stamp: u64,
    /// The document it was compiled from.
    pub config: Arc<SidecarConfig>,
    /// Who callers are (the keys file, when configured).
    pub identity: Arc<Identity>,
    /// Rules in document order.
    pub rules: Vec<Rule>,
    /// Rules with no tenant condition (indices into `rules`, ascending).
    pub(super) any_tenant: Vec<u32>,
    /// Rules naming tenants, by tenant (ascending indices). Hashed with Fx (rustc's hash): fast
    /// and unkeyed. Safe here because the map is built from the config and only *looked up*
    /// with caller-chosen tenants: a crafted tenant can collide with configured ones but cannot
    /// make the map grow or degrade.
    pub(super) by_tenant: HashMap<String, Vec<u32>, FxBuildHasher>,
    /// Rules that assign a priority.
    pub(super) assigners: Vec<u32>,
    /// In-flight mark for shedding.
    pub max_in_flight: Option<u64>,
}

/// Bit of a priority in [`Rule::priorities`].
pub fn priority_bit(p: Priority) -> u8 {
    match p {
        Priority::Sheddable => 1,
        Priority::Standard => 2,
        Priority::Critical => 4,
    }
}

// === impl Policy ===

impl Policy {
    /// Compiles `config`. Tables of rules whose name, limit and bucket key are unchanged since
    /// `prev` are kept (with the old rate remembered from `now` when it changed); new ones hold
    /// at most `max_entries` entries each.
    pub fn compile(
        config: Arc<SidecarConfig>,
        identity: Arc<Identity>,
        prev: Option<&Policy>,
        now: u64,
        max_entries: usize,
    ) -> Self {
        let share = config.replica_share;
        let old: HashMap<&str, &Rule> = prev
            .map(|p| p.rules.iter().map(|r| (&*r.name, r)).collect())
            .unwrap_or_default();
        let mut rules = Vec::with_capacity(config.rules.len());
        let mut any_tenant = Vec::new();
        let mut by_tenant: HashMap<String, Vec<u32>, FxBuildHasher> = HashMap::default();
        let mut assigners = Vec::new();
        for (i, r) in config.rules.iter().enumerate() {
            let i = i as u32;
            let tenants = r
                .match_
                .as_ref()
                .map(|m| m.tenants.as_slice())
                .unwrap_or(&[]);
            if tenants.is_empty() {
                any_tenant.push(i);
            } else {
                for t in tenants {
                    let list = by_tenant.entry(t.clone()).or_default();
                    if list.last() != Some(&i) {
                        list.push(i);
                    }
                }
            }
            if r.priority.is_some() {
                assigners.push(i);
            }
            let previous = old.get(r.name.as_str()).copied();
            rules.push(compile_rule(
                r,
                share,
                config.variants.len(),
                previous,
                now,
                max_entries,
            ));
        }
        static STAMPS: AtomicU64 = AtomicU64::new(1);
        Self {
            stamp: STAMPS.fetch_add(1, Ordering::Relaxed),
            max_in_flight: config.saturation.max_in_flight.map(u64::from),
            config,
            identity,
            rules,
            any_tenant,
            by_tenant,
            assigners,
        }
    }

    /// Rules that may apply to `tenant`, in document order.
    pub(super) fn candidates<'a>(&'a self, tenant: &str) -> impl Iterator<Item = u32> + 'a {
        let named: &[u32] = if self.by_tenant.is_empty() {
            &[]
        } else {
            self.by_tenant.get(tenant).map(Vec::as_slice).unwrap_or(&[])
        };
        Merge {
            a: &self.any_tenant,
            b: named,
        }
    }

    /// Every table of this policy (for sweeping and for the bucket gauge).
    pub fn limits(&self) -> impl Iterator<Item = &Limit> {
        self.rules.iter().flat_map(|r| r.limits.iter())
    }
}

/// Merges two ascending index lists.
struct Merge<'a> {
    a: &'a [u32],
    b: &'a [u32],
}

impl Iterator for Merge<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        let take_a = match (self.a.first(), self.b.first()) {
            (None, None) => return None,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(a), Some(b)) => a <= b,
        };
        let (list, other) = if take_a {
            (&mut self.a, &mut self.b)
        } else {
            (&mut self.b, &mut self.a)
        };
        let (first, rest) = list.split_first()?;
        *list = rest;
        if other.first() == Some(first) {
            *other = &other[1..];
        }
        Some(*first)
    }
}

fn compile_rule(
    r: &RateLimitRule,
    share: f64,
    variants: usize,
    prev: Option<&Rule>,
    now: u64,
    max_entries: usize,
) -> Rule {
    let share = match r.scope {
        Scope::Pod => 1.0,
        Scope::Cluster => share,
    };
    // `burst` is the capacity of the rule's rate limit; with several, of the first of
    // requestsPerSecond, requestsPerMinute, tokensPerMinute, bytesPerSecond.
    let mut burst = r.burst;
    let mut take_burst = |default: u64| burst.take().unwrap_or(default);
    let mut wanted: Vec<(LimitKind, u64, u64, u64)> = Vec::new();
    if let Some(v) = r.requests_per_second {
        let v = u64::from(v);
        wanted.push((LimitKind::RequestsPerSecond, v, SECOND, take_burst(v)));
    }
    if let Some(v) = r.requests_per_minute {
        let v = u64::from(v);
        wanted.push((LimitKind::RequestsPerMinute, v, MINUTE, take_burst(v)));
    }
    if let Some(v) = r.tokens_per_minute {
        wanted.push((LimitKind::TokensPerMinute, v, MINUTE, take_burst(v)));
    }
    if let Some(v) = r.bytes_per_second {
        wanted.push((LimitKind::BytesPerSecond, v, SECOND, take_burst(v)));
    }
    if let Some(v) = r.tokens_per_day {
        wanted.push((LimitKind::TokensPerDay, v, DAY, v));
    }
    if let Some(v) = r.max_concurrent {
        let v = u64::from(v);
        wanted.push((LimitKind::Concurrent, v, 1, v));
    }
    // A pod-wide limit has one bucket, a per-variant one a bucket per variant it matches;
    // tables of rules that name their tenants hold few; only open rules need many shards (64
    // keep two threads apart; each empty shard costs 64 bytes).
    let m = r.match_.as_ref();
    let named = m.is_some_and(|m| !m.tenants.is_empty());
    let variants = match m.map_or(0, |m| m.variants.len()) {
        0 => variants,
        matched => matched,
    };
    let new_table = || match r.per {
        BucketKey::Pod => Table::single(),
        BucketKey::Variant => Table::few(variants),
        BucketKey::Tenant if named => Table::new(1, max_entries),
        BucketKey::Key if named => Table::new(8, max_entries),
        BucketKey::Tenant | BucketKey::Key => Table::new(64, max_entries),
    };
    let limits = wanted
        .into_iter()
        .map(|(kind, units, period, capacity)| {
            let mut rate = Rate::new(units, period, capacity, share);
            if matches!(
                kind,
                LimitKind::RequestsPerSecond | LimitKind::RequestsPerMinute
            ) {
                // A share of a cluster limit below one request still admits one request at a
                // time (at the shared rate), rather than none.
                rate.capacity = rate.capacity.max(SCALE);
            }
            let max_in_flight = ((units as f64) * share).ceil().max(1.0) as u64;
            // A per-variant table sized for fewer variants than the rule now sees starts afresh.
            let old = prev
                .filter(|p| p.per == r.per)
                .and_then(|p| p.limits.iter().find(|l| l.kind == kind))
                .filter(|l| r.per != BucketKey::Variant || l.table.holds_few(variants));
            let (table, spec) = match old {
                Some(old) if old.spec.rate == rate => (old.table.clone(), old.spec),
                Some(old) => (
                    old.table.clone(),
                    Spec {
                        rate,
                        prev: Some((old.spec.rate, now)),
                    },
                ),
                None => (Arc::new(new_table()), Spec::new(rate)),
            };
            Limit {
                kind,
                spec,
                max_in_flight,
                configured: units,
                table,
            }
        })
        .collect();
    Rule {
        name: Arc::from(r.name.as_str()),
        per: r.per,
        variants: m.map(|m| m.variants.clone()).unwrap_or_default(),
        roles: m.map(|m| m.roles.clone()).unwrap_or_default(),
        priorities: m
            .map(|m| m.priorities.iter().fold(0, |acc, p| acc | priority_bit(*p)))
            .unwrap_or(0),
        assigns: r.priority,
        shadow: r.shadow,
        limits,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn merge_keeps_order_and_drops_duplicates() {
        let m = Merge {
            a: &[0, 2, 5],
            b: &[1, 2, 7],
        };
        assert_eq!(m.collect::<Vec<_>>(), vec![0, 1, 2, 5, 7]);
    }
}

//! The answers held: a map bounded in bytes, least recently used first out, each answer good for
//! one TTL from when it was stored. Synchronous and lock-free itself: [`super::ResponseCache`]
//! holds it under its mutex and never across an await.
//!
//! Two orderings over the map, each a `BTreeMap` from a sequence number to the key: by last use
//! (what to evict) and by age (what has expired). The TTL is the same for every entry, so the
//! oldest stored is the first to expire, and expired entries are dropped from the front as they
//! come, not left to hold memory until room is needed.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use super::{CacheKey, CacheMetrics, ENTRY_OVERHEAD, Weigh};

struct Entry<V> {
    value: V,
    /// `value.weight()` plus [`ENTRY_OVERHEAD`], as of when it was stored.
    charge: usize,
    stored_at: Instant,
    /// Its key in `by_use`.
    used: u64,
    /// Its key in `by_age`.
    born: u64,
}

pub(super) struct Store<V> {
    entries: HashMap<CacheKey, Entry<V>>,
    by_use: BTreeMap<u64, CacheKey>,
    by_age: BTreeMap<u64, CacheKey>,
    /// The next sequence number, of both orderings.
    next: u64,
    /// The sum of the entries' charges; at most `max_bytes`.
    bytes: usize,
    max_bytes: usize,
    ttl: Duration,
    metrics: CacheMetrics,
}

impl<V: Clone + Weigh> Store<V> {
    pub(super) fn new(max_bytes: usize, ttl: Duration, metrics: CacheMetrics) -> Self {
        Self {
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            by_age: BTreeMap::new(),
            next: 0,
            bytes: 0,
            max_bytes,
            ttl,
            metrics,
        }
    }

    /// The answer stored under `key`, if any and not expired; it becomes the most recently used.
    pub(super) fn get(&mut self, key: &CacheKey, now: Instant) -> Option<V> {
        self.purge_expired(now);
        let seq = self.seq();
        let entry = self.entries.get_mut(key)?;
        self.by_use.remove(&entry.used);
        self.by_use.insert(seq, *key);
        entry.used = seq;
        Some(entry.value.clone())
    }

    /// Stores a clone of `value` under `key` (replacing any answer there), evicting the least
    /// recently used until it fits. Stores nothing when it could never fit, or would be expired
    /// at once (a TTL of zero); returns whether it stored.
    pub(super) fn insert(&mut self, key: CacheKey, value: &V, now: Instant) -> bool {
        self.purge_expired(now);
        self.remove(&key);
        let charge = value.weight().saturating_add(ENTRY_OVERHEAD);
        if charge > self.max_bytes || self.ttl.is_zero() {
            return false;
        }
        self.evict_to(self.max_bytes - charge);
        let (used, born) = (self.seq(), self.seq());
        self.by_use.insert(used, key);
        self.by_age.insert(born, key);
        let entry = Entry {
            value: value.clone(),
            charge,
            stored_at: now,
            used,
            born,
        };
        self.entries.insert(key, entry);
        self.bytes += charge;
        self.metrics.bytes.inc_by(gauge(charge));
        self.metrics.entries.inc();
        true
    }

    /// New limits (a config reload): what no longer fits is evicted, least recently used first;
    /// what the new TTL has expired is dropped.
    pub(super) fn set_limits(&mut self, max_bytes: usize, ttl: Duration, now: Instant) {
        self.max_bytes = max_bytes;
        self.ttl = ttl;
        self.purge_expired(now);
        self.evict_to(max_bytes);
    }

    /// Drops the expired entries, oldest first.
    pub(super) fn purge_expired(&mut self, now: Instant) {
        while let Some((&born, &key)) = self.by_age.first_key_value() {
            match self.entries.get(&key).filter(|e| e.born == born) {
                Some(e) if now.saturating_duration_since(e.stored_at) < self.ttl => break,
                Some(_) => self.remove(&key),
                // An index without its entry cannot be; dropped rather than looped on.
                None => {
                    self.by_age.remove(&born);
                }
            }
        }
    }

    /// Evicts the least recently used until the entries hold at most `bytes`.
    fn evict_to(&mut self, bytes: usize) {
        while self.bytes > bytes {
            let Some((_, key)) = self.by_use.pop_first() else {
                break;
            };
            self.remove(&key);
            self.metrics.evictions.inc();
        }
    }

    fn remove(&mut self, key: &CacheKey) {
        let Some(entry) = self.entries.remove(key) else {
            return;
        };
        self.by_use.remove(&entry.used);
        self.by_age.remove(&entry.born);
        self.bytes -= entry.charge;
        self.metrics.bytes.dec_by(gauge(entry.charge));
        self.metrics.entries.dec();
    }

    fn seq(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
}

impl<V> Drop for Store<V> {
    /// Takes this store's share out of the gauges, which another cache may go on using.
    fn drop(&mut self) {
        self.metrics.bytes.dec_by(gauge(self.bytes));
        self.metrics.entries.dec_by(gauge(self.entries.len()));
    }
}

fn gauge(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

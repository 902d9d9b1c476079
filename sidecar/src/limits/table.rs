//! The bucket store of one limit: a sharded hash map from a 64-bit bucket key (a keyed hash of
//! the tenant, API key or variant) to a 16-byte [`Level`], bounded in size.
//!
//! Why not `dashmap` or `papaya`: an admission is a read-modify-write of one small value that
//! must happen under one lock anyway, and eviction needs to look at a whole shard; a fixed array
//! of `Mutex<HashMap>` shards does both with no extra dependency and a known footprint of about
//! 25 bytes per entry (8 key + 16 level + 1 control byte) before the map's spare capacity.
//! With 64 shards two threads almost never meet on one lock.
//!
//! Memory stays bounded under a key-cardinality attack in two ways: an entry whose bucket has
//! fully drained (and holds no request in flight) is indistinguishable from a missing one, so
//! [`Table::sweep`] drops it and inserts sweep a shard that is full; and a shard never holds
//! more than its share of [`Table::max_entries`]: when sweeping does not free room, entries are
//! dropped (a dropped entry forgets what its key used, which only favours that key; with an
//! attacker minting keys, the dropped keys are overwhelmingly the attacker's).

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    sync::{Mutex, MutexGuard},
};

use super::bucket::Level;

/// Default bound on the entries of one table (one limit of one rule): 1,048,576.
pub const DEFAULT_MAX_ENTRIES: usize = 1 << 20;

/// One table: the buckets of one limit of one rule, by key.
#[derive(Debug)]
pub struct Table {
    shards: Box<[Shard]>,
    per_shard: usize,
}

/// A cache-line aligned shard, so that two shards' locks never share a line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard(Mutex<Map>);

type Map = HashMap<u64, Level, BuildHasherDefault<KeyHasher>>;

/// The keys already are uniformly distributed keyed hashes: hashing them again would only cost.
#[derive(Debug, Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (keys are u64); fold anything else in for completeness.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

// === impl Table ===

impl Table {
    /// A table of `shards` shards (a power of two) holding at most about `max_entries` entries.
    pub fn new(shards: usize, max_entries: usize) -> Self {
        let shards = shards.next_power_of_two().max(1);
        Self {
            shards: (0..shards).map(|_| Shard::default()).collect(),
            per_shard: max_entries.div_ceil(shards).max(1),
        }
    }

    /// The bound on entries.
    pub fn max_entries(&self) -> usize {
        self.per_shard * self.shards.len()
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, Map> {
        // hashbrown uses the low bits for the slot and the top 7 for the tag: pick the shard
        // with bits from the middle so that neither loses entropy within a shard.
        let i = ((key >> 32) as usize) & (self.shards.len() - 1);
        // A panic while holding a shard lock cannot leave a `Level` half-written (it is Copy and
        // written whole), so a poisoned lock is safe to keep using.
        self.shards[i].0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the entry for `key`, creating it (as a new, empty bucket) when missing. When
    /// the shard is full, entries for which `idle` holds are dropped first, then arbitrary ones.
    /// Returns whether anything was evicted, with `f`'s result.
    pub fn with<R>(
        &self,
        key: u64,
        idle: impl Fn(&Level) -> bool,
        f: impl FnOnce(&mut Level) -> R,
    ) -> (R, usize) {
        let mut map = self.shard(key);
        let mut evicted = 0;
        if !map.contains_key(&key) && map.len() >= self.per_shard {
            evicted = make_room(&mut map, self.per_shard, &idle);
        }
        let level = map.entry(key).or_default();
        (f(level), evicted)
    }

    /// Runs `f` on the entry for `key` if present (refunds, releases: a missing entry was evicted
    /// and is already "empty").
    pub fn update<R>(&self, key: u64, f: impl FnOnce(&mut Level) -> R) -> Option<R> {
        let mut map = self.shard(key);
        map.get_mut(&key).map(f)
    }

    /// Reads the entry for `key` (a copy), if present.
    pub fn get(&self, key: u64) -> Option<Level> {
        self.shard(key).get(&key).copied()
    }

    /// Drops every entry for which `idle` holds; returns how many. Takes one shard lock at a
    /// time.
    pub fn sweep(&self, idle: impl Fn(&Level) -> bool) -> usize {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            let mut map = shard.0.lock().unwrap_or_else(|p| p.into_inner());
            let before = map.len();
            map.retain(|_, l| !idle(l));
            dropped += before - map.len();
            if map.is_empty() && map.capacity() > 0 {
                map.shrink_to_fit();
            }
        }
        dropped
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Frees room in a full shard: idle entries first; if that frees less than an eighth of the
/// shard, arbitrary entries (the map's order is effectively random) until an eighth is free, so
/// that the cost of a full scan is shared by many inserts.
fn make_room(map: &mut Map, per_shard: usize, idle: &impl Fn(&Level) -> bool) -> usize {
    let before = map.len();
    map.retain(|_, l| !idle(l));
    let target = per_shard - per_shard / 8;
    if map.len() > target {
        let excess = map.len() - target;
        let victims: Vec<u64> = map.keys().take(excess).copied().collect();
        for k in victims {
            map.remove(&k);
        }
    }
    before - map.len()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn entries_are_created_updated_and_swept() {
        let t = Table::new(4, 100);
        let (r, evicted) = t.with(
            7,
            |_| false,
            |l| {
                l.used += 5;
                l.used
            },
        );
        assert_eq!((r, evicted), (5, 0));
        assert_eq!(t.get(7).map(|l| l.used), Some(5));
        assert_eq!(t.update(8, |l| l.used), None, "update never creates");
        t.update(7, |l| l.used = 0);
        t.with(9 << 32, |_| false, |l| l.used = 1);
        assert_eq!(t.len(), 2);
        assert_eq!(t.sweep(|l| l.used == 0), 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_full_table_stays_bounded_and_prefers_idle_victims() {
        let t = Table::new(1, 64);
        for k in 0..64u64 {
            // Even keys are busy, odd ones idle.
            t.with(k, |_| false, |l| l.used = (k + 1) % 2);
        }
        assert_eq!(t.len(), 64);
        let (_, evicted) = t.with(1000, |l| l.used == 0, |l| l.used = 1);
        assert_eq!(evicted, 32, "the 32 idle entries made room");
        assert!(
            (0..64).step_by(2).all(|k| t.get(k).is_some()),
            "busy entries kept"
        );
        for k in 2000..100_000u64 {
            t.with(k, |l| l.used == 0, |l| l.used = 1);
            assert!(t.len() <= 64);
        }
    }
}

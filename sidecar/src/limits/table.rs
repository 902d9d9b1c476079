//! The bucket store of one limit: a sharded hash table from a 64-bit bucket key (a keyed hash of
//! the tenant, API key or variant) to a 16-byte [`Level`], bounded in size.
//!
//! Why a table of our own rather than `HashMap`, `dashmap` or `papaya`: an admission is a
//! read-modify-write of one small value under one lock, and with 100k active keys that value is
//! almost never in cache. A Swiss table (std's `HashMap`) keeps its control bytes and its entries
//! in two arrays, so a lookup is two dependent cache misses; here key and value sit side by side
//! in one 24-byte slot of an open-addressed (linear probing, at most half full) array, so a
//! lookup is one miss, and admission takes one lookup per per-key limit. Eviction needs to look
//! at a whole shard; a fixed array of `Mutex` shards does both with no extra dependency and a
//! known footprint: 24 bytes per slot, 48 to 96 bytes per entry.
//! With 64 shards two threads almost never meet on one lock.
//!
//! Memory stays bounded under a key-cardinality attack in two ways: an entry whose bucket has
//! fully drained (and holds no request in flight) is indistinguishable from a missing one, so
//! [`Table::sweep`] drops it and inserts sweep a shard that is full; and a shard never holds
//! more than its share of [`Table::max_entries`]: when sweeping does not free room, entries are
//! dropped (a dropped entry forgets what its key used, which only favours that key; with an
//! attacker minting keys, the dropped keys are overwhelmingly the attacker's).

use std::sync::{
    Mutex, MutexGuard,
    atomic::{AtomicPtr, AtomicUsize, Ordering},
};

use super::{bucket::Level, prefetch};

/// Buckets of the smallest [`Table::few`] table (1 KiB): a variant added later finds room.
const MIN_FEW: usize = 16;

/// Default bound on the entries of one table (one limit of one rule): 1,048,576.
pub const DEFAULT_MAX_ENTRIES: usize = 1 << 20;

/// One table: the buckets of one limit of one rule, by key.
#[derive(Debug)]
pub struct Table(Store);

#[derive(Debug)]
enum Store {
    /// Buckets by key.
    Sharded {
        shards: Box<[Shard]>,
        per_shard: usize,
    },
    /// The one bucket of a pod-wide limit. Every request on every core takes it, so the cache
    /// line it lives in moves between cores on each admission: the lock and the level share
    /// that one line.
    Single(Box<One>),
    /// The buckets of a limit with a handful of keys (one per variant), each with its lock and
    /// key in a line of its own, for the same reason as [`Store::Single`]; probed linearly.
    Few(Box<[Keyed]>),
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct One(Mutex<Option<Level>>);

#[derive(Debug, Default)]
#[repr(align(64))]
struct Keyed(Mutex<Option<Slot>>);

/// A cache-line aligned shard, so that two shards' locks never share a line.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard {
    map: Mutex<Map>,
    /// Where the map's slots are, and their number minus one: mirrored from under the lock
    /// whenever the array changes, for [`Table::prefetch`], which reads them without it (a
    /// stale pair only makes that prefetch useless).
    slots: AtomicPtr<Slot>,
    mask: AtomicUsize,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, Map> {
        lock(&self.map)
    }

    /// Mirrors `map` (this shard's, locked) for [`Table::prefetch`].
    fn mirror(&self, map: &Map) {
        let ptr = if map.slots.is_empty() {
            std::ptr::null_mut()
        } else {
            map.slots.as_ptr().cast_mut()
        };
        self.slots.store(ptr, Ordering::Relaxed);
        self.mask
            .store(map.slots.len().saturating_sub(1), Ordering::Relaxed);
    }

    /// The address of `key`'s home slot as last mirrored (possibly stale: never dereferenced).
    fn home(&self, key: u64) -> Option<*const Slot> {
        let slots = self.slots.load(Ordering::Relaxed);
        let i = key as usize & self.mask.load(Ordering::Relaxed);
        (!slots.is_null()).then(|| slots.cast_const().wrapping_add(i))
    }
}

/// Marks a free slot. A key equal to it is stored as `EMPTY - 1` (keys are 64-bit hashes: the
/// two would share a bucket with odds of one in 2^64).
const EMPTY: u64 = u64::MAX;

#[derive(Clone, Copy, Debug)]
struct Slot {
    key: u64,
    level: Level,
}

const FREE: Slot = Slot {
    key: EMPTY,
    level: Level { used: 0, at: 0 },
};

/// One shard's entries: open addressing with linear probing over a power-of-two array that is
/// never more than half full (so a lookup almost always ends in the slot it starts at).
/// Entries are only ever removed all at once ([`Map::retain`] rebuilds the array), so probing
/// needs no tombstones.
#[derive(Debug, Default)]
struct Map {
    slots: Vec<Slot>,
    len: usize,
}

impl Map {
    /// The slot holding `key`, or the free slot where it would go. `slots` must not be empty.
    fn find(&self, key: u64) -> Result<usize, usize> {
        let mask = self.slots.len() - 1;
        // The shard was picked with bits 32 and up; the slot takes the low bits.
        let mut i = key as usize & mask;
        loop {
            match self.slots[i].key {
                k if k == key => return Ok(i),
                EMPTY => return Err(i),
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn get_mut(&mut self, key: u64) -> Option<&mut Level> {
        if self.slots.is_empty() {
            return None;
        }
        let i = self.find(key).ok()?;
        Some(&mut self.slots[i].level)
    }

    /// Inserts `key` (known to be missing) with an empty bucket; returns its slot.
    fn insert(&mut self, key: u64) -> usize {
        if (self.len + 1) * 2 > self.slots.len() {
            self.rebuild((self.slots.len() * 2).max(8), |_| true);
        }
        let i = match self.find(key) {
            Ok(i) | Err(i) => i,
        };
        self.slots[i] = Slot {
            key,
            level: Level::default(),
        };
        self.len += 1;
        i
    }

    /// Re-inserts the entries `keep` holds for into an array of `capacity` slots; returns how
    /// many were dropped.
    fn rebuild(&mut self, capacity: usize, mut keep: impl FnMut(&Slot) -> bool) -> usize {
        let old = std::mem::take(&mut self.slots);
        let before = self.len;
        self.len = 0;
        if capacity > 0 {
            self.slots = vec![FREE; capacity];
        }
        for slot in old.into_iter().filter(|s| s.key != EMPTY) {
            if keep(&slot) {
                if let Err(i) = self.find(slot.key) {
                    self.slots[i] = slot;
                }
                self.len += 1;
            }
        }
        before - self.len
    }

    /// Drops the entries for which `idle` holds (and frees the array when none is left).
    fn retain_busy(&mut self, idle: impl Fn(&Level) -> bool) -> usize {
        let busy = self
            .slots
            .iter()
            .filter(|s| s.key != EMPTY && !idle(&s.level))
            .count();
        if busy == self.len {
            return 0;
        }
        let capacity = if busy == 0 {
            0
        } else {
            // Half full at most, but not below the array it replaces halved twice (so a shard
            // that churns does not shrink and regrow on every sweep).
            (busy * 2)
                .next_power_of_two()
                .max(self.slots.len() / 4)
                .max(8)
        };
        self.rebuild(capacity, |s| !idle(&s.level))
    }
}

fn stored(key: u64) -> u64 {
    if key == EMPTY { EMPTY - 1 } else { key }
}

// === impl Table ===

impl Table {
    /// A table of `shards` shards (a power of two) holding at most about `max_entries` entries.
    pub fn new(shards: usize, max_entries: usize) -> Self {
        let shards = shards.next_power_of_two().max(1);
        Self(Store::Sharded {
            shards: (0..shards).map(|_| Shard::default()).collect(),
            per_shard: max_entries.div_ceil(shards).max(1),
        })
    }

    /// The table of a pod-wide limit: one bucket, whatever the key.
    pub fn single() -> Self {
        Self(Store::Single(Box::default()))
    }

    /// The table of a limit with at most about `keys` keys (the variants of a model): twice as
    /// many buckets (at least 16), each in a cache line of its own. It never holds more: a key
    /// that finds every bucket taken replaces an idle one, or else the one it hashes to.
    pub fn few(keys: usize) -> Self {
        let slots = (keys * 2).next_power_of_two().max(MIN_FEW);
        Self(Store::Few((0..slots).map(|_| Keyed::default()).collect()))
    }

    /// Whether this is a [`Table::few`] table with room for `keys` keys.
    pub fn holds_few(&self, keys: usize) -> bool {
        matches!(&self.0, Store::Few(slots) if slots.len() >= keys * 2)
    }

    /// The bound on entries.
    pub fn max_entries(&self) -> usize {
        match &self.0 {
            Store::Sharded { shards, per_shard } => per_shard * shards.len(),
            Store::Single(_) => 1,
            Store::Few(slots) => slots.len(),
        }
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
        let (shards, per_shard) = match &self.0 {
            Store::Sharded { shards, per_shard } => (shards, *per_shard),
            Store::Single(one) => return (f(lock(&one.0).get_or_insert_default()), 0),
            Store::Few(slots) => return few_with(slots, stored(key), idle, f),
        };
        let key = stored(key);
        let shard = shard(shards, key);
        let mut map = shard.lock();
        if let Some(level) = map.get_mut(key) {
            return (f(level), 0);
        }
        let mut evicted = 0;
        if map.len >= per_shard {
            evicted = make_room(&mut map, per_shard, &idle);
        }
        let i = map.insert(key);
        shard.mirror(&map);
        (f(&mut map.slots[i].level), evicted)
    }

    /// Starts loading what [`Table::with`] on `key` will touch (the bucket's lock and slot) into
    /// this core's cache, for writing. An admission prefetches every bucket it is about to take
    /// before taking the first, so that their cache misses (a slot among 100k keys is rarely
    /// cached; a pod-wide bucket was last written by another core) overlap instead of queueing.
    pub fn prefetch(&self, key: u64) {
        match &self.0 {
            Store::Sharded { shards, .. } => {
                let key = stored(key);
                let shard = shard(shards, key);
                prefetch::write(shard);
                if let Some(slot) = shard.home(key) {
                    // A slot may straddle two lines.
                    prefetch::write(slot);
                    prefetch::write(slot.cast::<u8>().wrapping_add(size_of::<Slot>() - 1));
                }
            }
            Store::Single(one) => prefetch::write(&**one),
            Store::Few(slots) => prefetch::write(&slots[stored(key) as usize & (slots.len() - 1)]),
        }
    }

    /// Runs `f` on the entry for `key` if present (refunds, releases: a missing entry was evicted
    /// and is already "empty").
    pub fn update<R>(&self, key: u64, f: impl FnOnce(&mut Level) -> R) -> Option<R> {
        match &self.0 {
            Store::Sharded { shards, .. } => {
                let key = stored(key);
                shard(shards, key).lock().get_mut(key).map(f)
            }
            Store::Single(one) => lock(&one.0).as_mut().map(f),
            Store::Few(slots) => match few_probe(slots, stored(key), |_| false) {
                Probe::Found(mut slot) => slot.as_mut().map(|s| f(&mut s.level)),
                Probe::Free(_) | Probe::Full(_) => None,
            },
        }
    }

    /// Reads the entry for `key` (a copy), if present.
    pub fn get(&self, key: u64) -> Option<Level> {
        self.update(key, |l| *l)
    }

    /// Drops every entry for which `idle` holds; returns how many. Takes one shard lock at a
    /// time.
    pub fn sweep(&self, idle: impl Fn(&Level) -> bool) -> usize {
        match &self.0 {
            Store::Sharded { shards, .. } => shards
                .iter()
                .map(|shard| {
                    let mut map = shard.lock();
                    let dropped = map.retain_busy(&idle);
                    shard.mirror(&map);
                    dropped
                })
                .sum(),
            Store::Single(one) => {
                let mut level = lock(&one.0);
                usize::from(level.take_if(|l| idle(l)).is_some())
            }
            Store::Few(slots) => {
                // Taking an entry out could cut the probe path of a key stored past it, so the
                // survivors are re-inserted, with every bucket locked (in index order; admission
                // holds one lock at a time) so that no admission sees the table half rebuilt.
                let mut guards: Vec<_> = slots.iter().map(|s| lock(&s.0)).collect();
                let mut kept = Vec::new();
                let mut dropped = 0;
                for slot in guards.iter_mut().filter_map(|g| g.take()) {
                    if idle(&slot.level) {
                        dropped += 1;
                    } else {
                        kept.push(slot);
                    }
                }
                let mask = guards.len() - 1;
                for slot in kept {
                    let home = slot.key as usize & mask;
                    if let Some(free) = (0..guards.len())
                        .map(|n| (home + n) & mask)
                        .find(|&i| guards[i].is_none())
                    {
                        *guards[free] = Some(slot);
                    }
                }
                dropped
            }
        }
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        match &self.0 {
            Store::Sharded { shards, .. } => shards.iter().map(|s| s.lock().len).sum(),
            Store::Single(one) => usize::from(lock(&one.0).is_some()),
            Store::Few(slots) => slots.iter().filter(|s| lock(&s.0).is_some()).count(),
        }
    }

    /// Whether the table holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn shard(shards: &[Shard], key: u64) -> &Shard {
    // Bits from the middle pick the shard, so that the slot index (the low bits) keeps its
    // entropy within a shard.
    &shards[((key >> 32) as usize) & (shards.len() - 1)]
}

/// Where `key` stands in a [`Store::Few`] table, with the bucket it ends at locked.
enum Probe<'a> {
    /// The bucket holding it.
    Found(MutexGuard<'a, Option<Slot>>),
    /// The free bucket where it goes.
    Free(MutexGuard<'a, Option<Slot>>),
    /// Every bucket holds another key; the first idle one, if any.
    Full(Option<usize>),
}

/// Probes from `key`'s home bucket, one lock at a time (which [`Table::sweep`] relies on).
fn few_probe<'a>(slots: &'a [Keyed], key: u64, idle: impl Fn(&Level) -> bool) -> Probe<'a> {
    let mask = slots.len() - 1;
    let mut victim = None;
    for i in (0..slots.len()).map(|n| (key as usize + n) & mask) {
        let slot = lock(&slots[i].0);
        match &*slot {
            Some(s) if s.key == key => return Probe::Found(slot),
            Some(s) => {
                if victim.is_none() && idle(&s.level) {
                    victim = Some(i);
                }
            }
            None => return Probe::Free(slot),
        }
    }
    Probe::Full(victim)
}

fn few_with<R>(
    slots: &[Keyed],
    key: u64,
    idle: impl Fn(&Level) -> bool,
    f: impl FnOnce(&mut Level) -> R,
) -> (R, usize) {
    let (mut slot, evicted) = match few_probe(slots, key, idle) {
        Probe::Found(slot) | Probe::Free(slot) => (slot, 0),
        // More keys than the table was sized for: the new one replaces an idle bucket, or else
        // the one it hashes to, forgetting what that key used.
        Probe::Full(victim) => {
            let home = key as usize & (slots.len() - 1);
            (lock(&slots[victim.unwrap_or(home)].0), 1)
        }
    };
    if let Some(s) = slot.as_mut().filter(|s| s.key == key) {
        return (f(&mut s.level), 0);
    }
    let s = slot.insert(Slot {
        key,
        level: Level::default(),
    });
    (f(&mut s.level), evicted)
}

/// A panic while holding a table lock cannot leave a `Level` half-written (it is Copy and
/// written whole), so a poisoned lock is safe to keep using.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Frees room in a full shard: idle entries first; if that frees less than an eighth of the
/// shard, arbitrary entries (the slot order is effectively random) until an eighth is free, so
/// that the cost of a full scan is shared by many inserts.
fn make_room(map: &mut Map, per_shard: usize, idle: &impl Fn(&Level) -> bool) -> usize {
    let target = per_shard - per_shard / 8;
    let mut kept = 0;
    let capacity = map.slots.len();
    map.rebuild(capacity, |s| {
        let keep = !idle(&s.level) && kept < target;
        kept += usize::from(keep);
        keep
    })
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
    fn a_single_table_holds_one_bucket_for_every_key() {
        let t = Table::single();
        assert!(t.is_empty());
        assert_eq!(t.update(0, |l| l.used), None, "update never creates");
        t.with(0, |_| false, |l| l.used = 3);
        assert_eq!(t.get(12345).map(|l| l.used), Some(3));
        assert_eq!((t.len(), t.max_entries()), (1, 1));
        assert_eq!(t.sweep(|l| l.used == 3), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn a_few_table_keeps_a_bucket_per_key_and_stays_bounded() {
        let t = Table::few(2);
        assert_eq!(t.max_entries(), MIN_FEW);
        assert!(t.holds_few(8) && !t.holds_few(9) && !Table::single().holds_few(1));
        // Keys that all start probing at the same bucket.
        let keys: Vec<u64> = (1..=6u64).map(|k| k << 40).chain([u64::MAX]).collect();
        for (i, &k) in keys.iter().enumerate() {
            t.with(k, |_| false, |l| l.used = i as u64);
        }
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(t.get(k).map(|l| l.used), Some(i as u64), "key {k:#x}");
        }
        assert_eq!(t.update(99, |l| l.used), None, "update never creates");
        // Sweeping the first keys must not hide the ones that probed past them.
        assert_eq!(t.sweep(|l| l.used < 3), 3);
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(t.get(k).map(|l| l.used), (i >= 3).then_some(i as u64));
        }
        // More keys than buckets: each new one replaces an idle bucket first.
        for k in 0..100u64 {
            t.with(k, |l| l.used == 0, |l| l.used = 0);
        }
        assert_eq!(t.len(), MIN_FEW);
        assert!(
            keys[3..].iter().all(|&k| t.get(k).is_some()),
            "busy buckets kept"
        );
    }

    #[test]
    fn the_prefetch_mirror_follows_the_slot_array() {
        let t = Table::new(1, 10_000);
        let Store::Sharded { shards, .. } = &t.0 else {
            unreachable!()
        };
        // What a prefetch of `key` names, and the home slot it should name.
        let mirrored = |key: u64| {
            let map = shards[0].lock();
            let home = (!map.slots.is_empty())
                .then(|| &map.slots[key as usize & (map.slots.len() - 1)] as *const Slot);
            (shards[0].home(key), home)
        };
        assert_eq!(mirrored(1), (None, None), "nothing to prefetch yet");
        // Growing from 8 slots to 2048 moves the array nine times.
        for k in 0..1000u64 {
            t.with(k, |_| false, |l| l.used = k % 2);
            let (prefetched, home) = mirrored(k);
            assert!(prefetched.is_some() && prefetched == home, "key {k}");
        }
        assert_eq!(t.sweep(|l| l.used == 0), 500);
        let (prefetched, home) = mirrored(3);
        assert!(prefetched.is_some() && prefetched == home, "after a sweep");
        t.sweep(|_| true);
        assert_eq!(
            mirrored(3),
            (None, None),
            "an emptied shard mirrors no array"
        );
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

    #[test]
    fn colliding_keys_probe_past_each_other_and_survive_sweeps() {
        let t = Table::new(1, 10_000);
        // Every key starts probing at slot 0; u64::MAX is the free-slot marker.
        let keys: Vec<u64> = (1..=300u64).map(|k| k << 40).chain([u64::MAX]).collect();
        for (i, &k) in keys.iter().enumerate() {
            t.with(k, |_| false, |l| l.used = i as u64 % 3);
        }
        assert_eq!(t.len(), keys.len());
        for (i, &k) in keys.iter().enumerate() {
            assert_eq!(t.get(k).map(|l| l.used), Some(i as u64 % 3), "key {k:#x}");
        }
        let idle = keys.iter().enumerate().filter(|(i, _)| i % 3 == 0).count();
        assert_eq!(t.sweep(|l| l.used == 0), idle);
        for (i, &k) in keys.iter().enumerate() {
            let expected = (i % 3 != 0).then_some(i as u64 % 3);
            assert_eq!(t.get(k).map(|l| l.used), expected, "key {k:#x}");
        }
        assert_eq!(t.sweep(|_| true), keys.len() - idle);
        assert!(t.is_empty());
        t.with(5, |_| false, |l| l.used = 9);
        assert_eq!(
            t.get(5).map(|l| l.used),
            Some(9),
            "an emptied shard takes entries again"
        );
    }
}

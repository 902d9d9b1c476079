//! The cache on tokio's paused clock (`advance`, no sleeps): what it stores and for how long, what
//! it evicts, and how identical requests in flight share one generation, also when the filler gives
//! up or a waiter goes away.
#![allow(clippy::unwrap_used)]

use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::poll;
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;
use tokio::time::advance;

use super::*;

#[derive(Clone, Debug, PartialEq)]
struct Answer {
    id: u32,
    weight: usize,
}

impl Weigh for Answer {
    fn weight(&self) -> usize {
        self.weight
    }
}

const WEIGHT: usize = 100;
/// What one `answer` costs the cache.
const CHARGE: usize = WEIGHT + ENTRY_OVERHEAD;
const TTL: Duration = Duration::from_secs(60);

fn answer(id: u32) -> Answer {
    Answer { id, weight: WEIGHT }
}

fn key(name: &str) -> CacheKey {
    CacheKey::new("tenant", &[name.as_bytes()])
}

/// A cache of `entries` answers, and its metrics.
fn cache(entries: usize) -> (ResponseCache<Answer>, CacheMetrics) {
    let metrics = CacheMetrics::default();
    (
        ResponseCache::new(entries * CHARGE, TTL, metrics.clone()),
        metrics,
    )
}

fn filler(lookup: Lookup<Answer>) -> Filler<Answer> {
    match lookup {
        Lookup::Fill(filler) => filler,
        Lookup::Hit(value) => panic!("a hit ({value:?}), not a fill"),
    }
}

fn hit(lookup: Lookup<Answer>) -> Answer {
    match lookup {
        Lookup::Hit(value) => value,
        Lookup::Fill(filler) => panic!("a fill of {:?}, not a hit", filler.key()),
    }
}

/// Generates `value` for `key` (which must be a miss) and stores it.
async fn put(cache: &ResponseCache<Answer>, key: CacheKey, value: Answer) {
    assert!(filler(cache.lookup(key).await).fill(value), "stored");
}

/// The stored answer, or `None` (and the filler that miss made, dropped unfilled).
async fn get(cache: &ResponseCache<Answer>, key: CacheKey) -> Option<Answer> {
    match cache.lookup(key).await {
        Lookup::Hit(value) => Some(value),
        Lookup::Fill(_) => None,
    }
}

/// The requests waiting on `filler` (its channel's receivers, less the one kept while pending).
fn waiters(filler: &Filler<Answer>) -> usize {
    filler.sender.as_ref().unwrap().receiver_count() - 1
}

/// Lets the other tasks run until `n` wait on `filler`.
async fn until_waiting(filler: &Filler<Answer>, n: usize) {
    for _ in 0..10_000 {
        if waiters(filler) == n {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("{} waiting, not {n}", waiters(filler));
}

fn counts(m: &CacheMetrics) -> [u64; 4] {
    [
        m.hits.get(),
        m.misses.get(),
        m.coalesced.get(),
        m.evictions.get(),
    ]
}

fn held(m: &CacheMetrics) -> (i64, usize) {
    (m.entries.get(), usize::try_from(m.bytes.get()).unwrap())
}

#[test]
fn keys_are_scoped_and_their_parts_length_prefixed() {
    let parts: &[&[u8]] = &[b"model", b"prompt"];
    assert_eq!(CacheKey::new("a", parts), CacheKey::new("a", parts));
    assert_ne!(CacheKey::new("a", parts), CacheKey::new("b", parts));
    assert_ne!(
        CacheKey::new("t", &[b"ab", b"c"]),
        CacheKey::new("t", &[b"a", b"bc"])
    );
    assert_ne!(
        CacheKey::new("t", &[b"a"]),
        CacheKey::new("t", &[b"a", b""])
    );
    // The scope is a field like the parts: it cannot run into them.
    assert_ne!(CacheKey::new("ab", &[b"c"]), CacheKey::new("a", &[b"bc"]));
    // Shared is no tenant's scope, not even the empty name's.
    assert_eq!(CacheKey::shared(parts), CacheKey::shared(parts));
    assert_ne!(CacheKey::shared(parts), CacheKey::new("", parts));
    assert!(format!("{:?}", CacheKey::shared(parts)).starts_with("CacheKey("));
}

#[tokio::test(start_paused = true)]
async fn a_filled_answer_is_a_hit() {
    let (cache, m) = cache(4);
    let f = filler(cache.lookup(key("q")).await);
    assert_eq!(f.key(), key("q"));
    assert!(f.fill(answer(1)));
    assert_eq!(hit(cache.lookup(key("q")).await), answer(1));
    assert_eq!(hit(cache.lookup(key("q")).await), answer(1));
    assert_eq!(counts(&m), [2, 1, 0, 0]);
    assert_eq!(held(&m), (1, CHARGE));
}

#[tokio::test(start_paused = true)]
async fn tenants_do_not_share_answers() {
    let (cache, _) = cache(4);
    let parts: &[&[u8]] = &[b"same request"];
    put(&cache, CacheKey::new("alice", parts), answer(1)).await;
    assert_eq!(get(&cache, CacheKey::new("bob", parts)).await, None);
    assert_eq!(get(&cache, CacheKey::shared(parts)).await, None);
    assert_eq!(
        get(&cache, CacheKey::new("alice", parts)).await,
        Some(answer(1))
    );
}

#[tokio::test(start_paused = true)]
async fn answers_expire_one_ttl_after_they_were_stored() {
    let (cache, m) = cache(4);
    put(&cache, key("q"), answer(1)).await;
    advance(TTL - Duration::from_millis(1)).await;
    // A hit does not extend the TTL.
    assert_eq!(get(&cache, key("q")).await, Some(answer(1)));
    advance(Duration::from_millis(1)).await;
    assert_eq!(get(&cache, key("q")).await, None);
    assert_eq!(held(&m), (0, 0));
    assert_eq!(counts(&m), [1, 2, 0, 0], "expiry is no eviction");
}

#[tokio::test(start_paused = true)]
async fn expired_answers_go_without_being_asked_for() {
    let (cache, m) = cache(4);
    put(&cache, key("old"), answer(1)).await;
    advance(TTL / 2).await;
    put(&cache, key("new"), answer(2)).await;
    advance(TTL / 2).await;
    // Any lookup drops what has expired, here "old".
    assert_eq!(get(&cache, key("other")).await, None);
    assert_eq!(held(&m), (1, CHARGE));
    advance(TTL / 2).await;
    cache.purge_expired();
    assert_eq!(held(&m), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn the_least_recently_used_go_first_by_bytes() {
    let (cache, m) = cache(3);
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        put(&cache, key(name), answer(i as u32)).await;
    }
    // "a" used again: "b" is now the least recently used.
    assert_eq!(get(&cache, key("a")).await, Some(answer(0)));
    put(&cache, key("d"), answer(3)).await;
    assert_eq!(m.evictions.get(), 1);
    assert_eq!(held(&m), (3, 3 * CHARGE));
    // From the least recently used: c, a, d. Two answers' bytes take two places.
    let big = Answer {
        id: 4,
        weight: 2 * CHARGE - ENTRY_OVERHEAD,
    };
    put(&cache, key("e"), big.clone()).await;
    assert_eq!(m.evictions.get(), 3);
    assert_eq!(held(&m), (2, 3 * CHARGE));
    assert_eq!(get(&cache, key("d")).await, Some(answer(3)));
    assert_eq!(get(&cache, key("e")).await, Some(big));
    for gone in ["a", "b", "c"] {
        assert_eq!(get(&cache, key(gone)).await, None, "{gone}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_answer_heavier_than_the_cache_is_handed_over_but_not_stored() {
    let (cache, m) = cache(2);
    let f = filler(cache.lookup(key("q")).await);
    let waiter = tokio::spawn({
        let cache = cache.clone();
        async move { hit(cache.lookup(key("q")).await) }
    });
    until_waiting(&f, 1).await;
    let heavy = Answer {
        id: 1,
        weight: 2 * CHARGE - ENTRY_OVERHEAD + 1,
    };
    assert!(!f.fill(heavy.clone()));
    assert_eq!(waiter.await.unwrap(), heavy);
    assert_eq!(held(&m), (0, 0));
    assert_eq!(get(&cache, key("q")).await, None);
    // Exactly the limit fits.
    let fits = Answer {
        id: 2,
        weight: 2 * CHARGE - ENTRY_OVERHEAD,
    };
    put(&cache, key("q"), fits).await;
    assert_eq!(held(&m), (1, 2 * CHARGE));
}

#[tokio::test(start_paused = true)]
async fn a_ttl_of_zero_stores_nothing() {
    let metrics = CacheMetrics::default();
    let cache = ResponseCache::new(10 * CHARGE, Duration::ZERO, metrics.clone());
    assert!(!filler(cache.lookup(key("q")).await).fill(answer(1)));
    assert_eq!(held(&metrics), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn ten_identical_requests_make_one_generation() {
    let (cache, m) = cache(4);
    let mut requests = JoinSet::new();
    for _ in 0..10 {
        let cache = cache.clone();
        requests.spawn(async move { cache.lookup(key("q")).await });
    }
    // The filler's task is the one that finishes; the nine others wait for it.
    let f = filler(requests.join_next().await.unwrap().unwrap());
    until_waiting(&f, 9).await;
    assert!(requests.try_join_next().is_none());
    assert!(f.fill(answer(7)));
    let mut answers = 0;
    while let Some(done) = requests.join_next().await {
        assert_eq!(hit(done.unwrap()), answer(7));
        answers += 1;
    }
    assert_eq!(answers, 9);
    assert_eq!(counts(&m), [0, 1, 9, 0]);
    assert_eq!(hit(cache.lookup(key("q")).await), answer(7));
    assert_eq!(counts(&m), [1, 1, 9, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_filler_that_gives_up_hands_over_to_one_waiter() {
    let (cache, m) = cache(4);
    let first = filler(cache.lookup(key("q")).await);
    let mut requests = JoinSet::new();
    for _ in 0..4 {
        let cache = cache.clone();
        requests.spawn(async move { cache.lookup(key("q")).await });
    }
    until_waiting(&first, 4).await;
    drop(first);
    let second = filler(requests.join_next().await.unwrap().unwrap());
    until_waiting(&second, 3).await;
    assert!(requests.try_join_next().is_none(), "one filler only");
    assert!(second.fill(answer(2)));
    while let Some(done) = requests.join_next().await {
        assert_eq!(hit(done.unwrap()), answer(2));
    }
    assert_eq!(counts(&m), [0, 2, 3, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_filler_that_gives_up_unwaited_leaves_the_key_free() {
    let (cache, m) = cache(4);
    drop(filler(cache.lookup(key("q")).await));
    put(&cache, key("q"), answer(1)).await;
    assert_eq!(counts(&m), [0, 2, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_that_goes_away_leaves_the_others_be() {
    let (cache, m) = cache(4);
    let f = filler(cache.lookup(key("q")).await);
    let mut stays = pin!(cache.lookup(key("q")));
    let mut leaves = Box::pin(cache.lookup(key("q")));
    assert!(poll!(&mut stays).is_pending());
    assert!(poll!(&mut leaves).is_pending());
    assert_eq!(waiters(&f), 2);
    drop(leaves);
    assert_eq!(waiters(&f), 1);
    assert!(f.fill(answer(1)));
    assert_eq!(hit(stays.await), answer(1));
    assert_eq!(counts(&m), [0, 1, 1, 0]);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_gone_before_it_looks_again_takes_no_duty() {
    let (cache, m) = cache(4);
    let first = filler(cache.lookup(key("q")).await);
    let mut gone = Box::pin(cache.lookup(key("q")));
    let mut stays = Box::pin(cache.lookup(key("q")));
    assert!(poll!(&mut gone).is_pending());
    assert!(poll!(&mut stays).is_pending());
    // Both woken by the filler giving up; `gone` never looks again.
    drop(first);
    let second = filler(stays.await);
    drop(gone);
    assert_eq!(waiters(&second), 0);
    assert!(second.fill(answer(2)));
    assert_eq!(hit(cache.lookup(key("q")).await), answer(2));
    assert_eq!(counts(&m), [1, 2, 0, 0]);
}

#[tokio::test(start_paused = true)]
async fn new_limits_evict_at_once() {
    let (cache, m) = cache(3);
    for (i, name) in ["a", "b", "c"].into_iter().enumerate() {
        put(&cache, key(name), answer(i as u32)).await;
        advance(Duration::from_secs(10)).await;
    }
    assert_eq!(get(&cache, key("a")).await, Some(answer(0)));
    // Larger: nothing goes.
    cache.set_limits(10 * CHARGE, TTL);
    assert_eq!(held(&m), (3, 3 * CHARGE));
    // Room for one: the most recently used, "a", stays.
    cache.set_limits(CHARGE, TTL);
    assert_eq!(m.evictions.get(), 2);
    assert_eq!(held(&m), (1, CHARGE));
    assert_eq!(get(&cache, key("a")).await, Some(answer(0)));
    // A shorter TTL counts from when "a" was stored, 30 s ago.
    cache.set_limits(CHARGE, Duration::from_secs(30));
    assert_eq!(held(&m), (0, 0));
}

#[tokio::test(start_paused = true)]
async fn a_dropped_cache_takes_its_bytes_out_of_the_gauges() {
    let (cache, m) = cache(4);
    put(&cache, key("q"), answer(1)).await;
    let next = ResponseCache::new(4 * CHARGE, TTL, m.clone());
    put(&next, key("r"), answer(2)).await;
    assert_eq!(held(&m), (2, 2 * CHARGE));
    drop(cache);
    assert_eq!(held(&m), (1, CHARGE));
}

/// Real threads, real interleavings: whatever the timing, one generation per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_generation_per_key_across_threads() {
    let (cache, _) = cache(1000);
    for round in 0..50 {
        let fills = Arc::new(AtomicUsize::new(0));
        let mut requests = JoinSet::new();
        for _ in 0..16 {
            let (cache, fills) = (cache.clone(), Arc::clone(&fills));
            requests.spawn(async move {
                match cache.lookup(key(&round.to_string())).await {
                    Lookup::Hit(value) => value,
                    Lookup::Fill(f) => {
                        fills.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        f.fill(answer(round));
                        answer(round)
                    }
                }
            });
        }
        while let Some(done) = requests.join_next().await {
            assert_eq!(done.unwrap(), answer(round));
        }
        assert_eq!(fills.load(Ordering::SeqCst), 1, "round {round}");
    }
}

#[test]
fn the_cache_and_its_lookups_cross_threads() {
    fn send_sync<T: Send + Sync>(_: &T) {}
    fn send<T: Send>(_: &T) {}
    let (cache, _) = cache(1);
    send_sync(&cache);
    send(&cache.lookup(key("q")));
}

#[test]
fn metrics_are_registered_under_their_names() {
    let mut registry = Registry::with_prefix("sluice");
    let m = CacheMetrics::register(&mut registry);
    m.hits.inc();
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    for name in [
        "sluice_response_cache_hits_total 1",
        "sluice_response_cache_misses_total",
        "sluice_response_cache_coalesced_total",
        "sluice_response_cache_bytes",
        "sluice_response_cache_entries",
        "sluice_response_cache_evictions_total",
    ] {
        assert!(text.contains(name), "{name} in\n{text}");
    }
}

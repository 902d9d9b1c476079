//! The response cache (opt-in per model, `spec.cache`): an answer generated once is served
//! again to the exact same normalized request, within one tenant unless the cache is shared,
//! for a TTL, in a memory bound (bytes, least recently used out first).
//!
//! Identical requests that arrive while the first is still generating do not each go to the
//! engine (a stampede on a popular prompt is exactly when generation is dearest): the first
//! becomes the [`Filler`], the others wait for its answer. If the filler gives up (an error, its
//! client gone, an answer not worth keeping), one waiter takes its place and the others wait for
//! that one, so a failure costs one more generation at a time, never N at once, and no waiter is
//! left hanging.
//!
//! Pure: no HTTP, no engine. The request path builds the [`CacheKey`], calls
//! [`ResponseCache::lookup`], and either answers the hit or generates and [`Filler::fill`]s.

mod key;
mod metrics;
mod store;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

pub use key::CacheKey;
pub use metrics::CacheMetrics;
use store::Store;

/// What an entry costs beyond its value's [`Weigh::weight`]: its key (in the map and in both
/// orderings), its bookkeeping and the tables' slack, an estimate. Charged so that the limit in
/// bytes also bounds the number of entries, however small their values.
pub const ENTRY_OVERHEAD: usize = 256;

/// What a value costs the cache, in bytes.
pub trait Weigh {
    /// The bytes this value holds (its payload, on the heap or not); the cache adds
    /// [`ENTRY_OVERHEAD`] per entry.
    fn weight(&self) -> usize;
}

impl Weigh for [u8] {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl Weigh for str {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl Weigh for Vec<u8> {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl Weigh for String {
    fn weight(&self) -> usize {
        self.len()
    }
}

impl<T: Weigh + ?Sized> Weigh for Arc<T> {
    /// All of it: the cache keeps it alive, whoever else holds it.
    fn weight(&self) -> usize {
        T::weight(self)
    }
}

/// A cache of answers by [`CacheKey`]. A handle: clones share one cache; `Send` and `Sync`.
pub struct ResponseCache<V: Clone + Weigh + Send + Sync + 'static> {
    shared: Arc<Shared<V>>,
}

impl<V: Clone + Weigh + Send + Sync + 'static> Clone for ResponseCache<V> {
    fn clone(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<V> {
    state: Mutex<State<V>>,
    metrics: CacheMetrics,
}

impl<V> Shared<V> {
    /// The state, even after a panic elsewhere: every change to it is made whole before anything
    /// that could panic, so a poisoned lock guards a consistent state.
    fn lock(&self) -> MutexGuard<'_, State<V>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct State<V> {
    store: Store<V>,
    /// The keys being generated, each with the channel its filler will send the answer on.
    pending: HashMap<CacheKey, Pending<V>>,
    /// The next filler's id.
    next_filler: u64,
}

impl<V> State<V> {
    /// Forgets filler `id`'s pending key (not a successor's, under the same key).
    fn forget(&mut self, key: &CacheKey, id: u64) {
        if self.pending.get(key).is_some_and(|p| p.id == id) {
            self.pending.remove(key);
        }
    }
}

struct Pending<V> {
    id: u64,
    /// `None` until filled; closed unfilled when the filler gives up.
    answer: watch::Receiver<Option<V>>,
}

/// What [`ResponseCache::lookup`] found.
#[derive(Debug)]
pub enum Lookup<V: Clone + Weigh + Send + Sync + 'static> {
    /// The answer: stored, or generated for an identical request this one waited for
    /// ([`CacheMetrics`] tells the two apart).
    Hit(V),
    /// Not held, and no identical request generating: this request generates, then fills.
    Fill(Filler<V>),
}

enum Step<V: Clone + Weigh + Send + Sync + 'static> {
    Hit(V),
    Fill(Filler<V>),
    Wait(watch::Receiver<Option<V>>),
}

impl<V: Clone + Weigh + Send + Sync + 'static> ResponseCache<V> {
    /// An empty cache holding at most `max_bytes` (values' weights and [`ENTRY_OVERHEAD`]s), each
    /// answer for `ttl` from when it was stored. A `ttl` of zero stores nothing, but still
    /// coalesces identical requests in flight.
    pub fn new(max_bytes: usize, ttl: Duration, metrics: CacheMetrics) -> Self {
        let state = State {
            store: Store::new(max_bytes, ttl, metrics.clone()),
            pending: HashMap::new(),
            next_filler: 0,
        };
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(state),
                metrics,
            }),
        }
    }

    /// New limits (a config reload), at once: what no longer fits is evicted, least recently used
    /// first, and what the new TTL has expired is dropped. A TTL applies to entries already held,
    /// from when they were stored.
    pub fn set_limits(&self, max_bytes: usize, ttl: Duration) {
        let now = Instant::now();
        self.shared.lock().store.set_limits(max_bytes, ttl, now);
    }

    /// Drops the expired answers now. Lookups and fills do it as they go; this is for a cache
    /// left idle, so that expired answers do not hold memory until the next request.
    pub fn purge_expired(&self) {
        let now = Instant::now();
        self.shared.lock().store.purge_expired(now);
    }

    /// The answer to `key`, or the duty to generate it.
    ///
    /// While another request generates the same key this waits for it (as long as it takes: the
    /// caller's own deadline bounds the wait). Cancel-safe: dropping the future while it waits
    /// leaves nothing behind. A [`Lookup::Fill`] must be filled or dropped promptly; requests
    /// for its key wait on it.
    pub async fn lookup(&self, key: CacheKey) -> Lookup<V> {
        loop {
            let answer = match self.step(key) {
                Step::Hit(value) => return Lookup::Hit(value),
                Step::Fill(filler) => return Lookup::Fill(filler),
                Step::Wait(answer) => answer,
            };
            if let Some(value) = wait(answer).await {
                self.shared.metrics.coalesced.inc();
                return Lookup::Hit(value);
            }
            // The filler gave up. Look again: the first waiter back becomes the next filler
            // (under the lock, so only one does), the others wait for it.
        }
    }

    /// One look under the lock, which is released before anything awaits.
    fn step(&self, key: CacheKey) -> Step<V> {
        let now = Instant::now();
        let mut state = self.shared.lock();
        if let Some(value) = state.store.get(&key, now) {
            drop(state);
            self.shared.metrics.hits.inc();
            return Step::Hit(value);
        }
        if let Some(pending) = state.pending.get(&key) {
            return Step::Wait(pending.answer.clone());
        }
        let id = state.next_filler;
        state.next_filler += 1;
        let (sender, answer) = watch::channel(None);
        state.pending.insert(key, Pending { id, answer });
        drop(state);
        self.shared.metrics.misses.inc();
        Step::Fill(Filler {
            shared: Arc::clone(&self.shared),
            key,
            id,
            sender: Some(sender),
        })
    }
}

impl<V: Clone + Weigh + Send + Sync + 'static> fmt::Debug for ResponseCache<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseCache").finish_non_exhaustive()
    }
}

/// The answer from the filler's channel: `None` when the filler gave up without one.
async fn wait<V: Clone>(mut answer: watch::Receiver<Option<V>>) -> Option<V> {
    loop {
        if let Some(value) = answer.borrow_and_update().as_ref() {
            return Some(value.clone());
        }
        if answer.changed().await.is_err() {
            // Closed; an answer sent just before still counts.
            return answer.borrow().clone();
        }
    }
}

/// The one request generating a key's answer: [`Filler::fill`] stores it and hands it to the
/// requests waiting. Dropped unfilled (an error, the client gone, an answer not to keep: cut
/// short, failed), it hands the duty to one of them.
pub struct Filler<V: Clone + Weigh + Send + Sync + 'static> {
    shared: Arc<Shared<V>>,
    key: CacheKey,
    id: u64,
    /// Taken by `fill`; dropped with the filler otherwise, which closes the channel.
    sender: Option<watch::Sender<Option<V>>>,
}

impl<V: Clone + Weigh + Send + Sync + 'static> Filler<V> {
    /// The key this filler generates.
    pub fn key(&self) -> CacheKey {
        self.key
    }

    /// Stores `value` (unless it is heavier than the cache's limit, or the TTL is zero) and hands
    /// it to every request waiting for it, stored or not. Returns whether it was stored.
    pub fn fill(mut self, value: V) -> bool {
        let now = Instant::now();
        let stored = {
            let mut state = self.shared.lock();
            // Stored and no longer pending in one step: a request from now on hits it, or (not
            // stored) becomes the next filler; none waits on a channel already answered.
            state.forget(&self.key, self.id);
            state.store.insert(self.key, &value, now)
        };
        if let Some(sender) = self.sender.take() {
            sender.send_replace(Some(value));
        }
        stored
    }
}

impl<V: Clone + Weigh + Send + Sync + 'static> Drop for Filler<V> {
    /// Unfilled: no longer pending first, then (the sender dropped after this) the channel
    /// closes, so the waiters that look again find no filler and the first becomes one.
    fn drop(&mut self) {
        if self.sender.is_some() {
            self.shared.lock().forget(&self.key, self.id);
        }
    }
}

impl<V: Clone + Weigh + Send + Sync + 'static> fmt::Debug for Filler<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filler")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

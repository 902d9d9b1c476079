use std::sync::{
    atomic::{AtomicU64, AtomicUsize, Ordering},
    Arc,
};

use candle_core::{Result, Tensor};
use indexmap::IndexMap;
use tracing::info;

use crate::{
    kv_cache::{NormalCache, RecurrentStateSnapshot, RotatingCache, SingleCache},
    paged_attention::block_hash::BlockHash,
    pipeline::KvCache,
    sequence::Sequence,
};

/// sluice: the prefix cache's byte budget, and what it holds and does, shared with whoever
/// embeds the engine (the sidecar exports these as metrics). Upstream bounds the cache only by
/// the number of entries on a GPU, so on the CPU nothing was ever evicted; see
/// [`PrefixCacheManagerV2::add_sequence`].
#[derive(Debug)]
pub struct PrefixCacheMeter {
    max_bytes: usize,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    bytes: AtomicUsize,
    entries: AtomicUsize,
}

impl PrefixCacheMeter {
    /// A meter for a cache that may hold at most `max_bytes` of KV tensors.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            max_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            bytes: AtomicUsize::new(0),
            entries: AtomicUsize::new(0),
        }
    }
    /// The byte budget.
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }
    /// Prompts that started from a cached prefix.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
    /// Prompts looked up and not found (prefill from the first token).
    pub fn misses(&self) -> u64 {
        self.misses.load(Ordering::Relaxed)
    }
    /// Entries dropped to stay within the entry or byte bound.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }
    /// Bytes of KV tensors held now.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
    /// Entries held now.
    pub fn entries(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }
}

impl Default for PrefixCacheMeter {
    /// No byte bound (upstream's behaviour): only the entry count bounds the cache.
    fn default() -> Self {
        Self::new(usize::MAX)
    }
}

/// sluice: bytes of the tensors a cached sequence holds.
fn kv_bytes(cache: &[Option<KvCache>]) -> usize {
    let tensor_bytes =
        |t: Option<&Tensor>| t.map_or(0, |t| t.elem_count() * t.dtype().size_in_bytes());
    cache
        .iter()
        .flatten()
        .map(|layer| match layer {
            KvCache::Normal { k, v } => {
                tensor_bytes(k.all_data.as_ref()) + tensor_bytes(v.all_data.as_ref())
            }
            KvCache::Rotating { k, v } => {
                tensor_bytes(k.all_data.as_ref()) + tensor_bytes(v.all_data.as_ref())
            }
            KvCache::Shared { .. } => 0,
        })
        .sum()
}

/// sluice: a sequence's KV cache as the prefix cache keeps it: its own copy of the positions
/// written so far. A finished sequence's tensors are views of its capacity (grown in blocks of
/// `NormalCache::CACHE_GROW_SIZE` positions) and, after a batched step, of the whole batch's
/// tensors: keeping the views kept all of that alive.
fn compact(layer: &KvCache) -> Result<KvCache> {
    let single = |c: &SingleCache| -> Result<SingleCache> {
        let all_data = match &c.all_data {
            Some(data) => Some(
                data.narrow(c.dim, 0, c.current_seq_len)?
                    .force_contiguous()?,
            ),
            None => None,
        };
        Ok(SingleCache {
            all_data,
            dim: c.dim,
            current_seq_len: c.current_seq_len,
            max_seq_len: c.max_seq_len,
            capacity_seq_len: c.current_seq_len,
            row_lens: Vec::new(),
        })
    };
    // A sliding window wraps around its capacity: kept whole, in storage of its own.
    let rotating = |c: &RotatingCache| -> Result<RotatingCache> {
        let mut c = c.clone();
        c.all_data = c.all_data.map(|d| d.force_contiguous()).transpose()?;
        Ok(c)
    };
    Ok(match layer {
        KvCache::Normal { k, v } => KvCache::Normal {
            k: single(k)?,
            v: single(v)?,
        },
        KvCache::Rotating { k, v } => KvCache::Rotating {
            k: rotating(k)?,
            v: rotating(v)?,
        },
        KvCache::Shared { owner } => KvCache::Shared { owner: *owner },
    })
}

/// sluice: a cached layer rewound to `len` positions, with the capacity a sequence of `len`
/// positions has when it never left the engine (`len` rounded up to the blocks caches grow by,
/// `NormalCache::CACHE_GROW_SIZE`), so that it batches with the sequences of its length without
/// a copy into a ragged batch; the compacted copy has exactly its length.
fn restore(layer: &KvCache, len: usize) -> Result<KvCache> {
    let single = |c: &SingleCache| -> Result<SingleCache> {
        let capacity = len
            .div_ceil(NormalCache::CACHE_GROW_SIZE)
            .max(1)
            .saturating_mul(NormalCache::CACHE_GROW_SIZE)
            .min(c.max_seq_len)
            .max(len);
        let all_data = match &c.all_data {
            Some(data) => Some(
                data.narrow(c.dim, 0, len)?
                    .pad_with_zeros(c.dim, 0, capacity - len)?
                    .contiguous()?,
            ),
            None => None,
        };
        Ok(SingleCache {
            all_data,
            dim: c.dim,
            current_seq_len: len,
            max_seq_len: c.max_seq_len,
            capacity_seq_len: capacity,
            row_lens: Vec::new(),
        })
    };
    Ok(match layer {
        KvCache::Normal { k, v } => KvCache::Normal {
            k: single(k)?,
            v: single(v)?,
        },
        other => {
            let mut other = other.clone();
            other.set_len(len)?;
            other
        }
    })
}

#[derive(PartialEq, Eq, Debug, Hash)]
struct Tokens(Vec<u32>);

impl Tokens {
    /// Returns the length of the common prefix shared with `other`.
    fn shared_prefix_len(&self, other: &Self) -> usize {
        self.0
            .iter()
            .zip(other.0.iter())
            .take_while(|(a, b)| a == b)
            .count()
    }
}

impl From<Vec<u32>> for Tokens {
    fn from(value: Vec<u32>) -> Self {
        Self(value)
    }
}

#[derive(Clone)]
struct CacheElement {
    cache: Vec<Option<KvCache>>,
    /// Recurrent state snapshots for hybrid models (one per recurrent layer)
    recurrent_snapshots: Option<Vec<RecurrentStateSnapshot>>,
    audio_hashes: Option<Vec<u64>>,
    image_hashes: Option<Vec<u64>>,
    video_hashes: Option<Vec<u64>>,
    /// sluice: bytes of `cache`'s tensors.
    bytes: usize,
}

impl CacheElement {
    fn can_rewind_to(&self, len: usize) -> bool {
        self.cache
            .iter()
            .flatten()
            .all(|layer| layer.try_set_len(len).is_ok())
    }
}

pub struct PrefixCacheManagerV2 {
    caches: IndexMap<Tokens, CacheElement>,
    paged_recurrent_caches: IndexMap<Vec<BlockHash>, Vec<RecurrentStateSnapshot>>,
    n_on_device: usize,
    no_prefix_cache: bool,
    has_paged_attention: bool,
    /// sluice: the byte budget and the counts the embedder reads.
    meter: Arc<PrefixCacheMeter>,
    /// sluice: bytes held by `caches` (mirrored into `meter`).
    bytes: usize,
}

#[derive(Clone)]
pub enum MatchingCache {
    Normal {
        normal: Vec<Option<KvCache>>,
        recurrent_snapshots: Option<Vec<RecurrentStateSnapshot>>,
        images_to_keep: usize,
        audios_to_keep: usize,
        videos_to_keep: usize,
        toks: Vec<u32>,
        offset: usize,
    },
}

impl PrefixCacheManagerV2 {
    pub fn new(
        n_on_device: usize,
        no_prefix_cache: bool,
        has_paged_attention: bool,
        meter: Arc<PrefixCacheMeter>,
    ) -> Self {
        if !no_prefix_cache && !has_paged_attention {
            info!("Prefix caching enabled (sequence-level, non-paged attention). Expect higher multi-turn throughput for both text and multimodal.");
        }
        PrefixCacheManagerV2 {
            caches: IndexMap::new(),
            paged_recurrent_caches: IndexMap::new(),
            n_on_device,
            no_prefix_cache,
            has_paged_attention,
            meter,
            bytes: 0,
        }
    }

    /// sluice: publishes what the cache holds.
    fn publish(&self) {
        self.meter.bytes.store(self.bytes, Ordering::Relaxed);
        self.meter
            .entries
            .store(self.caches.len(), Ordering::Relaxed);
    }

    fn paged_recurrent_capacity(&self) -> usize {
        self.n_on_device.max(1).saturating_mul(8)
    }

    /// Keeps a finished sequence's KV cache for later prompts that share its prefix, as the
    /// most recently used entry.
    ///
    /// sluice: the entry is a compacted copy ([`compact`]) and counts against the byte budget
    /// as well as the entry bound; [`Self::evict_caches`] then drops the least recently used
    /// entries until both hold. An entry larger than the whole budget is not kept.
    pub fn add_sequence(
        &mut self,
        seq: &mut Sequence,
        recurrent_snapshots: Option<Vec<RecurrentStateSnapshot>>,
    ) {
        // Do not cache if prefix caching disabled
        if self.no_prefix_cache {
            return;
        }

        // For paged attention, prefix caching is handled by the KVCacheManager.
        // PrefixCacheManagerV2 only handles non-paged attention caching.
        if !self.has_paged_attention {
            let cache = match seq
                .normal_cache()
                .iter()
                .map(|layer| layer.as_ref().map(compact).transpose())
                .collect::<Result<Vec<_>>>()
            {
                Ok(cache) => cache,
                Err(e) => {
                    tracing::warn!("prefix cache: could not copy a sequence's KV cache: {e}");
                    return;
                }
            };
            let bytes = kv_bytes(&cache);
            self.insert(
                seq.get_toks().to_vec().into(),
                CacheElement {
                    cache,
                    recurrent_snapshots,
                    image_hashes: seq.image_hashes().map(|x| x.to_vec()),
                    audio_hashes: seq.audio_hashes().map(|x| x.to_vec()),
                    video_hashes: seq.video_hashes().map(|x| x.to_vec()),
                    bytes,
                },
            );
        }
    }

    /// sluice: keeps `element` as the most recently used entry, unless it alone exceeds the
    /// byte budget, and evicts what no longer fits, so that what the meter shows is always
    /// within both bounds.
    fn insert(&mut self, key: Tokens, element: CacheElement) {
        if let Some(old) = self.caches.shift_remove(&key) {
            self.bytes -= old.bytes;
        }
        if element.bytes <= self.meter.max_bytes {
            self.bytes += element.bytes;
            self.caches.insert(key, element);
        }
        // Cannot fail: eviction only drops entries.
        let _ = self.evict_caches();
    }

    /// Evicts the least recently used entries until at most `n_on_device` remain and they
    /// hold at most the byte budget. Returns the number of evicted sequences.
    ///
    /// sluice: upstream counted only entries on a GPU, so on the CPU the cache grew by one
    /// sequence's KV cache (about 23 MB on the demo model) per request until the pod was
    /// OOM-killed. Every entry counts now, wherever it lives.
    pub fn evict_caches(&mut self) -> Result<usize> {
        if self.no_prefix_cache {
            return Ok(0);
        }
        let mut n_evicted = 0;
        while self.caches.len() > self.n_on_device || self.bytes > self.meter.max_bytes {
            // Oldest first: entries are moved to the back when used.
            let Some((_, evicted)) = self.caches.shift_remove_index(0) else {
                break;
            };
            self.bytes -= evicted.bytes;
            n_evicted += 1;
        }
        self.meter
            .evictions
            .fetch_add(n_evicted as u64, Ordering::Relaxed);
        self.publish();
        Ok(n_evicted)
    }

    /// Evict all the caches.
    pub fn evict_all_caches(&mut self) -> Result<usize> {
        let len = self.caches.len();
        self.caches.clear();
        self.paged_recurrent_caches.clear();
        self.bytes = 0;
        self.meter
            .evictions
            .fetch_add(len as u64, Ordering::Relaxed);
        self.publish();
        Ok(len)
    }

    /// Add a recurrent-state snapshot for a paged-attention block-hash prefix key.
    /// This is used by hybrid models to restore recurrent states alongside paged KV prefix hits.
    pub fn add_paged_recurrent_prefix(
        &mut self,
        key: Vec<BlockHash>,
        snapshots: Vec<RecurrentStateSnapshot>,
    ) {
        if self.no_prefix_cache
            || !self.has_paged_attention
            || key.is_empty()
            || snapshots.is_empty()
        {
            return;
        }

        // Maintain LRU order by reinserting on update.
        let _ = self.paged_recurrent_caches.shift_remove(&key);
        self.paged_recurrent_caches.insert(key, snapshots);

        while self.paged_recurrent_caches.len() > self.paged_recurrent_capacity() {
            let _ = self.paged_recurrent_caches.shift_remove_index(0);
        }
    }

    /// Lookup a recurrent-state snapshot for a paged-attention block-hash prefix key.
    /// Returns a cloned snapshot and updates LRU order.
    pub fn get_paged_recurrent_prefix(
        &mut self,
        key: &[BlockHash],
    ) -> Option<Vec<RecurrentStateSnapshot>> {
        if self.no_prefix_cache || !self.has_paged_attention || key.is_empty() {
            return None;
        }

        let key = key.to_vec();
        let snapshots = self.paged_recurrent_caches.shift_remove(&key)?;
        let out = snapshots.clone();
        self.paged_recurrent_caches.insert(key, snapshots);
        Some(out)
    }

    /// Search for a matching cache given some tokens. Image-containing sequences are now cached too.
    pub fn search_for_matching_cache(
        &mut self,
        toks: &[u32],
        image_hashes: Option<&[u64]>,
        audio_hashes: Option<&[u64]>,
        video_hashes: Option<&[u64]>,
    ) -> Result<Option<MatchingCache>> {
        // Do not search if prefix caching disabled or no tokens
        if self.no_prefix_cache || toks.is_empty() {
            return Ok(None);
        }

        if self.has_paged_attention {
            // For paged attention, prefix caching is handled by the KVCacheManager.
            // PrefixCacheManagerV2 only handles non-paged attention caching.
            return Ok(None);
        }

        let toks = Tokens(toks.to_vec());

        let mut best_match: Option<(usize, usize, usize, usize, usize)> = None;
        for (index, (k, v)) in self.caches.iter().enumerate() {
            let match_len = toks.shared_prefix_len(k);
            if match_len == 0 {
                continue;
            }

            let images_match_until = match image_hashes {
                Some(input_hashes) => match &v.image_hashes {
                    Some(cached_hashes) => input_hashes
                        .iter()
                        .zip(cached_hashes)
                        .take_while(|(a, b)| a == b)
                        .count(),
                    None => 0,
                },
                None => 0,
            };

            let audios_match_until = match audio_hashes {
                Some(input_hashes) => match &v.audio_hashes {
                    Some(cached_hashes) => input_hashes
                        .iter()
                        .zip(cached_hashes)
                        .take_while(|(a, b)| a == b)
                        .count(),
                    None => 0,
                },
                None => 0,
            };

            // Vision/audio models can use repeated placeholder tokens (e.g. <image_soft_token>)
            // that are identical regardless of the actual image/audio content. This means
            // token-level matching can extend through image/audio regions even when the
            // underlying content differs, leaving stale vision/audio encoder outputs in the
            // KV cache. Skip entries where any overlapping images or audios diverge.
            let cached_image_count = v.image_hashes.as_ref().map_or(0, |h| h.len());
            let input_image_count = image_hashes.map_or(0, |h| h.len());
            if images_match_until < input_image_count.min(cached_image_count) {
                continue;
            }

            let cached_audio_count = v.audio_hashes.as_ref().map_or(0, |h| h.len());
            let input_audio_count = audio_hashes.map_or(0, |h| h.len());
            if audios_match_until < input_audio_count.min(cached_audio_count) {
                continue;
            }

            let videos_match_until = match video_hashes {
                Some(input_hashes) => match &v.video_hashes {
                    Some(cached_hashes) => input_hashes
                        .iter()
                        .zip(cached_hashes)
                        .take_while(|(a, b)| a == b)
                        .count(),
                    None => 0,
                },
                None => 0,
            };

            let cached_video_count = v.video_hashes.as_ref().map_or(0, |h| h.len());
            let input_video_count = video_hashes.map_or(0, |h| h.len());
            if videos_match_until < input_video_count.min(cached_video_count) {
                continue;
            }

            // Sliding/rotating caches only retain a fixed tail. If a cache has already
            // truncated older tokens, it can still safely serve an exact extension of the
            // cached prefix, but it cannot be rewound to an earlier logical length. Skip such
            // candidates here so a rolled-over cache does not block a shorter valid prefix hit.
            if !v.can_rewind_to(match_len) {
                continue;
            }

            if best_match
                .as_ref()
                .is_none_or(|(len, _, _, _, _)| match_len > *len)
            {
                best_match = Some((
                    match_len,
                    index,
                    images_match_until,
                    audios_match_until,
                    videos_match_until,
                ));
            }
        }

        if let Some((
            match_len,
            index,
            images_match_until,
            audios_match_until,
            videos_match_until,
        )) = best_match
        {
            let new_toks = toks.0[match_len..].to_vec();
            if new_toks.is_empty() {
                self.meter.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            // sluice: the entry becomes the most recently used.
            let last = self.caches.len() - 1;
            self.caches.move_index(index, last);
            let cache_element = &self.caches[last];

            // Count how many input images are not already cached
            let images_to_keep = if let Some(input_hashes) = image_hashes {
                input_hashes.len().saturating_sub(images_match_until)
            } else {
                0
            };
            let audios_to_keep = if let Some(input_hashes) = audio_hashes {
                input_hashes.len().saturating_sub(audios_match_until)
            } else {
                0
            };
            let videos_to_keep = if let Some(input_hashes) = video_hashes {
                input_hashes.len().saturating_sub(videos_match_until)
            } else {
                0
            };
            let normal = cache_element
                .cache
                .iter()
                .map(|layer| layer.as_ref().map(|l| restore(l, match_len)).transpose())
                .collect::<Result<Vec<_>>>()?;
            self.meter.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Some(MatchingCache::Normal {
                normal,
                recurrent_snapshots: cache_element.recurrent_snapshots.clone(),
                images_to_keep,
                audios_to_keep,
                videos_to_keep,
                toks: new_toks,
                offset: match_len,
            }));
        }

        self.meter.misses.fetch_add(1, Ordering::Relaxed);
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use candle_core::{DType, Device, IndexOp, Tensor};

    use super::{
        compact, kv_bytes, CacheElement, MatchingCache, PrefixCacheManagerV2, PrefixCacheMeter,
    };
    use crate::kv_cache::{KvCache, NormalCache, RotatingCache, SingleCache};

    fn make_cache_tensor(len: usize) -> candle_core::Result<Tensor> {
        Tensor::zeros((1, 1, len, 1), DType::F32, &Device::Cpu)
    }

    fn make_rotating_kv_cache(
        logical_len: usize,
        sliding_window: usize,
    ) -> candle_core::Result<KvCache> {
        let src = make_cache_tensor(logical_len)?;
        let mut k = RotatingCache::new(2, sliding_window, sliding_window);
        let mut v = RotatingCache::new(2, sliding_window, sliding_window);
        let _ = k.append(&src)?;
        let _ = v.append(&src)?;
        Ok(KvCache::Rotating { k, v })
    }

    fn make_normal_kv_cache(logical_len: usize) -> candle_core::Result<KvCache> {
        let src = make_cache_tensor(logical_len)?;
        let mut k = SingleCache::new(2, logical_len, logical_len);
        let mut v = SingleCache::new(2, logical_len, logical_len);
        k.append(&src)?;
        v.append(&src)?;
        Ok(KvCache::Normal { k, v })
    }

    #[test]
    fn skips_rolled_over_rotating_candidate_that_cannot_rewind() -> candle_core::Result<()> {
        let mut prefix_cacher = PrefixCacheManagerV2::new(1, false, false, Arc::default());

        prefix_cacher.caches.insert(
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10].into(),
            CacheElement {
                cache: vec![Some(make_rotating_kv_cache(10, 4)?)],
                recurrent_snapshots: None,
                audio_hashes: None,
                image_hashes: None,
                video_hashes: None,
                bytes: 0,
            },
        );
        prefix_cacher.caches.insert(
            vec![1, 2, 3, 4, 5, 9].into(),
            CacheElement {
                cache: vec![Some(make_normal_kv_cache(6)?)],
                recurrent_snapshots: None,
                audio_hashes: None,
                image_hashes: None,
                video_hashes: None,
                bytes: 0,
            },
        );

        let hit = prefix_cacher.search_for_matching_cache(
            &[1, 2, 3, 4, 5, 6, 7, 99],
            None,
            None,
            None,
        )?;

        match hit {
            Some(MatchingCache::Normal { toks, offset, .. }) => {
                assert_eq!(offset, 5);
                assert_eq!(toks, vec![6, 7, 99]);
            }
            None => panic!("expected a shorter valid prefix-cache hit"),
        }

        Ok(())
    }

    #[test]
    fn allows_exact_extension_from_rolled_over_rotating_cache() -> candle_core::Result<()> {
        let mut prefix_cacher = PrefixCacheManagerV2::new(1, false, false, Arc::default());

        prefix_cacher.caches.insert(
            vec![1, 2, 3, 4, 5, 6, 7, 8, 9, 10].into(),
            CacheElement {
                cache: vec![Some(make_rotating_kv_cache(10, 4)?)],
                recurrent_snapshots: None,
                audio_hashes: None,
                image_hashes: None,
                video_hashes: None,
                bytes: 0,
            },
        );

        let hit = prefix_cacher.search_for_matching_cache(
            &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
            None,
            None,
            None,
        )?;

        match hit {
            Some(MatchingCache::Normal { toks, offset, .. }) => {
                assert_eq!(offset, 10);
                assert_eq!(toks, vec![11]);
            }
            None => panic!("expected exact-extension prefix-cache hit"),
        }

        Ok(())
    }

    // sluice: the bounds, the compaction and the restored capacity.

    /// A sequence's layer as the engine leaves it: `len` positions written into a cache of
    /// `capacity` (one KV head, head size 2; position `i` holds `i`).
    fn written(len: usize, capacity: usize) -> candle_core::Result<KvCache> {
        let mut k = SingleCache::new(2, 4096, capacity);
        let mut v = SingleCache::new(2, 4096, capacity);
        let src = Tensor::arange(0f32, len as f32, &Device::Cpu)?
            .reshape((1, 1, len, 1))?
            .repeat((1, 1, 1, 2))?;
        k.append(&src)?;
        v.append(&src)?;
        Ok(KvCache::Normal { k, v })
    }

    fn entry(len: usize) -> candle_core::Result<CacheElement> {
        let cache = vec![Some(compact(&written(len, 512)?)?)];
        Ok(CacheElement {
            bytes: kv_bytes(&cache),
            cache,
            recurrent_snapshots: None,
            audio_hashes: None,
            image_hashes: None,
            video_hashes: None,
        })
    }

    fn key(first: u32, len: usize) -> super::Tokens {
        (first..first + len as u32).collect::<Vec<_>>().into()
    }

    #[test]
    fn kept_entries_hold_only_their_positions_in_storage_of_their_own() -> candle_core::Result<()> {
        let layer = written(10, 512)?;
        let kept = compact(&layer)?;
        // 10 positions x 2 floats x 4 bytes, for K and for V; not the 512-position capacity.
        assert_eq!(kv_bytes(&[Some(kept.clone())]), 2 * 10 * 2 * 4);
        let (KvCache::Normal { k: before, .. }, KvCache::Normal { k: after, .. }) = (&layer, &kept)
        else {
            panic!("normal caches")
        };
        let (before, after) = (
            before.all_data.as_ref().unwrap(),
            after.all_data.as_ref().unwrap(),
        );
        let written = before
            .i((.., .., ..10, ..))?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(after.flatten_all()?.to_vec1::<f32>()?, written);
        // A later write to the sequence's cache does not reach the kept copy.
        before.slice_set(&Tensor::full(99f32, (1, 1, 1, 2), &Device::Cpu)?, 2, 0)?;
        assert_eq!(after.flatten_all()?.to_vec1::<f32>()?, written);
        Ok(())
    }

    #[test]
    fn the_entry_bound_holds_on_the_cpu() -> candle_core::Result<()> {
        let meter = Arc::new(PrefixCacheMeter::default());
        let mut cacher = PrefixCacheManagerV2::new(2, false, false, meter.clone());
        for first in 0..5 {
            cacher.insert(key(first * 100, 10), entry(10)?);
            cacher.evict_caches()?;
        }
        assert_eq!(cacher.caches.len(), 2);
        assert_eq!((meter.entries(), meter.evictions()), (2, 3));
        assert_eq!(meter.bytes(), 2 * kv_bytes(&entry(10)?.cache));
        // The newest two stay.
        assert!(cacher.caches.contains_key(&key(300, 10)));
        assert!(cacher.caches.contains_key(&key(400, 10)));
        Ok(())
    }

    #[test]
    fn the_byte_bound_evicts_the_least_recently_used() -> candle_core::Result<()> {
        let one = kv_bytes(&entry(10)?.cache);
        let meter = Arc::new(PrefixCacheMeter::new(2 * one + one / 2));
        let mut cacher = PrefixCacheManagerV2::new(16, false, false, meter.clone());
        cacher.insert(key(0, 10), entry(10)?);
        cacher.insert(key(100, 10), entry(10)?);
        // A hit on the older entry makes it the most recently used...
        let hit = cacher.search_for_matching_cache(&[0, 1, 2, 3, 4, 5, 99], None, None, None)?;
        assert!(matches!(hit, Some(MatchingCache::Normal { offset: 6, .. })));
        // ... so the third entry evicts the other one.
        cacher.insert(key(200, 10), entry(10)?);
        cacher.evict_caches()?;
        assert!(cacher.caches.contains_key(&key(0, 10)));
        assert!(!cacher.caches.contains_key(&key(100, 10)));
        assert_eq!(meter.bytes(), 2 * one);
        assert_eq!((meter.hits(), meter.misses(), meter.evictions()), (1, 0, 1));
        // An entry larger than the whole budget is not kept, and evicts nothing.
        cacher.insert(key(300, 40), entry(40)?);
        assert_eq!(cacher.caches.len(), 2);
        assert!(cacher
            .search_for_matching_cache(&[300, 301, 7], None, None, None)?
            .is_none());
        assert_eq!(meter.misses(), 1);
        Ok(())
    }

    #[test]
    fn a_hit_restores_the_capacity_a_fresh_sequence_of_that_length_has() -> candle_core::Result<()>
    {
        let mut cacher = PrefixCacheManagerV2::new(4, false, false, Arc::default());
        cacher.insert(key(0, 10), entry(10)?);
        let Some(MatchingCache::Normal {
            normal,
            offset,
            toks,
            ..
        }) = cacher.search_for_matching_cache(&[0, 1, 2, 3, 4, 5, 6, 50, 51], None, None, None)?
        else {
            panic!("expected a hit")
        };
        assert_eq!((offset, toks), (7, vec![50, 51]));
        let Some(KvCache::Normal { k, .. }) = &normal[0] else {
            panic!("a normal cache")
        };
        let block = NormalCache::CACHE_GROW_SIZE;
        assert_eq!((k.current_seq_len, k.capacity_seq_len), (7, block));
        let data = k.all_data.as_ref().unwrap();
        assert_eq!(data.dims(), &[1, 1, block, 2]);
        assert_eq!(
            data.i((0, 0, ..7, 0))?.to_vec1::<f32>()?,
            vec![0., 1., 2., 3., 4., 5., 6.]
        );
        Ok(())
    }
}

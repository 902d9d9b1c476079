//! The response cache on the request path: which requests it may answer, their key, and the
//! cache's limits following the config in force (`spec.cache`, hot-reloaded like the rest).
//!
//! Only greedy requests (temperature 0, the model's default or the request's) and seeded ones
//! are cached: they are the ones whose answer is a function of the request (a seed reproduces
//! a sampled answer on the same pod and dtype, and the cache is per pod). The key is the
//! prompt as the engine sees it (chat template applied, tokenized: two requests that differ
//! only in JSON spelling or in fields that change nothing share it), the sampling and stopping
//! parameters, the route, this pod's variant and the caller's tenant (unless the cache is
//! shared): one tenant never sees what another asked.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use sluice_crds::sidecar_config::CacheConfig;

use crate::{
    cache::{CacheKey, CacheMetrics, Lookup, ResponseCache},
    engine::{GenerationParams, TokenizedPrompt},
    openai::Kind,
    stream::Answer,
};

/// The response cache of one sidecar, sized by the config in force.
#[derive(Debug)]
pub struct AnswerCache {
    cache: ResponseCache<Arc<Answer>>,
    /// The limits last applied (`None` until the cache is first used).
    applied: Mutex<Option<CacheConfig>>,
    /// Whether limits are applied (read without the lock on every request of a model that
    /// has no cache).
    active: AtomicBool,
}

/// What the key of one request is made of.
#[derive(Debug)]
pub struct CacheRequest<'a> {
    /// Chat or text completion.
    pub kind: Kind,
    /// This pod's variant (variants may differ in weights or quantization).
    pub variant: &'a str,
    /// The caller's tenant (`None`: no identity, everyone is anonymous).
    pub tenant: Option<&'a str>,
    /// The prompt as the engine sees it.
    pub prompt: &'a TokenizedPrompt,
    /// Sampling and stopping, defaults applied.
    pub params: &'a GenerationParams,
}

impl AnswerCache {
    /// An empty cache whose metrics are `metrics`.
    pub fn new(metrics: CacheMetrics) -> Self {
        Self {
            cache: ResponseCache::new(0, Duration::ZERO, metrics),
            applied: Mutex::new(None),
            active: AtomicBool::new(false),
        }
    }

    /// Looks `request` up under `config` (the config's `cache`; `None`: off): `None` when the
    /// cache is off or the request is not deterministic, else a hit (another request's answer,
    /// maybe after waiting for it) or the duty to fill the entry.
    pub async fn lookup(
        &self,
        config: Option<&CacheConfig>,
        request: &CacheRequest<'_>,
    ) -> Option<Lookup<Arc<Answer>>> {
        let Some(config) = config else {
            // A load first: on a model without a cache this runs on every request, and a swap
            // would write the shared flag each time.
            if self.active.load(Ordering::Relaxed) && self.active.swap(false, Ordering::Relaxed) {
                // Turned off: give the memory back.
                self.cache.set_limits(0, Duration::ZERO);
                *self.applied.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
            return None;
        };
        // Log-probabilities are not kept with an answer.
        let deterministic =
            request.params.temperature == Some(0.0) || request.params.seed.is_some();
        if !deterministic || request.params.logprobs.is_some() {
            return None;
        }
        self.apply(config);
        let tokens: Vec<u8> = request
            .prompt
            .tokens()
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
        // Debug spells every field of the parameters; the key never leaves this process.
        let params = format!("{:?}", request.params);
        let parts: [&[u8]; 4] = [
            request.kind.path().as_bytes(),
            request.variant.as_bytes(),
            &tokens,
            params.as_bytes(),
        ];
        let key = match (config.shared, request.tenant) {
            (false, Some(tenant)) => CacheKey::new(tenant, &parts),
            _ => CacheKey::shared(&parts),
        };
        Some(self.cache.lookup(key).await)
    }

    /// Resizes the cache when the config's limits changed.
    fn apply(&self, config: &CacheConfig) {
        let mut applied = self.applied.lock().unwrap_or_else(|e| e.into_inner());
        if applied.as_ref() != Some(config) {
            self.cache.set_limits(
                usize::try_from(config.max_bytes).unwrap_or(usize::MAX),
                Duration::from_secs(config.ttl_seconds.into()),
            );
            *applied = Some(*config);
            self.active.store(true, Ordering::Relaxed);
        }
    }
}

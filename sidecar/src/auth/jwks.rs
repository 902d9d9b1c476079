//! JWT issuers' key sets: from a mounted file (read with the config, re-read when it changes,
//! see [`crate::reload`]), or fetched from the issuer's `jwks_uri` ([`RemoteKeySet`]) and kept
//! fresh by a background task: every [`REFRESH_EVERY`], and at once, at most every
//! [`REFETCH_AT_MOST_EVERY`], when a token names a key the set lacks (the issuer rotated).
//! A failed fetch keeps the last good set.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock, Weak},
    time::Duration,
};

use jsonwebtoken::jwk::JwkSet;
use tokio::sync::Notify;

/// How often a fetched key set is refreshed.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// The least time between two fetches triggered by unknown keys.
pub const REFETCH_AT_MOST_EVERY: Duration = Duration::from_secs(30);
/// How soon a fetch that failed with no key set yet is retried.
const RETRY_WITHOUT_KEYS: Duration = Duration::from_secs(5);
/// The largest key set accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;
/// How long one fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Parses a JSON Web Key Set.
pub fn parse(text: &[u8]) -> Result<JwkSet, String> {
    serde_json::from_slice(text).map_err(|e| format!("not a JSON Web Key Set: {e}"))
}

/// The key sets fetched from URLs, one per URL for the process: configs that name the same URL
/// share it, so a reload neither refetches nor loses it.
#[derive(Debug, Default)]
pub struct KeySets {
    sets: Mutex<HashMap<String, Weak<RemoteKeySet>>>,
}

/// One issuer's key set at a URL, as last fetched.
#[derive(Debug)]
pub struct RemoteKeySet {
    uri: String,
    keys: RwLock<Option<Arc<JwkSet>>>,
    /// Shared with the refresh task, which holds the set itself only while it fetches.
    refresh: Arc<Notify>,
}

// === impl KeySets ===

impl KeySets {
    /// The key set at `uri`, its refresh task started when new (within a tokio runtime; the
    /// task ends when no config names the URL any more).
    pub fn get(&self, uri: &str) -> Arc<RemoteKeySet> {
        let mut sets = self.sets.lock().unwrap_or_else(|p| p.into_inner());
        sets.retain(|_, set| set.strong_count() > 0);
        if let Some(set) = sets.get(uri).and_then(Weak::upgrade) {
            return set;
        }
        let set = Arc::new(RemoteKeySet {
            uri: uri.to_owned(),
            keys: RwLock::new(None),
            refresh: Arc::new(Notify::new()),
        });
        sets.insert(uri.to_owned(), Arc::downgrade(&set));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(keep_fresh(Arc::downgrade(&set), set.refresh.clone()));
        }
        set
    }
}

// === impl RemoteKeySet ===

impl RemoteKeySet {
    /// The set as last fetched (`None`: not fetched yet).
    pub fn keys(&self) -> Option<Arc<JwkSet>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks for a fetch soon: a token named a key the set lacks.
    pub fn request_refresh(&self) {
        self.refresh.notify_one();
    }

    /// The URL.
    pub fn uri(&self) -> &str {
        &self.uri
    }
}

/// Fetches the set now, then every [`REFRESH_EVERY`] or when asked (`refresh`), until no
/// config names it any more (seen at its next wake-up).
async fn keep_fresh(set: Weak<RemoteKeySet>, refresh: Arc<Notify>) {
    let client = match reqwest::Client::builder()
        .timeout(FETCH_TIMEOUT)
        .user_agent(concat!("sluice-sidecar/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build the HTTP client for JWKS fetches");
            return;
        }
    };
    loop {
        let Some(strong) = set.upgrade() else { return };
        let fetched_at = tokio::time::Instant::now();
        let have_keys = match fetch(&client, &strong.uri).await {
            Ok(keys) => {
                tracing::info!(uri = %strong.uri, keys = keys.keys.len(), "JWKS fetched");
                *strong.keys.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(keys));
                true
            }
            Err(error) => {
                tracing::warn!(uri = %strong.uri, %error, "JWKS fetch failed; keeping the keys in force");
                strong.keys().is_some()
            }
        };
        drop(strong);
        let wait = if have_keys {
            REFRESH_EVERY
        } else {
            RETRY_WITHOUT_KEYS
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = refresh.notified() => {
                // Asked early: still keep the minimum spacing from the last fetch (tokens
                // naming unknown keys must not turn into a fetch each).
                tokio::time::sleep_until(fetched_at + REFETCH_AT_MOST_EVERY.min(wait)).await;
            }
        }
    }
}

async fn fetch(client: &reqwest::Client, uri: &str) -> Result<JwkSet, String> {
    let response = client
        .get(uri)
        .send()
        .await
        .map_err(|e| format!("GET {uri}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {uri}: status {}", response.status()));
    }
    if response
        .content_length()
        .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
    {
        return Err(format!("GET {uri}: larger than {MAX_JWKS_BYTES} bytes"));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| format!("GET {uri}: {e}"))?;
    if body.len() > MAX_JWKS_BYTES {
        return Err(format!("GET {uri}: larger than {MAX_JWKS_BYTES} bytes"));
    }
    parse(&body)
}

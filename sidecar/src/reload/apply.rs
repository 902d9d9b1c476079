//! Applying a config document: parsed, checked (its keys file read), compiled against the
//! policy in force and published to every request at once; a rejected one changes nothing but
//! the error counter.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use http::HeaderName;
use sluice_crds::SidecarConfig;
use tokio::sync::watch;

use super::metrics::ReloadMetrics;
use crate::{
    auth::{
        KeyRing, KeySets, jwks,
        jwt::{Issuer, IssuerKeys},
    },
    limits::{Identity, Limiter, Policy, PolicySlot, table::DEFAULT_MAX_ENTRIES},
    readiness::Readiness,
};

/// Parses, checks and publishes config documents; remembers what is in force.
#[derive(Debug)]
pub struct Reloader {
    pub(super) limiter: Limiter,
    metrics: ReloadMetrics,
    policy: watch::Sender<PolicySlot>,
    config: watch::Sender<Arc<SidecarConfig>>,
    pub(super) readiness: Readiness,
    state: Mutex<State>,
    max_entries: usize,
    /// JWT key sets fetched from URLs, shared by the configs that name them.
    key_sets: KeySets,
}

#[derive(Debug, Default)]
struct State {
    /// The text in force, to recompile when only a key file changes.
    text: Option<String>,
    /// The key files (API keys, JWT key sets) named by the config in force, and their
    /// contents when last read.
    key_files: KeyFiles,
}

/// The largest key file read: a mounted Secret or ConfigMap holds at most 1 MiB, and a path
/// that names something endless (`/dev/zero`) must fail, not fill the memory.
const MAX_KEY_FILE_BYTES: u64 = 8 << 20;

/// Files read with a config: (path, contents).
type KeyFiles = Vec<(String, Vec<u8>)>;

// === impl Reloader ===

impl Reloader {
    /// A reloader publishing to `policy` (the limiter's channel) and `config` (the request
    /// path's document), flipping `readiness`' config latch. Its metrics are unregistered
    /// until [`Reloader::with_metrics`].
    pub fn new(
        limiter: Limiter,
        policy: watch::Sender<PolicySlot>,
        config: watch::Sender<Arc<SidecarConfig>>,
        readiness: Readiness,
    ) -> Self {
        Self {
            limiter,
            metrics: ReloadMetrics::default(),
            policy,
            config,
            readiness,
            state: Mutex::default(),
            max_entries: DEFAULT_MAX_ENTRIES,
            key_sets: KeySets::default(),
        }
    }

    /// The same reloader counting in `metrics` (registered ones).
    pub fn with_metrics(self, metrics: ReloadMetrics) -> Self {
        Self { metrics, ..self }
    }

    /// Its metrics.
    pub fn metrics(&self) -> &ReloadMetrics {
        &self.metrics
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies a document: on success it is in force when this returns (its generation is
    /// returned); on failure nothing changes but the error counter.
    pub fn apply(&self, source: &str, text: &str) -> Result<u64, String> {
        let started = Instant::now();
        let result = self.compile(text);
        match result {
            Ok((policy, key_files)) => {
                let generation = policy.config.generation;
                let rules = policy.rules.len();
                let config = policy.config.clone();
                self.limiter.publish(&self.policy, policy);
                self.config.send_replace(config);
                {
                    let mut state = self.state();
                    state.text = Some(text.to_owned());
                    state.key_files = key_files;
                }
                self.metrics.generation.set(generation as i64);
                self.metrics.reloads.inc();
                self.readiness.set_config_valid(true);
                tracing::info!(
                    source,
                    generation,
                    rules,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "config applied"
                );
                Ok(generation)
            }
            Err(reason) => {
                self.metrics.reload_errors.inc();
                tracing::warn!(
                    source,
                    %reason,
                    "config rejected; the last good config stays in force"
                );
                Err(reason)
            }
        }
    }

    /// Parses `text`, reads its key files and compiles it against the policy in force.
    fn compile(&self, text: &str) -> Result<(Policy, KeyFiles), String> {
        let config = SidecarConfig::from_yaml(text).map_err(|e| e.to_string())?;
        let mut files = KeyFiles::new();
        let identity = match &config.auth {
            // `auth` identifies callers; `identity` (a policy's) is not used.
            Some(auth) => {
                let keys = match &auth.keys_file {
                    Some(path) => Some(read_keys("auth.keysFile", path, &mut files)?),
                    None => None,
                };
                let mut issuers = Vec::with_capacity(auth.jwt.len());
                for j in &auth.jwt {
                    let keys = match (&j.jwks_file, &j.jwks_uri) {
                        (Some(path), _) => {
                            let what = format!("auth.jwt {:?} jwksFile {path}", j.issuer);
                            let bytes = read_file(&what, path, &mut files)?;
                            let set = jwks::parse(&bytes).map_err(|e| format!("{what}: {e}"))?;
                            IssuerKeys::File(Arc::new(set))
                        }
                        (None, Some(uri)) => IssuerKeys::Remote(self.key_sets.get(uri)),
                        (None, None) => unreachable!("validate() requires a key source"),
                    };
                    issuers.push(Issuer::new(j.clone(), keys));
                }
                Identity::with_auth(auth, keys, issuers)
            }
            None => {
                let keys = match &config.identity.keys_file {
                    Some(path) => Some(read_keys("identity.keysFile", path, &mut files)?),
                    None => None,
                };
                if let Some(name) = &config.identity.header {
                    HeaderName::from_bytes(name.as_bytes())
                        .map_err(|e| format!("identity.header {name:?}: {e}"))?;
                }
                Identity::new(&config.identity, keys)?
            }
        };
        let prev = self.policy.borrow().clone();
        let policy = Policy::compile(
            Arc::new(config),
            Arc::new(identity),
            prev.as_deref(),
            self.limiter.now(),
            self.max_entries,
        );
        Ok((policy, files))
    }

    /// Serves `config` without a document having been validated (no source configured, or
    /// `--allow-unlimited` while the source has no valid one yet).
    pub fn install_default(&self, config: SidecarConfig, reason: &str) {
        let config = Arc::new(config);
        let policy = Policy::compile(
            config.clone(),
            Arc::new(Identity::open()),
            None,
            self.limiter.now(),
            self.max_entries,
        );
        self.limiter.publish(&self.policy, policy);
        self.config.send_replace(config);
        self.readiness.set_config_valid(true);
        tracing::info!(reason, "serving without rate limits");
    }

    /// Whether a document (not the built-in default) is in force.
    pub fn has_document(&self) -> bool {
        self.state().text.is_some()
    }

    /// Re-reads the key files of the config in force (API keys, JWT key sets); recompiles
    /// when one changed.
    pub fn check_key_files(&self) {
        let (files, text) = {
            let state = self.state();
            match &state.text {
                Some(text) if !state.key_files.is_empty() => {
                    (state.key_files.clone(), text.clone())
                }
                _ => return,
            }
        };
        for (path, seen) in &files {
            match read_key_file(path) {
                Ok(bytes) if bytes == *seen => {}
                Ok(_) => {
                    // A rejected file leaves the old keys in force (and is counted) like a bad
                    // document; remember the rejected bytes so it is counted once.
                    if self.apply("key file", &text).is_err() {
                        let mut state = self.state();
                        for (path, seen) in &mut state.key_files {
                            if let Ok(bytes) = read_key_file(path) {
                                *seen = bytes;
                            }
                        }
                    }
                    return;
                }
                Err(error) => {
                    tracing::debug!(%error, path, "key file unreadable; keeping the keys in force");
                }
            }
        }
    }
}

/// Reads the file at `path` (the field `what` names it), remembering it in `files`.
fn read_file(what: &str, path: &str, files: &mut KeyFiles) -> Result<Vec<u8>, String> {
    let bytes = read_key_file(path).map_err(|e| format!("{what} {path}: {e}"))?;
    files.push((path.to_owned(), bytes.clone()));
    Ok(bytes)
}

/// Reads a key file, refusing one over [`MAX_KEY_FILE_BYTES`].
fn read_key_file(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_KEY_FILE_BYTES} bytes"
        )));
    }
    Ok(bytes)
}

/// Reads and parses the API-key list at `path`.
fn read_keys(what: &str, path: &str, files: &mut KeyFiles) -> Result<KeyRing, String> {
    let bytes = read_file(what, path, files)?;
    let text = std::str::from_utf8(&bytes).map_err(|e| format!("{what} {path}: {e}"))?;
    KeyRing::from_yaml(text).map_err(|e| format!("{path}: {e}"))
}

#[cfg(test)]
pub(in crate::reload) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    pub(in crate::reload) const DOC: &str = "version: v1alpha1\nmodel: m\nvariants:\n  - name: default\n    weight: 100\nrules:\n  - name: rpm\n    requestsPerMinute: 2\n";

    /// A reloader on a fresh limiter, its policy channel and its readiness.
    pub(in crate::reload) fn reloader() -> (Arc<Reloader>, watch::Receiver<PolicySlot>, Readiness) {
        let limiter = Limiter::with_metrics(Default::default());
        let (ptx, prx) = watch::channel(None);
        let (ctx, _) = watch::channel(Arc::new(SidecarConfig::from_yaml(DOC).unwrap()));
        let readiness = Readiness::new();
        (
            Arc::new(Reloader::new(limiter, ptx, ctx, readiness.clone())),
            prx,
            readiness,
        )
    }

    #[test]
    fn invalid_documents_keep_the_last_good_one() {
        let (r, policy, readiness) = reloader();
        assert!(r.apply("test", "version: v9\n").is_err());
        assert!(policy.borrow().is_none());
        assert!(!readiness.is_ready(), "no valid config: not ready");
        r.apply("test", &DOC.replace("model: m", "generation: 42\nmodel: m"))
            .unwrap();
        let good = policy.borrow().clone().unwrap();
        for bad in [
            "{{{ not yaml",
            &DOC.replace("v1alpha1", "v2"),
            &DOC.replace("requestsPerMinute: 2", "requestsPerMinute: -2"),
            &DOC.replace("requestsPerMinute: 2", "requestsPerMinute: 0"),
            &DOC.replace("requestsPerMinute: 2", "requestsPerMinute: 2\n    typo: 1"),
            &DOC.replace(
                "model: m",
                "model: m\nidentity:\n  keysFile: /nonexistent/keys.yaml",
            ),
        ] {
            let reason = r.apply("test", bad).unwrap_err();
            assert!(!reason.is_empty());
            assert!(
                Arc::ptr_eq(policy.borrow().as_ref().unwrap(), &good),
                "{bad}"
            );
        }
        let m = r.metrics();
        assert_eq!(m.reload_errors.get(), 7);
        assert_eq!(m.generation.get(), 42);
    }

    #[test]
    fn a_thousand_rule_document_reloads_quickly() {
        let mut doc =
            String::from(DOC.trim_end_matches("  - name: rpm\n    requestsPerMinute: 2\n"));
        for i in 0..1000 {
            doc.push_str(&format!(
                "  - name: p/rule-{i}\n    per: Key\n    match:\n      tenants: [t{i}]\n    requestsPerMinute: {}\n    tokensPerMinute: 1000\n",
                i + 1
            ));
        }
        let (r, policy, _) = reloader();
        r.apply("test", &doc).unwrap();
        assert_eq!(policy.borrow().as_ref().unwrap().rules.len(), 1000);
        // Reloading with every rate changed keeps every table (by name).
        let before = policy.borrow().clone().unwrap();
        r.apply(
            "test",
            &doc.replace("tokensPerMinute: 1000", "tokensPerMinute: 2000"),
        )
        .unwrap();
        let after = policy.borrow().clone().unwrap();
        assert!(Arc::ptr_eq(
            &before.rules[999].limits[1].table,
            &after.rules[999].limits[1].table
        ));
        assert!(
            after.rules[999].limits[1].spec.prev.is_some(),
            "re-rated, not reset"
        );
    }

    #[test]
    fn a_changed_keys_file_is_picked_up() {
        let path = std::env::temp_dir().join(format!("sluice-keys-{}.yaml", std::process::id()));
        std::fs::write(&path, "- key: k1\n  tenant: a\n").unwrap();
        let doc = DOC.replace(
            "model: m",
            &format!("model: m\nidentity:\n  keysFile: {}", path.display()),
        );
        let (r, policy, _) = reloader();
        r.apply("test", &doc).unwrap();
        let identify = |key: &str| {
            policy
                .borrow()
                .as_ref()
                .unwrap()
                .identity
                .caller(Some(key))
                .map(|c| c.tenant.to_string())
        };
        assert_eq!(identify("k1").as_deref(), Ok("a"));
        assert!(identify("k2").is_err());
        r.check_key_files();
        assert_eq!(r.metrics().reloads.get(), 1, "unchanged: no reload");
        std::fs::write(&path, "- key: k2\n  tenant: b\n").unwrap();
        r.check_key_files();
        assert_eq!(identify("k2").as_deref(), Ok("b"));
        assert!(identify("k1").is_err());
        let _ = std::fs::remove_file(&path);
    }
}

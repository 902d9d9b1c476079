//! Config reload: the sidecar config document from a mounted file and/or a watched ConfigMap,
//! parsed, checked and compiled off the request path, then handed to every request at once
//! through `tokio::sync::watch`.
//!
//! - A **file** (`--config`) is re-read every [`POLL_INTERVAL`] by path. Opening the path anew
//!   each time follows Kubernetes' atomic `..data` symlink swap (the file's directory entry is
//!   a symlink into a new timestamped directory) as well as in-place writes; a read that catches
//!   an in-place write half-way is re-read before it counts as an error. The keys file named by
//!   `identity.keysFile` (a mounted Secret) is watched the same way.
//! - A **ConfigMap** (`--configmap NAMESPACE/NAME`) is watched through the API server with
//!   kube's watcher and a `metadata.name=NAME` field selector, so the pod's service account
//!   needs `get`/`list`/`watch` on that one ConfigMap only. The document is under the key
//!   `sidecar.yaml`.
//!
//! An invalid document (bad YAML, unknown version or fields, non-positive limits, an unreadable
//! keys file) is rejected: the last good config stays in force, the reason is logged,
//! `sluice_config_reload_errors_total` counts it and `sluice_config_generation` keeps the
//! generation in force.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sluice_crds::{SidecarConfig, sidecar_config::SIDECAR_CONFIG_KEY};
use tokio::sync::watch;

use crate::{
    identity::{Identity, KeyRing},
    limits::{Limiter, Policy, table::DEFAULT_MAX_ENTRIES},
    readiness::Readiness,
};

/// How often mounted files are re-read: a change is in force within this (plus parsing).
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// The policy channel's value: `None` while no valid config has been seen (and unlimited
/// serving was not allowed), so requests are refused and readiness is false.
pub type PolicySlot = Option<Arc<Policy>>;

/// Parses, checks and publishes config documents; remembers what is in force.
#[derive(Debug)]
pub struct Reloader {
    limiter: Limiter,
    policy: watch::Sender<PolicySlot>,
    config: watch::Sender<Arc<SidecarConfig>>,
    readiness: Readiness,
    state: Mutex<State>,
    max_entries: usize,
}

#[derive(Debug, Default)]
struct State {
    /// The text in force, to recompile when only the keys file changes.
    text: Option<String>,
    /// The keys file named by the config in force, and its contents when last read.
    keys_file: Option<(String, Vec<u8>)>,
}

// === impl Reloader ===

impl Reloader {
    /// A reloader publishing to `policy` (the limiter's channel) and `config` (the request
    /// path's document), flipping `readiness`' config latch.
    pub fn new(
        limiter: Limiter,
        policy: watch::Sender<PolicySlot>,
        config: watch::Sender<Arc<SidecarConfig>>,
        readiness: Readiness,
    ) -> Self {
        Self {
            limiter,
            policy,
            config,
            readiness,
            state: Mutex::default(),
            max_entries: DEFAULT_MAX_ENTRIES,
        }
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
            Ok((policy, keys_file)) => {
                let generation = policy.config.generation;
                let rules = policy.rules.len();
                let config = policy.config.clone();
                self.limiter.publish(&self.policy, policy);
                self.config.send_replace(config);
                {
                    let mut state = self.state();
                    state.text = Some(text.to_owned());
                    state.keys_file = keys_file;
                }
                let m = self.limiter.metrics();
                m.generation.set(generation as i64);
                m.reloads.inc();
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
                self.limiter.metrics().reload_errors.inc();
                tracing::warn!(
                    source,
                    %reason,
                    "config rejected; the last good config stays in force"
                );
                Err(reason)
            }
        }
    }

    /// Parses `text`, reads its keys file and compiles it against the policy in force.
    #[allow(clippy::type_complexity)]
    fn compile(&self, text: &str) -> Result<(Policy, Option<(String, Vec<u8>)>), String> {
        let config = SidecarConfig::from_yaml(text).map_err(|e| e.to_string())?;
        let (keys, keys_file) = match &config.identity.keys_file {
            Some(path) => {
                let bytes =
                    std::fs::read(path).map_err(|e| format!("identity.keysFile {path}: {e}"))?;
                let text = std::str::from_utf8(&bytes)
                    .map_err(|e| format!("identity.keysFile {path}: {e}"))?;
                let ring = KeyRing::from_yaml(text).map_err(|e| format!("{path}: {e}"))?;
                (Some(ring), Some((path.clone(), bytes)))
            }
            None => (None, None),
        };
        let identity = Identity::new(&config.identity, keys)?;
        let prev = self.policy.borrow().clone();
        let policy = Policy::compile(
            Arc::new(config),
            Arc::new(identity),
            prev.as_deref(),
            self.limiter.now(),
            self.max_entries,
        );
        Ok((policy, keys_file))
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

    /// Re-reads the keys file of the config in force; recompiles when it changed.
    pub fn check_keys_file(&self) {
        let (path, seen, text) = {
            let state = self.state();
            match (&state.keys_file, &state.text) {
                (Some((path, seen)), Some(text)) => (path.clone(), seen.clone(), text.clone()),
                _ => return,
            }
        };
        match std::fs::read(&path) {
            Ok(bytes) if bytes == seen => {}
            Ok(_) => {
                // A rejected key list leaves the old one in force (and is counted) like a bad
                // document; remember the rejected bytes so it is counted once.
                if self.apply("keys file", &text).is_err()
                    && let Ok(bytes) = std::fs::read(&path)
                {
                    let mut state = self.state();
                    if let Some((_, seen)) = &mut state.keys_file {
                        *seen = bytes;
                    }
                }
            }
            Err(error) => {
                tracing::debug!(%error, path, "keys file unreadable; keeping the keys in force");
            }
        }
    }
}

/// Where config documents come from, as the flags say.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    /// `--config`: a mounted file.
    pub file: Option<PathBuf>,
    /// `--configmap`: namespace and name of a ConfigMap to watch.
    pub configmap: Option<(String, String)>,
    /// `--allow-unlimited`: serve without limits while no valid document is in force.
    pub allow_unlimited: bool,
}

/// Loads the first document (synchronously for a file, so the first request already sees it)
/// and spawns the watchers and the bucket sweeper. Without any source the `default` document
/// (no limits) is in force. With a source but no valid document yet, the sidecar is not ready
/// and refuses requests, unless `allow_unlimited` says to serve `default` meanwhile.
pub fn start(
    sources: &Sources,
    default: SidecarConfig,
    reloader: Arc<Reloader>,
    policy: watch::Receiver<PolicySlot>,
    shutdown: watch::Receiver<bool>,
) {
    let mut seen = None;
    if let Some(path) = &sources.file {
        let source = format!("file {}", path.display());
        match std::fs::read(path) {
            Ok(bytes) => {
                let _ = reloader.apply(&source, &String::from_utf8_lossy(&bytes));
                seen = Some(bytes);
            }
            Err(error) => {
                reloader.limiter.metrics().reload_errors.inc();
                tracing::warn!(%error, source, "config file unreadable");
            }
        }
    }
    if !reloader.has_document() {
        if sources.file.is_none() && sources.configmap.is_none() {
            reloader.install_default(default, "no --config or --configmap given");
        } else if sources.allow_unlimited {
            reloader.install_default(default, "no valid config yet and --allow-unlimited is set");
        } else {
            reloader.readiness.set_config_valid(false);
            tracing::warn!(
                "no valid config yet: not ready until one arrives (see --allow-unlimited)"
            );
        }
    }
    if let Some(path) = &sources.file {
        tokio::spawn(watch_file(
            path.clone(),
            seen,
            reloader.clone(),
            POLL_INTERVAL,
            shutdown.clone(),
        ));
    }
    if let Some((namespace, name)) = &sources.configmap {
        let (namespace, name, reloader, shutdown) = (
            namespace.clone(),
            name.clone(),
            reloader.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            if let Err(error) = watch_configmap(namespace, name, reloader, shutdown).await {
                tracing::error!(%error, "cannot watch the config map");
            }
        });
    }
    tokio::spawn(sweep_buckets(
        reloader.limiter,
        policy,
        SWEEP_INTERVAL,
        shutdown,
    ));
}

/// How often idle buckets are swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Polls `path` (and the keys file of the config in force) until `shutdown`, applying each new
/// content; `seen` is the content already applied (or rejected), if any.
pub async fn watch_file(
    path: PathBuf,
    seen: Option<Vec<u8>>,
    reloader: Arc<Reloader>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let source = format!("file {}", path.display());
    let mut last: Option<Vec<u8>> = seen;
    let mut unreadable_logged = false;
    loop {
        match tokio::fs::read(&path).await {
            Ok(bytes) if last.as_deref() != Some(&bytes) => {
                unreadable_logged = false;
                let bytes = settle_read(&path, bytes, every).await;
                let text = String::from_utf8_lossy(&bytes).into_owned();
                let _ = reloader.apply(&source, &text);
                last = Some(bytes);
            }
            Ok(_) => reloader.check_keys_file(),
            Err(error) => {
                // Between the two renames of a `..data` swap the path can briefly dangle.
                if !unreadable_logged {
                    tracing::warn!(%error, source, "config file unreadable; keeping the config in force");
                    unreadable_logged = true;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// If `bytes` do not parse, waits a moment and re-reads: an in-place write may have been caught
/// half-way. Returns the latest content.
async fn settle_read(path: &PathBuf, bytes: Vec<u8>, every: Duration) -> Vec<u8> {
    let parses = |b: &[u8]| {
        std::str::from_utf8(b)
            .ok()
            .is_some_and(|t| SidecarConfig::from_yaml(t).is_ok())
    };
    if parses(&bytes) {
        return bytes;
    }
    tokio::time::sleep(every / 4).await;
    match tokio::fs::read(path).await {
        Ok(again) => again,
        Err(_) => bytes,
    }
}

/// Watches ConfigMap `namespace/name` through the API server with the in-cluster (or
/// kubeconfig) client until `shutdown`.
pub async fn watch_configmap(
    namespace: String,
    name: String,
    reloader: Arc<Reloader>,
    shutdown: watch::Receiver<bool>,
) -> crate::Result<()> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| crate::Error::Config(format!("--configmap: no Kubernetes client: {e}")))?;
    watch_configmap_with(client, namespace, name, reloader, shutdown).await;
    Ok(())
}

/// [`watch_configmap`] with a given client (tests pass a mocked API server).
pub async fn watch_configmap_with(
    client: kube::Client,
    namespace: String,
    name: String,
    reloader: Arc<Reloader>,
    mut shutdown: watch::Receiver<bool>,
) {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::{WatchStreamExt, watcher};

    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = std::pin::pin!(watcher(api, config).default_backoff());
    let source = format!("configmap {namespace}/{name}");
    let mut last: Option<String> = None;
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match event {
            None => return,
            Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => {
                match cm.data.as_ref().and_then(|d| d.get(SIDECAR_CONFIG_KEY)) {
                    Some(text) if last.as_deref() != Some(text.as_str()) => {
                        let _ = reloader.apply(&source, text);
                        last = Some(text.clone());
                    }
                    Some(_) => reloader.check_keys_file(),
                    None => {
                        reloader.limiter.metrics().reload_errors.inc();
                        tracing::warn!(
                            source,
                            key = SIDECAR_CONFIG_KEY,
                            "config map has no document under its key; the last good config stays in force"
                        );
                    }
                }
            }
            Some(Ok(watcher::Event::Delete(_))) => {
                tracing::warn!(
                    source,
                    "config map deleted; the last good config stays in force"
                );
            }
            Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
            Some(Err(error)) => {
                tracing::warn!(%error, source, "config map watch failed; retrying");
            }
        }
    }
}

/// Sweeps idle buckets of the policy in force every `every` until `shutdown`, and keeps
/// `sluice_ratelimit_buckets` current.
pub async fn sweep_buckets(
    limiter: Limiter,
    policy: watch::Receiver<PolicySlot>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let current = policy.borrow().clone();
        if let Some(p) = current {
            // A sweep of a large table takes milliseconds: keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || limiter.sweep(&p)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const DOC: &str = "version: v1alpha1\nmodel: m\nvariants:\n  - name: default\n    weight: 100\nrules:\n  - name: rpm\n    requestsPerMinute: 2\n";

    fn reloader() -> (Arc<Reloader>, watch::Receiver<PolicySlot>, Readiness) {
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
        let m = r.limiter.metrics();
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

    #[tokio::test]
    async fn file_edits_and_symlink_swaps_are_picked_up() {
        let dir = std::env::temp_dir().join(format!("sluice-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("v1")).unwrap();
        std::fs::create_dir_all(dir.join("v2")).unwrap();
        // Kubernetes' layout: sidecar.yaml -> ..data/sidecar.yaml, ..data -> v1.
        std::fs::write(dir.join("v1/sidecar.yaml"), DOC).unwrap();
        std::fs::write(
            dir.join("v2/sidecar.yaml"),
            DOC.replace("requestsPerMinute: 2", "requestsPerMinute: 5"),
        )
        .unwrap();
        std::os::unix::fs::symlink("v1", dir.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/sidecar.yaml", dir.join("sidecar.yaml")).unwrap();

        let (r, mut policy, readiness) = reloader();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(watch_file(
            dir.join("sidecar.yaml"),
            None,
            r.clone(),
            Duration::from_millis(20),
            stop_rx,
        ));
        let rpm = |p: &PolicySlot| p.as_ref().map(|p| p.config.rules[0].requests_per_minute);
        tokio::time::timeout(
            Duration::from_secs(5),
            policy.wait_for(|p| rpm(p) == Some(Some(2))),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(readiness.is_ready() || !readiness.is_loaded());

        // The atomic swap: a new ..data link renamed over the old one.
        std::os::unix::fs::symlink("v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            policy.wait_for(|p| rpm(p) == Some(Some(5))),
        )
        .await
        .unwrap()
        .unwrap();

        // An in-place write of a bad document is rejected once, the good one stays.
        std::fs::write(dir.join("v2/sidecar.yaml"), "version: nope\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while r.limiter.metrics().reload_errors.get() == 0 {
            assert!(Instant::now() < deadline, "the bad edit was never seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(r.limiter.metrics().reload_errors.get(), 1, "counted once");
        assert_eq!(rpm(&policy.borrow()), Some(Some(5)));

        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
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
            let mut h = http::HeaderMap::new();
            h.insert("authorization", format!("Bearer {key}").parse().unwrap());
            policy
                .borrow()
                .as_ref()
                .unwrap()
                .identity
                .identify(&h)
                .map(|c| c.tenant.to_string())
        };
        assert_eq!(identify("k1").as_deref(), Ok("a"));
        assert!(identify("k2").is_err());
        r.check_keys_file();
        assert_eq!(r.limiter.metrics().reloads.get(), 1, "unchanged: no reload");
        std::fs::write(&path, "- key: k2\n  tenant: b\n").unwrap();
        r.check_keys_file();
        assert_eq!(identify("k2").as_deref(), Ok("b"));
        assert!(identify("k1").is_err());
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn the_configmap_is_watched_by_name_through_the_api_server() {
        use http::{Request, Response};
        use kube::client::Body;

        let (service, mut api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let (r, mut policy, _) = reloader();
        let (stop_tx, stop_rx) = watch::channel(false);
        let task = tokio::spawn(watch_configmap_with(
            client,
            "models".into(),
            "chat-sidecar".into(),
            r.clone(),
            stop_rx,
        ));
        let cm = |rpm: u32, rv: &str| {
            serde_json::json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "chat-sidecar", "namespace": "models", "resourceVersion": rv},
                "data": {"sidecar.yaml": DOC.replace("requestsPerMinute: 2", &format!("requestsPerMinute: {rpm}"))},
            })
        };
        let rpm = |p: &PolicySlot| p.as_ref().map(|p| p.config.rules[0].requests_per_minute);

        // The list: only that ConfigMap, by field selector.
        let (req, send) = api.next_request().await.expect("a list request");
        let uri = req.uri().to_string();
        assert!(
            uri.starts_with("/api/v1/namespaces/models/configmaps?"),
            "{uri}"
        );
        assert!(
            uri.contains("fieldSelector=metadata.name%3Dchat-sidecar"),
            "{uri}"
        );
        let list = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMapList",
            "metadata": {"resourceVersion": "1"},
            "items": [cm(2, "1")],
        });
        send.send_response(Response::new(Body::from(
            serde_json::to_vec(&list).unwrap(),
        )));
        tokio::time::timeout(
            Duration::from_secs(5),
            policy.wait_for(|p| rpm(p) == Some(Some(2))),
        )
        .await
        .unwrap()
        .unwrap();

        // The watch: an edit arrives as MODIFIED.
        let (req, send) = api.next_request().await.expect("a watch request");
        let uri = req.uri().to_string();
        assert!(
            uri.contains("watch=true")
                && uri.contains("fieldSelector=metadata.name%3Dchat-sidecar"),
            "{uri}"
        );
        let event = serde_json::json!({"type": "MODIFIED", "object": cm(7, "2")});
        let mut line = serde_json::to_vec(&event).unwrap();
        line.push(b'\n');
        send.send_response(Response::new(Body::from(line)));
        tokio::time::timeout(
            Duration::from_secs(5),
            policy.wait_for(|p| rpm(p) == Some(Some(7))),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(r.limiter.metrics().reloads.get(), 2);

        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}

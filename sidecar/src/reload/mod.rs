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

mod apply;
mod configmap;
mod file;
pub mod metrics;

use std::{path::PathBuf, sync::Arc, time::Duration};

use sluice_crds::SidecarConfig;
use tokio::sync::watch;

pub use self::{
    apply::Reloader,
    configmap::{watch_configmap, watch_configmap_with},
    file::watch_file,
    metrics::ReloadMetrics,
};
use crate::limits::{
    PolicySlot,
    sweep::{SWEEP_INTERVAL, sweep_buckets},
};

/// How often mounted files are re-read: a change is in force within this (plus parsing).
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

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
                reloader.metrics().reload_errors.inc();
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

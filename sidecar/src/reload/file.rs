//! The config document from a mounted file, re-read by path (see the module above for why).

use std::{path::PathBuf, sync::Arc, time::Duration};

use sluice_crds::SidecarConfig;
use tokio::sync::watch;

use super::apply::Reloader;

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
            Ok(_) => reloader.check_key_files(),
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Instant;

    use super::*;
    use crate::limits::PolicySlot;
    use crate::reload::apply::tests::{DOC, reloader};

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
        while r.metrics().reload_errors.get() == 0 {
            assert!(Instant::now() < deadline, "the bad edit was never seen");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(r.metrics().reload_errors.get(), 1, "counted once");
        assert_eq!(rpm(&policy.borrow()), Some(Some(5)));

        stop_tx.send(true).unwrap();
        task.await.unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The config document from a ConfigMap, watched through the API server by name.

use std::sync::Arc;

use sluice_crds::sidecar_config::SIDECAR_CONFIG_KEY;
use tokio::sync::watch;

use super::apply::Reloader;
use crate::error::{Result, StartupError};

/// Watches ConfigMap `namespace/name` through the API server with the in-cluster (or
/// kubeconfig) client until `shutdown`.
pub async fn watch_configmap(
    namespace: String,
    name: String,
    reloader: Arc<Reloader>,
    shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let client = kube::Client::try_default()
        .await
        .map_err(|e| StartupError::Config(format!("--configmap: no Kubernetes client: {e}")))?;
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
                    Some(_) => reloader.check_key_files(),
                    None => {
                        reloader.metrics().reload_errors.inc();
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Duration;

    use super::*;
    use crate::limits::PolicySlot;
    use crate::reload::apply::tests::{DOC, reloader};

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
        assert_eq!(r.metrics().reloads.get(), 2);

        stop_tx.send(true).unwrap();
        task.await.unwrap();
    }
}

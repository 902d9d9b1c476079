//! `sluice-operator run`: the admin server, leader election and the controller, with graceful
//! shutdown on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use kube::Client;
use kube::runtime::events::Reporter;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::admin::{self, AdminState};
use crate::controller::{self, Context};
use crate::desired::Settings;
use crate::leader::{LeaderElector, RENEW_DEADLINE, RETRY_PERIOD};
use crate::metrics::Metrics;
use crate::names::FIELD_MANAGER;
use crate::{Error, Result};

/// Everything `run` needs, parsed and checked before anything starts.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Images to render.
    pub settings: Settings,
    /// Where `/metrics`, `/healthz` and `/readyz` are served.
    pub admin_listen: SocketAddr,
    /// Compete for the Lease; without it this replica always writes.
    pub leader_election: Option<LeaseConfig>,
    /// This replica's name (Events' reporting instance, Lease holder).
    pub instance: String,
    /// At most this many reconciles at once, per controller (0: unbounded).
    pub reconcile_concurrency: u16,
}

/// Where the leader Lease lives.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// The operator's own namespace.
    pub namespace: String,
    /// The Lease's name.
    pub name: String,
}

/// Runs until SIGTERM/SIGINT (Ok) or until leadership is lost (Err: exit non-zero and let the
/// pod restart as a follower, the usual controller pattern).
pub async fn run(config: RunConfig) -> Result<()> {
    let client = Client::try_default().await?;

    let mut registry = Registry::default();
    let metrics = Metrics::default().register(&mut registry);
    let (ready_tx, ready_rx) = watch::channel(false);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state = Arc::new(AdminState {
        registry,
        ready: ready_rx,
    });
    let admin = tokio::spawn(admin::serve(
        config.admin_listen,
        state,
        shutdown_rx.clone(),
    ));

    tokio::spawn(signal_shutdown(shutdown_tx.clone()));

    // Readiness: the API server answers (a latch; followers are ready too).
    {
        let client = client.clone();
        let mut shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            loop {
                match client.apiserver_version().await {
                    Ok(v) => {
                        info!(version = %v.git_version, "API server reached");
                        let _ = ready_tx.send(true);
                        return;
                    }
                    Err(error) => warn!(%error, "API server not reachable yet"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_PERIOD) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
            }
        });
    }

    let reporter = Reporter {
        controller: FIELD_MANAGER.to_owned(),
        instance: Some(config.instance.clone()),
    };
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            config.settings.clone(),
            metrics.clone(),
            reporter,
        )
        .with_reconcile_concurrency(config.reconcile_concurrency),
    );

    let result = match &config.leader_election {
        None => {
            metrics.leader.set(1);
            controller::run(ctx, wait_for(shutdown_rx.clone())).await;
            Ok(())
        }
        Some(lease) => {
            let elector = Arc::new(LeaderElector::new(
                client.clone(),
                &lease.namespace,
                &lease.name,
                &config.instance,
            ));
            lead(elector, ctx, metrics.clone(), shutdown_rx.clone()).await
        }
    };
    let _ = shutdown_tx.send(true);
    if let Ok(Err(error)) = admin.await {
        warn!(%error, "admin server failed");
    }
    result
}

/// Waits to become leader, runs the controller while leading, releases the Lease on shutdown.
async fn lead(
    elector: Arc<LeaderElector>,
    ctx: Arc<Context>,
    metrics: Metrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    info!("waiting for the leader Lease");
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => warn!(%error, "leader election attempt failed"),
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_PERIOD) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        }
    }
    info!("became leader");
    metrics.leader.set(1);

    // Renew in the background; losing the Lease stops the controller.
    let (lost_tx, lost_rx) = watch::channel(false);
    let renewer = {
        let elector = elector.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut last_renewed = Instant::now();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_PERIOD) => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                match elector.try_acquire_or_renew().await {
                    Ok(true) => last_renewed = Instant::now(),
                    Ok(false) => {
                        error!("another replica holds the leader Lease");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Err(error) if last_renewed.elapsed() >= RENEW_DEADLINE => {
                        error!(%error, "cannot renew the leader Lease in time");
                        let _ = lost_tx.send(true);
                        return;
                    }
                    Err(error) => warn!(%error, "leader Lease renewal failed; retrying"),
                }
            }
        })
    };

    let stop = {
        let shutdown = shutdown.clone();
        let lost = lost_rx.clone();
        async move {
            let mut shutdown = shutdown;
            let mut lost = lost;
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => {}
                _ = lost.wait_for(|l| *l) => {}
            }
        }
    };
    controller::run(ctx, stop).await;
    metrics.leader.set(0);
    renewer.abort();
    if *lost_rx.borrow() {
        return Err(Error::LeadershipLost);
    }
    if let Err(error) = elector.release().await {
        warn!(%error, "cannot release the leader Lease; it expires on its own");
    }
    info!("released the leader Lease");
    Ok(())
}

async fn wait_for(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn signal_shutdown(tx: watch::Sender<bool>) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    info!("shutting down: finishing in-flight reconciles");
    let _ = tx.send(true);
}

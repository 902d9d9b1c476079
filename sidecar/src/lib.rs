//! sluice-sidecar: the data plane. Serves a quantized GGUF model in-process with mistral.rs
//! over the OpenAI HTTP API, with admin endpoints for probes and metrics.

pub mod config;
pub mod convert;
pub mod engine;
pub mod error;
pub mod fetch;
pub mod forward;
pub mod identity;
pub mod limits;
pub mod memory_limit;
pub mod metrics;
mod priority;
pub mod readiness;
pub mod routing;
pub mod server;
pub mod stream;
pub mod watch;

use std::{
    sync::{Arc, OnceLock},
    time::Instant,
};

use tokio::net::TcpListener;

pub use error::{Error, Result};

use crate::{
    config::ServeConfig,
    engine::{Engine, EngineSettings, PrefixCacheMeter},
    metrics::Metrics,
    readiness::Readiness,
    routing::{Routing, RoutingMetrics},
    server::{AdminState, AppState},
};

/// Runs `serve` until SIGTERM/SIGINT: binds both ports, loads the model (readiness false until
/// then), serves, and on the signal drains within the grace period. `process_start` is when the
/// process began, for the cold-start measurement.
pub async fn serve(config: ServeConfig, process_start: Instant) -> Result<()> {
    serve_until(config, process_start, None, shutdown_signal()).await
}

/// [`serve`] until `shutdown` resolves, on `preloaded` when given (instead of loading
/// `config.model`). The benchmark uses it to put the HTTP API in front of the very engine it
/// also calls in-process, so that a comparison of the two measures the HTTP path alone.
pub async fn serve_until(
    config: ServeConfig,
    process_start: Instant,
    preloaded: Option<Engine>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let mut shutdown = std::pin::pin!(shutdown);
    let api_listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.listen)))?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|e| Error::Config(format!("cannot listen on {}: {e}", config.admin_listen)))?;
    tracing::info!(
        api = %config.listen,
        admin = %config.admin_listen,
        model = %config.model.display(),
        served_name = %config.served_name,
        prefix_cache_entries = config.prefix_cache,
        prefix_cache_bytes = config.prefix_cache_budget.bytes,
        prefix_cache_bytes_from = config.prefix_cache_budget.source,
        "listening"
    );

    let mut registry = metrics::new_registry();
    let metrics = Metrics::register(&mut registry);
    let prefix_cache_meter = Arc::new(PrefixCacheMeter::new(config.prefix_cache_budget.bytes));
    metrics::PrefixCacheMetrics::register(&mut registry, prefix_cache_meter.clone());
    let routing = Arc::new(Routing::new(
        config.variant.clone(),
        config.forward_token.as_ref(),
        config.forward_connect_timeout,
        RoutingMetrics::register(&mut registry),
    ));
    routing.log_startup(&config.sidecar);
    let limiter = limits::Limiter::new(&mut registry);
    let registry = Arc::new(registry);
    let readiness = Readiness::new();

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (admin_shutdown_tx, admin_shutdown_rx) = tokio::sync::watch::channel(false);
    // Config documents: the first is in force before the API port answers, watchers hot-reload
    // later ones; readiness says whether a valid one is in force.
    let (policy_tx, policy_rx) = tokio::sync::watch::channel(None);
    let (config_tx, config_rx) = tokio::sync::watch::channel(config.sidecar.clone());
    let reloader = Arc::new(watch::Reloader::new(
        limiter,
        policy_tx,
        config_tx,
        readiness.clone(),
    ));
    watch::start(
        &config.sources,
        (*config.sidecar).clone(),
        reloader,
        policy_rx.clone(),
        shutdown_rx.clone(),
    );
    let admin_state = Arc::new(AdminState {
        readiness: readiness.clone(),
        registry: registry.clone(),
    });
    let admin = tokio::spawn(server::serve(
        admin_listener,
        admin_state,
        server::admin,
        admin_shutdown_rx,
        config.drain_grace,
    ));

    let state = Arc::new(AppState {
        engine: OnceLock::new(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        config: config_rx,
        admission: Arc::new(limits::admission::LimitAdmission::new(limiter, policy_rx)),
        routing,
        served_name: config.served_name.clone(),
        max_body_bytes: config.max_body_bytes,
        request_timeout: config.request_timeout,
        default_max_tokens: config.default_max_tokens,
        sampling: config.sampling_defaults,
    });
    let api = tokio::spawn(server::serve(
        api_listener,
        state.clone(),
        server::api,
        shutdown_rx.clone(),
        config.drain_grace,
    ));

    // Load (and convert, if asked) while the admin port already answers: /readyz is false.
    let load_started = Instant::now();
    let load = async {
        if let Some(engine) = preloaded {
            return Ok(engine);
        }
        engine::start_kernel_threads(config.threads, config.kernel_nice);
        let model = match config.convert {
            Some(quant) => {
                let (src, dir) = (config.model.clone(), config.cache_dir.clone());
                tokio::task::spawn_blocking(move || convert::ensure_converted(&src, quant, &dir))
                    .await
                    .map_err(|e| Error::Model(format!("conversion task failed: {e}")))??
            }
            None => config.model.clone(),
        };
        Engine::load(&EngineSettings {
            model,
            served_name: config.served_name.clone(),
            dtype: config.dtype,
            threads: config.threads,
            kernel_nice: config.kernel_nice,
            max_seqs: config.max_seqs,
            max_queue: config.max_queue,
            prefix_cache: config.prefix_cache,
            prefix_cache_meter,
            context_length: config.context_length,
        })
        .await
    };
    let engine = tokio::select! {
        engine = load => engine?,
        _ = &mut shutdown => {
            tracing::info!("signal received while loading; exiting");
            let _ = shutdown_tx.send(true);
            let _ = admin_shutdown_tx.send(true);
            return Ok(());
        }
    };
    metrics.model_load.set(load_started.elapsed().as_secs_f64());
    // Set exactly once, here.
    let _ = state.engine.set(engine);
    readiness.set_loaded();
    let cold_start = process_start.elapsed();
    metrics.cold_start.set(cold_start.as_secs_f64());
    tracing::info!(
        load_ms = load_started.elapsed().as_millis() as u64,
        cold_start_ms = cold_start.as_millis() as u64,
        "ready"
    );

    shutdown.await;
    tracing::info!(grace = ?config.drain_grace, "shutting down: readiness false, draining");
    readiness.start_drain();
    let _ = shutdown_tx.send(true);
    let _ = api.await;
    // The admin port goes last so probes see `draining` until the end.
    let _ = admin_shutdown_tx.send(true);
    let _ = admin.await;
    tracing::info!("bye");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGTERM; only SIGINT stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Installs the tracing subscriber (`RUST_LOG` filters; default `info`).
pub fn init_tracing(format: config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = match format {
        config::LogFormat::Json => builder.json().try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}

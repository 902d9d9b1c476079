//! The process: `serve` wires every layer together — metrics, routing, the limiter and config
//! reload, the admin and API ports, the engine — and drains on SIGTERM. The only module that
//! sees all the others.

use std::{
    sync::{Arc, OnceLock},
    time::Instant,
};

use tokio::net::TcpListener;

use crate::{
    admit::limiter::LimitAdmission,
    cache::CacheMetrics,
    cli::ServeConfig,
    engine::{
        Engine, EngineSettings, PrefixCacheMeter, Prompt, device, start_kernel_threads, watchdog,
    },
    error::{Result, StartupError},
    forward::{
        Forwarder,
        fallback::{Fallback, FallbackToken},
        gateway::Gateway,
    },
    http::{
        self, AppState, Drain,
        admin::{self, AdminState},
        api::api,
        cached::AnswerCache,
        conn::{ConnectionLimits, Connections},
    },
    limits::Limiter,
    metrics::{self, ConnectionMetrics, Metrics},
    model::convert,
    open_files,
    readiness::{Liveness, Readiness},
    reload::{self, ReloadMetrics, Reloader},
    route::{Router, RoutingMetrics},
    stream::timing::DrainCut,
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
    // Before a port is bound: a device the pod cannot use stops it here, with one line.
    let device = match &preloaded {
        Some(engine) => engine.device().clone(),
        None => device::select(config.device, config.dtype)?,
    };
    tracing::info!(
        device = %device.label,
        name = %device.name,
        memory_bytes = device.memory_bytes,
        dtype = device.dtype.as_str(),
        "engine device"
    );
    let api_listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| StartupError::Config(format!("cannot listen on {}: {e}", config.listen)))?;
    // The admin port runs on a thread and runtime of its own (see `serve_admin`), so its
    // listener is registered there.
    let admin_listener = std::net::TcpListener::bind(config.admin_listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| {
            StartupError::Config(format!("cannot listen on {}: {e}", config.admin_listen))
        })?;
    let open_files = open_files::raise_to_hard_limit();
    let api_limits = ConnectionLimits {
        max_connections: config
            .max_connections
            .unwrap_or_else(|| open_files::api_connections(open_files)),
        max_per_client: config.max_connections_per_client,
        header_timeout: config.header_timeout,
        idle_timeout: config.idle_timeout,
    };
    let admin_limits = ConnectionLimits {
        max_connections: open_files::ADMIN_CONNECTIONS,
        max_per_client: None,
        ..api_limits
    };
    tracing::info!(
        api = %config.listen,
        admin = %config.admin_listen,
        model = %config.model.display(),
        served_name = %config.served_name,
        prefix_cache_entries = config.prefix_cache,
        prefix_cache_bytes = config.prefix_cache_budget.bytes,
        prefix_cache_bytes_from = config.prefix_cache_budget.source,
        open_files,
        max_connections = api_limits.max_connections,
        "listening"
    );

    let mut registry = metrics::new_registry();
    let metrics = Metrics::register(&mut registry);
    metrics::register_device(&mut registry, &device);
    metrics::EngineOccupancy::register(&mut registry, &metrics, config.max_seqs);
    let prefix_cache_meter = Arc::new(PrefixCacheMeter::new(config.prefix_cache_budget.bytes));
    metrics::PrefixCacheMetrics::register(&mut registry, prefix_cache_meter.clone());
    let router = Arc::new(Router::new(
        config.variant.clone(),
        config.forward_token.as_ref(),
        RoutingMetrics::register(&mut registry),
    ));
    router.log_startup(&config.sidecar);
    // Forwards give up connecting after the connect timeout (then the request falls back).
    // One client (one connection pool) for forwards to variants, the fallback model and the
    // other models of the namespace.
    let client = Forwarder::new(config.forward_connect_timeout);
    let forwarder = config.forward_token.as_ref().map(|_| client.clone());
    let fallback = config
        .fallback_token_file
        .clone()
        .map(|path| Fallback::new(client.clone(), FallbackToken::new(path), &mut registry));
    let gateway = Gateway::new(client, &mut registry);
    let cache = AnswerCache::new(CacheMetrics::register(&mut registry));
    let limiter = Limiter::new(&mut registry);
    let reload_metrics = ReloadMetrics::register(&mut registry);
    let connection_metrics = ConnectionMetrics::register(&mut registry);
    let registry = Arc::new(registry);
    let readiness = Readiness::new();

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (admin_shutdown_tx, admin_shutdown_rx) = tokio::sync::watch::channel(false);
    // Config documents: the first is in force before the API port answers, watchers hot-reload
    // later ones; readiness says whether a valid one is in force.
    let (policy_tx, policy_rx) = tokio::sync::watch::channel(None);
    let (config_tx, config_rx) = tokio::sync::watch::channel(config.sidecar.clone());
    let reloader = Arc::new(
        Reloader::new(limiter, policy_tx, config_tx, readiness.clone())
            .with_metrics(reload_metrics),
    );
    reload::start(
        &config.sources,
        (*config.sidecar).clone(),
        reloader,
        policy_rx.clone(),
        shutdown_rx.clone(),
    );
    let liveness = Liveness::default();
    let admin_state = Arc::new(AdminState {
        readiness: readiness.clone(),
        liveness: liveness.clone(),
        registry: registry.clone(),
    });
    let admin = serve_admin(
        admin_listener,
        Connections::new("admin", admin_limits, connection_metrics.clone()),
        admin_state,
        admin_shutdown_rx,
        config.drain_grace,
    )?;
    let (drain_cut_tx, drain_cut_rx) = tokio::sync::watch::channel(false);

    let state = Arc::new(AppState {
        engine: OnceLock::new(),
        metrics: metrics.clone(),
        readiness: readiness.clone(),
        config: config_rx,
        admission: Arc::new(LimitAdmission::new(limiter, policy_rx)),
        router,
        forwarder,
        fallback,
        gateway,
        cache,
        served_name: config.served_name.clone(),
        max_body_bytes: config.max_body_bytes,
        request_timeout: config.request_timeout,
        first_token_timeout: config.first_token_timeout,
        body_pace: config.body_pace,
        drain_cut: DrainCut {
            signal: drain_cut_rx,
            count: metrics.cut_at_drain_end.clone(),
        },
        default_max_tokens: config.default_max_tokens,
        sampling: config.sampling_defaults,
    });
    let api = tokio::spawn(http::serve(
        api_listener,
        Connections::new("api", api_limits, connection_metrics),
        state.clone(),
        api,
        shutdown_rx.clone(),
        Drain {
            grace: config.drain_grace,
            cut: Some(drain_cut_tx),
        },
    ));

    // Load (and convert, if asked) while the admin port already answers: /readyz is false.
    let load_started = Instant::now();
    let load = async {
        if let Some(engine) = preloaded {
            return Ok(engine);
        }
        start_kernel_threads(config.threads, config.kernel_nice);
        let model = match config.convert {
            Some(quant) => {
                let (src, dir) = (config.model.clone(), config.cache_dir.clone());
                tokio::task::spawn_blocking(move || convert::ensure_converted(&src, quant, &dir))
                    .await
                    .map_err(|e| StartupError::Model(format!("conversion task failed: {e}")))??
            }
            None => config.model.clone(),
        };
        Engine::load(&EngineSettings {
            model,
            served_name: config.served_name.clone(),
            device,
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
    let (slots, probed) = (engine.slots().clone(), engine.clone());
    tokio::spawn(watchdog::watch(
        move || slots.busy(),
        move || {
            let engine = probed.clone();
            async move {
                let _ = engine.tokenize_in_engine(&Prompt::Text("ok".into())).await;
            }
        },
        config.first_token_timeout,
        liveness,
    ));
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

/// Serves the admin port on a thread with a runtime of its own: probes and scrapes are answered
/// however busy the API's runtime is. The receiver resolves when it has stopped.
fn serve_admin(
    listener: std::net::TcpListener,
    connections: Arc<Connections>,
    state: Arc<AdminState>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    grace: std::time::Duration,
) -> Result<tokio::sync::oneshot::Receiver<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| StartupError::Config(format!("cannot start the admin port's runtime: {e}")))?;
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("sluice-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        let drain = Drain { grace, cut: None };
                        http::serve(listener, connections, state, admin::admin, shutdown, drain)
                            .await;
                    }
                    Err(error) => tracing::error!(%error, "admin port cannot listen"),
                }
            });
            let _ = stopped_tx.send(());
        })
        .map_err(|e| StartupError::Config(format!("cannot start the admin port's thread: {e}")))?;
    Ok(stopped_rx)
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

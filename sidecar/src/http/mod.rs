//! The HTTP front door: the accept loop both ports share ([`serve`]), what a request handler
//! holds ([`AppState`]), and how an [`ApiError`] goes on the wire. The OpenAI routes are in
//! [`api`] and the request path itself in [`generate`]; the admin port in [`admin`].

pub mod admin;
pub mod api;
pub mod generate;
pub mod validate;

use std::{
    convert::Infallible,
    future::Future,
    sync::{Arc, OnceLock},
    time::Duration,
};

use http::{HeaderValue, Request, Response, header};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use sluice_crds::SidecarConfig;
use tokio::{net::TcpListener, sync::watch};

use crate::{
    admit::Admission,
    engine::{Engine, SamplingDefaults},
    forward::Forwarder,
    metrics::Metrics,
    openai::ApiError,
    readiness::Readiness,
    route::Router,
    stream::body::{ResponseBody, add_headers, full},
};

/// Everything a request handler needs; one per process, shared by every connection.
pub struct AppState {
    /// The engine, set once the model has loaded (until then requests get 503).
    pub engine: OnceLock<Engine>,
    /// The metrics the request path updates.
    pub metrics: Metrics,
    /// Readiness latch.
    pub readiness: Readiness,
    /// The sidecar config in force; the watcher sends new versions.
    pub config: watch::Receiver<Arc<SidecarConfig>>,
    /// Admission (rate limits).
    pub admission: Arc<dyn Admission>,
    /// Which variant serves each request.
    pub router: Arc<Router>,
    /// The client forwards to other variants go through (`None`: forwarding disabled).
    pub forwarder: Option<Forwarder>,
    /// The id clients use.
    pub served_name: String,
    /// Body size limit.
    pub max_body_bytes: usize,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Completion cap (and token reservation) of requests that set no `max_tokens`; `None`:
    /// the rest of the context window.
    pub default_max_tokens: Option<usize>,
    /// Temperature and top_p of requests that set none (`--default-temperature/top-p`).
    pub sampling: SamplingDefaults,
}

/// Renders an error as OpenAI does, with `Retry-After` where retrying helps.
pub fn error_response(error: &ApiError) -> Response<ResponseBody> {
    let mut res = full(error.status(), "application/json", error.to_json());
    if let Some(secs) = error.retry_after() {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    add_headers(&mut res, error.headers());
    res
}

/// Accepts connections on `listener` and serves them with `handler` until `shutdown` turns
/// true; then stops accepting, lets in-flight requests finish for at most `grace`, and returns.
pub async fn serve<S, F, Fut>(
    listener: TcpListener,
    state: Arc<S>,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // The watch guard must not live across the awaits below.
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
        };
        let (stream, _peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handler(state, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(addr = ?local, connections = graceful.count(), "stopped accepting; draining");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!(addr = ?local, "all connections finished"),
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(addr = ?local, ?grace, "grace period over; closing remaining connections")
        }
    }
}

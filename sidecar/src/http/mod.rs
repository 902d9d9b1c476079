//! The HTTP front door: the accept loop both ports share ([`serve`]), what a request handler
//! holds ([`AppState`]), and how an [`ApiError`] goes on the wire. The OpenAI routes are in
//! [`api`] and the request path itself in [`generate`]; the admin port in [`admin`].

pub mod admin;
pub mod api;
pub mod cached;
pub mod conn;
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
use hyper::server::conn::http1;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use sluice_crds::{SidecarConfig, lifecycle::TERMINATION_MARGIN_SECS};
use tokio::{net::TcpListener, sync::watch};

use self::cached::AnswerCache;
use self::conn::{Activity, BodyPace, Connections, Guarded};
use crate::{
    admit::Admission,
    engine::{Engine, SamplingDefaults},
    forward::{Forwarder, fallback::Fallback, gateway::Gateway},
    metrics::Metrics,
    openai::ApiError,
    readiness::Readiness,
    route::Router,
    stream::{
        body::{ResponseBody, add_headers, full},
        timing::DrainCut,
    },
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
    /// The response cache (on when the config in force has `cache`).
    pub cache: AnswerCache,
    /// Sends requests this model cannot serve to the config's fallback model (`None`: no
    /// `--fallback-token-file`).
    pub fallback: Option<Fallback>,
    /// Sends requests naming another model of the namespace (the config's `models`) to it.
    pub gateway: Gateway,
    /// The id clients use.
    pub served_name: String,
    /// Body size limit.
    pub max_body_bytes: usize,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Time to the first token (queueing and prompt processing).
    pub first_token_timeout: Duration,
    /// The pace a request body must keep (408 otherwise).
    pub body_pace: BodyPace,
    /// Turns true when the drain's grace period is over: answers still running end then.
    pub drain_cut: DrainCut,
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
    // The rest of a body too slow to wait for is still on its way: the connection cannot be
    // reused, and the client is told so.
    if matches!(error, ApiError::ReadTimeout(_)) {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

/// How a listener ends on shutdown.
#[derive(Debug)]
pub struct Drain {
    /// How long answers in flight get to finish once the listener stops accepting.
    pub grace: Duration,
    /// Set when the grace period is over: answers still running end with an error (an SSE
    /// error event and the end of the stream) instead of a cut connection.
    pub cut: Option<watch::Sender<bool>>,
}

/// How long answers told to end at the end of the grace period get to flush before the
/// connections are dropped.
const CUT_FLUSH: Duration = Duration::from_secs(2);
// The pod's grace period leaves a margin after the drain; the flush must fit in it.
const _: () = assert!(CUT_FLUSH.as_secs() < TERMINATION_MARGIN_SECS as u64);

/// Accepts connections on `listener` within `connections`' limits and serves them (HTTP/1.1)
/// with `handler` until `shutdown` turns true; then stops accepting, lets answers in flight
/// finish for at most the drain's grace period, ends the rest, and returns.
pub async fn serve<S, F, Fut>(
    listener: TcpListener,
    connections: Arc<Connections>,
    state: Arc<S>,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
    drain: Drain,
) where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    // HTTP/1.1 only: what OpenAI clients and Kubernetes' proxies speak to a backend. Cleartext
    // HTTP/2 would be a second set of limits to keep (streams per connection, resets, pings)
    // for no client that needs it. Its preface is refused by closing the connection.
    let mut builder = http1::Builder::new();
    // The header timer is `TimedIo`'s: hyper's starts at the first byte and closes silently.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None::<Duration>);
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // The watch guard must not live across the awaits below.
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Out of file descriptors (EMFILE) ends here too: wait for some to free up.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match connections.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(error) => {
                tracing::debug!(%peer, %error, "connection refused");
                connections.refuse(stream, &error);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::default());
        let io = connections.wrap(stream, permit, activity.clone());
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            // Before the future: the request is in flight from the moment hyper has its head.
            let in_flight = activity.begin();
            // Also before the future: hyper may drop it unpolled (the client's end closed as the
            // request came), and the handler counts what it was handed.
            let answer = handler(state.clone(), req);
            async move {
                let res = answer.await;
                Ok::<_, Infallible>(res.map(|body| Guarded::new(body, in_flight)))
            }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(addr = ?local, connections = graceful.count(), "stopped accepting; draining");
    let finished = graceful.shutdown();
    let mut finished = std::pin::pin!(finished);
    tokio::select! {
        _ = &mut finished => {
            tracing::info!(addr = ?local, "all connections finished");
            return;
        }
        _ = tokio::time::sleep(drain.grace) => {}
    }
    let Some(cut) = drain.cut else {
        tracing::warn!(addr = ?local, grace = ?drain.grace, "grace period over; closing connections");
        return;
    };
    tracing::warn!(addr = ?local, grace = ?drain.grace, "grace period over; ending answers still running");
    let _ = cut.send(true);
    if tokio::time::timeout(CUT_FLUSH, finished).await.is_err() {
        tracing::warn!(addr = ?local, "answers did not end in time; closing connections");
    }
}

//! `sluice-sidecar activate`: what answers for a model scaled to zero (see
//! [`sluice_crds::activation`]). It loads no model. Each request is held: the variants'
//! Deployments are scaled from 0 to 1 (through their `scale` subresource, with the pod's
//! service account), and the request goes, as its client sent it, to the first variant Service
//! that accepts a connection, retried until a pod is ready or the hold timeout passes (then
//! 503 with `Retry-After`). The answer is relayed as it comes, streams frame by frame.
//!
//! Nothing is admitted or charged here: the pod that serves the request routes it by weight
//! and admits it under the model's RateLimitPolicy, as any client's request, so it is charged
//! once. (Admission needs the prompt's exact token count, which needs the model's tokenizer;
//! the activator has no model.) Only POST requests (the generation routes) are held; other
//! requests (`GET /v1/models`) wake the model and get 503 with `Retry-After`.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http::{Method, Request, Response, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Incoming};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};
use sluice_crds::activation::{
    DEFAULT_HOLD_TIMEOUT_SECS, HOLD_TIMEOUT_SECS_FLAG, UPSTREAM_FLAG, WAKE_FLAG,
};
use sluice_crds::lifecycle::REQUEST_TIMEOUT_SECS;
use tokio::net::TcpListener;

use crate::{
    forward::{ForwardError, Forwarder, Outbound, relay_as_is},
    http::{
        Drain,
        admin::{AdminState, admin},
        conn::{ConnectionLimits, Connections},
        error_response, serve,
    },
    metrics::{self, ConnectionMetrics},
    open_files,
    openai::ApiError,
    readiness::{Liveness, Readiness},
    stream::body::ResponseBody,
};
use sluice_telemetry::LogFormat;

/// `sluice-sidecar activate` flags (the operator passes them; see [`sluice_crds::activation`]).
#[derive(Clone, Debug, clap::Args)]
pub struct ActivateArgs {
    /// Address of the OpenAI API the held requests arrive on.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// Address of the admin endpoints (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,
    /// Namespace of the Deployments to wake (the pod's own).
    #[arg(long, env = "SLUICE_POD_NAMESPACE")]
    pub namespace: String,
    /// A Deployment to scale from 0 to 1 when a request arrives; repeated.
    #[arg(long = WAKE_FLAG, required = true)]
    pub wake: Vec<String>,
    /// A variant Service's base URL (`http://chat-a.ns.svc:8080`) to send held requests to;
    /// repeated, tried in order.
    #[arg(long = UPSTREAM_FLAG, required = true)]
    pub upstream: Vec<String>,
    /// Seconds a request is held for a ready pod before it gets 503 with `Retry-After`.
    #[arg(long = HOLD_TIMEOUT_SECS_FLAG, default_value_t = u64::from(DEFAULT_HOLD_TIMEOUT_SECS))]
    pub hold_timeout_secs: u64,
    /// Requests held at once; more get 503 at once.
    #[arg(long, env = "SLUICE_MAX_HELD", default_value_t = 1024)]
    pub max_held: usize,
    /// Largest request body held, in bytes; larger bodies get 413.
    #[arg(long, env = "SLUICE_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Log format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Labels of `sluice_activator_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    /// `forwarded` (a pod answered, whatever its status), `timeout` (none was ready in
    /// time), `error` (the connection failed once the request was sent), `refused` (too many
    /// held, or not a generation request).
    outcome: &'static str,
}

/// The activator's metrics.
#[derive(Clone, Debug)]
struct ActivatorMetrics {
    held: Gauge,
    requests: Family<OutcomeLabels, Counter>,
    hold_time: Histogram,
    wakes: Counter,
    wake_failures: Counter,
}

impl ActivatorMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = Self {
            held: Gauge::default(),
            requests: Family::default(),
            // 50 ms .. ~14 min
            hold_time: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.05, 2.0, 15,
            )),
            wakes: Counter::default(),
            wake_failures: Counter::default(),
        };
        registry.register(
            "activator_requests_held",
            "Requests held now, waiting for a pod of the model to be ready",
            m.held.clone(),
        );
        registry.register(
            "activator_requests",
            "Requests the activator answered, by outcome",
            m.requests.clone(),
        );
        registry.register_with_unit(
            "activator_hold",
            "Time a request was held before a pod took it",
            Unit::Seconds,
            m.hold_time.clone(),
        );
        registry.register(
            "activator_wakes",
            "Times the activator scaled a Deployment of the model from 0 to 1",
            m.wakes.clone(),
        );
        registry.register(
            "activator_wake_failures",
            "Scale-ups that the API server refused or did not answer",
            m.wake_failures.clone(),
        );
        m
    }
}

/// How often a held request tries the variant Services again.
const RETRY_EVERY: Duration = Duration::from_millis(200);
/// How often, while requests are held, the Deployments are checked (and scaled up) again: the
/// operator may have scaled them to zero between the first scale-up and the pod's start.
const WAKE_AGAIN_AFTER: Duration = Duration::from_secs(10);
/// How soon a scale-up the API server refused or did not answer is tried again.
const WAKE_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Time a request body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// One activator process.
struct Activator {
    client: kube::Client,
    namespace: String,
    wake: Vec<String>,
    upstreams: Vec<String>,
    forwarder: Forwarder,
    hold_timeout: Duration,
    max_held: usize,
    max_body_bytes: usize,
    metrics: ActivatorMetrics,
    /// When the Deployments may be checked (and scaled up) again.
    next_wake: Mutex<Option<Instant>>,
}

/// Runs the activator until SIGTERM.
pub async fn activate(args: ActivateArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default().await?;
    let mut registry = metrics::new_registry();
    let metrics = ActivatorMetrics::register(&mut registry);
    let connection_metrics = ConnectionMetrics::register(&mut registry);
    let activator = Arc::new(Activator {
        client,
        namespace: args.namespace,
        wake: args.wake,
        upstreams: args.upstream,
        forwarder: Forwarder::new(Duration::from_secs(2)),
        hold_timeout: Duration::from_secs(args.hold_timeout_secs),
        max_held: args.max_held,
        max_body_bytes: args.max_body_bytes,
        metrics,
        next_wake: Mutex::new(None),
    });
    let open_files = open_files::raise_to_hard_limit();
    let limits = ConnectionLimits {
        max_connections: open_files::api_connections(open_files),
        max_per_client: None,
        header_timeout: Duration::from_secs(20),
        idle_timeout: Duration::from_secs(120),
    };
    let api = TcpListener::bind(args.listen).await?;
    let admin_listener = TcpListener::bind(args.admin_listen).await?;
    let readiness = Readiness::new();
    readiness.set_loaded();
    readiness.set_config_valid(true);
    let admin_state = Arc::new(AdminState {
        readiness: readiness.clone(),
        liveness: Liveness::default(),
        registry: Arc::new(registry),
    });
    tracing::info!(
        api = %args.listen,
        admin = %args.admin_listen,
        wake = ?activator.wake,
        upstreams = ?activator.upstreams,
        hold_timeout_secs = activator.hold_timeout.as_secs(),
        "activator listening"
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let api_connections = Connections::new("api", limits, connection_metrics.clone());
    let admin_connections = Connections::new(
        "admin",
        ConnectionLimits {
            max_connections: open_files::ADMIN_CONNECTIONS,
            ..limits
        },
        connection_metrics,
    );
    let drain = || Drain {
        grace: Duration::from_secs(30),
        cut: None,
    };
    let api_server = tokio::spawn(serve(
        api,
        api_connections,
        activator,
        hold,
        stop_rx.clone(),
        drain(),
    ));
    let admin_server = tokio::spawn(serve(
        admin_listener,
        admin_connections,
        admin_state,
        admin,
        stop_rx,
        drain(),
    ));
    crate::shutdown_signal().await;
    readiness.start_drain();
    let _ = stop_tx.send(true);
    let _ = api_server.await;
    let _ = admin_server.await;
    Ok(())
}

/// Holds one request until a pod of the model takes it (see the module docs).
async fn hold(activator: Arc<Activator>, req: Request<Incoming>) -> Response<ResponseBody> {
    let arrived = Instant::now();
    let id = crate::http::api::request_id(req.headers());
    if req.method() != Method::POST {
        activator.clone().wake_soon();
        return activator.refuse(&ApiError::Waking {
            waited: Duration::ZERO,
        });
    }
    if activator.metrics.held.get() >= i64::try_from(activator.max_held).unwrap_or(i64::MAX) {
        return activator.refuse(&ApiError::Waking {
            waited: Duration::ZERO,
        });
    }
    let (parts, body) = req.into_parts();
    let body = match read_body(body, &parts.headers, activator.max_body_bytes).await {
        Ok(body) => body,
        Err(error) => return activator.refuse(&error),
    };
    activator.metrics.held.inc();
    let _held = HeldGuard(activator.metrics.held.clone());
    activator.clone().wake_soon();
    let hold_until = tokio::time::Instant::now() + activator.hold_timeout;
    let out = Outbound {
        path: parts.uri.path(),
        headers: &parts.headers,
        body,
        request_id: &id,
        prompt_tokens: 0,
        // Until the serving pod's own request timeout has passed too (it answers 503 itself).
        deadline: hold_until + Duration::from_secs(u64::from(REQUEST_TIMEOUT_SECS)),
        timeout: activator.hold_timeout + Duration::from_secs(u64::from(REQUEST_TIMEOUT_SECS)),
        drain_cut: None,
        caller: None,
    };
    loop {
        for upstream in &activator.upstreams {
            match activator.forwarder.send_unsigned(upstream, &out).await {
                Ok(res) => {
                    let waited = arrived.elapsed();
                    tracing::info!(request_id = %id, %upstream, waited_ms = waited.as_millis() as u64, status = res.status().as_u16(), "held request taken by a pod");
                    activator.metrics.hold_time.observe(waited.as_secs_f64());
                    activator.count("forwarded");
                    return relay_as_is(res);
                }
                Err(ForwardError::Connect(_)) => {}
                Err(ForwardError::Timeout) => {
                    activator.count("timeout");
                    return error_response(&ApiError::Timeout(activator.hold_timeout));
                }
                Err(error @ ForwardError::Other(_)) => {
                    tracing::warn!(request_id = %id, %upstream, %error, "a pod failed a held request");
                    activator.count("error");
                    return error_response(&ApiError::ModelUnreachable {
                        model: named_model(&out.body),
                        sent: true,
                    });
                }
            }
        }
        if tokio::time::Instant::now() + RETRY_EVERY >= hold_until {
            tracing::warn!(request_id = %id, waited_secs = arrived.elapsed().as_secs(), "no pod ready within the hold timeout");
            activator.count("timeout");
            return error_response(&ApiError::Waking {
                waited: arrived.elapsed(),
            });
        }
        tokio::time::sleep(RETRY_EVERY).await;
        activator.clone().wake_soon();
    }
}

/// The `model` a request body names, for an error message (the activator serves one model
/// and reads nothing else of the body).
fn named_model(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("model")?.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Reads a held request's body: at most `limit` bytes, within [`BODY_TIMEOUT`].
async fn read_body(
    body: Incoming,
    headers: &http::HeaderMap,
    limit: usize,
) -> Result<Bytes, ApiError> {
    if headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|len| len > limit as u64)
    {
        return Err(ApiError::BodyTooLarge { limit });
    }
    match tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect()).await {
        Err(_) => Err(ApiError::ReadTimeout(format!(
            "the request body did not arrive within {}s",
            BODY_TIMEOUT.as_secs()
        ))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::BodyTooLarge { limit })
        }
        Ok(Err(_)) => Err(ApiError::ClientClosed),
    }
}

/// Counts a held request out of `sluice_activator_requests_held` however it ends (a client that
/// goes away drops the request's future).
struct HeldGuard(Gauge);

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Activator {
    fn count(&self, outcome: &'static str) {
        self.metrics
            .requests
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    fn refuse(&self, error: &ApiError) -> Response<ResponseBody> {
        self.count("refused");
        error_response(error)
    }

    /// Scales the Deployments up in the background, unless that was done in the last
    /// [`WAKE_AGAIN_AFTER`] (or failed in the last [`WAKE_RETRY_AFTER`]).
    fn wake_soon(self: Arc<Self>) {
        if !self.wake_due(WAKE_AGAIN_AFTER) {
            return;
        }
        tokio::spawn(async move { self.wake().await });
    }

    /// Whether a wake is due now; if so, the next one is due `after`.
    fn wake_due(&self, after: Duration) -> bool {
        let mut next = self.next_wake.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if next.is_some_and(|at| now < at) {
            return false;
        }
        *next = Some(now + after);
        true
    }

    /// Scales each Deployment at 0 replicas to 1 (one at more is left to its autoscaler).
    async fn wake(&self) {
        let api: Api<Deployment> = Api::namespaced(self.client.clone(), &self.namespace);
        for name in &self.wake {
            let scaled = async {
                let scale = api.get_scale(name).await?;
                if scale.spec.and_then(|s| s.replicas).unwrap_or(0) > 0 {
                    return Ok::<_, kube::Error>(false);
                }
                let one = serde_json::json!({"spec": {"replicas": 1}});
                api.patch_scale(name, &PatchParams::default(), &Patch::Merge(&one))
                    .await?;
                Ok(true)
            };
            match scaled.await {
                Ok(true) => {
                    self.metrics.wakes.inc();
                    tracing::info!(deployment = %name, "scaled from 0 to 1");
                }
                Ok(false) => {}
                Err(error) => {
                    self.metrics.wake_failures.inc();
                    // Try again soon rather than in WAKE_AGAIN_AFTER.
                    *self.next_wake.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some(Instant::now() + WAKE_RETRY_AFTER);
                    tracing::warn!(deployment = %name, %error, "cannot scale up");
                }
            }
        }
    }
}

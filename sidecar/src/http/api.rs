//! The OpenAI routes: which handler serves a request, and what every answer carries — the
//! request id, the variant that served it (`x-sluice-variant`) and its count in
//! `sluice_requests_total` (but for another model's answers: see [`OtherModel`]).

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tracing::Instrument;

use super::{AppState, error_response, generate::generate};
use crate::{
    forward::gateway::OtherModel,
    openai::{
        ApiError, CHAT_PATH, COMPLETIONS_PATH, Kind, MODELS_PATH, error::CLIENT_CLOSED_REQUEST,
    },
    route::VARIANT_HEADER,
    stream::body::{ResponseBody, json},
};

/// The route label of a path that is no route.
const OTHER_ROUTE: &str = "other";

/// Routes one API request. Never fails: every error becomes an OpenAI error response.
///
/// Not an `async fn`: the request is counted from the moment hyper hands it over, and hyper
/// drops the future unpolled when the client's end closes as the request arrives (a request sent
/// whole, then the connection closed), which an `async fn` would not notice at all.
pub fn api(
    state: Arc<AppState>,
    req: Request<Incoming>,
) -> impl Future<Output = Response<ResponseBody>> + Send + 'static {
    let started = Instant::now();
    let id = request_id(req.headers());
    let route: &'static str = match req.uri().path() {
        CHAT_PATH => CHAT_PATH,
        COMPLETIONS_PATH => COMPLETIONS_PATH,
        p if p == MODELS_PATH || p.starts_with("/v1/models/") => MODELS_PATH,
        _ => OTHER_ROUTE,
    };
    // One span per request, a trace's server span: the fields left empty are recorded as the
    // request goes (OpenTelemetry's HTTP and GenAI attribute names), and a client's
    // `traceparent` makes it part of the client's trace.
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{} {route}", req.method()),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        request_id = %id,
        method = %req.method(),
        route,
        http.response.status_code = tracing::field::Empty,
        gen_ai.operation.name = tracing::field::Empty,
        gen_ai.request.model = tracing::field::Empty,
        gen_ai.request.max_tokens = tracing::field::Empty,
        gen_ai.usage.input_tokens = tracing::field::Empty,
        gen_ai.usage.output_tokens = tracing::field::Empty,
        gen_ai.server.time_to_first_token = tracing::field::Empty,
        sluice.tenant = tracing::field::Empty,
        sluice.variant = tracing::field::Empty,
    );
    sluice_telemetry::set_parent(&span, req.headers());
    // hyper drops the answer's future when the client goes away before the answer: still
    // counted.
    let unanswered = Unanswered {
        state: state.clone(),
        route,
        span: span.clone(),
        counted: false,
    };
    answer(state, req, id, started, span, unanswered)
}

/// The answer to a request [`api`] has taken in.
async fn answer(
    state: Arc<AppState>,
    req: Request<Incoming>,
    id: String,
    started: Instant,
    span: tracing::Span,
    mut unanswered: Unanswered,
) -> Response<ResponseBody> {
    let route = unanswered.route;
    let mut res = async {
        let res = match handle(&state, route, req, &id, started).await {
            Ok(res) => res,
            Err(error) => {
                if error.status().is_server_error() {
                    tracing::warn!(%error, status = error.status().as_u16(), "request failed");
                } else {
                    tracing::info!(%error, status = error.status().as_u16(), "request refused");
                }
                let mut res = error_response(&error);
                if matches!(error, ApiError::ModelUnreachable { .. }) {
                    res.extensions_mut().insert(OtherModel);
                }
                // Counted against the variant that could not serve it, not this pod's own.
                if let ApiError::VariantUnavailable {
                    variant: Some(variant),
                    ..
                } = &error
                    && let Ok(v) = HeaderValue::from_str(variant)
                {
                    res.headers_mut().insert(VARIANT_HEADER, v);
                }
                res
            }
        };
        tracing::debug!(
            status = res.status().as_u16(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "responded"
        );
        res
    }
    .instrument(span)
    .await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        res.headers_mut().insert("x-request-id", v);
    }
    // Another model's answer names its own variant, and is counted by that model's pods:
    // counted here under a variant name, it would read as this model's traffic (its canary
    // analysis sums this metric by variant). `sluice_gateway_forwards_total` counts it here.
    if res.extensions().get::<OtherModel>().is_some() {
        unanswered.counted = true;
        return res;
    }
    // Forwarded responses already name the variant that served them.
    if !res.headers().contains_key(VARIANT_HEADER)
        && let Ok(v) = HeaderValue::from_str(state.router.local_variant())
    {
        res.headers_mut().insert(VARIANT_HEADER, v);
    }
    // Labelled with the variant that served the request, so the operator's canary analysis
    // does not blame the entry pod's variant for what another variant answered.
    let served_by = res
        .headers()
        .get(VARIANT_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    state
        .metrics
        .record_request(route, served_by, res.status().as_u16());
    unanswered.counted = true;
    let span = &unanswered.span;
    span.record("http.response.status_code", res.status().as_u16());
    span.record("sluice.variant", served_by);
    if res.status().is_server_error() {
        span.record("otel.status_code", "error");
    }
    res
}

/// Counts a request whose client left before it was answered (hyper dropped the handler) under
/// 499, as a request abandoned mid-body is.
struct Unanswered {
    state: Arc<AppState>,
    route: &'static str,
    span: tracing::Span,
    /// Set once the answer is counted.
    counted: bool,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if self.counted {
            return;
        }
        let state = &self.state;
        state.metrics.record_request(
            self.route,
            state.router.local_variant(),
            CLIENT_CLOSED_REQUEST.as_u16(),
        );
        self.span
            .in_scope(|| tracing::info!("client closed the connection before the answer"));
    }
}

async fn handle(
    state: &Arc<AppState>,
    route: &'static str,
    req: Request<Incoming>,
    id: &str,
    started: Instant,
) -> Result<Response<ResponseBody>, ApiError> {
    let path = req.uri().path().to_owned();
    match (route, req.method()) {
        (MODELS_PATH, &Method::GET) => models(state, &path),
        (CHAT_PATH, &Method::POST) => generate(state, Kind::Chat, req, id, started).await,
        (COMPLETIONS_PATH, &Method::POST) => {
            generate(state, Kind::Completion, req, id, started).await
        }
        (OTHER_ROUTE, _) => Err(ApiError::NotFound(path)),
        (_, method) => Err(ApiError::MethodNotAllowed {
            method: method.to_string(),
            path,
        }),
    }
}

/// `GET /v1/models` lists this pod's model and every other model of the namespace it answers
/// for (the config's `models`, see [`crate::forward::gateway`]); `GET /v1/models/{id}` answers
/// for any of them. An unknown id gets 404 naming only that id.
fn models(state: &AppState, path: &str) -> Result<Response<ResponseBody>, ApiError> {
    let config = state.config.borrow().clone();
    let card = |id: &str| {
        serde_json::json!({
            "id": id,
            "object": "model",
            "created": 0,
            "owned_by": "sluice",
        })
    };
    let known = std::iter::once(state.served_name.as_str())
        .chain(config.models.iter().map(|m| m.name.as_str()));
    match path.strip_prefix("/v1/models/") {
        None => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"object": "list", "data": known.map(card).collect::<Vec<_>>()}),
        )),
        Some(name) => match known.into_iter().find(|id| *id == name) {
            Some(id) => Ok(json(StatusCode::OK, &card(id))),
            None => Err(ApiError::ModelNotFound(name.to_owned())),
        },
    }
}

/// The client's `x-request-id` (at most 128 bytes), else a new one unique to this process.
pub fn request_id(headers: &HeaderMap) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static PREFIX: OnceLock<u64> = OnceLock::new();
    if let Some(id) = headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
    {
        return id.to_owned();
    }
    let prefix = PREFIX.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        (u64::from(std::process::id()) << 32) ^ u64::from(nanos)
    });
    format!("{prefix:x}-{:x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_taken_or_made() {
        let mut h = HeaderMap::new();
        let a = request_id(&h);
        let b = request_id(&h);
        assert_ne!(a, b);
        h.insert("x-request-id", HeaderValue::from_static("abc"));
        assert_eq!(request_id(&h), "abc");
    }
}

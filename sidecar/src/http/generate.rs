//! THE request path of a generation, top-down: read → another model's? → authenticate → route →
//! validate → tokenize → budget → admit → forward, or cache → queue → generate → answer; what this pod
//! cannot serve (shed, no variant reachable, queue full) goes to the fallback model. Each step
//! is a call into one lower module; the answer settles the admitted request's reservation when
//! it ends (also on disconnect or error).

use std::{io::ErrorKind, sync::Arc, time::Instant};

use http::{Request, Response, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Incoming};
use sluice_crds::sidecar_config::FallbackRoute;
use tokio::time::Instant as TokioInstant;

use super::{AppState, cached::CacheRequest, validate};
use crate::{
    admit::{AdmissionRequest, NoReservation, Outcome, Reservation, settle::Settlement},
    auth::Grant,
    cache::Lookup,
    engine::{Engine, GenerationParams},
    forward::{
        self, Dispatched, Outbound,
        fallback::{Fallback, FallbackReason},
    },
    openai::{self, ApiError, Kind},
    route::RouteDecision,
    stream::{
        self, Reply,
        body::{ResponseBody, add_headers},
        timing::{self, Deadline, Timing},
    },
    usage::Usage,
};

/// Serves one `kind` generation request (`id` is its request id, `started` when it arrived).
pub async fn generate(
    state: &Arc<AppState>,
    kind: Kind,
    req: Request<Incoming>,
    id: &str,
    started: Instant,
) -> Result<Response<ResponseBody>, ApiError> {
    let now = TokioInstant::now();
    let deadline = Deadline {
        at: now + state.request_timeout,
        timeout: state.request_timeout,
        first_token: Some((now + state.first_token_timeout, state.first_token_timeout)),
        drain_cut: state.drain_cut.clone(),
    };
    let mut headers = req.headers().clone();
    let config = state.config.borrow().clone();
    let body = read_body(state, req).await?;
    // --- gateway: a request naming another model of the namespace is that model's, to route
    // and admit (so before this model's routing, whose headers and counts it must not touch) ---
    let gateway = state
        .gateway
        .forward(&config, kind.path(), &headers, &body, id, &deadline);
    if let Some(answer) = gateway.await {
        return answer;
    }
    // --- authentication: who calls (401) and what it may use (403); the credential is removed
    // here. A request another sidecar forwarded names the caller its entry pod identified. ---
    let (caller, grant, decision) = match state.router.forwarded_caller(&headers, kind.path())? {
        Some(caller) => (caller, Grant::all(), RouteDecision::ForwardedIn),
        None => {
            let authenticated = tracing::info_span!("authenticate")
                .in_scope(|| state.admission.authenticate(&mut headers));
            let (caller, grant) = authenticated?;
            // --- routing: which of the variants the caller may use serves it ---
            let decision = state.router.decide(&config, &headers, &grant)?;
            (caller, grant, decision)
        }
    };
    // The request span (see `api`) records what the request is, as it becomes known.
    let span = tracing::Span::current();
    span.record("sluice.tenant", &*caller.shown_tenant());
    span.record("gen_ai.operation.name", kind.operation());
    let request = validate::parse(kind, &body)?;
    span.record("gen_ai.request.model", request.model.as_str());
    // A forwarded request names the model of the pod that sent it: a sibling variant's (the
    // same), or, from a model this one is the fallback of, that model's.
    if request.model != state.served_name && !decision.skips_admission() {
        return Err(ApiError::ModelNotFound(request.model));
    }
    // Only requests admitted here fall back (so at most once) or use the response cache (whose
    // entries are per tenant: the tenant is known where the request was admitted).
    let admitted_here = !decision.skips_admission();
    let fallback = match (&config.fallback, &state.fallback) {
        (Some(route), Some(fallback)) if admitted_here => Some((route, fallback)),
        _ => None,
    };
    // An answer of several choices (`n`) is not kept: the cache holds one text per request.
    let cache = config
        .cache
        .as_ref()
        .filter(|_| admitted_here && request.choices == 1);
    let engine = state.engine.get().ok_or(ApiError::Loading)?;
    validate::check_logit_bias(&request, engine.vocab_size())?;
    validate::check_output(&request, engine)?;

    let tokenize_started = Instant::now();
    let prompt = engine.tokenize(&request.prompt).await?;
    let tokenize_time = tokenize_started.elapsed();
    let (budget, params) = generation_params(state, engine, prompt.len(), &request)?;
    span.record("gen_ai.usage.input_tokens", prompt.len());
    span.record("gen_ai.request.max_tokens", budget);

    // --- admission: the limiter decides here, before the request queues for the engine ---
    let admission = AdmissionRequest {
        route: kind.path(),
        caller: &caller,
        model: &request.model,
        prompt_tokens: prompt.len(),
        // Every choice may use the whole budget.
        max_completion_tokens: budget.saturating_mul(request.choices),
        stream: request.stream,
        config: &config,
        variant: match &decision {
            RouteDecision::Forward { variant, .. } => variant,
            _ => state.router.local_variant(),
        },
        request_bytes: body.len(),
        overflow: fallback.is_some(),
    };
    let reservation = admit(state, &decision, &admission)?;
    let rate_headers = openai::rate_headers(&reservation.rate());
    // --- forwarding: when routing chose another variant, it serves the admitted request ---
    let outbound = Outbound {
        path: kind.path(),
        headers: &headers,
        body: body.clone(),
        request_id: id,
        prompt_tokens: prompt.len(),
        deadline: deadline.at,
        timeout: deadline.timeout,
        drain_cut: Some(deadline.drain_cut.clone()),
        caller: Some(&caller),
    };
    // --- fallback: the saturation mark sheds it here, so the fallback model serves it ---
    if reservation.shed() {
        let error = ApiError::Overloaded {
            queued: engine.slots().waiting(),
        };
        let reason = FallbackReason::Shed;
        return fall_back(
            fallback,
            reason,
            &outbound,
            reservation,
            error,
            rate_headers,
        )
        .await;
    }
    let dispatched = forward::dispatch(
        &state.router,
        state.forwarder.as_ref(),
        &config,
        decision,
        &grant,
        outbound.clone(),
        reservation,
    )
    .await?;
    let reservation = match dispatched {
        Dispatched::Remote(res) => return Ok(with_headers(res, rate_headers)),
        Dispatched::Local(reservation) => reservation,
        Dispatched::Unavailable(reservation, error) => {
            let reason = FallbackReason::Unavailable;
            return fall_back(
                fallback,
                reason,
                &outbound,
                reservation,
                error,
                rate_headers,
            )
            .await;
        }
    };
    let mut settlement = Settlement::new(reservation, prompt.len());
    let mut reply = Reply {
        metrics: state.metrics.clone(),
        kind,
        stream: request.stream,
        include_usage: request.include_usage,
        request_id: id.to_owned(),
        model: state.served_name.clone(),
        prompt_tokens: prompt.len(),
        deadline,
        rate_headers,
        fill: None,
        tool_answer: request.tool_answer.clone(),
    };

    // --- response cache: a deterministic request answered before is answered again ---
    let cache_request = CacheRequest {
        kind,
        variant: state.router.local_variant(),
        tenant: settlement.tenant(),
        prompt: &prompt,
        params: &params,
    };
    let lookup = state.cache.lookup(cache, &cache_request);
    match reply.deadline.run(lookup).await {
        Ok(Some(Lookup::Hit(answer))) => return Ok(stream::replay(reply, &answer, settlement)),
        Ok(Some(Lookup::Fill(filler))) => reply.fill = Some(filler),
        Ok(None) => {}
        Err(e) => {
            settlement.settle(Outcome::Failed);
            return Err(e);
        }
    }

    // --- bounded queue in front of the engine (when full, the fallback model serves it) ---
    let queued = timing::queue(&state.metrics, engine.slots(), &mut reply.deadline).await;
    let in_flight = match queued {
        Ok(in_flight) => in_flight,
        Err(error @ ApiError::Overloaded { .. }) if fallback.is_some() => {
            let Some(reservation) = settlement.hand_over() else {
                return Err(error);
            };
            let (reason, headers) = (FallbackReason::Overloaded, reply.rate_headers);
            return fall_back(fallback, reason, &outbound, reservation, error, headers).await;
        }
        Err(e) => {
            settlement.settle(Outcome::Failed);
            return Err(e);
        }
    };

    let generation = engine
        .submit_choices(prompt, &params, request.stream, request.choices)
        .await?;
    let timing = Timing::new(started, tokenize_time, Instant::now());
    stream::respond(reply, generation, settlement, in_flight, timing).await
}

/// Sends an admitted request this pod cannot serve to the fallback model, if the model has one
/// (`reason` says why); else, or when that fails too, the client gets `error` and the
/// reservation is settled as failed.
async fn fall_back(
    fallback: Option<(&FallbackRoute, &Fallback)>,
    reason: FallbackReason,
    out: &Outbound<'_>,
    reservation: Box<dyn Reservation>,
    error: ApiError,
    rate_headers: Vec<(http::HeaderName, http::HeaderValue)>,
) -> Result<Response<ResponseBody>, ApiError> {
    let Some((route, fallback)) = fallback else {
        reservation.settle(Usage::new(out.prompt_tokens, 0), Outcome::Failed);
        return Err(error);
    };
    let res = fallback
        .send(route, reason, out, reservation, error)
        .await?;
    Ok(with_headers(res, rate_headers))
}

/// `res` with the `x-ratelimit-*` headers of its admission.
fn with_headers(
    mut res: Response<ResponseBody>,
    rate_headers: Vec<(http::HeaderName, http::HeaderValue)>,
) -> Response<ResponseBody> {
    add_headers(&mut res, rate_headers);
    res
}

/// The completion budget (`max_tokens`, else the default cap, checked against the context
/// window with the counted prompt) and the request's sampling with it, the model's sampling
/// defaults filling what the request left unset.
fn generation_params(
    state: &AppState,
    engine: &Engine,
    prompt_tokens: usize,
    request: &validate::GenerationRequest,
) -> Result<(usize, GenerationParams), ApiError> {
    let budget = validate::completion_budget(
        engine.max_context(),
        prompt_tokens,
        request.params.max_tokens.or(state
            .default_max_tokens
            .map(|cap| cap.min(engine.max_context().saturating_sub(prompt_tokens).max(1)))),
    )?;
    let mut params = request.params.clone();
    params.max_tokens = Some(budget);
    state.sampling.apply(&mut params);
    Ok((budget, params))
}

/// Admits the request, unless another sidecar forwarded it: limits are charged once, at the
/// entry pod.
fn admit(
    state: &AppState,
    decision: &RouteDecision,
    request: &AdmissionRequest<'_>,
) -> Result<Box<dyn Reservation>, ApiError> {
    if decision.skips_admission() {
        return Ok(Box::new(NoReservation));
    }
    let _traced = tracing::info_span!("admission").entered();
    Ok(state.admission.admit(request)?)
}

/// The request body: declared JSON (415 otherwise), at most `--max-body-bytes` of it (413),
/// arriving at the body pace (408) and within the request's timeout.
async fn read_body(state: &AppState, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    json_content_type(req.headers())?;
    let limit = state.max_body_bytes;
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let mut body = Limited::new(req.into_body(), limit);
    let start = TokioInstant::now();
    let whole = start + state.request_timeout;
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut received = 0;
    loop {
        let deadline = state.body_pace.deadline(start, received).min(whole);
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) if deadline == whole => return Err(ApiError::Timeout(state.request_timeout)),
            Err(_) => {
                let pace = state.body_pace;
                return Err(ApiError::ReadTimeout(format!(
                    "the request body arrived too slowly: {received} bytes in {:.1}s; a body may \
                     take {}s plus 1s per {} bytes",
                    start.elapsed().as_secs_f64(),
                    pace.allowance.as_secs_f64(),
                    pace.min_bytes_per_sec
                )));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(body_error(&*e, limit)),
            Ok(Some(Ok(frame))) => frame,
        };
        if let Ok(data) = frame.into_data() {
            received += data.len();
            chunks.push(data);
        }
    }
    Ok(match chunks.len() {
        1 => chunks.pop().unwrap_or_default(),
        _ => Bytes::from(chunks.concat()),
    })
}

/// Refuses a body not declared `application/json` (parameters such as `charset` allowed), as
/// OpenAI does. Web pages may POST form and text types cross-origin without asking; JSON needs
/// a CORS preflight, which this server never grants.
fn json_content_type(headers: &http::HeaderMap) -> Result<(), ApiError> {
    let value = headers.get(header::CONTENT_TYPE);
    let is_json = value
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    if is_json {
        return Ok(());
    }
    let got = value.map(|v| {
        let text = String::from_utf8_lossy(v.as_bytes());
        text.chars().take(100).collect::<String>()
    });
    Err(ApiError::UnsupportedMediaType(got))
}

/// What a failed body read means for the client: too large, gone, or a malformed body.
fn body_error(error: &(dyn std::error::Error + 'static), limit: usize) -> ApiError {
    if error.is::<http_body_util::LengthLimitError>() {
        return ApiError::BodyTooLarge { limit };
    }
    // The connection closed (or reset) before the whole body came: nobody is left to answer.
    // hyper reports it as an I/O error somewhere down the error's chain.
    let mut cause = Some(error);
    while let Some(e) = cause {
        let closed_io = e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::UnexpectedEof
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::BrokenPipe
            )
        });
        let closed_conn = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(|e| e.is_incomplete_message() || e.is_closed() || e.is_canceled());
        if closed_io || closed_conn {
            return ApiError::ClientClosed;
        }
        cause = e.source();
    }
    ApiError::InvalidRequest {
        message: format!("could not read the request body: {error}"),
        param: None,
        code: None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{super::conn::BodyPace, *};

    #[test]
    fn only_json_bodies_are_taken() {
        let with = |value: Option<&'static str>| {
            let mut headers = http::HeaderMap::new();
            if let Some(v) = value {
                headers.insert(header::CONTENT_TYPE, http::HeaderValue::from_static(v));
            }
            json_content_type(&headers)
        };
        assert!(with(Some("application/json")).is_ok());
        assert!(with(Some("Application/JSON ; charset=utf-8")).is_ok());
        for refused in [
            None,
            Some("text/plain"),
            Some("application/jsonx"),
            Some(""),
        ] {
            let e = with(refused).unwrap_err();
            assert_eq!(
                e.status(),
                http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{refused:?}"
            );
        }
    }

    #[test]
    fn a_body_earns_time_by_the_bytes_it_sends() {
        let pace = BodyPace {
            allowance: Duration::from_secs(20),
            min_bytes_per_sec: 1024,
        };
        let start = TokioInstant::now();
        assert_eq!(pace.deadline(start, 0), start + Duration::from_secs(20));
        assert_eq!(
            pace.deadline(start, 10_240),
            start + Duration::from_secs(30)
        );
    }
}

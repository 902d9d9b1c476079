//! THE request path of a generation, top-down: route → read → validate → tokenize → budget →
//! admit → forward, or queue → generate → answer. Each step is a call into one lower module;
//! the answer settles the admitted request's reservation when it ends (also on disconnect or
//! error).

use std::{sync::Arc, time::Instant};

use http::{Request, Response, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Incoming};
use tokio::time::Instant as TokioInstant;

use super::{AppState, validate};
use crate::{
    admit::{AdmissionRequest, NoReservation, Outcome, Reservation, settle::Settlement},
    engine::{Engine, GenerationParams},
    forward::{self, Dispatched, Outbound},
    openai::{self, ApiError, Kind},
    route::RouteDecision,
    stream::{
        self, Reply,
        body::{ResponseBody, add_headers},
        timing::{self, Timing},
    },
};

/// Serves one `kind` generation request (`id` is its request id, `started` when it arrived).
pub async fn generate(
    state: &Arc<AppState>,
    kind: Kind,
    req: Request<Incoming>,
    id: &str,
    started: Instant,
) -> Result<Response<ResponseBody>, ApiError> {
    let deadline = TokioInstant::now() + state.request_timeout;
    let headers = req.headers().clone();
    // --- routing: which variant serves this request (403 for a forged internal header) ---
    let config = state.config.borrow().clone();
    let decision = state.router.decide(&config, &headers, kind.path())?;
    let body = read_body(state, req).await?;
    let request = validate::parse(kind, &body)?;
    if request.model != state.served_name {
        return Err(ApiError::ModelNotFound(request.model));
    }
    let engine = state.engine.get().ok_or(ApiError::Loading)?;

    let tokenize_started = Instant::now();
    let prompt = engine.tokenize(&request.prompt).await?;
    let tokenize_time = tokenize_started.elapsed();
    let (budget, params) = generation_params(state, engine, prompt.len(), &request)?;

    // --- admission: the limiter decides here, before the request queues for the engine ---
    let admission = AdmissionRequest {
        route: kind.path(),
        headers: &headers,
        model: &request.model,
        prompt_tokens: prompt.len(),
        max_completion_tokens: budget,
        stream: request.stream,
        config: &config,
        variant: match &decision {
            RouteDecision::Forward { variant, .. } => variant,
            _ => state.router.local_variant(),
        },
        request_bytes: body.len(),
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
        deadline,
    };
    let dispatched = forward::dispatch(
        &state.router,
        state.forwarder.as_ref(),
        &config,
        decision,
        outbound,
        reservation,
    )
    .await?;
    let reservation = match dispatched {
        Dispatched::Remote(mut res) => {
            add_headers(&mut res, rate_headers);
            return Ok(res);
        }
        Dispatched::Local(reservation) => reservation,
    };
    let mut settlement = Settlement::new(reservation, prompt.len());

    // --- bounded queue in front of the engine ---
    let queued = timing::queue(
        &state.metrics,
        engine.slots(),
        deadline,
        state.request_timeout,
    )
    .await;
    let in_flight = match queued {
        Ok(in_flight) => in_flight,
        Err(e) => {
            settlement.settle(Outcome::Failed);
            return Err(e);
        }
    };

    let prompt_tokens = prompt.len();
    let generation = engine.submit(prompt, &params, request.stream).await?;
    let timing = Timing::new(started, tokenize_time, Instant::now());
    let reply = Reply {
        metrics: state.metrics.clone(),
        kind,
        stream: request.stream,
        include_usage: request.include_usage,
        request_id: id.to_owned(),
        model: state.served_name.clone(),
        prompt_tokens,
        deadline,
        timeout: state.request_timeout,
        rate_headers,
    };
    stream::respond(reply, generation, settlement, in_flight, timing).await
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
    Ok(state.admission.admit(request)?)
}

/// The request body, at most `--max-body-bytes` of it, within the request's timeout.
async fn read_body(state: &AppState, req: Request<Incoming>) -> Result<Bytes, ApiError> {
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
    let body = Limited::new(req.into_body(), limit);
    match tokio::time::timeout(state.request_timeout, body.collect()).await {
        Err(_) => Err(ApiError::Timeout(state.request_timeout)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(ApiError::BodyTooLarge { limit })
        }
        Ok(Err(e)) => Err(ApiError::InvalidRequest {
            message: format!("could not read the request body: {e}"),
            param: None,
            code: None,
        }),
    }
}

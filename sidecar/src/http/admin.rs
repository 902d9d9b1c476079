//! The admin port: `/healthz` (the process answers and its engine is not wedged), `/readyz` (model loaded, config valid, not
//! draining) and `/metrics` (the one registry).

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use prometheus_client::registry::Registry;

use super::error_response;
use crate::{
    metrics,
    openai::ApiError,
    readiness::{Liveness, Readiness},
    stream::body::{ResponseBody, full},
};

/// What the admin port serves.
pub struct AdminState {
    /// Readiness latch.
    pub readiness: Readiness,
    /// False while the engine is wedged.
    pub liveness: Liveness,
    /// The one registry.
    pub registry: Arc<Registry>,
}

/// Routes one admin request.
pub async fn admin(state: Arc<AdminState>, req: Request<Incoming>) -> Response<ResponseBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") if state.liveness.is_wedged() => full(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "engine wedged: no answer to a probe while requests are pending\n",
        ),
        (&Method::GET, "/healthz") => full(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            if state.readiness.is_ready() {
                full(StatusCode::OK, "text/plain", "ready\n")
            } else if state.readiness.is_draining() {
                full(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else if !state.readiness.is_loaded() {
                full(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "loading\n")
            } else {
                full(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "config invalid\n",
                )
            }
        }
        (&Method::GET, "/metrics") => full(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics::encode(&state.registry),
        ),
        (_, path) => error_response(&ApiError::NotFound(path.to_owned())),
    }
}

//! Sending a request this model cannot serve to its fallback model (`spec.fallback`): the
//! entry pod admitted it (limits charged here, once), and its engine queue is full, its
//! saturation mark shed it, or no variant could be reached. The request goes once to the
//! fallback model's Service, signed with that model's forwarding token (whose sidecars then
//! serve it without routing or admission), and its answer is relayed with
//! [`FALLBACK_HEADER`]; a fallback that fails too leaves the client the original 503.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use http::HeaderValue;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use sluice_crds::sidecar_config::FallbackRoute;

use super::{Forwarder, Outbound, relay};
use crate::{
    admit::{Outcome, Reservation},
    openai::ApiError,
    route::{ForwardAuth, ForwardToken},
    stream::body::ResponseBody,
    usage::Usage,
};

/// Set on an answer the fallback model gave: its InferenceModel's name.
pub const FALLBACK_HEADER: &str = "x-sluice-fallback";

/// Why a request went to the fallback model (the metric's `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackReason {
    /// The engine's queue was full.
    Overloaded,
    /// The saturation mark shed the request's priority.
    Shed,
    /// No variant could be reached (their breakers open, or no connection).
    Unavailable,
}

impl FallbackReason {
    fn label(self) -> &'static str {
        match self {
            Self::Overloaded => "overloaded",
            Self::Shed => "shed",
            Self::Unavailable => "unavailable",
        }
    }
}

/// Labels of `sluice_model_fallbacks_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    /// `overloaded`, `shed` or `unavailable`.
    pub reason: String,
    /// `forwarded` (the fallback model answered, whatever its status) or `failed`.
    pub outcome: String,
}

/// The fallback model's forwarding token, read from its file when first needed: the operator
/// mounts the fallback's Secret as optional, so it may appear after this pod started.
pub struct FallbackToken {
    path: PathBuf,
    auth: Mutex<Option<ForwardAuth>>,
}

impl FallbackToken {
    /// The token in `path` (`--fallback-token-file`).
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            auth: Mutex::new(None),
        }
    }

    fn auth(&self) -> Result<ForwardAuth, String> {
        let mut cached = self.auth.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(auth) = cached.as_ref() {
            return Ok(auth.clone());
        }
        let token = ForwardToken::from_file(&self.path).map_err(|e| e.to_string())?;
        let auth = ForwardAuth::new(&token);
        *cached = Some(auth.clone());
        Ok(auth)
    }
}

impl std::fmt::Debug for FallbackToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FallbackToken")
            .field("path", &self.path)
            .finish()
    }
}

/// What a sidecar needs to fall back: the client, the token, the metric.
#[derive(Clone, Debug)]
pub struct Fallback {
    forwarder: Forwarder,
    token: Arc<FallbackToken>,
    sent: Family<FallbackLabels, Counter>,
}

impl Fallback {
    /// Falls back through `forwarder` with the token in `token`; the metric is registered in
    /// `registry`.
    pub fn new(forwarder: Forwarder, token: FallbackToken, registry: &mut Registry) -> Self {
        let sent = Family::default();
        registry.register(
            "model_fallbacks",
            "Requests sent to the fallback model, by reason and outcome",
            sent.clone(),
        );
        Self {
            forwarder,
            token: Arc::new(token),
            sent,
        }
    }

    /// Sends the admitted request `out` to `route`'s model and relays its answer (settling
    /// `reservation` when it ends). When the fallback cannot be reached, the reservation is
    /// settled as failed and the client gets `error`, what it would have had without one.
    pub async fn send(
        &self,
        route: &FallbackRoute,
        reason: FallbackReason,
        out: &Outbound<'_>,
        reservation: Box<dyn Reservation>,
        error: ApiError,
    ) -> Result<hyper::Response<ResponseBody>, ApiError> {
        let sent = match self.token.auth() {
            Ok(auth) => self
                .forwarder
                .send(&auth, &route.address, out)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        let outcome = if sent.is_ok() { "forwarded" } else { "failed" };
        self.sent
            .get_or_create(&FallbackLabels {
                reason: reason.label().to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
        match sent {
            Ok(res) => {
                tracing::info!(
                    fallback = %route.model,
                    reason = reason.label(),
                    status = res.status().as_u16(),
                    "sent to the fallback model"
                );
                let mut res = relay::relay(
                    res,
                    reservation,
                    out.prompt_tokens,
                    out.drain_cut.clone(),
                    Some((out.deadline, out.timeout)),
                );
                if let Ok(v) = HeaderValue::from_str(&route.model) {
                    res.headers_mut().insert(FALLBACK_HEADER, v);
                }
                Ok(res)
            }
            Err(e) => {
                tracing::warn!(
                    fallback = %route.model,
                    address = %route.address,
                    reason = reason.label(),
                    error = %e,
                    "the fallback model cannot be reached"
                );
                reservation.settle(Usage::new(out.prompt_tokens, 0), Outcome::Failed);
                Err(error)
            }
        }
    }
}

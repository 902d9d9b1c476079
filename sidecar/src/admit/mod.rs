//! The admission contract of the request path: who the caller is and what it may use
//! ([`Admission::authenticate`]), what admission sees of a request ([`AdmissionRequest`]), the
//! hook that admits or refuses it ([`Admission::admit`]), and what an
//! admitted request holds until it ends ([`Reservation`], settled exactly once by a
//! [`settle::Settlement`]). The rate limiter implements it ([`limiter::LimitAdmission`]);
//! [`AdmitAll`] admits everything.

pub mod caller;
pub mod limiter;
pub mod settle;

use http::HeaderMap;
use sluice_crds::SidecarConfig;

use crate::{
    auth::{Caller, Forbidden, Grant, Identity, Unauthorized},
    limits::{RateInfo, Refusal},
    usage::Usage,
};

/// What admission sees of a request: parsed, validated and token-counted, not yet queued for
/// the engine.
#[derive(Debug)]
pub struct AdmissionRequest<'a> {
    /// `/v1/chat/completions` or `/v1/completions`.
    pub route: &'static str,
    /// The caller, as [`Admission::authenticate`] identified it.
    pub caller: &'a Caller,
    /// The model id the client asked for.
    pub model: &'a str,
    /// Exact prompt tokens (chat template applied).
    pub prompt_tokens: usize,
    /// Most completion tokens the request may generate.
    pub max_completion_tokens: usize,
    /// Whether the response streams.
    pub stream: bool,
    /// The sidecar config in force.
    pub config: &'a SidecarConfig,
    /// The variant routing chose to serve it.
    pub variant: &'a str,
    /// Request body bytes.
    pub request_bytes: usize,
    /// A fallback model can take the request: one this pod's saturation mark would shed is
    /// admitted under the limits anyway and marked ([`Reservation::shed`]).
    pub overflow: bool,
}

/// Decides whether a request may proceed. Implemented by the rate limiter; the default admits
/// everything. A refusal answers the request (e.g. with a 429, see [`crate::openai`]).
pub trait Admission: Send + Sync + 'static {
    /// Identifies the caller of a request (401) and what it may use (403) under the config in
    /// force, and removes its credential from `headers`: nothing past this point (forwards to
    /// other variants, logs) sees it.
    fn authenticate(&self, headers: &mut HeaderMap) -> Result<(Caller, Grant), AdmitError>;

    /// Admits (and reserves for) one request, or refuses it.
    fn admit(&self, request: &AdmissionRequest<'_>) -> Result<Box<dyn Reservation>, AdmitError>;
}

/// What an admitted request holds until it ends.
pub trait Reservation: Send + 'static {
    /// Called exactly once when the request ends (finished, failed, timed out or the client
    /// disconnected), with the tokens actually used.
    fn settle(self: Box<Self>, usage: Usage, outcome: Outcome);

    /// The rate windows as of admission, which the successful response reports
    /// (`x-ratelimit-*`), streaming included.
    fn rate(&self) -> RateInfo {
        RateInfo::default()
    }

    /// Counts response body bytes sent (for byte limits), before `settle`.
    fn add_response_bytes(&mut self, _bytes: u64) {}

    /// The caller's tenant, as admission identified it (`None`: no identity, or the config
    /// has no response cache, its only reader).
    fn tenant(&self) -> Option<&str> {
        None
    }

    /// Admitted for the fallback model only: this pod's saturation mark sheds it (see
    /// [`AdmissionRequest::overflow`]).
    fn shed(&self) -> bool {
        false
    }
}

/// How an admitted request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The generation finished and the response was sent.
    Completed,
    /// The client went away before the end.
    Cancelled,
    /// Engine error or timeout.
    Failed,
}

/// Why admission refused a request.
#[derive(Debug)]
pub enum AdmitError {
    /// The caller is not in the key list, its token was refused, or it sent no credential
    /// while one is required.
    Unauthorized(Unauthorized),
    /// The caller is identified but the access rules do not let it make this request.
    Forbidden(Forbidden),
    /// No valid config is in force (and `--allow-unlimited` is not set): nothing is admitted
    /// until one arrives.
    NoPolicy,
    /// A rate limit, quota, size bound or saturation shedding refused it.
    Limited(Box<Refusal>),
}

/// Admits everything: the behaviour until a limiter is installed.
#[derive(Debug, Default)]
pub struct AdmitAll;

impl Admission for AdmitAll {
    fn authenticate(&self, headers: &mut HeaderMap) -> Result<(Caller, Grant), AdmitError> {
        let caller =
            caller::identify(&Identity::open(), headers).map_err(AdmitError::Unauthorized)?;
        Ok((caller, Grant::all()))
    }

    fn admit(&self, _: &AdmissionRequest<'_>) -> Result<Box<dyn Reservation>, AdmitError> {
        Ok(Box::new(NoReservation))
    }
}

/// Holds nothing: what a request admitted without limits (or not admitted here at all, because
/// the entry pod admitted it) settles.
#[derive(Debug)]
pub struct NoReservation;

impl Reservation for NoReservation {
    fn settle(self: Box<Self>, _: Usage, _: Outcome) {}
}

//! The one place a request's errors become HTTP: each layer's error ([`EngineError`],
//! [`RouteError`], [`AdmitError`] and the limiter's [`Refusal`] in it) converts into an
//! [`ApiError`], which knows its status, OpenAI's error body, `Retry-After` and the rate-limit
//! headers.

use std::time::Duration;

use http::{HeaderName, HeaderValue, StatusCode, header};
use serde::Serialize;

use super::ratelimit::refusal_headers;
use crate::{
    admit::AdmitError,
    auth::Unauthorized,
    engine::EngineError,
    limits::{Cause, RateInfo, Refusal, Unit},
    route::RouteError,
};

/// The status a request is counted under when its client left before the answer (nginx's 499;
/// never sent).
pub const CLIENT_CLOSED_REQUEST: StatusCode = match StatusCode::from_u16(499) {
    Ok(status) => status,
    Err(_) => panic!("499 is a valid status code"),
};

/// How long a request refused for want of a valid config should wait.
const NO_POLICY_RETRY_NS: u64 = 1_000_000_000;

/// Everything that can go wrong with one request, as an OpenAI client is told.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request body is not JSON.
    #[error("could not parse the JSON body of the request: {0}")]
    MalformedJson(String),

    /// The request is JSON but not a valid request (wrong type, missing or out-of-range field).
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong, for a human.
        message: String,
        /// The offending field, when known.
        param: Option<String>,
        /// A machine-readable code, when OpenAI has one for the case.
        code: Option<&'static str>,
    },

    /// The prompt (plus the requested completion) does not fit in the model's context window.
    #[error(
        "This model's maximum context length is {context} tokens. However, you requested {requested} tokens ({prompt} in the prompt, {completion} for the completion). Please reduce the length of the prompt or the completion."
    )]
    ContextLengthExceeded {
        /// The model's context window in tokens.
        context: usize,
        /// Prompt plus completion tokens asked for.
        requested: usize,
        /// Prompt tokens.
        prompt: usize,
        /// Completion tokens asked for (or the 1 token any completion needs).
        completion: usize,
    },

    /// The request names a model this sidecar does not serve.
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    ModelNotFound(String),

    /// The request body is larger than the configured limit.
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The configured limit (`--max-body-bytes`).
        limit: usize,
    },

    /// No route for this path.
    #[error("no route for {0}")]
    NotFound(String),

    /// The path exists but not with this method.
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path asked for.
        path: String,
    },

    /// The local queue is full: more requests are waiting for the engine than configured.
    #[error("the server is overloaded ({queued} requests queued); retry shortly")]
    Overloaded {
        /// Requests waiting when this one was refused.
        queued: usize,
    },

    /// The request did not finish (or start) within the per-request timeout.
    #[error("the request timed out after {0:?}")]
    Timeout(Duration),

    /// No first token within the first-token timeout (queueing and prompt processing).
    #[error(
        "no first token within {0:?} (queueing and prompt processing): the server is busy or \
         the prompt is long; retry shortly"
    )]
    FirstTokenTimeout(Duration),

    /// The request head or body did not arrive in time (408): the message says which part
    /// and what pace was expected.
    #[error("{0}")]
    ReadTimeout(String),

    /// A POST body that is not declared `application/json` (415). Requiring it keeps web pages
    /// from sending simple cross-origin POSTs (which may only use form or text types) to a
    /// sidecar that has no API keys.
    #[error(
        "requests must have Content-Type: application/json (got {}); set the header to \
         `application/json`",
        .0.as_deref().unwrap_or("none")
    )]
    UnsupportedMediaType(Option<String>),

    /// The listener holds as many connections as it may (all, or from this client): refused
    /// before any request is read.
    #[error("the server holds its limit of {limit} open connections{}; retry shortly",
        if *.per_client { " from one client" } else { "" })]
    TooManyConnections {
        /// The limit reached.
        limit: usize,
        /// Whether it is the per-client limit.
        per_client: bool,
    },

    /// The client went away before its answer could be sent (a body abandoned mid-way, a
    /// connection closed while the request waited). Never sent: it only labels the request's
    /// count, 499 as nginx logs it.
    #[error("the client closed the connection before the answer")]
    ClientClosed,

    /// The model is still loading.
    #[error("the model is still loading; retry when the server is ready")]
    Loading,

    /// The sidecar is shutting down and accepts no new work.
    #[error("the server is shutting down")]
    Draining,

    /// The engine failed while serving the request.
    #[error("the engine failed: {0}")]
    Engine(String),

    /// The request carries a header internal to sluice (a forwarded request's signature) that
    /// does not verify: clients cannot skip limits or pick variants with it.
    #[error("{0}")]
    Forbidden(String),

    /// The variant routing chose (or the override header named) cannot be reached, and no
    /// other variant can take the request. `variant` names it, when known: the request is
    /// that variant's failure, not this pod's (its metrics and the canary analysis say so).
    #[error("{message}")]
    VariantUnavailable {
        variant: Option<String>,
        message: String,
    },

    /// The request names another model of the namespace, whose Service could not be reached
    /// (503: no connection was made, nothing was sent) or failed before answering (502).
    /// The message names only the model the client asked for: the address and the cause are
    /// internal (they are logged).
    #[error("the model `{model}` cannot be reached right now; retry shortly")]
    ModelUnreachable {
        /// The model the request named.
        model: String,
        /// Whether the request may have reached it (then 502, and no `Retry-After`).
        sent: bool,
    },

    /// The model is scaled to zero and no pod of it became ready while the activator held
    /// the request (or the request is not one it holds): it is starting; retry (503).
    #[error("the model is scaled to zero and is starting (no pod ready after {}s); retry shortly", .waited.as_secs())]
    Waking {
        /// How long the request was held.
        waited: Duration,
    },

    /// The caller's credential is missing, not in the API-key list, or a refused token (401).
    #[error("{}", unauthorized_message(.0))]
    Unauthorized(Unauthorized),

    /// No valid rate-limit config is in force yet (503).
    #[error("the server has no valid rate-limit configuration yet; retry shortly")]
    NoPolicy,

    /// Refused by a rate limit, a quota, a size bound or saturation shedding (429, 400 or 503;
    /// see [`crate::limits`]), with its own headers.
    #[error("{}", .0.message)]
    Limited(Box<Refusal>),
}

/// OpenAI's error envelope: `{"error": {...}}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The error itself.
    pub error: ErrorDetail,
}

/// OpenAI's error object: message, type, param and code (the last two may be null).
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    /// Human-readable description.
    pub message: String,
    /// `invalid_request_error`, `not_found_error`, `server_error`, ...
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The request field at fault, or null.
    pub param: Option<String>,
    /// A machine-readable code, or null.
    pub code: Option<&'static str>,
}

fn unauthorized_message(reason: &Unauthorized) -> String {
    match reason {
        Unauthorized::Missing => "You didn't provide an API key. You need to provide your API \
                                  key in an Authorization header using Bearer auth (i.e. \
                                  Authorization: Bearer YOUR_KEY)."
            .to_owned(),
        Unauthorized::Unknown(hash) => {
            format!("Incorrect API key provided (key hash {hash}).")
        }
        Unauthorized::Token(why) => format!("The bearer token was refused: {why}."),
    }
}

// === impl ApiError ===

impl ApiError {
    /// A 400 for a field that is present but not acceptable.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    /// A 400 for a parameter this server does not support (yet).
    pub fn unsupported(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
            code: Some("unsupported_parameter"),
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MalformedJson(_)
            | Self::InvalidRequest { .. }
            | Self::ContextLengthExceeded { .. } => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded { .. }
            | Self::Timeout(_)
            | Self::FirstTokenTimeout(_)
            | Self::Draining
            | Self::Loading => StatusCode::SERVICE_UNAVAILABLE,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::ReadTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::TooManyConnections { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::ClientClosed => CLIENT_CLOSED_REQUEST,
            Self::VariantUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::ModelUnreachable { sent: false, .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::ModelUnreachable { sent: true, .. } => StatusCode::BAD_GATEWAY,
            Self::Waking { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::NoPolicy => StatusCode::SERVICE_UNAVAILABLE,
            Self::Limited(r) => match r.cause {
                Cause::RateLimited(_) | Cause::Quota => StatusCode::TOO_MANY_REQUESTS,
                Cause::TooLarge { .. } => StatusCode::BAD_REQUEST,
                Cause::Saturated => StatusCode::SERVICE_UNAVAILABLE,
            },
            Self::Engine(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Seconds a client should wait before retrying, when retrying makes sense.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Overloaded { .. }
            | Self::Timeout(_)
            | Self::FirstTokenTimeout(_)
            | Self::Loading
            | Self::TooManyConnections { .. }
            | Self::VariantUnavailable { .. }
            | Self::ModelUnreachable { sent: false, .. } => Some(1),
            Self::Draining | Self::Waking { .. } => Some(5),
            Self::NoPolicy => Some(NO_POLICY_RETRY_NS.div_ceil(1_000_000_000)),
            Self::Limited(r) => r.retry_after_secs(),
            _ => None,
        }
    }

    /// The OpenAI error body for this error.
    pub fn body(&self) -> ErrorBody {
        let (kind, param, code) = match self {
            Self::MalformedJson(_) => ("invalid_request_error", None, None),
            Self::InvalidRequest { param, code, .. } => {
                ("invalid_request_error", param.clone(), *code)
            }
            Self::ContextLengthExceeded { .. } => (
                "invalid_request_error",
                Some("messages".to_owned()),
                Some("context_length_exceeded"),
            ),
            Self::ModelNotFound(_) => (
                "invalid_request_error",
                Some("model".to_owned()),
                Some("model_not_found"),
            ),
            Self::BodyTooLarge { .. } => ("invalid_request_error", None, Some("body_too_large")),
            Self::NotFound(_) => ("invalid_request_error", None, Some("not_found")),
            Self::MethodNotAllowed { .. } => {
                ("invalid_request_error", None, Some("method_not_allowed"))
            }
            Self::Overloaded { .. } => ("server_error", None, Some("overloaded")),
            Self::Timeout(_) | Self::FirstTokenTimeout(_) => {
                ("server_error", None, Some("timeout"))
            }
            Self::Draining => ("server_error", None, Some("shutting_down")),
            Self::Forbidden(_) => ("permission_error", None, Some("forbidden")),
            Self::ReadTimeout(_) => ("invalid_request_error", None, Some("request_timeout")),
            Self::UnsupportedMediaType(_) => (
                "invalid_request_error",
                None,
                Some("unsupported_media_type"),
            ),
            Self::TooManyConnections { .. } => ("server_error", None, Some("too_many_connections")),
            Self::ClientClosed => ("invalid_request_error", None, Some("client_closed_request")),
            Self::VariantUnavailable { .. } => ("server_error", None, Some("variant_unavailable")),
            Self::ModelUnreachable { .. } => ("server_error", None, Some("model_unavailable")),
            Self::Loading => ("server_error", None, Some("loading")),
            Self::Waking { .. } => ("server_error", None, Some("model_waking")),
            Self::Unauthorized(Unauthorized::Token(_)) => {
                ("invalid_request_error", None, Some("invalid_token"))
            }
            Self::Unauthorized(_) => ("invalid_request_error", None, Some("invalid_api_key")),
            Self::NoPolicy => ("server_error", None, Some("config_invalid")),
            Self::Limited(r) => match r.cause {
                Cause::RateLimited(Unit::Requests) => {
                    ("requests", None, Some("rate_limit_exceeded"))
                }
                Cause::RateLimited(Unit::Tokens) => ("tokens", None, Some("rate_limit_exceeded")),
                Cause::Quota => ("insufficient_quota", None, Some("insufficient_quota")),
                Cause::TooLarge { param } => (
                    "invalid_request_error",
                    param.map(str::to_owned),
                    Some("request_too_large"),
                ),
                Cause::Saturated => ("server_error", None, Some("overloaded")),
            },
            Self::Engine(_) => ("server_error", None, None),
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind,
                param,
                code,
            },
        }
    }

    /// Headers the answer carries besides `Retry-After` (refusals: `retry-after-ms`,
    /// `x-ratelimit-*`, `x-sluice-rule`).
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        match self {
            Self::Limited(r) => refusal_headers(&r.rate, r.retry_after_ns, r.rule.as_deref()),
            Self::NoPolicy => refusal_headers(&RateInfo::default(), Some(NO_POLICY_RETRY_NS), None),
            // RFC 6750: a 401 names the scheme that would get in.
            Self::Unauthorized(reason) => {
                let value = match reason {
                    Unauthorized::Token(_) => "Bearer error=\"invalid_token\"",
                    Unauthorized::Missing | Unauthorized::Unknown(_) => "Bearer",
                };
                vec![(header::WWW_AUTHENTICATE, HeaderValue::from_static(value))]
            }
            _ => Vec::new(),
        }
    }

    /// The body as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a struct of strings cannot fail.
        serde_json::to_vec(&self.body()).unwrap_or_default()
    }
}

// === conversions from each layer's errors ===

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> Self {
        match error {
            EngineError::InvalidPrompt { param, message } => Self::InvalidRequest {
                message,
                param: Some(param.to_owned()),
                code: None,
            },
            EngineError::Unsupported(message) => Self::InvalidRequest {
                message,
                param: None,
                code: Some("unsupported_parameter"),
            },
            EngineError::Rejected(message) => Self::InvalidRequest {
                message,
                param: None,
                code: None,
            },
            EngineError::Overloaded { queued } => Self::Overloaded { queued },
            EngineError::Draining => Self::Draining,
            EngineError::Failed(message) => Self::Engine(message),
        }
    }
}

impl From<RouteError> for ApiError {
    fn from(error: RouteError) -> Self {
        match error {
            RouteError::Forbidden(message) => Self::Forbidden(message),
            RouteError::UnknownVariant { header, message } => Self::InvalidRequest {
                message,
                param: Some(header),
                code: None,
            },
            RouteError::Unreachable(message) => Self::VariantUnavailable {
                variant: None,
                message,
            },
        }
    }
}

impl From<AdmitError> for ApiError {
    fn from(error: AdmitError) -> Self {
        match error {
            AdmitError::Unauthorized(reason) => Self::Unauthorized(reason),
            AdmitError::Forbidden(refused) => Self::Forbidden(refused.0),
            AdmitError::NoPolicy => Self::NoPolicy,
            AdmitError::Limited(refusal) => Self::Limited(refusal),
        }
    }
}

#[cfg(test)]
mod tests;

//! The sidecar's one error type, and how each error looks to an OpenAI client.

use std::time::Duration;

use http::StatusCode;
use serde::Serialize;

/// `Result` with the sidecar's [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the sidecar: start-up problems (bad flags, an unreadable
/// model) and per-request problems, which render as OpenAI's error shape with the right status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag, environment variable or config file is invalid. Start-up refuses to go on.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The model could not be read, converted or loaded.
    #[error("model: {0}")]
    Model(String),

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
    /// other variant can take the request.
    #[error("{0}")]
    VariantUnavailable(String),

    /// Refused by a rate limit, the API-key list or saturation shedding (429, 400, 401 or
    /// 503; see [`crate::limits`]), with its own headers.
    #[error("{}", .0.message)]
    Limited(Box<crate::limits::Refusal>),

    /// An I/O error (start-up, sockets).
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// `sluice-sidecar fetch` could not download or verify the weights; the message is the
    /// one line Kubernetes shows as the init container's termination reason.
    #[error("{0}")]
    Fetch(String),
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

// === impl Error ===

impl Error {
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
            Self::Overloaded { .. } | Self::Timeout(_) | Self::Draining | Self::Loading => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::VariantUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Limited(r) => r.status,
            Self::Config(_) | Self::Model(_) | Self::Engine(_) | Self::Io(_) | Self::Fetch(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }

    /// Seconds a client should wait before retrying, when retrying makes sense.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::Overloaded { .. }
            | Self::Timeout(_)
            | Self::Loading
            | Self::VariantUnavailable(_) => Some(1),
            Self::Draining => Some(5),
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
            Self::Timeout(_) => ("server_error", None, Some("timeout")),
            Self::Draining => ("server_error", None, Some("shutting_down")),
            Self::Forbidden(_) => ("permission_error", None, Some("forbidden")),
            Self::VariantUnavailable(_) => ("server_error", None, Some("variant_unavailable")),
            Self::Loading => ("server_error", None, Some("loading")),
            Self::Limited(r) => (r.kind, r.param.map(str::to_owned), Some(r.code)),
            Self::Config(_) | Self::Model(_) | Self::Engine(_) | Self::Io(_) | Self::Fetch(_) => {
                ("server_error", None, None)
            }
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

    /// Headers the answer carries besides `Retry-After` (rate-limit refusals: `retry-after-ms`,
    /// `x-ratelimit-*`, `x-sluice-rule`).
    pub fn headers(&self) -> Vec<(http::HeaderName, http::HeaderValue)> {
        match self {
            Self::Limited(r) => r.headers(),
            _ => Vec::new(),
        }
    }

    /// The body as JSON bytes.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a struct of strings cannot fail.
        serde_json::to_vec(&self.body()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_openai_shape() {
        let err = Error::invalid("temperature", "temperature must be between 0 and 2");
        let v: serde_json::Value = serde_json::from_slice(&err.to_json()).unwrap();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "temperature");
        assert!(v["error"]["code"].is_null());
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("between 0 and 2")
        );
    }

    #[test]
    fn overload_is_retryable_503() {
        let err = Error::Overloaded { queued: 3 };
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.retry_after(), Some(1));
        assert_eq!(err.body().error.code, Some("overloaded"));
    }
}

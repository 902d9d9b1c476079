//! The HTTP side: OpenAI routes on the API port, `/healthz` `/readyz` `/metrics` on the admin
//! port, the request/response types, and the request path:
//!
//! parse -> validate -> count prompt tokens -> **admit** (the [`Admission`] hook: limits) ->
//! wait for an engine slot (bounded queue) -> generate -> respond -> **settle** (actual usage,
//! also on disconnect or error).

use std::{
    convert::Infallible,
    future::Future,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use sluice_crds::SidecarConfig;
use tokio::{net::TcpListener, sync::watch, time::Instant as TokioInstant};
use tracing::Instrument;

use crate::{
    engine::{ChatTurn, Engine, Event, GenerationParams, Prompt, TokenUsage},
    error::{Error, Result},
    metrics::Metrics,
    readiness::Readiness,
    stream::{self, Framer, Kind, Usage},
};

/// Response body of every route.
pub type ResponseBody = BoxBody<Bytes, Infallible>;

const CHAT_ROUTE: &str = "/v1/chat/completions";
const COMPLETIONS_ROUTE: &str = "/v1/completions";
const MODELS_ROUTE: &str = "/v1/models";
/// Where a response says how its time went ([`Timing::server_timing`]).
const SERVER_TIMING: http::HeaderName = http::HeaderName::from_static("server-timing");

// === admission hook ===

/// What admission sees of a request: parsed, validated and token-counted, not yet queued for
/// the engine.
#[derive(Debug)]
pub struct AdmissionRequest<'a> {
    /// `/v1/chat/completions` or `/v1/completions`.
    pub route: &'static str,
    /// The request's headers (API key, sticky and override headers).
    pub headers: &'a HeaderMap,
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
}

/// Decides whether a request may proceed. Implemented by the rate limiter; the default admits
/// everything. Returning an error answers the request with that error (e.g. a 429).
pub trait Admission: Send + Sync + 'static {
    /// Admits (and reserves for) one request, or refuses it.
    fn admit(&self, request: &AdmissionRequest<'_>) -> Result<Box<dyn Reservation>>;
}

/// What an admitted request holds until it ends.
pub trait Reservation: Send + 'static {
    /// Called exactly once when the request ends (finished, failed, timed out or the client
    /// disconnected), with the tokens actually used.
    fn settle(self: Box<Self>, usage: Usage, outcome: Outcome);

    /// Headers the successful response carries (`x-ratelimit-*`), streaming included.
    fn headers(&self) -> Vec<(http::HeaderName, HeaderValue)> {
        Vec::new()
    }

    /// Counts response body bytes sent (for byte limits), before `settle`.
    fn add_response_bytes(&mut self, _bytes: u64) {}
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

/// Admits everything: the behaviour until a limiter is installed.
#[derive(Debug, Default)]
pub struct AdmitAll;

impl Admission for AdmitAll {
    fn admit(&self, _: &AdmissionRequest<'_>) -> Result<Box<dyn Reservation>> {
        Ok(Box::new(NoReservation))
    }
}

struct NoReservation;

impl Reservation for NoReservation {
    fn settle(self: Box<Self>, _: Usage, _: Outcome) {}
}

/// Settles a reservation exactly once: explicitly, or on drop (client gone) as `Cancelled`.
struct Settlement {
    reservation: Option<Box<dyn Reservation>>,
    usage: Usage,
}

impl Settlement {
    fn new(reservation: Box<dyn Reservation>, prompt_tokens: usize) -> Self {
        Self {
            reservation: Some(reservation),
            usage: Usage::new(prompt_tokens, 0),
        }
    }

    fn settle(&mut self, outcome: Outcome) {
        if let Some(r) = self.reservation.take() {
            r.settle(self.usage, outcome);
        }
    }

    fn add_response_bytes(&mut self, bytes: u64) {
        if let Some(r) = &mut self.reservation {
            r.add_response_bytes(bytes);
        }
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.settle(Outcome::Cancelled);
    }
}

// === state ===

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
    /// Which variant serves each request, and forwarding to the others.
    pub routing: Arc<crate::routing::Routing>,
    /// The id clients use.
    pub served_name: String,
    /// Body size limit.
    pub max_body_bytes: usize,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Completion cap (and token reservation) of requests that set no `max_tokens`; `None`:
    /// the rest of the context window.
    pub default_max_tokens: Option<usize>,
    /// Temperature and top_p of requests that set none (`--default-temperature/top-p`).
    pub sampling: SamplingDefaults,
}

/// Sampling settings a model's operator chose (the InferenceModel's `engine`) for requests that
/// set none; a request's own values always win.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SamplingDefaults {
    /// Temperature (0..=2); `None`: greedy, the engine's default.
    pub temperature: Option<f64>,
    /// Nucleus mass (0..=1); `None`: no cut.
    pub top_p: Option<f64>,
}

impl SamplingDefaults {
    /// Fills what the request left unset. A top_p of 0 keeps only the most likely token, which
    /// the engine spells as temperature 0 (it reads top_p 0 as "no cut").
    pub fn apply(&self, params: &mut GenerationParams) {
        if params.temperature.is_none() {
            params.temperature = self.temperature;
        }
        if params.top_p.is_none() {
            params.top_p = self.top_p;
        }
        if params.top_p == Some(0.0) {
            params.top_p = None;
            params.temperature = Some(0.0);
        }
    }
}

/// What the admin port serves.
pub struct AdminState {
    /// Readiness latch.
    pub readiness: Readiness,
    /// The one registry.
    pub registry: Arc<Registry>,
}

// === request types ===

/// `POST /v1/chat/completions` body (fields we do not use are ignored, as OpenAI-compatible
/// servers do).
#[derive(Debug, Deserialize)]
pub struct ChatCompletionRequest {
    /// Model id.
    pub model: String,
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Stream as SSE.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Legacy completion token limit.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// Completion token limit (preferred).
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// 0..=2.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Up to 4 stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Accepted; sampling is seeded per engine, so only temperature 0 is reproducible.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Only 1 is supported.
    #[serde(default)]
    pub n: Option<u64>,
    /// -2..=2.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// -2..=2.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Not supported (400 when true).
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// Not supported (400 when non-empty).
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
}

/// `POST /v1/completions` body.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// Model id.
    pub model: String,
    /// A string, or an array of exactly one string.
    pub prompt: PromptInput,
    /// Stream as SSE.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Streaming options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Completion token limit (OpenAI's default is 16).
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// 0..=2.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Up to 4 stop strings.
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Accepted, as for chat.
    #[serde(default)]
    pub seed: Option<i64>,
    /// Only 1 is supported.
    #[serde(default)]
    pub n: Option<u64>,
    /// -2..=2.
    #[serde(default)]
    pub presence_penalty: Option<f32>,
    /// -2..=2.
    #[serde(default)]
    pub frequency_penalty: Option<f32>,
    /// Not supported (400 when set).
    #[serde(default)]
    pub logprobs: Option<u32>,
    /// Not supported (400 when true).
    #[serde(default)]
    pub echo: Option<bool>,
    /// Not supported (400 when set).
    #[serde(default)]
    pub suffix: Option<String>,
    /// Only 1 is supported.
    #[serde(default)]
    pub best_of: Option<u64>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with usage.
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `prompt` of `/v1/completions`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptInput {
    /// Text.
    Text(String),
    /// Texts (only one supported).
    Texts(Vec<String>),
    /// Token ids (not supported).
    Tokens(Vec<serde_json::Value>),
}

/// One message of a chat request.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Text, text parts, or null (assistant messages with tool calls).
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// Content of a chat message.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Content parts; only `text` parts are supported.
    Parts(Vec<ContentPart>),
}

/// A content part.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    /// `text` (others are refused).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

// === response types ===

/// Non-streaming chat response.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model.
    pub model: String,
    /// One choice.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: UsageOut,
}

/// A chat choice.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChatChoice {
    /// 0.
    pub index: usize,
    /// The answer.
    pub message: AssistantMessage,
    /// `stop` or `length`.
    pub finish_reason: String,
    /// Always null.
    pub logprobs: Option<()>,
}

/// The assistant's message.
#[derive(Debug, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Non-streaming completion response.
#[derive(Debug, Serialize, Deserialize)]
pub struct Completion {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Served model.
    pub model: String,
    /// One choice.
    pub choices: Vec<CompletionChoice>,
    /// Token counts.
    pub usage: UsageOut,
}

/// A completion choice.
#[derive(Debug, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// The text.
    pub text: String,
    /// 0.
    pub index: usize,
    /// Always null.
    pub logprobs: Option<()>,
    /// `stop` or `length`.
    pub finish_reason: String,
}

/// Usage as serialised in responses.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UsageOut {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Completion tokens.
    pub completion_tokens: usize,
    /// Sum.
    pub total_tokens: usize,
}

impl From<Usage> for UsageOut {
    fn from(u: Usage) -> Self {
        Self {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
        }
    }
}

/// A validated generation request, whichever route it came from.
#[derive(Debug, PartialEq)]
pub struct Parsed {
    /// Which chunk/response shape.
    pub kind: Kind,
    /// Model id asked for.
    pub model: String,
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling.
    pub params: GenerationParams,
    /// SSE or JSON.
    pub stream: bool,
    /// Final usage chunk on streams.
    pub include_usage: bool,
}

// === parsing ===

/// Parses a JSON body into `T`, telling malformed JSON from wrong types.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => Error::MalformedJson(e.to_string()),
            Category::Data => Error::InvalidRequest {
                message: format!("invalid request body: {e}"),
                param: None,
                code: None,
            },
        }
    })
}

fn check_common(
    temperature: Option<f64>,
    top_p: Option<f64>,
    n: Option<u64>,
    presence: Option<f32>,
    frequency: Option<f32>,
    stop: Option<Stop>,
) -> Result<Vec<String>> {
    if let Some(t) = temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(Error::invalid(
            "temperature",
            format!("{t} is not a valid temperature: it must be between 0 and 2"),
        ));
    }
    if let Some(p) = top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(Error::invalid(
            "top_p",
            format!("{p} is not a valid top_p: it must be greater than 0 and at most 1"),
        ));
    }
    match n {
        None | Some(1) => {}
        Some(0) => return Err(Error::invalid("n", "n must be at least 1")),
        Some(n) => {
            return Err(Error::unsupported(
                "n",
                format!("n = {n} is not supported by this server: only one choice (n = 1)"),
            ));
        }
    }
    for (name, v) in [
        ("presence_penalty", presence),
        ("frequency_penalty", frequency),
    ] {
        if let Some(v) = v
            && !(-2.0..=2.0).contains(&v)
        {
            return Err(Error::invalid(
                name,
                format!("{v} is not a valid {name}: it must be between -2 and 2"),
            ));
        }
    }
    let stop = match stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 {
        return Err(Error::invalid(
            "stop",
            "at most 4 stop sequences are allowed",
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(Error::invalid("stop", "stop sequences must not be empty"));
    }
    Ok(stop)
}

fn check_max_tokens(param: &str, v: Option<u64>) -> Result<Option<usize>> {
    match v {
        None => Ok(None),
        Some(0) => Err(Error::invalid(param, format!("{param} must be at least 1"))),
        Some(v) => Ok(Some(usize::try_from(v).unwrap_or(usize::MAX))),
    }
}

impl ChatCompletionRequest {
    /// Validates the request into a [`Parsed`] generation.
    pub fn validate(self) -> Result<Parsed> {
        if self.messages.is_empty() {
            return Err(Error::invalid(
                "messages",
                "messages must contain at least one message",
            ));
        }
        if self.logprobs == Some(true) {
            return Err(Error::unsupported("logprobs", "logprobs are not supported"));
        }
        if self.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(Error::unsupported("tools", "tools are not supported"));
        }
        let stop = check_common(
            self.temperature,
            self.top_p,
            self.n,
            self.presence_penalty,
            self.frequency_penalty,
            self.stop,
        )?;
        let max_tokens = match self.max_completion_tokens {
            Some(_) => check_max_tokens("max_completion_tokens", self.max_completion_tokens)?,
            None => check_max_tokens("max_tokens", self.max_tokens)?,
        };
        let mut turns = Vec::with_capacity(self.messages.len());
        for (i, m) in self.messages.into_iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" => "tool",
                other => {
                    return Err(Error::invalid(
                        format!("messages[{i}].role"),
                        format!(
                            "invalid role {other:?}: expected system, developer, user, assistant or tool"
                        ),
                    ));
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t,
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.kind.as_str(), part.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            (kind, _) => {
                                return Err(Error::unsupported(
                                    format!("messages[{i}].content"),
                                    format!(
                                        "content parts of type {kind:?} are not supported; only text"
                                    ),
                                ));
                            }
                        }
                    }
                    text
                }
            };
            turns.push(ChatTurn {
                role: role.to_owned(),
                content,
            });
        }
        let stream = self.stream.unwrap_or(false);
        Ok(Parsed {
            kind: Kind::Chat,
            model: self.model,
            prompt: Prompt::Chat(turns),
            params: GenerationParams {
                max_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                stop,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
            },
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
        })
    }
}

impl CompletionRequest {
    /// Validates the request into a [`Parsed`] generation.
    pub fn validate(self) -> Result<Parsed> {
        let text = match self.prompt {
            PromptInput::Text(t) => t,
            PromptInput::Texts(mut v) if v.len() == 1 => v.remove(0),
            PromptInput::Texts(v) if v.is_empty() => {
                return Err(Error::invalid("prompt", "prompt must not be empty"));
            }
            PromptInput::Texts(_) => {
                return Err(Error::unsupported(
                    "prompt",
                    "batched prompts are not supported: send one prompt per request",
                ));
            }
            PromptInput::Tokens(_) => {
                return Err(Error::unsupported(
                    "prompt",
                    "token-id prompts are not supported: send text",
                ));
            }
        };
        if text.is_empty() {
            return Err(Error::invalid("prompt", "prompt must not be empty"));
        }
        if self.logprobs.is_some() {
            return Err(Error::unsupported("logprobs", "logprobs are not supported"));
        }
        if self.echo == Some(true) {
            return Err(Error::unsupported("echo", "echo is not supported"));
        }
        if self.suffix.is_some() {
            return Err(Error::unsupported("suffix", "suffix is not supported"));
        }
        if !matches!(self.best_of, None | Some(1)) {
            return Err(Error::unsupported("best_of", "best_of is not supported"));
        }
        let stop = check_common(
            self.temperature,
            self.top_p,
            self.n,
            self.presence_penalty,
            self.frequency_penalty,
            self.stop,
        )?;
        // OpenAI's default for /v1/completions.
        let max_tokens = check_max_tokens("max_tokens", self.max_tokens)?.or(Some(16));
        let stream = self.stream.unwrap_or(false);
        Ok(Parsed {
            kind: Kind::Completion,
            model: self.model,
            prompt: Prompt::Text(text),
            params: GenerationParams {
                max_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                stop,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
            },
            stream,
            include_usage: stream
                && self
                    .stream_options
                    .and_then(|o| o.include_usage)
                    .unwrap_or(false),
        })
    }
}

/// Checks the prompt plus the requested completion against the context window and returns the
/// completion budget.
pub fn completion_budget(
    context: usize,
    prompt_tokens: usize,
    max_tokens: Option<usize>,
) -> Result<usize> {
    let wanted = max_tokens.unwrap_or(1);
    if prompt_tokens.saturating_add(wanted) > context {
        return Err(Error::ContextLengthExceeded {
            context,
            requested: prompt_tokens.saturating_add(wanted),
            prompt: prompt_tokens,
            completion: wanted,
        });
    }
    Ok(max_tokens.unwrap_or(context - prompt_tokens))
}

// === responses ===

fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut res = Response::new(Full::new(body.into()).boxed());
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    full(status, "application/json", body)
}

/// Renders an error as OpenAI does, with `Retry-After` where retrying helps.
pub fn error_response(error: &Error) -> Response<ResponseBody> {
    let mut res = full(error.status(), "application/json", error.to_json());
    if let Some(secs) = error.retry_after() {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    add_headers(&mut res, error.headers());
    res
}

/// Adds `headers` to a response (rate-limit headers on answers and refusals).
fn add_headers(res: &mut Response<ResponseBody>, headers: Vec<(http::HeaderName, HeaderValue)>) {
    for (name, value) in headers {
        res.headers_mut().insert(name, value);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(headers: &HeaderMap) -> String {
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

// === API routes ===

/// Routes one API request. Never fails: every error becomes an OpenAI error response.
pub async fn api(state: Arc<AppState>, req: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    let id = request_id(req.headers());
    let route: &'static str = match req.uri().path() {
        CHAT_ROUTE => CHAT_ROUTE,
        COMPLETIONS_ROUTE => COMPLETIONS_ROUTE,
        p if p == MODELS_ROUTE || p.starts_with("/v1/models/") => MODELS_ROUTE,
        _ => "other",
    };
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), route);
    let mut res = async {
        let res = match handle(&state, route, req, &id, started).await {
            Ok(res) => res,
            Err(error) => {
                if error.status().is_server_error() {
                    tracing::warn!(%error, status = error.status().as_u16(), "request failed");
                } else {
                    tracing::info!(%error, status = error.status().as_u16(), "request refused");
                }
                error_response(&error)
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
    // Forwarded responses already name the variant that served them.
    if !res.headers().contains_key(crate::routing::VARIANT_HEADER)
        && let Ok(v) = HeaderValue::from_str(state.routing.local_variant())
    {
        res.headers_mut().insert(crate::routing::VARIANT_HEADER, v);
    }
    // Labelled with the variant that served the request, so the operator's canary analysis
    // does not blame the entry pod's variant for what another variant answered.
    let served_by = res
        .headers()
        .get(crate::routing::VARIANT_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    state
        .metrics
        .record_request(route, served_by, res.status().as_u16());
    res
}

async fn handle(
    state: &Arc<AppState>,
    route: &'static str,
    req: Request<Incoming>,
    id: &str,
    started: Instant,
) -> Result<Response<ResponseBody>> {
    let path = req.uri().path().to_owned();
    match (route, req.method()) {
        (MODELS_ROUTE, &Method::GET) => models(state, &path),
        (CHAT_ROUTE | COMPLETIONS_ROUTE, &Method::POST) => {
            generate(state, route, req, id, started).await
        }
        ("other", _) => Err(Error::NotFound(path)),
        (_, method) => Err(Error::MethodNotAllowed {
            method: method.to_string(),
            path,
        }),
    }
}

fn models(state: &AppState, path: &str) -> Result<Response<ResponseBody>> {
    let model = serde_json::json!({
        "id": state.served_name,
        "object": "model",
        "created": 0,
        "owned_by": "sluice",
    });
    match path.strip_prefix("/v1/models/") {
        None => Ok(json(
            StatusCode::OK,
            &serde_json::json!({"object": "list", "data": [model]}),
        )),
        Some(name) if name == state.served_name => Ok(json(StatusCode::OK, &model)),
        Some(name) => Err(Error::ModelNotFound(name.to_owned())),
    }
}

async fn read_body(state: &AppState, req: Request<Incoming>) -> Result<Bytes> {
    let limit = state.max_body_bytes;
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(Error::BodyTooLarge { limit });
    }
    let body = Limited::new(req.into_body(), limit);
    match tokio::time::timeout(state.request_timeout, body.collect()).await {
        Err(_) => Err(Error::Timeout(state.request_timeout)),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(Error::BodyTooLarge { limit })
        }
        Ok(Err(e)) => Err(Error::InvalidRequest {
            message: format!("could not read the request body: {e}"),
            param: None,
            code: None,
        }),
    }
}

async fn generate(
    state: &Arc<AppState>,
    route: &'static str,
    req: Request<Incoming>,
    id: &str,
    started: Instant,
) -> Result<Response<ResponseBody>> {
    let deadline = TokioInstant::now() + state.request_timeout;
    let headers = req.headers().clone();
    // --- routing: which variant serves this request (403 for a forged internal header) ---
    let config = state.config.borrow().clone();
    let decision = state.routing.decide(&config, &headers, route)?;
    let body = read_body(state, req).await?;
    let parsed = match route {
        CHAT_ROUTE => parse_json::<ChatCompletionRequest>(&body)?.validate()?,
        _ => parse_json::<CompletionRequest>(&body)?.validate()?,
    };
    if parsed.model != state.served_name {
        return Err(Error::ModelNotFound(parsed.model));
    }
    let engine = state.engine.get().ok_or(Error::Loading)?;

    let tokenize_started = Instant::now();
    let prompt = engine.tokenize(&parsed.prompt).await?;
    let tokenize_time = tokenize_started.elapsed();
    let prompt_tokens = prompt.len();
    let budget = completion_budget(
        engine.max_context(),
        prompt_tokens,
        parsed.params.max_tokens.or(state
            .default_max_tokens
            .map(|cap| cap.min(engine.max_context().saturating_sub(prompt_tokens).max(1)))),
    )?;
    let mut params = parsed.params.clone();
    params.max_tokens = Some(budget);
    state.sampling.apply(&mut params);

    // --- admission: the limiter decides here, before the request queues for the engine ---
    // (not for requests another sidecar forwarded: limits are charged once, at the entry pod)
    let reservation: Box<dyn Reservation> = if decision.skips_admission() {
        Box::new(NoReservation)
    } else {
        state.admission.admit(&AdmissionRequest {
            route,
            headers: &headers,
            model: &parsed.model,
            prompt_tokens,
            max_completion_tokens: budget,
            stream: parsed.stream,
            config: &config,
            variant: match &decision {
                crate::routing::RouteDecision::Forward { variant, .. } => variant,
                _ => state.routing.local_variant(),
            },
            request_bytes: body.len(),
        })?
    };
    let rate_headers = reservation.headers();
    // --- forwarding: when routing chose another variant, it serves the admitted request ---
    let outbound = crate::forward::Outbound {
        path: route,
        headers: &headers,
        body: body.clone(),
        request_id: id,
        prompt_tokens,
        deadline,
    };
    let reservation = match state
        .routing
        .dispatch(&config, decision, outbound, reservation)
        .await?
    {
        crate::forward::Dispatched::Remote(mut res) => {
            add_headers(&mut res, rate_headers);
            return Ok(res);
        }
        crate::forward::Dispatched::Local(reservation) => reservation,
    };
    let mut settlement = Settlement::new(reservation, prompt_tokens);

    // --- bounded queue in front of the engine ---
    let queued = QueueGuard::enter(&state.metrics);
    let slot = tokio::time::timeout_at(deadline, engine.slots().acquire())
        .await
        .map_err(|_| Error::Timeout(state.request_timeout))
        .and_then(|r| r);
    drop(queued);
    let slot = match slot {
        Ok(slot) => slot,
        Err(e) => {
            settlement.settle(Outcome::Failed);
            return Err(e);
        }
    };
    let in_flight = InFlight::enter(&state.metrics, slot);

    let mut generation = engine.submit(prompt, &params, parsed.stream).await?;
    let created = unix_now();
    let response_id = match parsed.kind {
        Kind::Chat => format!("chatcmpl-{id}"),
        Kind::Completion => format!("cmpl-{id}"),
    };
    let mut timing = Timing::new(started, tokenize_time, Instant::now());

    if !parsed.stream {
        let mut text = String::new();
        let mut finish = None;
        let mut usage = None;
        let mut chunks = 0usize;
        loop {
            let event = match tokio::time::timeout_at(deadline, generation.next()).await {
                Err(_) => {
                    settlement.usage = Usage::new(prompt_tokens, chunks);
                    settlement.settle(Outcome::Failed);
                    return Err(Error::Timeout(state.request_timeout));
                }
                Ok(None) => break,
                Ok(Some(event)) => event,
            };
            match event {
                Event::Delta {
                    text: t,
                    finish_reason,
                    usage: u,
                } => {
                    timing.token();
                    chunks += 1;
                    text.push_str(&t);
                    if u.is_some() {
                        usage = u;
                    }
                    if finish_reason.is_some() {
                        finish = finish_reason;
                        break;
                    }
                }
                Event::Done {
                    text: t,
                    finish_reason,
                    usage: u,
                } => {
                    timing.first_and_last(u.completion_tokens);
                    text = t;
                    finish = Some(finish_reason);
                    usage = Some(u);
                    break;
                }
                Event::Failed(e) => {
                    settlement.settle(Outcome::Failed);
                    return Err(e);
                }
            }
        }
        let usage = usage_or_counted(usage, prompt_tokens, chunks);
        settlement.usage = usage;
        record_usage(&state.metrics, usage, &timing);
        drop(in_flight);
        let finish_reason = openai_finish_reason(finish);
        tracing::info!(
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            %finish_reason,
            ttft_ms = timing.ttft_ms(),
            "completed"
        );
        let mut res = match parsed.kind {
            Kind::Chat => json(
                StatusCode::OK,
                &ChatCompletion {
                    id: response_id,
                    object: "chat.completion".into(),
                    created,
                    model: state.served_name.clone(),
                    choices: vec![ChatChoice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant".into(),
                            content: text,
                        },
                        finish_reason,
                        logprobs: None,
                    }],
                    usage: usage.into(),
                },
            ),
            Kind::Completion => json(
                StatusCode::OK,
                &Completion {
                    id: response_id,
                    object: "text_completion".into(),
                    created,
                    model: state.served_name.clone(),
                    choices: vec![CompletionChoice {
                        text,
                        index: 0,
                        logprobs: None,
                        finish_reason,
                    }],
                    usage: usage.into(),
                },
            ),
        };
        if let Some(bytes) = hyper::body::Body::size_hint(res.body()).exact() {
            settlement.add_response_bytes(bytes);
        }
        settlement.settle(Outcome::Completed);
        add_headers(&mut res, rate_headers);
        res.headers_mut()
            .insert(SERVER_TIMING, timing.server_timing());
        return Ok(res);
    }

    // Streaming: wait for the first token so an engine refusal is still a clean JSON error.
    let first = match tokio::time::timeout_at(deadline, generation.next()).await {
        Err(_) => {
            settlement.settle(Outcome::Failed);
            return Err(Error::Timeout(state.request_timeout));
        }
        Ok(None) => {
            settlement.settle(Outcome::Failed);
            return Err(Error::Engine(
                "the engine ended the request without output".into(),
            ));
        }
        Ok(Some(Event::Failed(e))) => {
            settlement.settle(Outcome::Failed);
            return Err(e);
        }
        Ok(Some(event)) => event,
    };
    let (tx, body) = stream::channel();
    let framer = Framer::new(
        parsed.kind,
        response_id,
        state.served_name.clone(),
        created,
        parsed.include_usage,
    );
    let mut relay = Relay {
        state: state.clone(),
        framer,
        tx,
        prompt_tokens,
        settlement,
        timing,
        deadline,
        sent: 0,
        chunks: 0,
        engine_usage: None,
        finish: None,
        _in_flight: in_flight,
    };
    // The first chunk is in the body before the response leaves, so the head and the first
    // token go out in one write instead of waiting for the relay task to be scheduled.
    let ended = relay.relay(first);
    let server_timing = relay.timing.server_timing();
    tokio::spawn(
        relay
            .run(ended, generation)
            .instrument(tracing::Span::current()),
    );
    let mut res = Response::new(body.boxed());
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(SERVER_TIMING, server_timing);
    add_headers(&mut res, rate_headers);
    Ok(res)
}

/// Relays one streaming generation to its response body; stops (and so cancels the
/// generation) when the client goes away.
struct Relay {
    state: Arc<AppState>,
    framer: Framer,
    tx: stream::BodySender,
    prompt_tokens: usize,
    settlement: Settlement,
    timing: Timing,
    deadline: TokioInstant,
    /// Body bytes sent so far (for byte limits).
    sent: u64,
    /// Engine events relayed (the completion-token count when the engine reports none).
    chunks: usize,
    engine_usage: Option<TokenUsage>,
    finish: Option<String>,
    _in_flight: InFlight,
}

impl Relay {
    /// Frames one engine event into the body; `Some` when the stream ends with it.
    fn relay(&mut self, event: Event) -> Option<Outcome> {
        let (text, finish_reason, usage) = match event {
            Event::Delta {
                text,
                finish_reason,
                usage,
            } => (text, finish_reason, usage),
            Event::Done {
                text,
                finish_reason,
                usage,
            } => (text, Some(finish_reason), Some(usage)),
            Event::Failed(e) => {
                tracing::warn!(error = %e, "generation failed mid-stream");
                let _ = send_counted(&self.tx, &mut self.sent, stream::data_event(&e.body()));
                return Some(Outcome::Failed);
            }
        };
        self.timing.token();
        self.chunks += 1;
        if usage.is_some() {
            self.engine_usage = usage;
        }
        let done = finish_reason.is_some();
        let fr = finish_reason.map(|f| openai_finish_reason(Some(f)));
        if done {
            self.finish = fr.clone();
        }
        if send_counted(&self.tx, &mut self.sent, self.framer.delta(text, fr)).is_err() {
            return Some(Outcome::Cancelled);
        }
        done.then_some(Outcome::Completed)
    }

    /// Relays the rest of the generation (nothing more when `ended` says it is over), then
    /// closes the stream and settles the request.
    async fn run(mut self, ended: Option<Outcome>, mut generation: crate::engine::Generation) {
        let outcome = match ended {
            Some(outcome) => outcome,
            None => loop {
                let event = tokio::select! {
                    // Notice a disconnect even while the engine is busy prefilling.
                    _ = self.tx.closed() => break Outcome::Cancelled,
                    r = tokio::time::timeout_at(self.deadline, generation.next()) => match r {
                        Err(_) => {
                            let e = Error::Timeout(self.state.request_timeout);
                            let _ = send_counted(&self.tx, &mut self.sent, stream::data_event(&e.body()));
                            break Outcome::Failed;
                        }
                        Ok(None) => break Outcome::Completed,
                        Ok(Some(event)) => event,
                    },
                };
                if let Some(outcome) = self.relay(event) {
                    break outcome;
                }
            },
        };
        // Dropping the generation here (before the body closes) tells the engine to stop.
        drop(generation);
        let usage = usage_or_counted(self.engine_usage, self.prompt_tokens, self.chunks);
        if outcome == Outcome::Completed {
            if let Some(bytes) = self.framer.usage(usage) {
                let _ = send_counted(&self.tx, &mut self.sent, bytes);
            }
            let _ = send_counted(&self.tx, &mut self.sent, Bytes::from_static(stream::DONE));
        } else if outcome == Outcome::Failed {
            let _ = send_counted(&self.tx, &mut self.sent, Bytes::from_static(stream::DONE));
        } else {
            self.state.metrics.cancelled.inc();
            tracing::info!(
                completion_tokens = self.chunks,
                "client disconnected; generation cancelled"
            );
        }
        self.settlement.usage = usage;
        self.settlement.add_response_bytes(self.sent);
        self.settlement.settle(outcome);
        record_usage(&self.state.metrics, usage, &self.timing);
        if outcome == Outcome::Completed {
            tracing::info!(
                prompt_tokens = usage.prompt_tokens,
                completion_tokens = usage.completion_tokens,
                finish_reason = self.finish.as_deref().unwrap_or("stop"),
                ttft_ms = self.timing.ttft_ms(),
                "completed"
            );
        }
    }
}

/// Sends one piece of a streamed body, counting its bytes.
fn send_counted(
    tx: &stream::BodySender,
    sent: &mut u64,
    bytes: Bytes,
) -> std::result::Result<(), tokio::sync::mpsc::error::SendError<Bytes>> {
    *sent = sent.saturating_add(bytes.len() as u64);
    tx.send(bytes)
}

/// Engine usage when it reported it, else the counted prompt plus one token per delta.
fn usage_or_counted(usage: Option<TokenUsage>, prompt_tokens: usize, deltas: usize) -> Usage {
    match usage {
        Some(u) => Usage::new(u.prompt_tokens, u.completion_tokens),
        None => Usage::new(prompt_tokens, deltas),
    }
}

fn openai_finish_reason(reason: Option<String>) -> String {
    match reason.as_deref() {
        Some("length") => "length".into(),
        Some("tool_calls") => "tool_calls".into(),
        _ => "stop".into(),
    }
}

fn record_usage(metrics: &Metrics, usage: Usage, timing: &Timing) {
    metrics.prompt_tokens.inc_by(usage.prompt_tokens as u64);
    metrics
        .completion_tokens
        .inc_by(usage.completion_tokens as u64);
    if let Some(first) = timing.first {
        metrics
            .time_to_first_token
            .observe(first.duration_since(timing.started).as_secs_f64());
        if let Some(last) = timing.last
            && usage.completion_tokens > 1
        {
            metrics.time_per_output_token.observe(
                last.duration_since(first).as_secs_f64() / (usage.completion_tokens - 1) as f64,
            );
        }
    }
    metrics
        .request_duration
        .observe(timing.started.elapsed().as_secs_f64());
}

/// Token timestamps of one request.
#[derive(Debug)]
struct Timing {
    started: Instant,
    /// Templating and tokenizing the prompt.
    tokenize: Duration,
    /// When the engine took the request.
    submitted: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
}

impl Timing {
    fn new(started: Instant, tokenize: Duration, submitted: Instant) -> Self {
        Self {
            started,
            tokenize,
            submitted,
            first: None,
            last: None,
        }
    }

    /// The `Server-Timing` header, in ms: `admit`, from the request's head to the engine
    /// taking it (the body, parsing, the prompt's tokenization, admission, queueing);
    /// `tokenize`, the part of it spent templating and tokenizing the prompt; `engine-ttft`,
    /// from the engine taking it to the first token (to the whole text for a `/v1/completions`
    /// request without streaming, which the engine answers at once). A client's time to first
    /// token less `admit` and `engine-ttft` is what the network and the HTTP layers took.
    fn server_timing(&self) -> HeaderValue {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let admit = ms(self.submitted.duration_since(self.started));
        let tokenize = ms(self.tokenize);
        let ttft = ms(self
            .first
            .unwrap_or(self.submitted)
            .duration_since(self.submitted));
        HeaderValue::from_str(&format!(
            "admit;dur={admit:.3}, tokenize;dur={tokenize:.3}, engine-ttft;dur={ttft:.3}"
        ))
        .unwrap_or_else(|_| HeaderValue::from_static("admit"))
    }

    fn token(&mut self) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
    }

    /// Non-streaming: only the end is seen; count it as both (no per-token timing).
    fn first_and_last(&mut self, _tokens: usize) {
        self.token();
    }

    fn ttft_ms(&self) -> Option<u64> {
        self.first
            .map(|f| f.duration_since(self.started).as_millis() as u64)
    }
}

/// Counts a request in `sluice_queue_depth` while it waits.
struct QueueGuard(Metrics);

impl QueueGuard {
    fn enter(metrics: &Metrics) -> Self {
        metrics.queue_depth.inc();
        Self(metrics.clone())
    }
}

impl Drop for QueueGuard {
    fn drop(&mut self) {
        self.0.queue_depth.dec();
    }
}

/// Holds the engine slot and counts the request in `sluice_requests_in_flight`.
struct InFlight {
    metrics: Metrics,
    _slot: crate::engine::Slot,
}

impl InFlight {
    fn enter(metrics: &Metrics, slot: crate::engine::Slot) -> Self {
        metrics.in_flight.inc();
        Self {
            metrics: metrics.clone(),
            _slot: slot,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight.dec();
    }
}

// === admin routes ===

/// Routes one admin request.
pub async fn admin(state: Arc<AdminState>, req: Request<Incoming>) -> Response<ResponseBody> {
    match (req.method(), req.uri().path()) {
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
            crate::metrics::encode(&state.registry),
        ),
        (_, path) => error_response(&Error::NotFound(path.to_owned())),
    }
}

// === serving ===

/// Accepts connections on `listener` and serves them with `handler` until `shutdown` turns
/// true; then stops accepting, lets in-flight requests finish for at most `grace`, and returns.
pub async fn serve<S, F, Fut>(
    listener: TcpListener,
    state: Arc<S>,
    handler: F,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) where
    S: Send + Sync + 'static,
    F: Fn(Arc<S>, Request<Incoming>) -> Fut + Copy + Send + Sync + 'static,
    Fut: Future<Output = Response<ResponseBody>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    let local = listener.local_addr().ok();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            // The watch guard must not live across the awaits below.
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => break,
        };
        let (stream, _peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = hyper::service::service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handler(state, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(error) = conn.await {
                tracing::debug!(%error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(addr = ?local, connections = graceful.count(), "stopped accepting; draining");
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!(addr = ?local, "all connections finished"),
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(addr = ?local, ?grace, "grace period over; closing remaining connections")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn chat(body: &str) -> Result<Parsed> {
        parse_json::<ChatCompletionRequest>(body.as_bytes())?.validate()
    }

    fn completion(body: &str) -> Result<Parsed> {
        parse_json::<CompletionRequest>(body.as_bytes())?.validate()
    }

    #[test]
    fn sampling_defaults_fill_only_what_the_request_left_unset() {
        let defaults = SamplingDefaults {
            temperature: Some(0.7),
            top_p: Some(0.9),
        };
        let mut p = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#)
            .unwrap()
            .params;
        defaults.apply(&mut p);
        assert_eq!((p.temperature, p.top_p), (Some(0.7), Some(0.9)));
        let mut p = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0,"top_p":0.5}"#,
        )
        .unwrap()
        .params;
        defaults.apply(&mut p);
        assert_eq!((p.temperature, p.top_p), (Some(0.0), Some(0.5)));
        // top_p 0 as a default: greedy.
        let greedy = SamplingDefaults {
            temperature: Some(1.0),
            top_p: Some(0.0),
        };
        let mut p = completion(r#"{"model":"m","prompt":"x"}"#).unwrap().params;
        greedy.apply(&mut p);
        assert_eq!((p.temperature, p.top_p), (Some(0.0), None));
    }

    #[test]
    fn parses_a_full_chat_request() {
        let p = chat(
            r#"{"model":"m","messages":[{"role":"developer","content":"be brief"},
                {"role":"user","content":[{"type":"text","text":"Hi"},{"type":"text","text":"!"}]}],
                "stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":8,
                "max_tokens":99,"temperature":0,"top_p":0.9,"stop":"\n","seed":1,"n":1,
                "user":"ignored","response_format":{"type":"text"}}"#,
        )
        .unwrap();
        assert_eq!(p.kind, Kind::Chat);
        assert!(p.stream && p.include_usage);
        assert_eq!(p.params.max_tokens, Some(8), "max_completion_tokens wins");
        assert_eq!(p.params.temperature, Some(0.0));
        assert_eq!(p.params.stop, vec!["\n".to_owned()]);
        let Prompt::Chat(turns) = p.prompt else {
            panic!("chat prompt")
        };
        assert_eq!(turns[0].role, "system");
        assert_eq!(turns[1].content, "Hi!");
    }

    #[test]
    fn include_usage_needs_stream() {
        let p = chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":{"include_usage":true}}"#).unwrap();
        assert!(!p.stream && !p.include_usage);
    }

    #[test]
    fn malformed_json_and_wrong_types_are_400s_with_different_messages() {
        let e = chat(r#"{"model":"m","messages":["#).unwrap_err();
        assert!(matches!(e, Error::MalformedJson(_)), "{e:?}");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e =
            chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#)
                .unwrap_err();
        assert!(matches!(e, Error::InvalidRequest { .. }), "{e:?}");
        assert!(e.to_string().contains("invalid type"), "{e}");
        let e = chat(r#"{"model":"m"}"#).unwrap_err();
        assert!(e.to_string().contains("missing field `messages`"), "{e}");
        let e = chat(r#"[1,2]"#).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        let base = r#""model":"m","messages":[{"role":"user","content":"x"}]"#;
        for (extra, param) in [
            (r#""messages":[]"#, "messages"),
            (r#""n":2"#, "n"),
            (r#""temperature":3"#, "temperature"),
            (r#""top_p":0"#, "top_p"),
            (r#""max_tokens":0"#, "max_tokens"),
            (r#""stop":["a","b","c","d","e"]"#, "stop"),
            (r#""presence_penalty":5"#, "presence_penalty"),
            (r#""logprobs":true"#, "logprobs"),
        ] {
            let body = if extra.starts_with(r#""messages""#) {
                format!(r#"{{"model":"m",{extra}}}"#)
            } else {
                format!("{{{base},{extra}}}")
            };
            let e = chat(&body).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{extra}");
            assert_eq!(e.body().error.param.as_deref(), Some(param), "{extra}: {e}");
        }
        let e = chat(r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#).unwrap_err();
        assert_eq!(e.body().error.param.as_deref(), Some("messages[0].role"));
        let e = chat(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"}}]}]}"#).unwrap_err();
        assert_eq!(e.body().error.code, Some("unsupported_parameter"));
    }

    #[test]
    fn completion_prompts() {
        let p = completion(r#"{"model":"m","prompt":"The capital of France is"}"#).unwrap();
        assert_eq!(p.prompt, Prompt::Text("The capital of France is".into()));
        assert_eq!(p.params.max_tokens, Some(16), "OpenAI's default");
        let p =
            completion(r#"{"model":"m","prompt":["one"],"max_tokens":3,"stream":true}"#).unwrap();
        assert_eq!(p.prompt, Prompt::Text("one".into()));
        assert!(p.stream && !p.include_usage);
        for body in [
            r#"{"model":"m","prompt":["a","b"]}"#,
            r#"{"model":"m","prompt":[1,2,3]}"#,
            r#"{"model":"m","prompt":""}"#,
            r#"{"model":"m","prompt":"x","echo":true}"#,
            r#"{"model":"m","prompt":"x","n":3}"#,
        ] {
            let e = completion(body).unwrap_err();
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{body}");
            assert!(e.body().error.param.as_deref().is_some(), "{body}");
        }
    }

    #[test]
    fn context_window_checks() {
        assert_eq!(completion_budget(100, 10, None).unwrap(), 90);
        assert_eq!(completion_budget(100, 10, Some(5)).unwrap(), 5);
        let e = completion_budget(100, 100, None).unwrap_err();
        assert_eq!(e.body().error.code, Some("context_length_exceeded"));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let e = completion_budget(100, 60, Some(50)).unwrap_err();
        assert!(
            e.to_string().contains("maximum context length is 100"),
            "{e}"
        );
    }

    #[test]
    fn finish_reasons_are_openai_values() {
        assert_eq!(openai_finish_reason(Some("length".into())), "length");
        assert_eq!(openai_finish_reason(Some("canceled".into())), "stop");
        assert_eq!(openai_finish_reason(None), "stop");
    }

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

//! The OpenAI wire types sluice serves: request bodies (fields we do not use are ignored, as
//! OpenAI-compatible servers do), JSON responses, and the chunks of streamed responses.

use serde::{Deserialize, Serialize};

use crate::usage::Usage;

/// `POST`: chat completions.
pub const CHAT_PATH: &str = "/v1/chat/completions";
/// `POST`: text completions.
pub const COMPLETIONS_PATH: &str = "/v1/completions";
/// `GET`: the served model (also `/v1/models/{id}`).
pub const MODELS_PATH: &str = "/v1/models";

/// Which generation API a request uses: it decides the request body, the response object and
/// the chunk shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

impl Kind {
    /// The route.
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => CHAT_PATH,
            Self::Completion => COMPLETIONS_PATH,
        }
    }

    /// The id of a response to request `request_id`: `chatcmpl-…` or `cmpl-…`.
    pub fn response_id(self, request_id: &str) -> String {
        match self {
            Self::Chat => format!("chatcmpl-{request_id}"),
            Self::Completion => format!("cmpl-{request_id}"),
        }
    }
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
    /// Token id (as a string) to a bias in -100..=100; kept as JSON so a wrong shape is a 400
    /// naming `logit_bias`, not a bare deserialization error.
    #[serde(default)]
    pub logit_bias: Option<serde_json::Value>,
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
    /// As for chat.
    #[serde(default)]
    pub logit_bias: Option<serde_json::Value>,
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
    /// The call a `tool` message answers (required there); kept as JSON so a non-string is a
    /// 400 naming `messages[i].tool_call_id`, not a bare deserialization error.
    #[serde(default)]
    pub tool_call_id: Option<serde_json::Value>,
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
    pub usage: Usage,
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
    pub usage: Usage,
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

// === streamed chunks ===

/// `chat.completion.chunk`.
#[derive(Debug, Serialize)]
pub struct ChatChunk<'a> {
    /// Same id on every chunk of a response.
    pub id: &'a str,
    /// Always `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model id.
    pub model: &'a str,
    /// Zero or one choice (zero on the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Present (null) on every chunk when usage was requested, set on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One choice in a chat chunk.
#[derive(Debug, Serialize)]
pub struct ChatChunkChoice {
    /// Always 0 (n = 1).
    pub index: usize,
    /// The new text.
    pub delta: ChatDelta,
    /// Always null.
    pub logprobs: Option<()>,
    /// Set on the last content chunk.
    pub finish_reason: Option<String>,
}

/// The delta of a chat chunk.
#[derive(Debug, Default, Serialize)]
pub struct ChatDelta {
    /// `assistant` on the first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// `text_completion` streaming chunk.
#[derive(Debug, Serialize)]
pub struct CompletionChunk<'a> {
    /// Same id on every chunk.
    pub id: &'a str,
    /// Always `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model id.
    pub model: &'a str,
    /// Zero or one choice.
    pub choices: Vec<CompletionChunkChoice>,
    /// As for chat.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// One choice in a completion chunk.
#[derive(Debug, Serialize)]
pub struct CompletionChunkChoice {
    /// New text.
    pub text: String,
    /// Always 0.
    pub index: usize,
    /// Always null.
    pub logprobs: Option<()>,
    /// Set on the last chunk.
    pub finish_reason: Option<String>,
}

//! The OpenAI wire types sluice serves: request bodies (fields that change nothing are ignored,
//! as OpenAI does; fields that would change the answer and are not supported are refused by
//! name: [`super::fields`]), JSON responses, and the chunks of streamed responses.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{engine::TokenLogprob, usage::Usage};

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

    /// OpenTelemetry's `gen_ai.operation.name` of the request.
    pub fn operation(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completion => "text_completion",
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

/// `POST /v1/chat/completions` body. Shapes OpenAI leaves open (`response_format`, `tools`,
/// `tool_choice`, ...) are kept as JSON, so that a wrong one is a 400 naming the field, not a bare
/// deserialization error.
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
    /// Seeds the request's sampling: reproducible on the same pod and dtype.
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
    /// Return each output token's log-probability.
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// 0..=20 most likely alternatives per token (needs `logprobs`).
    #[serde(default)]
    pub top_logprobs: Option<u64>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {...}}`.
    #[serde(default)]
    pub response_format: Option<Value>,
    /// Functions the model may call: `[{"type": "function", "function": {...}}]`.
    #[serde(default)]
    pub tools: Option<Value>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name": ...}}`.
    #[serde(default)]
    pub tool_choice: Option<Value>,
    /// Accepted: at most one call is made per answer, which every value allows.
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    /// Token id (as a string) to a bias in -100..=100.
    #[serde(default)]
    pub logit_bias: Option<Value>,
    /// Sampling extensions (vLLM's and llama.cpp's names).
    #[serde(flatten)]
    pub extensions: SamplingExtensions,
    /// Every other field: ignored, or refused by name when it would change the answer.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Sampling settings beyond OpenAI's that vLLM and llama.cpp's server take under these names.
#[derive(Debug, Default, Deserialize)]
pub struct SamplingExtensions {
    /// Keep the `top_k` most likely tokens (0: all).
    #[serde(default)]
    pub top_k: Option<u64>,
    /// Keep tokens at least this fraction as likely as the most likely one (0..=1).
    #[serde(default)]
    pub min_p: Option<f64>,
    /// Penalty on tokens already in the context (> 0; 1: none).
    #[serde(default)]
    pub repetition_penalty: Option<f32>,
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
    /// As for chat.
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
    /// Return each token's log-probability with this many (0..=5) alternatives.
    #[serde(default)]
    pub logprobs: Option<u64>,
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
    pub logit_bias: Option<Value>,
    /// As for chat.
    #[serde(flatten)]
    pub extensions: SamplingExtensions,
    /// As for chat.
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
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
    pub tool_call_id: Option<Value>,
    /// The calls an assistant message made (shown to the model in the follow-up turn).
    #[serde(default)]
    pub tool_calls: Option<Value>,
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
    /// One per `n`.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// A chat choice.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Which of the request's `n`.
    pub index: usize,
    /// The answer.
    pub message: AssistantMessage,
    /// `stop`, `length` or `tool_calls`.
    pub finish_reason: String,
    /// The tokens' log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
}

/// The assistant's message.
#[derive(Debug, Serialize, Deserialize)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: String,
    /// The text (null when the answer is a tool call).
    pub content: Option<String>,
    /// The calls the model made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// A function call the model made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// `call_…`: what the follow-up `tool` message names.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function and its arguments.
    pub function: FunctionCall,
}

/// The function of a [`ToolCall`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, a JSON object as a string.
    pub arguments: String,
}

/// A piece of a tool call in a streamed delta: the first has its id, type and name, the
/// following ones more of its arguments.
#[derive(Debug, Serialize)]
pub struct ToolCallDelta {
    /// Which call (always 0: one call per choice).
    pub index: usize,
    /// On the first piece.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function`, on the first piece.
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// The name (first piece) and more arguments.
    pub function: FunctionCallDelta,
}

/// The function part of a [`ToolCallDelta`].
#[derive(Debug, Serialize)]
pub struct FunctionCallDelta {
    /// On the first piece.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// More of the arguments.
    pub arguments: String,
}

/// A chat choice's `logprobs`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ChatLogprobs {
    /// One entry per output token.
    pub content: Vec<ChatTokenLogprob>,
}

/// One output token's log-probability in a chat answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChatTokenLogprob {
    /// The token.
    pub token: String,
    /// Its log-probability (≤ 0).
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
    /// The most likely tokens at its position.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// An alternative at one position.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChatTopLogprob {
    /// The token.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Vec<u8>,
}

impl ChatLogprobs {
    /// The chat shape of `logprobs`.
    pub fn new(logprobs: &[TokenLogprob]) -> Self {
        let content = logprobs
            .iter()
            .map(|l| ChatTokenLogprob {
                token: l.token.clone(),
                logprob: l.logprob,
                bytes: l.bytes.clone(),
                top_logprobs: l
                    .top
                    .iter()
                    .map(|t| ChatTopLogprob {
                        token: t.token.clone(),
                        logprob: t.logprob,
                        bytes: t.token.as_bytes().to_vec(),
                    })
                    .collect(),
            })
            .collect();
        Self { content }
    }
}

/// A text completion choice's `logprobs` (the legacy shape: parallel lists).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    /// The output tokens.
    pub tokens: Vec<String>,
    /// Their log-probabilities.
    pub token_logprobs: Vec<f32>,
    /// Per position, the most likely tokens and their log-probabilities.
    pub top_logprobs: Vec<BTreeMap<String, f32>>,
    /// Where each token starts in the completion's text (bytes from the start of the answer).
    pub text_offset: Vec<usize>,
}

impl CompletionLogprobs {
    /// The legacy shape of `logprobs`, the first token starting at `offset` in the answer.
    pub fn new(logprobs: &[TokenLogprob], mut offset: usize) -> Self {
        let mut out = Self::default();
        for l in logprobs {
            out.tokens.push(l.token.clone());
            out.token_logprobs.push(l.logprob);
            out.top_logprobs
                .push(l.top.iter().map(|t| (t.token.clone(), t.logprob)).collect());
            out.text_offset.push(offset);
            offset += l.token.len();
        }
        out
    }
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
    /// One per `n`.
    pub choices: Vec<CompletionChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// A completion choice.
#[derive(Debug, Serialize, Deserialize)]
pub struct CompletionChoice {
    /// The text.
    pub text: String,
    /// Which of the request's `n`.
    pub index: usize,
    /// The tokens' log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
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
    /// Which of the request's `n`.
    pub index: usize,
    /// The new text.
    pub delta: ChatDelta,
    /// The new tokens' log-probabilities, when asked for.
    pub logprobs: Option<ChatLogprobs>,
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
    /// A piece of the tool call the answer is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
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
    /// Which of the request's `n`.
    pub index: usize,
    /// The new tokens' log-probabilities, when asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// Set on the last chunk.
    pub finish_reason: Option<String>,
}

//! Engine tokens to Server-Sent Events: OpenAI's chunk shapes, the `data:` framing, the final
//! `data: [DONE]`, and a response body fed by a channel whose closing tells the producer that
//! the client went away.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use hyper::body::{Body, Bytes, Frame};
use serde::Serialize;
use tokio::sync::mpsc;

/// The last event of every stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";

/// Frames one SSE `data:` event holding `value` as JSON.
pub fn data_event<T: Serialize>(value: &T) -> Bytes {
    // JSON never contains a raw newline, so one `data:` line is enough.
    let mut out = b"data: ".to_vec();
    // Serialising our plain structs cannot fail; an empty object keeps the framing valid.
    if serde_json::to_writer(&mut out, value).is_err() {
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Token counts as OpenAI reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Sum of both.
    pub total_tokens: usize,
}

impl Usage {
    /// Usage from the two counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

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

/// Which chunk shape a stream uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// Builds the chunks of one response.
#[derive(Debug)]
pub struct Framer {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    include_usage: bool,
    sent_role: bool,
}

impl Framer {
    /// A framer for one response.
    pub fn new(kind: Kind, id: String, model: String, created: u64, include_usage: bool) -> Self {
        Self {
            kind,
            id,
            model,
            created,
            include_usage,
            sent_role: false,
        }
    }

    /// The event for new text (and the finish reason on the last one).
    pub fn delta(&mut self, text: String, finish_reason: Option<String>) -> Bytes {
        let usage = self.include_usage.then_some(None);
        match self.kind {
            Kind::Chat => {
                let role = (!self.sent_role).then_some("assistant");
                self.sent_role = true;
                let content =
                    (role.is_some() || !text.is_empty() || finish_reason.is_none()).then_some(text);
                data_event(&ChatChunk {
                    id: &self.id,
                    object: "chat.completion.chunk",
                    created: self.created,
                    model: &self.model,
                    choices: vec![ChatChunkChoice {
                        index: 0,
                        delta: ChatDelta { role, content },
                        logprobs: None,
                        finish_reason,
                    }],
                    usage,
                })
            }
            Kind::Completion => data_event(&CompletionChunk {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: vec![CompletionChunkChoice {
                    text,
                    index: 0,
                    logprobs: None,
                    finish_reason,
                }],
                usage,
            }),
        }
    }

    /// The usage chunk (no choices), when the client asked for it with
    /// `stream_options.include_usage`.
    pub fn usage(&self, usage: Usage) -> Option<Bytes> {
        if !self.include_usage {
            return None;
        }
        Some(match self.kind {
            Kind::Chat => data_event(&ChatChunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
            Kind::Completion => data_event(&CompletionChunk {
                id: &self.id,
                object: "text_completion",
                created: self.created,
                model: &self.model,
                choices: Vec::new(),
                usage: Some(Some(usage)),
            }),
        })
    }
}

/// The sending half of a [`ChannelBody`].
pub type BodySender = mpsc::UnboundedSender<Bytes>;

/// A response body fed through a channel. When hyper drops it (the client disconnected or the
/// connection closed) the sender sees a closed channel and stops the generation.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
}

/// A body and its sender. Unbounded so the engine is never held up by a slow reader; a
/// response is bounded by `max_tokens` anyway.
pub fn channel() -> (BodySender, ChannelBody) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, ChannelBody { rx })
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn parse(event: &Bytes) -> serde_json::Value {
        let s = std::str::from_utf8(event).unwrap();
        assert!(s.starts_with("data: "), "{s}");
        assert!(s.ends_with("\n\n"), "{s:?}");
        assert_eq!(s.matches('\n').count(), 2, "one line per event: {s:?}");
        serde_json::from_str(&s["data: ".len()..s.len() - 2]).unwrap()
    }

    #[test]
    fn chat_chunks_have_openai_shape() {
        let mut f = Framer::new(Kind::Chat, "chatcmpl-1".into(), "m".into(), 7, false);
        let first = parse(&f.delta("Hel".into(), None));
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["choices"][0]["delta"]["content"], "Hel");
        assert!(first["choices"][0]["finish_reason"].is_null());
        assert!(first.get("usage").is_none(), "no usage key unless asked");
        let second = parse(&f.delta("lo\nworld".into(), None));
        assert!(second["choices"][0]["delta"].get("role").is_none());
        assert_eq!(second["choices"][0]["delta"]["content"], "lo\nworld");
        let last = parse(&f.delta(String::new(), Some("stop".into())));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert!(last["choices"][0]["delta"].get("content").is_none());
        assert!(f.usage(Usage::new(1, 2)).is_none());
    }

    #[test]
    fn usage_chunk_when_asked() {
        let mut f = Framer::new(Kind::Completion, "cmpl-1".into(), "m".into(), 7, true);
        let c = parse(&f.delta(" Paris".into(), Some("length".into())));
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["text"], " Paris");
        assert!(c["usage"].is_null() && c.get("usage").is_some());
        let u = parse(&f.usage(Usage::new(5, 3)).unwrap());
        assert_eq!(u["choices"].as_array().unwrap().len(), 0);
        assert_eq!(u["usage"]["total_tokens"], 8);
    }

    #[tokio::test]
    async fn body_relays_and_reports_disconnect() {
        let (tx, body) = channel();
        tx.send(Bytes::from_static(b"data: {}\n\n")).unwrap();
        tx.send(Bytes::from_static(DONE)).unwrap();
        drop(tx);
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"data: {}\n\ndata: [DONE]\n\n");

        let (tx, body) = channel();
        drop(body);
        assert!(
            tx.send(Bytes::from_static(DONE)).is_err(),
            "closed body is visible"
        );
        assert!(tx.is_closed());
    }
}

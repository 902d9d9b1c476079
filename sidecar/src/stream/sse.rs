//! Server-Sent Events: the `data:` framing of OpenAI's chunks ([`Framer`]), the final
//! `data: [DONE]`, and the inverse, [`split_events`], which reads the events of a relayed stream.

use hyper::body::Bytes;
use serde::Serialize;

use crate::{
    openai::{
        Kind,
        types::{ChatChunk, ChatChunkChoice, ChatDelta, CompletionChunk, CompletionChunkChoice},
    },
    usage::Usage,
};

/// The last event of every stream.
pub const DONE: &[u8] = b"data: [DONE]\n\n";
/// [`DONE`]'s payload, as [`split_events`] reads it.
pub const DONE_PAYLOAD: &[u8] = b"[DONE]";

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

/// Splits the complete events off the front of `buf` (the inverse of [`data_event`]): calls
/// `each` with the payload of every `data:` event, then drops what it read, so that an event
/// cut across reads is completed by the next one.
pub fn split_events(buf: &mut Vec<u8>, mut each: impl FnMut(&[u8])) {
    let mut start = 0;
    while let Some(end) = find(&buf[start..], b"\n\n") {
        if let Some(payload) = buf[start..start + end].strip_prefix(b"data: ") {
            each(payload);
        }
        start += end + 2;
    }
    buf.drain(..start);
}

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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

#[cfg(test)]
mod tests {
    use super::*;

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
}

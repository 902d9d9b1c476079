//! Server-Sent Events: the `data:` framing of OpenAI's chunks ([`Framer`]), the final
//! `data: [DONE]`, and the inverse, [`split_events`], which reads the events of a relayed stream.

use hyper::body::Bytes;
use serde::Serialize;

use crate::{
    engine::TokenLogprob,
    openai::{
        Kind,
        tools::ToolAnswer,
        types::{
            ChatChunk, ChatChunkChoice, ChatDelta, ChatLogprobs, CompletionChunk,
            CompletionChunkChoice, CompletionLogprobs, FunctionCallDelta, ToolCallDelta,
        },
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
    choices: Vec<ChoiceFraming>,
}

/// What one choice's next chunk depends on.
#[derive(Debug)]
struct ChoiceFraming {
    sent_role: bool,
    /// Bytes of text framed so far (where the next token starts, for completion logprobs).
    offset: usize,
    /// When the answer is a tool call: how it is framed.
    tool: Option<ToolFraming>,
}

/// How a tool call is streamed: a named function's arguments as they come (the name is known
/// from the start); a call to any function whole at the end, once its name is complete; with
/// `auto`, text as it comes once the first token shows it is not a call.
#[derive(Debug)]
struct ToolFraming {
    answer: ToolAnswer,
    call_id: String,
    /// The output so far (only kept for a call whose name is not known yet).
    buffered: String,
    /// `auto`: whether the answer is text, once its first text has come.
    text: Option<bool>,
}

impl Framer {
    /// A framer for one response of `choices` choices; `tool`: the tool call each choice is,
    /// with the calls' ids (one per choice).
    pub fn new(
        kind: Kind,
        id: String,
        model: String,
        created: u64,
        include_usage: bool,
        choices: usize,
        tool: Option<(ToolAnswer, Vec<String>)>,
    ) -> Self {
        let choices = (0..choices.max(1))
            .map(|i| ChoiceFraming {
                sent_role: false,
                offset: 0,
                tool: tool.as_ref().map(|(answer, call_ids)| ToolFraming {
                    answer: answer.clone(),
                    call_id: call_ids.get(i).cloned().unwrap_or_default(),
                    buffered: String::new(),
                    text: None,
                }),
            })
            .collect();
        Self {
            kind,
            id,
            model,
            created,
            include_usage,
            choices,
        }
    }

    /// The event for new text of choice `index` (and the finish reason on its last one), with
    /// the log-probabilities of its tokens when they were asked for. Empty when there is nothing
    /// to send yet (a tool call being buffered).
    pub fn delta(
        &mut self,
        index: usize,
        text: String,
        finish_reason: Option<String>,
        logprobs: &[TokenLogprob],
    ) -> Bytes {
        let usage = self.include_usage.then_some(None);
        let Some(choice) = self.choices.get_mut(index) else {
            return Bytes::new();
        };
        let offset = choice.offset;
        choice.offset += text.len();
        match self.kind {
            Kind::Chat => {
                let role = (!choice.sent_role).then_some("assistant");
                let (content, tool_calls, finish_reason) = match &mut choice.tool {
                    None => {
                        let content =
                            (role.is_some() || !text.is_empty() || finish_reason.is_none())
                                .then_some(text);
                        (content, None, finish_reason)
                    }
                    Some(tool) => match tool.delta(role.is_some(), text, finish_reason) {
                        Some(framed) => framed,
                        None => return Bytes::new(),
                    },
                };
                choice.sent_role = true;
                data_event(&ChatChunk {
                    id: &self.id,
                    object: "chat.completion.chunk",
                    created: self.created,
                    model: &self.model,
                    choices: vec![ChatChunkChoice {
                        index,
                        delta: ChatDelta {
                            role,
                            content,
                            tool_calls,
                        },
                        logprobs: (!logprobs.is_empty()).then(|| ChatLogprobs::new(logprobs)),
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
                    index,
                    logprobs: (!logprobs.is_empty())
                        .then(|| CompletionLogprobs::new(logprobs, offset)),
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

type ChatPieces = (Option<String>, Option<Vec<ToolCallDelta>>, Option<String>);

impl ToolFraming {
    /// The content, tool-call piece and finish reason of one chat delta (`first`: the role goes
    /// with it); `None` when nothing is sent yet.
    fn delta(&mut self, first: bool, text: String, finish: Option<String>) -> Option<ChatPieces> {
        if self.answer == ToolAnswer::Auto {
            // The grammar lets no text start with `{`, and every call does.
            if self.text.is_none() && !text.is_empty() {
                self.text = Some(!text.starts_with('{'));
            }
            if self.text == Some(true) {
                let content = (first || !text.is_empty() || finish.is_none()).then_some(text);
                return Some((content, None, finish));
            }
        }
        let finish = finish.map(|f| match f.as_str() {
            "stop" => self.answer.finish_reason().to_owned(),
            _ => f,
        });
        match &self.answer {
            ToolAnswer::Named(name) => {
                let piece = ToolCallDelta {
                    index: 0,
                    id: first.then(|| self.call_id.clone()),
                    kind: first.then_some("function"),
                    function: FunctionCallDelta {
                        name: first.then(|| name.clone()),
                        arguments: text,
                    },
                };
                Some((None, Some(vec![piece]), finish))
            }
            ToolAnswer::Required | ToolAnswer::Auto => {
                self.buffered.push_str(&text);
                match finish {
                    // The role goes out at once, so the client sees the answer begin.
                    None if first => Some((None, None, None)),
                    None => None,
                    Some(finish) => match self.answer.call(&self.call_id, &self.buffered) {
                        Some(call) => {
                            let piece = ToolCallDelta {
                                index: 0,
                                id: Some(call.id),
                                kind: Some("function"),
                                function: FunctionCallDelta {
                                    name: Some(call.function.name),
                                    arguments: call.function.arguments,
                                },
                            };
                            Some((None, Some(vec![piece]), Some(finish)))
                        }
                        // Cut short: what was generated, as text.
                        None => {
                            Some((Some(std::mem::take(&mut self.buffered)), None, Some(finish)))
                        }
                    },
                }
            }
        }
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
        let mut f = Framer::new(
            Kind::Chat,
            "chatcmpl-1".into(),
            "m".into(),
            7,
            false,
            1,
            None,
        );
        let first = parse(&f.delta(0, "Hel".into(), None, &[]));
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(first["choices"][0]["delta"]["content"], "Hel");
        assert!(first["choices"][0]["finish_reason"].is_null());
        assert!(first.get("usage").is_none(), "no usage key unless asked");
        let second = parse(&f.delta(0, "lo\nworld".into(), None, &[]));
        assert!(second["choices"][0]["delta"].get("role").is_none());
        assert_eq!(second["choices"][0]["delta"]["content"], "lo\nworld");
        let last = parse(&f.delta(0, String::new(), Some("stop".into()), &[]));
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert!(last["choices"][0]["delta"].get("content").is_none());
        assert!(f.usage(Usage::new(1, 2)).is_none());
    }

    #[test]
    fn usage_chunk_when_asked() {
        let mut f = Framer::new(
            Kind::Completion,
            "cmpl-1".into(),
            "m".into(),
            7,
            true,
            1,
            None,
        );
        let c = parse(&f.delta(0, " Paris".into(), Some("length".into()), &[]));
        assert_eq!(c["object"], "text_completion");
        assert_eq!(c["choices"][0]["text"], " Paris");
        assert!(c["usage"].is_null() && c.get("usage").is_some());
        let u = parse(&f.usage(Usage::new(5, 3)).unwrap());
        assert_eq!(u["choices"].as_array().unwrap().len(), 0);
        assert_eq!(u["usage"]["total_tokens"], 8);
    }
}

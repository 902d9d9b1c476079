//! Answers: a generation's events become one OpenAI JSON object or a stream of Server-Sent
//! Events ([`respond`]), on a response body that notices when the client goes away; the
//! admitted request's reservation is settled when the answer ends (also on disconnect or error).

mod answer;
pub mod body;
mod relay;
pub mod sse;
pub mod timing;

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use http::{HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;
use tracing::Instrument;

pub use self::answer::{Answer, CACHE_HEADER};
use self::{
    body::{ResponseBody, add_headers, json},
    relay::{Piece, Progress, Relay, collect},
    sse::Framer,
    timing::{Deadline, InFlight, SERVER_TIMING, Timing, record_usage},
};
use crate::{
    admit::{Outcome, settle::Settlement},
    cache::Filler,
    engine::{Generation, TokenLogprob},
    metrics::Metrics,
    openai::{
        ApiError, Kind,
        tools::{self, ToolAnswer},
        types::{
            AssistantMessage, ChatChoice, ChatCompletion, ChatLogprobs, Completion,
            CompletionChoice, CompletionLogprobs,
        },
    },
    usage::Usage,
};

/// How to answer one admitted request, besides the generation itself.
#[derive(Debug)]
pub struct Reply {
    /// The metrics the answer updates.
    pub metrics: Metrics,
    /// Chat or text completion: the response object and the chunk shape.
    pub kind: Kind,
    /// SSE (true) or one JSON object.
    pub stream: bool,
    /// Whether a stream ends with a usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
    /// The request's id; the response's id derives from it.
    pub request_id: String,
    /// The model id responses carry.
    pub model: String,
    /// Exact prompt tokens (the usage when the engine reports none).
    pub prompt_tokens: usize,
    /// When the answer must end (timeout, end of the drain).
    pub deadline: Deadline,
    /// The admitted request's rate-limit headers (`x-ratelimit-*`).
    pub rate_headers: Vec<(HeaderName, HeaderValue)>,
    /// The response cache's entry this answer fills, when it completes (`None`: not cached).
    pub fill: Option<Filler<Arc<Answer>>>,
    /// The tool call the answer is, when the request forced one.
    pub tool_answer: Option<ToolAnswer>,
}

impl Reply {
    /// The chunks' framer of an answer of `choices` choices.
    fn framer(&self, response_id: String, created: u64, choices: usize) -> Framer {
        let tool = self.tool_answer.clone().map(|answer| {
            let call_ids = (0..choices)
                .map(|i| tools::call_id(&self.request_id, i))
                .collect();
            (answer, call_ids)
        });
        Framer::new(
            self.kind,
            response_id,
            self.model.clone(),
            created,
            self.include_usage,
            choices,
            tool,
        )
    }
}

/// Answers with `generation`: one JSON object, or (streaming) the response head as soon as the
/// first token is in its body, the rest relayed by a task of its own. The reservation is settled
/// when the answer ends.
pub async fn respond(
    mut reply: Reply,
    mut generation: Generation,
    mut settlement: Settlement,
    in_flight: InFlight,
    timing: Timing,
) -> Result<Response<ResponseBody>, ApiError> {
    let created = unix_now();
    let response_id = reply.kind.response_id(&reply.request_id);
    let choices = generation.choices();
    let mut progress = Progress::new(
        timing,
        reply.prompt_tokens,
        reply.metrics.completion_rate.clone(),
        choices,
    );

    if !reply.stream {
        let collected = collect(
            &mut progress,
            &mut generation,
            &mut settlement,
            &mut reply.deadline,
        )
        .await?;
        let usage = progress.usage();
        record_usage(&reply.metrics, usage, &progress.timing, progress.rated());
        drop(in_flight);
        tracing::info!(
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            finish_reason = progress.finish_reason(0),
            ttft_ms = progress.timing.ttft_ms(),
            "completed"
        );
        let choices: Vec<JsonChoice<'_>> = collected
            .iter()
            .enumerate()
            .map(|(i, c)| JsonChoice {
                text: &c.text,
                finish_reason: progress.finish_reason(i),
                logprobs: &c.logprobs,
            })
            .collect();
        let mut res = json_answer(&reply, response_id, created, &choices, usage);
        if let Some(filler) = reply.fill
            && let [only] = choices.as_slice()
        {
            filler.fill(Arc::new(Answer {
                text: only.text.to_owned(),
                finish_reason: only.finish_reason.to_owned(),
                usage,
            }));
        }
        if let Some(bytes) = hyper::body::Body::size_hint(res.body()).exact() {
            settlement.add_response_bytes(bytes);
        }
        settlement.settle_with(usage, Outcome::Completed);
        add_headers(&mut res, reply.rate_headers);
        res.headers_mut()
            .insert(SERVER_TIMING, progress.timing.server_timing());
        return Ok(res);
    }

    // Streaming: wait for the first token so an engine refusal is still a clean JSON error.
    let first = match reply.deadline.run(generation.next_choice()).await {
        Err(e) => {
            settlement.settle(Outcome::Failed);
            return Err(e);
        }
        Ok(None) => {
            settlement.settle(Outcome::Failed);
            return Err(ApiError::Engine(
                "the engine ended the request without output".into(),
            ));
        }
        Ok(Some(event)) => match progress.read(event) {
            Piece::Failed(e) => {
                settlement.settle(Outcome::Failed);
                return Err(e.into());
            }
            piece => piece,
        },
    };
    reply.deadline.first_token_came();
    let (tx, body) = body::channel();
    let framer = reply.framer(response_id, created, choices);
    let mut relay = Relay {
        metrics: reply.metrics,
        framer,
        tx,
        progress,
        settlement,
        deadline: reply.deadline,
        sent: 0,
        fill: reply.fill.map(|filler| (filler, String::new())),
        _in_flight: in_flight,
    };
    // The first chunk is in the body before the response leaves, so the head and the first
    // token go out in one write instead of waiting for the relay task to be scheduled.
    let ended = relay.relay(first);
    let server_timing = relay.progress.timing.server_timing();
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
    add_headers(&mut res, reply.rate_headers);
    Ok(res)
}

/// Answers from the response cache: `answer` as one JSON object or as a stream (its whole
/// text in one chunk), its usage marked `cached`, with `x-sluice-cache: hit`. The reservation
/// is settled with no tokens (the engine did no work; request limits were charged) once the
/// body is built: it is sent whole, at once.
pub fn replay(reply: Reply, answer: &Answer, mut settlement: Settlement) -> Response<ResponseBody> {
    let created = unix_now();
    let response_id = reply.kind.response_id(&reply.request_id);
    let usage = Usage {
        prompt_tokens: reply.prompt_tokens,
        total_tokens: reply.prompt_tokens + answer.usage.completion_tokens,
        cached: true,
        ..answer.usage
    };
    let mut res = if reply.stream {
        let mut framer = reply.framer(response_id, created, 1);
        let finish_reason = Some(answer.finish_reason.clone());
        let mut body = framer.delta(0, answer.text.clone(), None, &[]).to_vec();
        body.extend_from_slice(&framer.delta(0, String::new(), finish_reason, &[]));
        if let Some(usage) = framer.usage(usage) {
            body.extend_from_slice(&usage);
        }
        body.extend_from_slice(sse::DONE);
        let mut res = body::full(StatusCode::OK, "text/event-stream", body);
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        res
    } else {
        let choice = JsonChoice {
            text: &answer.text,
            finish_reason: &answer.finish_reason,
            logprobs: &[],
        };
        json_answer(&reply, response_id, created, &[choice], usage)
    };
    if let Some(bytes) = hyper::body::Body::size_hint(res.body()).exact() {
        settlement.add_response_bytes(bytes);
    }
    settlement.settle_with(Usage::new(0, 0), Outcome::Completed);
    add_headers(&mut res, reply.rate_headers);
    res.headers_mut()
        .insert(CACHE_HEADER, HeaderValue::from_static("hit"));
    res
}

/// One choice of a JSON answer.
struct JsonChoice<'a> {
    text: &'a str,
    finish_reason: &'a str,
    /// Its tokens' log-probabilities (empty: not asked for).
    logprobs: &'a [TokenLogprob],
}

/// One JSON answer (`chat.completion` or `text_completion`) of `choices`, with their tokens'
/// `logprobs` when they were asked for.
fn json_answer(
    reply: &Reply,
    id: String,
    created: u64,
    choices: &[JsonChoice<'_>],
    usage: Usage,
) -> Response<ResponseBody> {
    let model = reply.model.clone();
    match reply.kind {
        Kind::Chat => {
            let choices = choices
                .iter()
                .enumerate()
                .map(|(index, c)| chat_choice(reply, index, c))
                .collect();
            json(
                StatusCode::OK,
                &ChatCompletion {
                    id,
                    object: "chat.completion".into(),
                    created,
                    model,
                    choices,
                    usage,
                },
            )
        }
        Kind::Completion => json(
            StatusCode::OK,
            &Completion {
                id,
                object: "text_completion".into(),
                created,
                model,
                choices: choices
                    .iter()
                    .enumerate()
                    .map(|(index, c)| CompletionChoice {
                        text: c.text.to_owned(),
                        index,
                        logprobs: (!c.logprobs.is_empty())
                            .then(|| CompletionLogprobs::new(c.logprobs, 0)),
                        finish_reason: c.finish_reason.to_owned(),
                    })
                    .collect(),
                usage,
            },
        ),
    }
}

/// Choice `index` of a chat answer: its text, or the tool call it is when the request forced
/// one (and the text parses as one).
fn chat_choice(reply: &Reply, index: usize, choice: &JsonChoice<'_>) -> ChatChoice {
    let mut finish_reason = choice.finish_reason.to_owned();
    let call_id = tools::call_id(&reply.request_id, index);
    let call = reply
        .tool_answer
        .as_ref()
        .and_then(|tool| Some((tool, tool.call(&call_id, choice.text)?)));
    let message = match call {
        Some((tool, call)) => {
            if finish_reason == "stop" {
                finish_reason = tool.finish_reason().to_owned();
            }
            AssistantMessage {
                role: "assistant".into(),
                content: None,
                tool_calls: Some(vec![call]),
            }
        }
        None => AssistantMessage {
            role: "assistant".into(),
            content: Some(choice.text.to_owned()),
            tool_calls: None,
        },
    };
    ChatChoice {
        index,
        message,
        finish_reason,
        logprobs: (!choice.logprobs.is_empty()).then(|| ChatLogprobs::new(choice.logprobs)),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

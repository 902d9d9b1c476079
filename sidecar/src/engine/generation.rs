//! A submitted generation as its events come back from the engine: text deltas (with their
//! tokens' log-probabilities), the end, or a failure, for each of its choices.

use mistralrs::core::{Response, ResponseLogprob};
use tokio::sync::mpsc;

use super::error::EngineError;
use crate::usage::Usage;

/// One generated token's log-probability, with the most likely alternatives at its step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its natural-log probability (≤ 0).
    pub logprob: f32,
    /// Its UTF-8 bytes (a token may hold part of a character).
    pub bytes: Vec<u8>,
    /// The most likely tokens at that step, most likely first.
    pub top: Vec<TokenAlternative>,
}

/// A token the model could have generated at one step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenAlternative {
    /// The token's text.
    pub token: String,
    /// Its natural-log probability.
    pub logprob: f32,
}

impl From<ResponseLogprob> for TokenLogprob {
    fn from(l: ResponseLogprob) -> Self {
        Self {
            bytes: l.bytes.unwrap_or_else(|| l.token.as_bytes().to_vec()),
            token: l.token,
            logprob: l.logprob,
            top: l
                .top_logprobs
                .into_iter()
                .map(|t| TokenAlternative {
                    token: t.bytes.unwrap_or_default(),
                    logprob: t.logprob,
                })
                .collect(),
        }
    }
}

/// What a running generation yields.
#[derive(Debug)]
pub enum Event {
    /// New text (possibly empty); the last one carries a finish reason.
    Delta {
        /// Text since the previous event.
        text: String,
        /// `stop` or `length` on the last delta.
        finish_reason: Option<String>,
        /// Counted usage, on the last delta when the engine reports it.
        usage: Option<Usage>,
        /// The log-probabilities of the tokens in `text`, when asked for.
        logprobs: Vec<TokenLogprob>,
    },
    /// The whole completion at once (non-streaming `/v1/completions`).
    Done {
        /// The completion.
        text: String,
        /// Why it stopped.
        finish_reason: String,
        /// Counted usage.
        usage: Usage,
        /// The log-probabilities of its tokens, when asked for.
        logprobs: Vec<TokenLogprob>,
    },
    /// The engine refused or failed the request.
    Failed(EngineError),
}

/// A submitted generation: one sequence per choice (OpenAI's `n`). Dropping it cancels them
/// all: the engine's next attempt to send a token fails and it stops the sequence.
#[derive(Debug)]
pub struct Generation {
    /// One per choice; `None` once the engine has finished with it.
    choices: Vec<Option<mpsc::Receiver<Response>>>,
    /// The choice read first on the next call, so that no choice starves the others.
    turn: usize,
}

impl Generation {
    /// The generation whose choices answer on `choices`, in order.
    pub(super) fn new(choices: Vec<mpsc::Receiver<Response>>) -> Self {
        Self {
            choices: choices.into_iter().map(Some).collect(),
            turn: 0,
        }
    }
}

// === impl Generation ===

impl Generation {
    /// How many choices it generates.
    pub fn choices(&self) -> usize {
        self.choices.len()
    }

    /// The next event of any choice, or `None` once the engine has finished with the request.
    pub async fn next(&mut self) -> Option<Event> {
        self.next_choice().await.map(|(_, event)| event)
    }

    /// The next event and the choice it belongs to, or `None` once the engine has finished with
    /// every choice. Choices are read in turn, so one that streams fast does not hold back the
    /// others' tokens.
    pub async fn next_choice(&mut self) -> Option<(usize, Event)> {
        let (index, response) = std::future::poll_fn(|cx| {
            let n = self.choices.len();
            let mut open = false;
            for k in 0..n {
                let i = (self.turn + k) % n;
                let Some(rx) = &mut self.choices[i] else {
                    continue;
                };
                match rx.poll_recv(cx) {
                    std::task::Poll::Ready(Some(response)) => {
                        self.turn = (i + 1) % n;
                        return std::task::Poll::Ready(Some((i, response)));
                    }
                    std::task::Poll::Ready(None) => self.choices[i] = None,
                    std::task::Poll::Pending => open = true,
                }
            }
            if open {
                std::task::Poll::Pending
            } else {
                std::task::Poll::Ready(None)
            }
        })
        .await?;
        Some((index, Self::event(response)))
    }

    fn event(response: Response) -> Event {
        match response {
            Response::Chunk(chunk) => {
                let usage = chunk
                    .usage
                    .as_ref()
                    .map(|u| Usage::new(u.prompt_tokens, u.completion_tokens));
                let choice = chunk.choices.into_iter().next();
                let (text, finish_reason, logprobs) = choice
                    .map(|c| {
                        let logprobs = c.logprobs.into_iter().map(TokenLogprob::from).collect();
                        (
                            c.delta.content.unwrap_or_default(),
                            c.finish_reason,
                            logprobs,
                        )
                    })
                    .unwrap_or_default();
                Event::Delta {
                    text,
                    finish_reason,
                    usage,
                    logprobs,
                }
            }
            Response::CompletionChunk(chunk) => {
                let choice = chunk.choices.into_iter().next();
                let (text, finish_reason, logprobs) = choice
                    .map(|c| {
                        let logprobs = c.logprobs.into_iter().map(TokenLogprob::from).collect();
                        (c.text, c.finish_reason, logprobs)
                    })
                    .unwrap_or_default();
                Event::Delta {
                    text,
                    finish_reason,
                    usage: None,
                    logprobs,
                }
            }
            Response::CompletionDone(done) => {
                let usage = Usage::new(done.usage.prompt_tokens, done.usage.completion_tokens);
                let choice = done.choices.into_iter().next();
                let (text, finish_reason, logprobs) = choice
                    .map(|c| {
                        let logprobs = c.logprobs.and_then(|l| l.content).unwrap_or_default();
                        let logprobs = logprobs.into_iter().map(TokenLogprob::from).collect();
                        (c.text, c.finish_reason, logprobs)
                    })
                    .unwrap_or_else(|| (String::new(), "stop".to_owned(), Vec::new()));
                Event::Done {
                    text,
                    finish_reason,
                    usage,
                    logprobs,
                }
            }
            Response::Done(done) => {
                let usage = Usage::new(done.usage.prompt_tokens, done.usage.completion_tokens);
                let choice = done.choices.into_iter().next();
                let (text, finish_reason, logprobs) = choice
                    .map(|c| {
                        let logprobs = c.logprobs.and_then(|l| l.content).unwrap_or_default();
                        let logprobs = logprobs.into_iter().map(TokenLogprob::from).collect();
                        (
                            c.message.content.unwrap_or_default(),
                            c.finish_reason,
                            logprobs,
                        )
                    })
                    .unwrap_or_else(|| (String::new(), "stop".to_owned(), Vec::new()));
                Event::Done {
                    text,
                    finish_reason,
                    usage,
                    logprobs,
                }
            }
            Response::ValidationError(e) => Event::Failed(EngineError::Rejected(e.to_string())),
            Response::InternalError(e) => Event::Failed(EngineError::Failed(e.to_string())),
            Response::ModelError(msg, _) | Response::CompletionModelError(msg, _) => {
                Event::Failed(EngineError::Failed(msg))
            }
            _ => Event::Failed(EngineError::Failed("unexpected engine response".into())),
        }
    }
}

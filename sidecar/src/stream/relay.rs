//! Engine events to an answer: one JSON object ([`collect`]) or SSE chunks as they come
//! ([`Relay`]). Both read events through [`Progress`], so they count tokens, token times and
//! finish reasons alike.

use std::sync::Arc;

use hyper::body::Bytes;
use tokio::sync::mpsc::error::SendError;

use super::{
    answer::Answer,
    body::BodySender,
    sse::{DONE, Framer, data_event},
    timing::{Deadline, InFlight, Timing, record_usage},
};
use crate::{
    admit::{Outcome, settle::Settlement},
    cache::Filler,
    engine::{EngineError, Event, Generation, TokenLogprob},
    metrics::{Metrics, TokenRate},
    openai::ApiError,
    usage::Usage,
};

/// One generation as its events arrive: the token times, how many text events came, the usage
/// the engine reported and the finish reason, per choice.
pub(super) struct Progress {
    pub(super) timing: Timing,
    prompt_tokens: usize,
    /// `sluice_completion_tokens_per_second`: each streamed delta counts as it comes, so a long
    /// generation shows in the rate while it runs, not all at once when it ends.
    rate: Arc<TokenRate>,
    /// Tokens counted into `rate` so far (the rest of the usage is counted at the end).
    rated: usize,
    choices: Vec<ChoiceProgress>,
}

/// One choice's progress.
#[derive(Default)]
struct ChoiceProgress {
    /// Text events read (the completion-token count when the engine reports none).
    chunks: usize,
    engine_usage: Option<Usage>,
    /// OpenAI's finish reason, once the last event has come.
    finish: Option<String>,
}

/// One engine event as the client sees it.
pub(super) enum Piece {
    /// New text of choice `index`; its last piece carries OpenAI's finish reason.
    Text {
        /// The choice.
        index: usize,
        /// The text since the previous piece.
        text: String,
        /// `stop`, `length` or `tool_calls` on the last piece.
        finish_reason: Option<String>,
        /// Its tokens' log-probabilities, when asked for.
        logprobs: Vec<TokenLogprob>,
    },
    /// The engine refused or failed the request.
    Failed(EngineError),
}

impl Progress {
    pub(super) fn new(
        timing: Timing,
        prompt_tokens: usize,
        rate: Arc<TokenRate>,
        choices: usize,
    ) -> Self {
        Self {
            timing,
            prompt_tokens,
            rate,
            rated: 0,
            choices: (0..choices.max(1))
                .map(|_| ChoiceProgress::default())
                .collect(),
        }
    }

    /// Reads one event of choice `index`: a delta, or the whole text at once (which counts as
    /// the last delta).
    pub(super) fn read(&mut self, (index, event): (usize, Event)) -> Piece {
        let (text, finish_reason, usage, logprobs) = match event {
            Event::Delta {
                text,
                finish_reason,
                usage,
                logprobs,
            } => {
                // A delta is a token; a last one carrying only the finish reason is not.
                if !text.is_empty() {
                    self.rate.record(1);
                    self.rated += 1;
                }
                (text, finish_reason, usage, logprobs)
            }
            // Non-streaming `/v1/completions`: only the end is seen, so it counts as both the
            // first and the last token (no per-token timing).
            Event::Done {
                text,
                finish_reason,
                usage,
                logprobs,
            } => (text, Some(finish_reason), Some(usage), logprobs),
            Event::Failed(e) => return Piece::Failed(e),
        };
        self.timing.token();
        let Some(choice) = self.choices.get_mut(index) else {
            return Piece::Failed(EngineError::Failed(format!("no choice {index}")));
        };
        choice.chunks += 1;
        if usage.is_some() {
            choice.engine_usage = usage;
        }
        let finish_reason = finish_reason.map(|f| openai_finish_reason(Some(f)));
        if finish_reason.is_some() {
            choice.finish = finish_reason.clone();
        }
        Piece::Text {
            index,
            text,
            finish_reason,
            logprobs,
        }
    }

    /// Whether the last event of every choice has come.
    pub(super) fn finished(&self) -> bool {
        self.choices.iter().all(|c| c.finish.is_some())
    }

    /// The prompt once and every choice's completion: the engine's counts when it reported
    /// them, else the counted prompt and one token per delta.
    pub(super) fn usage(&self) -> Usage {
        let prompt = self
            .choices
            .iter()
            .find_map(|c| c.engine_usage.map(|u| u.prompt_tokens))
            .unwrap_or(self.prompt_tokens);
        let completion = self
            .choices
            .iter()
            .map(|c| c.engine_usage.map_or(c.chunks, |u| u.completion_tokens))
            .sum();
        Usage::new(prompt, completion)
    }

    /// Text events read so far, all choices together.
    fn chunks(&self) -> usize {
        self.choices.iter().map(|c| c.chunks).sum()
    }

    /// Completion tokens already counted in the token rate.
    pub(super) fn rated(&self) -> usize {
        self.rated
    }

    /// OpenAI's finish reason of choice `index` (`stop` when the engine ended without one).
    pub(super) fn finish_reason(&self, index: usize) -> &str {
        self.choices
            .get(index)
            .and_then(|c| c.finish.as_deref())
            .unwrap_or("stop")
    }
}

fn openai_finish_reason(reason: Option<String>) -> String {
    match reason.as_deref() {
        Some("length") => "length".into(),
        Some("tool_calls") => "tool_calls".into(),
        _ => "stop".into(),
    }
}

/// One choice's whole text and its tokens' log-probabilities (when asked for).
#[derive(Default)]
pub(super) struct CollectedChoice {
    pub(super) text: String,
    pub(super) logprobs: Vec<TokenLogprob>,
}

/// Reads the whole generation for a JSON answer: each choice's text and log-probabilities, or
/// the error that ended it (the reservation then settled as failed).
pub(super) async fn collect(
    progress: &mut Progress,
    generation: &mut Generation,
    settlement: &mut Settlement,
    deadline: &mut Deadline,
) -> Result<Vec<CollectedChoice>, ApiError> {
    let mut choices: Vec<CollectedChoice> = (0..progress.choices.len())
        .map(|_| CollectedChoice::default())
        .collect();
    loop {
        let event = match deadline.run(generation.next_choice()).await {
            Err(e) => {
                let counted = Usage::new(progress.prompt_tokens, progress.chunks());
                settlement.settle_with(counted, Outcome::Failed);
                return Err(e);
            }
            Ok(None) => break,
            Ok(Some(event)) => event,
        };
        deadline.first_token_came();
        match progress.read(event) {
            Piece::Text {
                index,
                text,
                logprobs,
                ..
            } => {
                if let Some(choice) = choices.get_mut(index) {
                    choice.text.push_str(&text);
                    choice.logprobs.extend(logprobs);
                }
                if progress.finished() {
                    break;
                }
            }
            Piece::Failed(e) => {
                settlement.settle(Outcome::Failed);
                return Err(e.into());
            }
        }
    }
    Ok(choices)
}

/// Relays one streaming generation to its response body; stops (and so cancels the
/// generation) when the client goes away.
pub(super) struct Relay {
    pub(super) metrics: Metrics,
    pub(super) framer: Framer,
    pub(super) tx: BodySender,
    pub(super) progress: Progress,
    pub(super) settlement: Settlement,
    /// When the stream must end (timeout, end of the drain), with an error event.
    pub(super) deadline: Deadline,
    /// Body bytes sent so far (for byte limits).
    pub(super) sent: u64,
    /// The response cache's entry to fill, and the text so far.
    pub(super) fill: Option<(Filler<Arc<Answer>>, String)>,
    pub(super) _in_flight: InFlight,
}

impl Relay {
    /// Frames one piece into the body; `Some` when the stream ends with it.
    pub(super) fn relay(&mut self, piece: Piece) -> Option<Outcome> {
        match piece {
            Piece::Failed(e) => {
                tracing::warn!(error = %e, "generation failed mid-stream");
                let _ = self.send(data_event(&ApiError::from(e).body()));
                Some(Outcome::Failed)
            }
            Piece::Text {
                index,
                text,
                finish_reason,
                logprobs,
            } => {
                if let Some((_, so_far)) = &mut self.fill {
                    so_far.push_str(&text);
                }
                let event = self.framer.delta(index, text, finish_reason, &logprobs);
                if !event.is_empty() && self.send(event).is_err() {
                    return Some(Outcome::Cancelled);
                }
                self.progress.finished().then_some(Outcome::Completed)
            }
        }
    }

    /// Sends one piece of the body, counting its bytes.
    fn send(&mut self, bytes: Bytes) -> Result<(), SendError<Bytes>> {
        self.sent = self.sent.saturating_add(bytes.len() as u64);
        self.tx.send(bytes)
    }

    /// Relays the rest of the generation (nothing more when `ended` says it is over), then
    /// closes the stream and settles the request.
    pub(super) async fn run(mut self, ended: Option<Outcome>, mut generation: Generation) {
        let outcome = match ended {
            Some(outcome) => outcome,
            None => loop {
                let event = tokio::select! {
                    // Notice a disconnect even while the engine is busy prefilling.
                    _ = self.tx.closed() => break Outcome::Cancelled,
                    r = self.deadline.run(generation.next_choice()) => match r {
                        Err(e) => {
                            tracing::warn!(error = %e, "stream ended early");
                            let _ = self.send(data_event(&e.body()));
                            break Outcome::Failed;
                        }
                        Ok(None) => break Outcome::Completed,
                        Ok(Some(event)) => event,
                    },
                };
                let piece = self.progress.read(event);
                if let Some(outcome) = self.relay(piece) {
                    break outcome;
                }
            },
        };
        // Dropping the generation here (before the body closes) tells the engine to stop.
        drop(generation);
        let usage = self.progress.usage();
        if outcome == Outcome::Completed {
            if let Some(bytes) = self.framer.usage(usage) {
                let _ = self.send(bytes);
            }
            let _ = self.send(Bytes::from_static(DONE));
            if let Some((filler, text)) = self.fill.take() {
                filler.fill(Arc::new(Answer {
                    text,
                    finish_reason: self.progress.finish_reason(0).to_owned(),
                    usage,
                }));
            }
        } else if outcome == Outcome::Failed {
            let _ = self.send(Bytes::from_static(DONE));
        } else {
            self.metrics.cancelled.inc();
            tracing::info!(
                completion_tokens = self.progress.chunks(),
                "client disconnected; generation cancelled"
            );
        }
        self.settlement.add_response_bytes(self.sent);
        self.settlement.settle_with(usage, outcome);
        record_usage(
            &self.metrics,
            usage,
            &self.progress.timing,
            self.progress.rated(),
        );
        if outcome == Outcome::Completed {
            tracing::info!(
                prompt_tokens = usage.prompt_tokens,
                completion_tokens = usage.completion_tokens,
                finish_reason = self.progress.finish_reason(0),
                ttft_ms = self.progress.timing.ttft_ms(),
                "completed"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_reasons_are_openai_values() {
        assert_eq!(openai_finish_reason(Some("length".into())), "length");
        assert_eq!(openai_finish_reason(Some("canceled".into())), "stop");
        assert_eq!(openai_finish_reason(None), "stop");
    }
}

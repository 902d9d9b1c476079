//! How a request's time goes and what it occupies meanwhile: token timestamps and the
//! `Server-Timing` header ([`Timing`]), the bounded queue in front of the engine ([`queue`]), and
//! the gauges that count a request while it waits and while it runs.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use http::{HeaderName, HeaderValue};
use prometheus_client::metrics::counter::Counter;
use tokio::{sync::watch, time::Instant as TokioInstant};
use tracing::Instrument;

use crate::{
    engine::{Slot, Slots},
    metrics::Metrics,
    openai::ApiError,
    usage::Usage,
};

/// Where a response says how its time went ([`Timing::server_timing`]).
pub const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// When a request must be over: at its timeout, before its first token at the first-token
/// timeout, or when the drain's grace period ends.
#[derive(Clone, Debug)]
pub struct Deadline {
    /// When the request times out.
    pub at: TokioInstant,
    /// The per-request timeout (for the error).
    pub timeout: Duration,
    /// When the first token must have come, and the first-token timeout (for the error);
    /// `None` once it has come.
    pub first_token: Option<(TokioInstant, Duration)>,
    /// The end of the drain's grace period.
    pub drain_cut: DrainCut,
}

/// The end of the drain's grace period, which ends the answers still running: the signal and
/// the counter of answers it ended.
#[derive(Clone, Debug)]
pub struct DrainCut {
    /// Turns true when the grace period is over.
    pub signal: watch::Receiver<bool>,
    /// Counts the answers the end of the grace period ended.
    pub count: Counter,
}

impl DrainCut {
    /// Resolves when the grace period is over (never, if the sender is gone without it: the
    /// process is going anyway).
    pub async fn wait(&mut self) {
        if self.signal.wait_for(|cut| *cut).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Deadline {
    /// The first token has come: from now on only the whole request's timeout applies.
    pub fn first_token_came(&mut self) {
        self.first_token = None;
    }

    /// `work`'s output, or why the request had to end first: [`ApiError::FirstTokenTimeout`],
    /// [`ApiError::Timeout`], or [`ApiError::Draining`] (counted) at the end of the grace period.
    pub async fn run<F: Future>(&mut self, work: F) -> Result<F::Output, ApiError> {
        let first_token = self.first_token.filter(|(at, _)| *at < self.at);
        let at = first_token.map_or(self.at, |(at, _)| at);
        tokio::select! {
            biased;
            out = tokio::time::timeout_at(at, work) => out.map_err(|_| match first_token {
                Some((_, timeout)) => ApiError::FirstTokenTimeout(timeout),
                None => ApiError::Timeout(self.timeout),
            }),
            () = self.drain_cut.wait() => {
                self.drain_cut.count.inc();
                Err(ApiError::Draining)
            }
        }
    }
}

/// Waits in the bounded queue in front of the engine (counted in `sluice_queue_depth`) for a
/// slot, until the request's deadline. The slot comes back counted in
/// `sluice_requests_in_flight`.
pub async fn queue(
    metrics: &Metrics,
    slots: &Slots,
    deadline: &mut Deadline,
) -> Result<InFlight, ApiError> {
    let queued = QueueGuard::enter(metrics);
    let slot = deadline
        .run(slots.acquire())
        .instrument(tracing::info_span!("queue"))
        .await?;
    drop(queued);
    Ok(InFlight::enter(metrics, slot?))
}

/// Counts a finished request's tokens, and its time to first token, time per output token and
/// duration. `rated` completion tokens were counted in the token rate as they came; the rest
/// of the usage (all of it for an answer the engine gave at once) is counted now.
pub fn record_usage(metrics: &Metrics, usage: Usage, timing: &Timing, rated: usize) {
    metrics.prompt_tokens.inc_by(usage.prompt_tokens as u64);
    metrics
        .completion_tokens
        .inc_by(usage.completion_tokens as u64);
    metrics
        .completion_rate
        .record(usage.completion_tokens.saturating_sub(rated) as u64);
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
    let span = &timing.request;
    span.record("gen_ai.usage.output_tokens", usage.completion_tokens);
    if let Some(first) = timing.first {
        let ttft = first.duration_since(timing.started).as_secs_f64();
        span.record("gen_ai.server.time_to_first_token", ttft);
    }
}

/// Token timestamps of one request, and the trace spans of its engine phases.
#[derive(Debug)]
pub struct Timing {
    started: Instant,
    /// Templating and tokenizing the prompt.
    tokenize: Duration,
    /// When the engine took the request.
    submitted: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    /// The request's span, which the usage and time to first token are recorded on.
    request: tracing::Span,
    /// `prefill` until the first token, then `decode` until the answer ends (dropped with it).
    phase: tracing::Span,
}

impl Timing {
    /// The request arrived at `started`, its prompt took `tokenize` to template and tokenize,
    /// and the engine took it at `submitted`. Made within the request's span (`http::api`).
    pub fn new(started: Instant, tokenize: Duration, submitted: Instant) -> Self {
        let request = tracing::Span::current();
        Self {
            started,
            tokenize,
            submitted,
            first: None,
            last: None,
            phase: tracing::info_span!(parent: &request, "prefill"),
            request,
        }
    }

    /// The `Server-Timing` header, in ms: `admit`, from the request's head to the engine
    /// taking it (the body, parsing, the prompt's tokenization, admission, queueing);
    /// `tokenize`, the part of it spent templating and tokenizing the prompt; `engine-ttft`,
    /// from the engine taking it to the first token (to the whole text for a `/v1/completions`
    /// request without streaming, which the engine answers at once). A client's time to first
    /// token less `admit` and `engine-ttft` is what the network and the HTTP layers took.
    pub fn server_timing(&self) -> HeaderValue {
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

    /// A token arrived now.
    pub fn token(&mut self) {
        let now = Instant::now();
        if self.first.is_none() {
            self.first = Some(now);
            self.phase = tracing::info_span!(parent: &self.request, "decode");
        }
        self.last = Some(now);
    }

    /// Milliseconds from arrival to the first token, once there was one.
    pub fn ttft_ms(&self) -> Option<u64> {
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
pub struct InFlight {
    metrics: Metrics,
    _slot: Slot,
}

impl InFlight {
    fn enter(metrics: &Metrics, slot: Slot) -> Self {
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

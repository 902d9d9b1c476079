//! The mistral.rs engine, in-process: load GGUF weights once, count prompt tokens, submit
//! generations and read their tokens back.
//!
//! The engine batches every running sequence into one forward pass per step (continuous
//! batching); this wrapper only bounds how many requests it holds at once ([`Slots`]).
//!
//! Loading never touches the Hugging Face hub: the model id handed to mistral.rs is the local
//! directory of the GGUF file, so its file lookups resolve on disk, and the tokenizer and chat
//! template come from the GGUF metadata.

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use either::Either;
use indexmap::IndexMap;
use mistralrs::core::{
    AutoDeviceMapParams, DefaultSchedulerMethod, DeviceMapSetting, GGUFLoaderBuilder,
    GGUFSpecificConfig, MessageContent, MistralRs, MistralRsBuilder, ModelDType, NormalRequest,
    PromptTokenizer, Request, RequestMessage, Response, SamplingParams, SchedulerConfig,
    StopTokens, TokenSource, TokenizationRequest,
};
use tokio::sync::{Semaphore, mpsc};

/// The prefix cache's byte budget and counts (`sluice_prefix_cache_*` in `/metrics`).
pub use mistralrs::core::PrefixCacheMeter;

use crate::{
    config::Activations,
    error::{Error, Result},
};

/// What the engine needs to load a model.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// GGUF file to load (already converted, if conversion was asked for).
    pub model: PathBuf,
    /// The model id responses carry.
    pub served_name: String,
    /// Activation dtype.
    pub dtype: Activations,
    /// Kernel threads (None: all cores).
    pub threads: Option<usize>,
    /// Nice value of the kernel threads (0: the HTTP threads' priority).
    pub kernel_nice: i32,
    /// Sequences batched at once.
    pub max_seqs: usize,
    /// Requests that may wait for a slot.
    pub max_queue: usize,
    /// Prefix cache size in sequences (0: off).
    pub prefix_cache: usize,
    /// The prefix cache's byte budget (0: off), and where it reports what it holds.
    pub prefix_cache_meter: Arc<PrefixCacheMeter>,
    /// Cap on the context window (`--context-length`); `None`: the model's own.
    pub context_length: Option<usize>,
}

/// A loaded model and its engine. Cloning shares the engine.
#[derive(Clone)]
pub struct Engine {
    runner: Arc<MistralRs>,
    /// Templates and tokenizes prompts as the engine would, off the engine loop.
    prompt_tokenizer: PromptTokenizer,
    served_name: Arc<str>,
    max_context: usize,
    slots: Slots,
}

/// Prompts up to this many bytes are tokenized on the calling async worker.
const INLINE_TOKENIZE_BYTES: usize = 4096;

fn prompt_bytes(prompt: &Prompt) -> usize {
    match prompt {
        Prompt::Chat(turns) => turns.iter().map(|t| t.content.len() + t.role.len()).sum(),
        Prompt::Text(text) => text.len(),
    }
}

/// A prompt as a tokenization request takes it.
fn prompt_text(prompt: &Prompt) -> Either<Vec<IndexMap<String, MessageContent>>, String> {
    match prompt {
        Prompt::Chat(turns) => Either::Left(chat_messages(turns)),
        Prompt::Text(text) => Either::Right(text.clone()),
    }
}

/// A prompt as a request gives it.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Chat turns; the model's chat template (from the GGUF) renders them.
    Chat(Vec<ChatTurn>),
    /// Raw text for `/v1/completions`, tokenized as is.
    Text(String),
}

/// A prompt as the engine sees it, templated (a chat) and tokenized once, by
/// [`Engine::tokenize`]: its length decides admission and the completion budget, and
/// [`Engine::submit`] hands its tokens to the engine, which does not tokenize it again.
#[derive(Clone, Debug)]
pub struct TokenizedPrompt {
    text: String,
    tokens: Vec<u32>,
    chat: bool,
}

impl TokenizedPrompt {
    /// Its tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Its length in tokens.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether it has no tokens (the engine refuses such a prompt).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    fn into_message(self) -> RequestMessage {
        RequestMessage::Tokenized {
            text: self.text,
            tokens: self.tokens,
            chat: self.chat,
        }
    }
}

/// One chat message, flattened to text.
#[derive(Clone, Debug, PartialEq)]
pub struct ChatTurn {
    /// `system`, `user`, `assistant`, `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Sampling and stopping for one generation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerationParams {
    /// Most tokens to generate.
    pub max_tokens: Option<usize>,
    /// Sampling temperature; 0 is greedy.
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    pub top_p: Option<f64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// OpenAI presence penalty.
    pub presence_penalty: Option<f32>,
    /// OpenAI frequency penalty.
    pub frequency_penalty: Option<f32>,
}

/// Token counts of one generation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenUsage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
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
        usage: Option<TokenUsage>,
    },
    /// The whole completion at once (non-streaming `/v1/completions`).
    Done {
        /// The completion.
        text: String,
        /// Why it stopped.
        finish_reason: String,
        /// Counted usage.
        usage: TokenUsage,
    },
    /// The engine refused or failed the request.
    Failed(Error),
}

/// A submitted generation. Dropping it cancels the generation: the engine's next attempt to
/// send a token fails and it stops the sequence.
#[derive(Debug)]
pub struct Generation {
    rx: mpsc::Receiver<Response>,
}

/// Bounds the requests the engine holds: `max_seqs` run (batched), `max_queue` wait.
#[derive(Clone, Debug)]
pub struct Slots {
    running: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
}

/// A held engine slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Builds the pool candle runs its CPU kernels on (rayon's global pool): `threads` of them
/// (None: one per core) at nice value `nice`. The pool can be built once per process, so this
/// must run before anything computes on it (weight conversion does); later calls keep the
/// first pool.
pub fn start_kernel_threads(threads: Option<usize>, nice: i32) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .start_handler(move |_| {
            if nice != 0
                && let Err(error) = crate::priority::set_current_thread_nice(nice)
            {
                tracing::warn!(%error, nice, "could not lower a kernel thread's priority");
            }
        })
        .build_global();
    if let Err(error) = pool {
        tracing::debug!(%error, "kernel thread pool already built");
    }
}

// === impl Engine ===

impl Engine {
    /// Loads the GGUF file (mmapped and read once) and starts the engine thread.
    pub async fn load(settings: &EngineSettings) -> Result<Self> {
        start_kernel_threads(settings.threads, settings.kernel_nice);
        let path = std::fs::canonicalize(&settings.model)
            .map_err(|e| Error::Model(format!("cannot read {}: {e}", settings.model.display())))?;
        let (dir, file) = split_model_path(&path)?;
        let dtype = match settings.dtype {
            Activations::Auto => ModelDType::Auto,
            Activations::F32 => ModelDType::F32,
            Activations::F16 => ModelDType::F16,
            Activations::Bf16 => ModelDType::BF16,
        };
        let started = Instant::now();
        let pipeline = tokio::task::spawn_blocking(move || {
            // The quantized model id is the local directory: mistral.rs resolves every file
            // on disk and never asks the hub. No tokenizer model id: tokenizer and chat
            // template come from the GGUF.
            let loader = GGUFLoaderBuilder::new(
                None,
                None,
                dir,
                vec![file],
                GGUFSpecificConfig::default(),
                false,
                None,
            )
            .build();
            loader.load_model_from_hf(
                None,
                TokenSource::None,
                &dtype,
                &mistralrs::Device::Cpu,
                true,
                DeviceMapSetting::Auto(AutoDeviceMapParams::default_text()),
                None,
                None,
            )
        })
        .await
        .map_err(|e| Error::Model(format!("loader task failed: {e}")))?
        .map_err(|e| Error::Model(format!("{e:#}")))?;

        let max_seqs = std::num::NonZeroUsize::new(settings.max_seqs)
            .ok_or_else(|| Error::Config("--max-seqs must be at least 1".into()))?;
        let scheduler = SchedulerConfig::DefaultScheduler {
            method: DefaultSchedulerMethod::Fixed(max_seqs),
        };
        let prompt_tokenizer = PromptTokenizer::new(&*pipeline.lock().await)
            .ok_or_else(|| Error::Model("the model has no text tokenizer".into()))?;
        let runner = MistralRsBuilder::new(pipeline, scheduler, false, None)
            .with_model_id(settings.served_name.clone())
            .with_no_kv_cache(false)
            .with_no_prefix_cache(
                settings.prefix_cache == 0 || settings.prefix_cache_meter.max_bytes() == 0,
            )
            .with_prefix_cache_n(settings.prefix_cache.max(1))
            .with_prefix_cache_meter(settings.prefix_cache_meter.clone())
            .build()
            .await;
        let max_context = runner
            .max_sequence_length(None)
            .map_err(|e| Error::Model(format!("{e}")))?
            .unwrap_or(2048);
        let max_context = match settings.context_length {
            Some(cap) if cap > max_context => {
                tracing::warn!(
                    context_length = cap,
                    model_context = max_context,
                    "--context-length is larger than the model's context window; using the model's"
                );
                max_context
            }
            Some(cap) => cap,
            None => max_context,
        };
        tracing::info!(
            model = %settings.model.display(),
            max_context,
            dtype = ?settings.dtype,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        Ok(Self {
            runner,
            prompt_tokenizer,
            served_name: settings.served_name.as_str().into(),
            max_context,
            slots: Slots::new(settings.max_seqs, settings.max_queue),
        })
    }

    /// The id responses carry.
    pub fn served_name(&self) -> &str {
        &self.served_name
    }

    /// The model's context window in tokens (prompt plus completion).
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// The engine's request slots (the bounded queue in front of it).
    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// Templates and tokenizes `prompt` exactly as the engine would (chat template applied,
    /// generation prompt and special tokens added), with the model's own chat template and
    /// tokenizer. Asking the engine instead ([`Engine::tokenize_in_engine`]) waits
    /// for the step in progress.
    pub async fn tokenize(&self, prompt: &Prompt) -> Result<TokenizedPrompt> {
        let tokenizer = self.prompt_tokenizer.clone();
        let input = prompt_text(prompt);
        let tokenize = move || match input {
            Either::Left(messages) => tokenizer
                .tokenize_chat(messages, true, true, None, None, Vec::new())
                .map(|(text, tokens)| TokenizedPrompt {
                    text,
                    tokens,
                    chat: true,
                }),
            Either::Right(text) => {
                tokenizer
                    .tokenize_text(&text, true)
                    .map(|tokens| TokenizedPrompt {
                        text,
                        tokens,
                        chat: false,
                    })
            }
        };
        // A long prompt takes milliseconds to template and tokenize: off the async workers.
        // A short one (most chat turns) takes a fraction of the hand-off to a blocking thread.
        let tokenized = if prompt_bytes(prompt) <= INLINE_TOKENIZE_BYTES {
            tokenize()
        } else {
            tokio::task::spawn_blocking(tokenize)
                .await
                .map_err(|e| Error::Engine(format!("tokenizer task failed: {e}")))?
        };
        let param = match prompt {
            Prompt::Chat(_) => "messages",
            Prompt::Text(_) => "prompt",
        };
        tokenized.map_err(|e| Error::invalid(param, format!("{e:#}")))
    }

    /// [`Engine::tokenize`]'s tokens as the engine's own tokenization request answers them
    /// (between engine steps).
    pub async fn tokenize_in_engine(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let text = prompt_text(prompt);
        let sender = self
            .runner
            .get_sender(None)
            .map_err(|e| Error::Engine(e.to_string()))?;
        // The engine panics if a tokenization answer finds its receiver gone, so the request
        // and its answer live in a task of their own that always waits for the answer, even
        // when the caller has gone away.
        let task = tokio::spawn(async move {
            let (tx, mut rx) = mpsc::channel(1);
            let request = Request::Tokenize(TokenizationRequest {
                text,
                tools: None,
                add_generation_prompt: true,
                add_special_tokens: true,
                enable_thinking: None,
                reasoning_effort: None,
                response: tx,
            });
            sender
                .send(request)
                .await
                .map_err(|_| Error::Engine("engine stopped".into()))?;
            match rx.recv().await {
                Some(Ok(tokens)) => Ok(tokens),
                Some(Err(e)) => Err(Error::invalid("messages", format!("{e:#}"))),
                None => Err(Error::Engine(
                    "engine dropped a tokenization request".into(),
                )),
            }
        });
        task.await
            .map_err(|e| Error::Engine(format!("tokenizer task failed: {e}")))?
    }

    /// Hands a request to the engine's scheduler.
    async fn send(&self, request: Request) -> Result<()> {
        let sender = self
            .runner
            .get_sender(None)
            .map_err(|e| Error::Engine(e.to_string()))?;
        sender
            .send(request)
            .await
            .map_err(|_| Error::Engine("engine stopped".into()))
    }

    /// Submits a generation. `stream` asks for one event per token; chat generations always
    /// stream inside the engine (so a dropped client cancels them), `/v1/completions` without
    /// streaming comes back as one [`Event::Done`].
    pub async fn submit(
        &self,
        prompt: TokenizedPrompt,
        params: &GenerationParams,
        stream: bool,
    ) -> Result<Generation> {
        let engine_streams = stream || prompt.chat;
        let messages = prompt.into_message();
        let sampling_params = SamplingParams {
            temperature: params.temperature,
            top_p: params.top_p,
            frequency_penalty: params.frequency_penalty,
            presence_penalty: params.presence_penalty,
            stop_toks: (!params.stop.is_empty()).then(|| StopTokens::Seqs(params.stop.clone())),
            max_len: params.max_tokens,
            n_choices: 1,
            ..SamplingParams::neutral()
        };
        // Room for a burst of tokens so the engine never waits on a slow reader; the server
        // relays them at once anyway.
        let (tx, rx) = mpsc::channel(64);
        let request = Request::Normal(Box::new(NormalRequest {
            is_streaming: engine_streams,
            ..NormalRequest::new_simple(
                messages,
                sampling_params,
                tx,
                self.runner.next_request_id(),
                None,
                None,
            )
        }));
        self.send(request).await?;
        Ok(Generation { rx })
    }

    /// Log-probabilities over the vocabulary of the token that follows `prompt` (raw logits of
    /// one forward pass, log-softmaxed). Used to check converted weights against the original.
    pub async fn next_token_logprobs(&self, prompt: Prompt) -> Result<Vec<f32>> {
        let messages = self.tokenize(&prompt).await?.into_message();
        let sampling_params = SamplingParams {
            max_len: Some(1),
            n_choices: 1,
            ..SamplingParams::deterministic()
        };
        let (tx, mut rx) = mpsc::channel(4);
        let request = Request::Normal(Box::new(NormalRequest {
            return_raw_logits: true,
            ..NormalRequest::new_simple(
                messages,
                sampling_params,
                tx,
                self.runner.next_request_id(),
                None,
                None,
            )
        }));
        self.send(request).await?;
        let logits = match rx.recv().await {
            Some(Response::Raw { logits_chunks, .. }) => logits_chunks
                .last()
                .cloned()
                .ok_or_else(|| Error::Engine("no logits".into()))?,
            Some(Response::ValidationError(e)) | Some(Response::InternalError(e)) => {
                return Err(Error::Engine(e.to_string()));
            }
            _ => return Err(Error::Engine("unexpected engine response".into())),
        };
        let engine_err = |e: candle_core::Error| Error::Engine(e.to_string());
        let vocab = logits.dims().last().copied().unwrap_or(0);
        let flat = logits
            .flatten_all()
            .and_then(|t| t.to_dtype(candle_core::DType::F32))
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(engine_err)?;
        let last = &flat[flat.len().saturating_sub(vocab)..];
        let max = last.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let log_sum = last.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max;
        Ok(last.iter().map(|x| x - log_sum).collect())
    }
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("served_name", &self.served_name)
            .field("max_context", &self.max_context)
            .finish_non_exhaustive()
    }
}

fn split_model_path(path: &Path) -> Result<(String, String)> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::Model(format!("{} has no parent directory", path.display())))?;
    let file = path
        .file_name()
        .ok_or_else(|| Error::Model(format!("{} is not a file", path.display())))?;
    Ok((
        dir.to_string_lossy().into_owned(),
        file.to_string_lossy().into_owned(),
    ))
}

fn chat_messages(turns: &[ChatTurn]) -> Vec<IndexMap<String, MessageContent>> {
    turns
        .iter()
        .map(|turn| {
            let mut m = IndexMap::new();
            m.insert("role".to_owned(), Either::Left(turn.role.clone()));
            m.insert("content".to_owned(), Either::Left(turn.content.clone()));
            m
        })
        .collect()
}

// === impl Generation ===

impl Generation {
    /// The next event, or `None` once the engine has finished with the request.
    pub async fn next(&mut self) -> Option<Event> {
        let response = self.rx.recv().await?;
        Some(match response {
            Response::Chunk(chunk) => {
                let usage = chunk.usage.as_ref().map(|u| TokenUsage {
                    prompt_tokens: u.prompt_tokens,
                    completion_tokens: u.completion_tokens,
                });
                let choice = chunk.choices.into_iter().next();
                let (text, finish_reason) = choice
                    .map(|c| (c.delta.content.unwrap_or_default(), c.finish_reason))
                    .unwrap_or_default();
                Event::Delta {
                    text,
                    finish_reason,
                    usage,
                }
            }
            Response::CompletionChunk(chunk) => {
                let choice = chunk.choices.into_iter().next();
                let (text, finish_reason) = choice
                    .map(|c| (c.text, c.finish_reason))
                    .unwrap_or_default();
                Event::Delta {
                    text,
                    finish_reason,
                    usage: None,
                }
            }
            Response::CompletionDone(done) => {
                let usage = TokenUsage {
                    prompt_tokens: done.usage.prompt_tokens,
                    completion_tokens: done.usage.completion_tokens,
                };
                let choice = done.choices.into_iter().next();
                let (text, finish_reason) = choice
                    .map(|c| (c.text, c.finish_reason))
                    .unwrap_or_else(|| (String::new(), "stop".to_owned()));
                Event::Done {
                    text,
                    finish_reason,
                    usage,
                }
            }
            Response::Done(done) => {
                let usage = TokenUsage {
                    prompt_tokens: done.usage.prompt_tokens,
                    completion_tokens: done.usage.completion_tokens,
                };
                let choice = done.choices.into_iter().next();
                let (text, finish_reason) = choice
                    .map(|c| (c.message.content.unwrap_or_default(), c.finish_reason))
                    .unwrap_or_else(|| (String::new(), "stop".to_owned()));
                Event::Done {
                    text,
                    finish_reason,
                    usage,
                }
            }
            Response::ValidationError(e) => Event::Failed(Error::InvalidRequest {
                message: e.to_string(),
                param: None,
                code: None,
            }),
            Response::InternalError(e) => Event::Failed(Error::Engine(e.to_string())),
            Response::ModelError(msg, _) | Response::CompletionModelError(msg, _) => {
                Event::Failed(Error::Engine(msg))
            }
            _ => Event::Failed(Error::Engine("unexpected engine response".into())),
        })
    }
}

// === impl Slots ===

impl Slots {
    /// `running` slots, at most `max_queue` waiters.
    pub fn new(running: usize, max_queue: usize) -> Self {
        Self {
            running: Arc::new(Semaphore::new(running)),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_queue,
        }
    }

    /// Requests waiting for a slot right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Takes a slot, waiting in the bounded queue when all are busy; a full queue is
    /// [`Error::Overloaded`]. The caller bounds the wait with its request timeout.
    pub async fn acquire(&self) -> Result<Slot> {
        if let Ok(permit) = self.running.clone().try_acquire_owned() {
            return Ok(Slot { _permit: permit });
        }
        let queued = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _leave = LeaveQueue(&self.waiting);
        if queued >= self.max_queue {
            return Err(Error::Overloaded { queued });
        }
        let permit = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::Draining)?;
        Ok(Slot { _permit: permit })
    }
}

/// Leaves the queue when the waiter is done or dropped (timeout, disconnect).
struct LeaveQueue<'a>(&'a AtomicUsize);

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_queue_then_refuse() {
        let slots = Slots::new(1, 1);
        let first = slots.acquire().await.unwrap();
        let s2 = slots.clone();
        let waiter = tokio::spawn(async move { s2.acquire().await.map(|_| ()) });
        // Let the waiter enter the queue.
        while slots.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = slots.acquire().await.unwrap_err();
        assert!(matches!(refused, Error::Overloaded { queued: 1 }));
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(slots.waiting(), 0);
    }

    #[test]
    fn chat_messages_keep_roles_and_order() {
        let m = chat_messages(&[
            ChatTurn {
                role: "system".into(),
                content: "be brief".into(),
            },
            ChatTurn {
                role: "user".into(),
                content: "hi".into(),
            },
        ]);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1]["role"], Either::Left("user".to_owned()));
        assert_eq!(m[0]["content"], Either::Left("be brief".to_owned()));
    }
}

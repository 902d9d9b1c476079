//! The mistral.rs engine, in-process: load GGUF weights once, count prompt tokens, submit
//! generations and read their tokens back.
//!
//! The engine batches every running sequence into one forward pass per step (continuous
//! batching); this wrapper only bounds how many requests it holds at once ([`Slots`]).
//!
//! Loading never touches the Hugging Face hub: the model id handed to mistral.rs is the local
//! directory of the GGUF file, so its file lookups resolve on disk, and the tokenizer and chat
//! template come from the GGUF metadata.

pub mod device;
mod error;
mod generation;
mod output;
mod priority;
mod slots;
mod threads;
pub mod watchdog;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use candle_core::Tensor;
use either::Either;
use indexmap::IndexMap;
use mistralrs::core::{
    AutoDeviceMapParams, Constraint, CustomLogitsProcessor, DefaultSchedulerMethod,
    DeviceMapSetting, GGUFLoaderBuilder, GGUFSpecificConfig, MessageContent, MistralRs,
    MistralRsBuilder, ModelDType, NormalRequest, PromptTokenizer, Request, RequestMessage,
    Response, SamplingParams, SchedulerConfig, StopTokens, TokenSource, TokenizationRequest,
    llguidance::ParserFactory,
};
use tokio::sync::mpsc;

/// The prefix cache's byte budget and counts (`sluice_prefix_cache_*` in `/metrics`).
pub use mistralrs::core::PrefixCacheMeter;

pub use self::{
    error::EngineError,
    generation::{Event, Generation, TokenAlternative, TokenLogprob},
    output::OutputFormat,
    slots::{Slot, Slots},
    threads::start_kernel_threads,
};
use crate::error::{Result, StartupError};

/// What the engine needs to load a model.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// GGUF file to load (already converted, if conversion was asked for).
    pub model: PathBuf,
    /// The model id responses carry.
    pub served_name: String,
    /// Where to compute, with the activation dtype ([`device::select`]).
    pub device: device::EngineDevice,
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

/// Activation dtype of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Activations {
    /// By device: F32 on the CPU (its fastest), BF16 on a GPU that has it (compute capability
    /// 8.0 and newer), else F16.
    Auto,
    /// 32-bit floats: fastest on CPU.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    Bf16,
}

impl Activations {
    /// As `--dtype` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        }
    }
}

/// A loaded model and its engine. Cloning shares the engine.
#[derive(Clone)]
pub struct Engine {
    runner: Arc<MistralRs>,
    device: device::EngineDevice,
    /// Templates and tokenizes prompts as the engine would, off the engine loop.
    prompt_tokenizer: PromptTokenizer,
    served_name: Arc<str>,
    max_context: usize,
    /// Token ids run from 0 to this, exclusive ([`Engine::vocab_size`]).
    vocab_size: usize,
    /// Compiles output grammars over the model's vocabulary ([`Engine::check_output`]);
    /// `None` when the model's tokenizer gave the engine none.
    grammars: Option<Arc<ParserFactory>>,
    /// The model's end-of-turn tokens (where a constrained output ends).
    eos: Arc<[u32]>,
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
    /// OpenAI `logit_bias`: added to these tokens' logits before sampling (greedy included).
    pub logit_bias: BTreeMap<u32, f32>,
    /// What the output must be (`response_format`, a forced tool call); `None`: free text.
    pub output: Option<OutputFormat>,
    /// Log-probabilities of each generated token, with this many most likely alternatives
    /// (`None`: none reported).
    pub logprobs: Option<usize>,
    /// Keep only the `k` most likely tokens (an extension, as in vLLM and llama.cpp).
    pub top_k: Option<usize>,
    /// Drop tokens less likely than this fraction of the most likely one (an extension).
    pub min_p: Option<f64>,
    /// Multiplicative penalty on tokens already in the context (an extension; 1: none).
    pub repetition_penalty: Option<f32>,
    /// Seeds this request's sampling: the same request with the same seed gives the same
    /// tokens on the same pod and dtype (`None`: the engine's shared generator).
    pub seed: Option<u64>,
}

/// Adds a request's `logit_bias` to the logits, as OpenAI does before sampling; ids past the
/// logits' width (validated against the vocabulary before) are skipped.
struct LogitBias(BTreeMap<u32, f32>);

impl CustomLogitsProcessor for LogitBias {
    fn apply(&self, logits: &Tensor, _context: &[u32]) -> candle_core::Result<Tensor> {
        let mut values = logits.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?;
        for (&id, &bias) in &self.0 {
            if let Some(v) = values.get_mut(id as usize) {
                *v += bias;
            }
        }
        Tensor::new(values, logits.device())?.to_dtype(logits.dtype())
    }
}

/// Sampling settings a model's operator chose (the InferenceModel's `engine`) for requests that
/// set none; a request's own values always win.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SamplingDefaults {
    /// Temperature (0..=2); `None`: greedy, the engine's default.
    pub temperature: Option<f64>,
    /// Nucleus mass (0..=1); `None`: no cut.
    pub top_p: Option<f64>,
}

impl SamplingDefaults {
    /// Fills what the request left unset. A top_p of 0 keeps only the most likely token, which
    /// the engine spells as temperature 0 (it reads top_p 0 as "no cut").
    pub fn apply(&self, params: &mut GenerationParams) {
        if params.temperature.is_none() {
            params.temperature = self.temperature;
        }
        if params.top_p.is_none() {
            params.top_p = self.top_p;
        }
        if params.top_p == Some(0.0) {
            params.top_p = None;
            params.temperature = Some(0.0);
        }
    }
}

// === impl Engine ===

impl Engine {
    /// Loads the GGUF file (mmapped and read once) and starts the engine thread.
    pub async fn load(settings: &EngineSettings) -> Result<Self> {
        start_kernel_threads(settings.threads, settings.kernel_nice);
        let path = std::fs::canonicalize(&settings.model).map_err(|e| {
            StartupError::Model(format!("cannot read {}: {e}", settings.model.display()))
        })?;
        let (dir, file) = split_model_path(&path)?;
        let dtype = match settings.device.dtype {
            Activations::Auto => ModelDType::Auto,
            Activations::F32 => ModelDType::F32,
            Activations::F16 => ModelDType::F16,
            Activations::Bf16 => ModelDType::BF16,
        };
        let started = Instant::now();
        let device = settings.device.device.clone();
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
                &device,
                // silent: no progress bars in the pod's log.
                true,
                DeviceMapSetting::Auto(AutoDeviceMapParams::default_text()),
                None,
                None,
            )
        })
        .await
        .map_err(|e| StartupError::Model(format!("loader task failed: {e}")))?
        .map_err(|e| StartupError::Model(format!("{e:#}")))?;

        let max_seqs = std::num::NonZeroUsize::new(settings.max_seqs)
            .ok_or_else(|| StartupError::Config("--max-seqs must be at least 1".into()))?;
        let scheduler = SchedulerConfig::DefaultScheduler {
            method: DefaultSchedulerMethod::Fixed(max_seqs),
        };
        let (prompt_tokenizer, vocab_size, (grammars, eos)) = {
            let pipeline = pipeline.lock().await;
            let prompt_tokenizer = PromptTokenizer::new(&*pipeline)
                .ok_or_else(|| StartupError::Model("the model has no text tokenizer".into()))?;
            // One past the highest id, added tokens included: the tokenizer's own count
            // (`get_vocab_size(true)`) counts distinct token strings, which falls short of
            // the ids in use when a vocabulary repeats a string or skips an id.
            let vocab_size = pipeline.tokenizer().map_or(0, |t| {
                let vocab = t.get_vocab(true);
                vocab
                    .values()
                    .max()
                    .map_or(0, |&id| id as usize + 1)
                    .max(vocab.len())
            });
            let metadata = pipeline.get_metadata();
            let grammars = (
                metadata.llg_factory.clone(),
                metadata.eos_tok.clone().into(),
            );
            (prompt_tokenizer, vocab_size, grammars)
        };
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
            .map_err(|e| StartupError::Model(format!("{e}")))?
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
            device = %settings.device.label,
            dtype = settings.device.dtype.as_str(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "model loaded"
        );
        Ok(Self {
            runner,
            device: settings.device.clone(),
            prompt_tokenizer,
            served_name: settings.served_name.as_str().into(),
            max_context,
            vocab_size,
            grammars,
            eos,
            slots: Slots::new(settings.max_seqs, settings.max_queue),
        })
    }

    /// The device it computes on.
    pub fn device(&self) -> &device::EngineDevice {
        &self.device
    }

    /// The id responses carry.
    pub fn served_name(&self) -> &str {
        &self.served_name
    }

    /// The model's context window in tokens (prompt plus completion).
    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// The size of the model's vocabulary, added (special) tokens included: the token ids a
    /// request may name (`logit_bias`) are those below it. From the tokenizer, not the logits'
    /// width, which some models pad past the last token.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Checks that the engine can hold the output to `params.output` (compiles its grammar over
    /// the model's vocabulary), so an unsupported schema is refused before the request is
    /// admitted or queued. The message names what the compiler refused, e.g. `Unimplemented
    /// keys: ["format"]`.
    pub fn check_output(&self, params: &GenerationParams) -> Result<(), EngineError> {
        let Some(output) = &params.output else {
            return Ok(());
        };
        let factory = self.grammars.as_ref().ok_or_else(|| {
            EngineError::Unsupported("this model has no tokenizer for constrained output".into())
        })?;
        factory
            .create_parser(output.grammar(&self.eos))
            .map(drop)
            .map_err(|e| EngineError::Unsupported(format!("{e:#}")))
    }

    /// The engine's request slots (the bounded queue in front of it).
    pub fn slots(&self) -> &Slots {
        &self.slots
    }

    /// Templates and tokenizes `prompt` exactly as the engine would (chat template applied,
    /// generation prompt and special tokens added), with the model's own chat template and
    /// tokenizer. Asking the engine instead ([`Engine::tokenize_in_engine`]) waits
    /// for the step in progress.
    pub async fn tokenize(&self, prompt: &Prompt) -> Result<TokenizedPrompt, EngineError> {
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
                .map_err(|e| EngineError::Failed(format!("tokenizer task failed: {e}")))?
        };
        let param = match prompt {
            Prompt::Chat(_) => "messages",
            Prompt::Text(_) => "prompt",
        };
        tokenized.map_err(|e| EngineError::InvalidPrompt {
            param,
            message: format!("{e:#}"),
        })
    }

    /// [`Engine::tokenize`]'s tokens as the engine's own tokenization request answers them
    /// (between engine steps).
    pub async fn tokenize_in_engine(&self, prompt: &Prompt) -> Result<Vec<u32>, EngineError> {
        let text = prompt_text(prompt);
        let sender = self
            .runner
            .get_sender(None)
            .map_err(|e| EngineError::Failed(e.to_string()))?;
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
                .map_err(|_| EngineError::Failed("engine stopped".into()))?;
            match rx.recv().await {
                Some(Ok(tokens)) => Ok(tokens),
                Some(Err(e)) => Err(EngineError::InvalidPrompt {
                    param: "messages",
                    message: format!("{e:#}"),
                }),
                None => Err(EngineError::Failed(
                    "engine dropped a tokenization request".into(),
                )),
            }
        });
        task.await
            .map_err(|e| EngineError::Failed(format!("tokenizer task failed: {e}")))?
    }

    /// Hands a request to the engine's scheduler.
    async fn send(&self, request: Request) -> Result<(), EngineError> {
        let sender = self
            .runner
            .get_sender(None)
            .map_err(|e| EngineError::Failed(e.to_string()))?;
        sender
            .send(request)
            .await
            .map_err(|_| EngineError::Failed("engine stopped".into()))
    }

    /// Submits a generation. `stream` asks for one event per token; chat generations always
    /// stream inside the engine (so a dropped client cancels them), `/v1/completions` without
    /// streaming comes back as one [`Event::Done`].
    pub async fn submit(
        &self,
        prompt: TokenizedPrompt,
        params: &GenerationParams,
        stream: bool,
    ) -> Result<Generation, EngineError> {
        self.submit_choices(prompt, params, stream, 1).await
    }

    /// Submits `choices` independent generations of one prompt (OpenAI's `n`), read together
    /// through one [`Generation`]. Each is a sequence of its own in the engine's batch (its
    /// scheduler runs them side by side); a seeded request seeds choice `i` with `seed + i`, so
    /// that the choices differ and each is reproduced by the seed.
    pub async fn submit_choices(
        &self,
        prompt: TokenizedPrompt,
        params: &GenerationParams,
        stream: bool,
        choices: usize,
    ) -> Result<Generation, EngineError> {
        // The prompt is copied only for the choices before the last (none for one choice).
        let last = choices.max(1) - 1;
        let mut receivers = Vec::with_capacity(last + 1);
        for choice in 0..last {
            receivers.push(
                self.submit_one(prompt.clone(), params, choice, stream)
                    .await?,
            );
        }
        receivers.push(self.submit_one(prompt, params, last, stream).await?);
        Ok(Generation::new(receivers))
    }

    /// Submits choice `choice` of a generation.
    async fn submit_one(
        &self,
        prompt: TokenizedPrompt,
        params: &GenerationParams,
        choice: usize,
        stream: bool,
    ) -> Result<mpsc::Receiver<Response>, EngineError> {
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
            top_n_logprobs: params.logprobs.unwrap_or(0),
            top_k: params.top_k,
            min_p: params.min_p,
            repetition_penalty: params.repetition_penalty,
            seed: params.seed.map(|seed| seed.wrapping_add(choice as u64)),
            ..SamplingParams::neutral()
        };
        // Room for a burst of tokens so the engine never waits on a slow reader; the server
        // relays them at once anyway.
        let (tx, rx) = mpsc::channel(64);
        // mistral.rs's sampler has a `logits_bias` setting it never reads; a logits processor
        // is applied before every sampling method.
        let logits_processors = (!params.logit_bias.is_empty()).then(|| {
            let bias = LogitBias(params.logit_bias.clone());
            vec![Arc::new(bias) as Arc<dyn CustomLogitsProcessor>]
        });
        let constraint = match &params.output {
            Some(output) => Constraint::Llguidance(output.grammar(&self.eos)),
            None => Constraint::None,
        };
        let request = Request::Normal(Box::new(NormalRequest {
            is_streaming: engine_streams,
            logits_processors,
            constraint,
            return_logprobs: params.logprobs.is_some(),
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
        Ok(rx)
    }

    /// Log-probabilities over the vocabulary of the token that follows `prompt` (raw logits of
    /// one forward pass, log-softmaxed). Used to check converted weights against the original.
    pub async fn next_token_logprobs(&self, prompt: Prompt) -> Result<Vec<f32>, EngineError> {
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
                .ok_or_else(|| EngineError::Failed("no logits".into()))?,
            Some(Response::ValidationError(e)) | Some(Response::InternalError(e)) => {
                return Err(EngineError::Failed(e.to_string()));
            }
            _ => return Err(EngineError::Failed("unexpected engine response".into())),
        };
        let engine_err = |e: candle_core::Error| EngineError::Failed(e.to_string());
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
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

fn split_model_path(path: &Path) -> Result<(String, String)> {
    let dir = path.parent().ok_or_else(|| {
        StartupError::Model(format!("{} has no parent directory", path.display()))
    })?;
    let file = path
        .file_name()
        .ok_or_else(|| StartupError::Model(format!("{} is not a file", path.display())))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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

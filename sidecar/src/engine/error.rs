//! How a request fails in the engine. The request path turns these into OpenAI errors
//! (`crate::openai`).

/// Why the engine did not (fully) serve a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The prompt cannot be templated or tokenized: the request is at fault. `param` is the
    /// request field holding the prompt.
    #[error("{message}")]
    InvalidPrompt {
        /// `messages` or `prompt`.
        param: &'static str,
        /// What the tokenizer said.
        message: String,
    },
    /// The request asks for what this engine cannot do (e.g. a JSON Schema keyword constrained
    /// decoding cannot enforce).
    #[error("{0}")]
    Unsupported(String),
    /// The engine refused the request as invalid.
    #[error("{0}")]
    Rejected(String),
    /// The local queue is full: more requests are waiting for the engine than configured.
    #[error("the server is overloaded ({queued} requests queued); retry shortly")]
    Overloaded {
        /// Requests waiting when this one was refused.
        queued: usize,
    },
    /// The sidecar is shutting down and accepts no new work.
    #[error("the server is shutting down")]
    Draining,
    /// The engine failed while serving the request.
    #[error("the engine failed: {0}")]
    Failed(String),
}

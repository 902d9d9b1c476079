//! Token usage of one request: what the engine counted, what a response reports and what a
//! reservation is settled with are one type.

use serde::{Deserialize, Serialize};

/// Token counts as OpenAI reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Sum of both.
    pub total_tokens: usize,
    /// The answer came from the response cache: the engine did none of this work (only ever
    /// serialised as `true`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cached: bool,
}

impl Usage {
    /// Usage from the two counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            cached: false,
        }
    }
}

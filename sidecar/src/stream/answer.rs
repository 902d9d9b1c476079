//! A complete answer as the response cache keeps it ([`Answer`]), and the header that marks the
//! answers it served.

use crate::{cache::Weigh, usage::Usage};

/// Set on answers the response cache served (`hit`).
pub const CACHE_HEADER: &str = "x-sluice-cache";

/// A complete answer as the response cache keeps it: enough to answer again as JSON or as a
/// stream.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The whole generated text.
    pub text: String,
    /// OpenAI's finish reason.
    pub finish_reason: String,
    /// The usage of the generation that made it.
    pub usage: Usage,
}

impl Weigh for Answer {
    fn weight(&self) -> usize {
        self.text.len() + self.finish_reason.len() + std::mem::size_of::<Self>()
    }
}

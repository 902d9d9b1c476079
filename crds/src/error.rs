/// Everything that can go wrong reading or checking a sluice document.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The document is not valid YAML/JSON for its type (unknown field, wrong type, ...).
    #[error("invalid document: {0}")]
    Parse(#[from] serde_yaml::Error),

    /// The document, written as JSON, is not valid for its type.
    #[error("invalid document: {0}")]
    ParseJson(serde_json::Error),

    /// JSON encoding failed (only for types that cannot be represented, an invariant).
    #[error("cannot encode document: {0}")]
    Encode(#[from] serde_json::Error),

    /// The document parsed but breaks a rule the schema cannot express.
    #[error("invalid {what}: {reason}")]
    Invalid { what: &'static str, reason: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn invalid(what: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what,
            reason: reason.into(),
        }
    }
}

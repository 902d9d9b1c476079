//! The operator's one error type.

/// Everything that can fail while rendering or reconciling an InferenceModel.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a request.
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),

    /// The InferenceModel breaks a rule the CRD schema cannot check (or was applied without it).
    #[error("invalid spec: {0}")]
    InvalidSpec(String),

    /// An object could not be encoded (an invariant: our types always serialize).
    #[error("cannot encode object: {0}")]
    Encode(#[from] serde_json::Error),

    /// A YAML document could not be read or written.
    #[error("YAML: {0}")]
    Yaml(#[from] serde_yaml::Error),

    /// The sidecar config document is invalid (a bug in the operator if it ever happens).
    #[error("sidecar config: {0}")]
    SidecarConfig(#[from] sluice_crds::Error),

    /// The object lacks a field the API server always sets (name, namespace).
    #[error("object has no {0}")]
    MissingField(&'static str),

    /// Another replica took the leader Lease while this one was reconciling.
    #[error("lost the leader Lease")]
    LeadershipLost,

    /// The admin server could not bind or serve.
    #[error("admin server: {0}")]
    Io(#[from] std::io::Error),
}

/// `Result` with the operator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

// === impl Error ===

impl Error {
    /// A short, stable label for metrics and logs (`sluice_operator_reconcile_failures_total`).
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) => match status.code {
                409 => "Conflict",
                404 => "NotFound",
                403 => "Forbidden",
                422 => "Invalid",
                429 => "TooManyRequests",
                500..=599 => "ServerError",
                _ => "ApiError",
            },
            Error::Kube(_) => "ClientError",
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::Encode(_) | Error::Yaml(_) => "Encode",
            Error::SidecarConfig(_) => "SidecarConfig",
            Error::MissingField(_) => "MissingField",
            Error::LeadershipLost => "LeadershipLost",
            Error::Io(_) => "Io",
        }
    }
}

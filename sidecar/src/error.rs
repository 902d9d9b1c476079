//! Start-up errors: a bad flag or config file, a model that cannot be read, converted or loaded,
//! an I/O failure, a weights download that failed. Main prints them as one line and exits
//! non-zero. (A request's errors are [`crate::openai::ApiError`], built from each layer's own.)

/// `Result` with [`StartupError`] as the default error.
pub type Result<T, E = StartupError> = std::result::Result<T, E>;

/// What stops the sidecar (or one of its subcommands) before it serves.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A flag, environment variable or config file is invalid. Start-up refuses to go on.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// The device `--device` asks for cannot be used (no CUDA in the build, no driver, no GPU).
    #[error("{0}")]
    Device(String),

    /// The model could not be read, converted or loaded.
    #[error("model: {0}")]
    Model(String),

    /// An I/O error (start-up, sockets).
    #[error(transparent)]
    Io(#[from] std::io::Error),

    /// `sluice-sidecar fetch` could not download or verify the weights; the message is the
    /// one line Kubernetes shows as the init container's termination reason.
    #[error("{0}")]
    Fetch(String),
}

//! `serve`'s flags and environment variables, parsed once into typed configuration ([`ServeConfig`]).
//! Everything that can be checked before a port is bound is checked here, so a bad setting exits
//! non-zero with a one-line reason. Only `main` and [`crate::app`] read it.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use sluice_crds::SidecarConfig;
use sluice_crds::device::DEVICE_ENV;
use sluice_crds::inference_model::DEFAULT_MAX_CONCURRENT_SEQUENCES;
use sluice_crds::lifecycle::{
    DRAIN_GRACE_SECS, DRAIN_GRACE_SECS_FLAG, FIRST_TOKEN_TIMEOUT_SECS_FLAG, REQUEST_TIMEOUT_SECS,
    REQUEST_TIMEOUT_SECS_FLAG,
};
use sluice_crds::sidecar_config::{FALLBACK_TOKEN_FILE_FLAG, SIDECAR_CONFIG_VERSION, VariantRoute};

use crate::{
    engine::{Activations, SamplingDefaults, device::DeviceRequest},
    error::{Result, StartupError},
    http::conn::BodyPace,
    model::convert::Quant,
    preflight::check_gguf,
    reload::Sources,
    route::ForwardToken,
};
use sluice_telemetry::LogFormat;

/// `sluice-sidecar serve` flags. Every flag can also be set with the `SLUICE_*` variable named
/// beside it.
#[derive(Clone, Debug, clap::Args)]
pub struct ServeArgs {
    /// GGUF model file to serve.
    #[arg(long, env = "SLUICE_MODEL")]
    pub model: PathBuf,

    /// Model id clients send and `/v1/models` lists (default: the config's `model`, else the
    /// file name without `.gguf`).
    #[arg(long, env = "SLUICE_SERVED_NAME")]
    pub served_name: Option<String>,

    /// Sidecar config document (YAML, `sluice_crds::SidecarConfig`), e.g. the ConfigMap mounted
    /// as a file; re-read on change (in-place writes and Kubernetes' `..data` symlink swaps).
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,

    /// Watch the sidecar config in this ConfigMap (`NAMESPACE/NAME`, key `sidecar.yaml`) through
    /// the Kubernetes API; the pod's service account needs get/list/watch on it only.
    #[arg(long, env = "SLUICE_CONFIGMAP", value_name = "NAMESPACE/NAME")]
    pub configmap: Option<String>,

    /// While no valid config document is in force, serve without rate limits (instead of
    /// staying unready and refusing requests).
    #[arg(long, env = "SLUICE_ALLOW_UNLIMITED")]
    pub allow_unlimited: bool,

    /// Completion cap of requests that set no `max_tokens` (and what token limits reserve for
    /// them); 0: the rest of the context window.
    #[arg(long, env = "SLUICE_DEFAULT_MAX_TOKENS", default_value_t = 2048)]
    pub default_max_tokens: usize,

    /// Context window in tokens (prompt plus completion), at most the model's own; requests
    /// that do not fit get 400 `context_length_exceeded`. Default: the model's.
    #[arg(long, env = "SLUICE_CONTEXT_LENGTH")]
    pub context_length: Option<usize>,

    /// Sampling temperature of requests that set none (0 to 2; 0 is greedy). Default: greedy.
    #[arg(long, env = "SLUICE_DEFAULT_TEMPERATURE")]
    pub default_temperature: Option<f64>,

    /// Nucleus sampling mass (`top_p`) of requests that set none (0 to 1; 0 keeps only the
    /// most likely token, i.e. greedy). Default: no nucleus cut.
    #[arg(long, env = "SLUICE_DEFAULT_TOP_P")]
    pub default_top_p: Option<f64>,

    /// Address of the OpenAI API.
    #[arg(long, env = "SLUICE_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address of the admin endpoints (`/healthz`, `/readyz`, `/metrics`).
    #[arg(long, env = "SLUICE_ADMIN_LISTEN", default_value = "0.0.0.0:9090")]
    pub admin_listen: SocketAddr,

    /// Largest request body accepted, in bytes; larger bodies get 413.
    #[arg(long, env = "SLUICE_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,

    /// Connections the API port holds at once; more are answered 503 and closed. Default: 4096,
    /// or fewer where the open-file limit cannot hold them (the admin port keeps its own share).
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,

    /// Connections one client address may hold on the API port (0: no such limit). Leave it at 0
    /// behind a proxy or load balancer, where all requests come from a few addresses.
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS_PER_CLIENT", default_value_t = 0)]
    pub max_connections_per_client: usize,

    /// Seconds a client has to send a whole request head: on a new connection from when it
    /// opens, on a kept-alive one from its first byte. Over it: 408 and the connection closed
    /// (closed without an answer if nothing came).
    #[arg(long, env = "SLUICE_HEADER_TIMEOUT_SECS", default_value_t = 20.0)]
    pub header_timeout_secs: f64,

    /// Seconds a kept-alive connection may wait for its next request before it is closed. Keep
    /// it above the upstream idle timeout of a proxy in front (Envoy, a cloud load balancer), so
    /// that the proxy closes first.
    #[arg(long, env = "SLUICE_IDLE_TIMEOUT_SECS", default_value_t = 120.0)]
    pub idle_timeout_secs: f64,

    /// Seconds any request body may take, plus one for every `--body-min-rate` bytes received
    /// (a stalled or trickled body gets 408 early; a large one at a usable pace does not).
    #[arg(long, env = "SLUICE_BODY_TIMEOUT_SECS", default_value_t = 20.0)]
    pub body_timeout_secs: f64,

    /// Bytes per second that earn a request body more time (see `--body-timeout-secs`).
    #[arg(long, env = "SLUICE_BODY_MIN_RATE", default_value_t = 1024)]
    pub body_min_rate: u64,

    /// Sequences the engine batches at once (continuous batching); also the number of requests
    /// in flight in the engine.
    #[arg(
        long,
        env = "SLUICE_MAX_SEQS",
        default_value_t = DEFAULT_MAX_CONCURRENT_SEQUENCES as usize
    )]
    pub max_seqs: usize,

    /// Requests that may wait for an engine slot; beyond that new requests get 503.
    #[arg(long, env = "SLUICE_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,

    /// Per-request timeout in seconds (queueing plus generation); 503 `timeout` when exceeded
    /// (an error event on a stream already answering).
    #[arg(
        long = REQUEST_TIMEOUT_SECS_FLAG,
        env = "SLUICE_REQUEST_TIMEOUT_SECS",
        default_value_t = f64::from(REQUEST_TIMEOUT_SECS)
    )]
    pub request_timeout_secs: f64,

    /// Seconds a request may wait for its first token (queueing plus prompt processing), at most
    /// the request timeout; 503 `timeout` before any output when exceeded. Default: the request
    /// timeout.
    #[arg(long = FIRST_TOKEN_TIMEOUT_SECS_FLAG, env = "SLUICE_FIRST_TOKEN_TIMEOUT_SECS")]
    pub first_token_timeout_secs: Option<f64>,

    /// On SIGTERM, seconds in-flight requests get to finish before the process exits. The
    /// operator passes it and sizes the pod's termination grace period to outlast it.
    #[arg(
        long = DRAIN_GRACE_SECS_FLAG,
        env = "SLUICE_DRAIN_GRACE_SECS",
        default_value_t = f64::from(DRAIN_GRACE_SECS)
    )]
    pub drain_grace_secs: f64,

    /// CPU threads for the engine's kernels (default: all cores).
    #[arg(long, env = "SLUICE_THREADS")]
    pub threads: Option<usize>,

    /// Nice value of the engine's kernel threads (0 to 19). Above the HTTP threads' 0, a
    /// streamed token or an admission does not wait for a kernel's time slice; kernels still
    /// get every cycle the HTTP path leaves. 0 runs them at the same priority.
    #[arg(long, env = "SLUICE_KERNEL_NICE", default_value_t = 10)]
    pub kernel_nice: i32,

    /// Where the engine computes: `auto` (the first CUDA device when this build has CUDA and
    /// the process sees one, else the CPU), `cpu`, `cuda` or `cuda:N`. Asking for CUDA where it
    /// cannot be used stops the sidecar at start-up, never a fall back to the CPU.
    #[arg(long, env = DEVICE_ENV, default_value_t = DeviceRequest::Auto)]
    pub device: DeviceRequest,

    /// Activation dtype. `auto`: F32 on the CPU (its fastest: F16 is ~16% slower), BF16 on a GPU
    /// that has it (compute capability 8.0+), else F16.
    #[arg(long, env = "SLUICE_DTYPE", value_enum, default_value_t = Activations::Auto)]
    pub dtype: Activations,

    /// Convert the weights once to a quantization with fast CPU kernels (cached beside
    /// `--cache-dir`). Q4_1 has no AVX path in candle; Q4_0 and Q8_0 do.
    #[arg(long, env = "SLUICE_CONVERT", value_enum)]
    pub convert: Option<Quant>,

    /// Where converted weights are cached (default: `$XDG_CACHE_HOME/sluice` or
    /// `$HOME/.cache/sluice`).
    #[arg(long, env = "SLUICE_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Sequences kept in the engine's prefix cache (0 disables it).
    #[arg(long, env = "SLUICE_PREFIX_CACHE", default_value_t = 16)]
    pub prefix_cache: usize,

    /// Memory the prefix cache may hold, in bytes or as a Kubernetes quantity (`256Mi`); 0
    /// disables it. Default: an eighth of the memory this process may use (its cgroup's
    /// limit, i.e. the pod's memory limit, else the machine's).
    #[arg(long, env = "SLUICE_PREFIX_CACHE_BYTES", value_parser = sluice_crds::quantity::parse_bytes)]
    pub prefix_cache_bytes: Option<u64>,

    /// Log format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The variant of the model this pod serves (default: the config's first variant).
    #[arg(long, env = "SLUICE_VARIANT")]
    pub variant: Option<String>,

    /// File holding the model's forwarding token (a mounted Secret). Without it this sidecar
    /// neither forwards requests to other variants nor accepts forwarded ones.
    #[arg(long, env = "SLUICE_FORWARD_TOKEN_FILE")]
    pub forward_token_file: Option<PathBuf>,

    /// File holding the fallback model's forwarding token (its mounted Secret): requests this
    /// model cannot serve go to the config's `fallback` signed with it. Read when first needed,
    /// so it may appear after start-up.
    #[arg(long = FALLBACK_TOKEN_FILE_FLAG, env = "SLUICE_FALLBACK_TOKEN_FILE")]
    pub fallback_token_file: Option<PathBuf>,

    /// Seconds a forward to another variant may take to connect before the request falls back.
    #[arg(
        long,
        env = "SLUICE_FORWARD_CONNECT_TIMEOUT_SECS",
        default_value_t = 1.0
    )]
    pub forward_connect_timeout_secs: f64,
}

/// Validated configuration of `serve`.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// The GGUF file as given.
    pub model: PathBuf,
    /// The id clients use.
    pub served_name: String,
    /// The initial sidecar config document (synthesised when no `--config` is given).
    pub sidecar: Arc<SidecarConfig>,
    /// Where config documents come from (file, ConfigMap) and whether to serve unlimited
    /// without one.
    pub sources: Sources,
    /// Completion cap of requests without `max_tokens` (`None`: the context window).
    pub default_max_tokens: Option<usize>,
    /// Cap on the engine's context window (`None`: the model's).
    pub context_length: Option<usize>,
    /// Sampling defaults of requests that set none.
    pub sampling_defaults: SamplingDefaults,
    /// API address.
    pub listen: SocketAddr,
    /// Admin address.
    pub admin_listen: SocketAddr,
    /// Body size limit.
    pub max_body_bytes: usize,
    /// API connections held at once (`None`: what the open-file limit allows, at most 4096).
    pub max_connections: Option<usize>,
    /// API connections held at once per client address (`None`: no such limit).
    pub max_connections_per_client: Option<usize>,
    /// Time to send a request head.
    pub header_timeout: Duration,
    /// Time a kept-alive connection waits for its next request.
    pub idle_timeout: Duration,
    /// The pace a request body must keep.
    pub body_pace: BodyPace,
    /// Engine batch size / engine slots.
    pub max_seqs: usize,
    /// Queue bound.
    pub max_queue: usize,
    /// Per-request timeout.
    pub request_timeout: Duration,
    /// Time to the first token (at most `request_timeout`).
    pub first_token_timeout: Duration,
    /// Grace period on SIGTERM.
    pub drain_grace: Duration,
    /// Kernel threads.
    pub threads: Option<usize>,
    /// Nice value of the kernel threads.
    pub kernel_nice: i32,
    /// Where the engine computes.
    pub device: DeviceRequest,
    /// Activation dtype (`Auto`: by device).
    pub dtype: Activations,
    /// Weight conversion, if any.
    pub convert: Option<Quant>,
    /// Cache for converted weights.
    pub cache_dir: PathBuf,
    /// Prefix cache size (0: off).
    pub prefix_cache: usize,
    /// Prefix cache memory (0: off, as with `prefix_cache` 0).
    pub prefix_cache_budget: PrefixCacheBudget,
    /// Log format.
    pub log_format: LogFormat,
    /// This pod's variant.
    pub variant: String,
    /// The forwarding token, when forwarding is enabled.
    pub forward_token: Option<ForwardToken>,
    /// The fallback model's forwarding token file (`--fallback-token-file`).
    pub fallback_token_file: Option<PathBuf>,
    /// Connect timeout of forwards.
    pub forward_connect_timeout: Duration,
}

// === impl ServeArgs ===

impl ServeArgs {
    /// Checks every flag and reads the config file; errors name the flag.
    pub fn validate(self) -> Result<ServeConfig> {
        check_gguf(&self.model)?;
        // An unreadable or invalid document is not fatal: the watcher reports it (log, metric)
        // and the sidecar stays unready until a valid one arrives (or serves unlimited with
        // --allow-unlimited).
        let sidecar = self
            .config
            .as_deref()
            .and_then(|path| std::fs::read_to_string(path).ok())
            .and_then(|text| SidecarConfig::from_yaml(&text).ok());
        let configmap = match self.configmap.as_deref() {
            None => None,
            Some(v) => match v.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Some((ns.to_owned(), name.to_owned()))
                }
                _ => {
                    return Err(StartupError::Config(format!(
                        "--configmap {v:?}: expected NAMESPACE/NAME"
                    )));
                }
            },
        };
        let served_name = match (&self.served_name, &sidecar) {
            (Some(name), _) => name.clone(),
            (None, Some(doc)) => doc.model.clone(),
            (None, None) => default_served_name(&self.model),
        };
        if served_name.is_empty() {
            return Err(StartupError::Config(
                "--served-name must not be empty".into(),
            ));
        }
        let sidecar = sidecar.unwrap_or_else(|| default_sidecar_config(&served_name));
        if self.max_seqs == 0 {
            return Err(StartupError::Config("--max-seqs must be at least 1".into()));
        }
        if self.max_body_bytes < 1024 {
            return Err(StartupError::Config(
                "--max-body-bytes must be at least 1024".into(),
            ));
        }
        if matches!(self.threads, Some(0)) {
            return Err(StartupError::Config("--threads must be at least 1".into()));
        }
        if !(0..=19).contains(&self.kernel_nice) {
            return Err(StartupError::Config(format!(
                "--kernel-nice must be between 0 and 19, not {}",
                self.kernel_nice
            )));
        }
        if let Some(n) = self.context_length
            && n < 16
        {
            return Err(StartupError::Config(format!(
                "--context-length {n} is too small: it must be at least 16 tokens"
            )));
        }
        if let Some(t) = self.default_temperature
            && !(0.0..=2.0).contains(&t)
        {
            return Err(StartupError::Config(format!(
                "--default-temperature {t} is out of range: it must be between 0 and 2"
            )));
        }
        if let Some(p) = self.default_top_p
            && !(0.0..=1.0).contains(&p)
        {
            return Err(StartupError::Config(format!(
                "--default-top-p {p} is out of range: it must be between 0 and 1"
            )));
        }
        let request_timeout = positive_secs(
            &format!("--{REQUEST_TIMEOUT_SECS_FLAG}"),
            self.request_timeout_secs,
        )?;
        let first_token_timeout = match self.first_token_timeout_secs {
            None => request_timeout,
            Some(secs) => {
                let flag = format!("--{FIRST_TOKEN_TIMEOUT_SECS_FLAG}");
                let t = positive_secs(&flag, secs)?;
                if t > request_timeout {
                    return Err(StartupError::Config(format!(
                        "{flag} {secs} exceeds --{REQUEST_TIMEOUT_SECS_FLAG} {}: the first token \
                         cannot come later than the whole answer",
                        request_timeout.as_secs_f64()
                    )));
                }
                t
            }
        };
        if self.max_connections == Some(0) {
            return Err(StartupError::Config(
                "--max-connections must be at least 1".into(),
            ));
        }
        if self.body_min_rate == 0 {
            return Err(StartupError::Config(
                "--body-min-rate must be at least 1 byte per second".into(),
            ));
        }
        let header_timeout = positive_secs("--header-timeout-secs", self.header_timeout_secs)?;
        let idle_timeout = positive_secs("--idle-timeout-secs", self.idle_timeout_secs)?;
        let body_pace = BodyPace {
            allowance: positive_secs("--body-timeout-secs", self.body_timeout_secs)?,
            min_bytes_per_sec: self.body_min_rate,
        };
        let drain_grace =
            positive_secs(&format!("--{DRAIN_GRACE_SECS_FLAG}"), self.drain_grace_secs)?;
        let cache_dir = self.cache_dir.unwrap_or_else(default_cache_dir);
        let variant = match self.variant {
            Some(v) if v.is_empty() => {
                return Err(StartupError::Config("--variant must not be empty".into()));
            }
            Some(v) => v,
            // The config always has at least one variant (validated).
            None => sidecar
                .variants
                .first()
                .map_or_else(|| "default".to_owned(), |v| v.name.clone()),
        };
        let forward_token = self
            .forward_token_file
            .as_deref()
            .map(ForwardToken::from_file)
            .transpose()?;
        let forward_connect_timeout = positive_secs(
            "--forward-connect-timeout-secs",
            self.forward_connect_timeout_secs,
        )?;
        Ok(ServeConfig {
            model: self.model,
            served_name,
            sidecar: Arc::new(sidecar),
            sources: Sources {
                file: self.config,
                configmap,
                allow_unlimited: self.allow_unlimited,
            },
            default_max_tokens: (self.default_max_tokens > 0).then_some(self.default_max_tokens),
            context_length: self.context_length,
            sampling_defaults: SamplingDefaults {
                temperature: self.default_temperature,
                top_p: self.default_top_p,
            },
            listen: self.listen,
            admin_listen: self.admin_listen,
            max_body_bytes: self.max_body_bytes,
            max_connections: self.max_connections,
            max_connections_per_client: (self.max_connections_per_client > 0)
                .then_some(self.max_connections_per_client),
            header_timeout,
            idle_timeout,
            body_pace,
            max_seqs: self.max_seqs,
            max_queue: self.max_queue,
            request_timeout,
            first_token_timeout,
            drain_grace,
            threads: self.threads,
            kernel_nice: self.kernel_nice,
            device: self.device,
            dtype: self.dtype,
            convert: self.convert,
            cache_dir,
            prefix_cache: self.prefix_cache,
            prefix_cache_budget: PrefixCacheBudget::new(self.prefix_cache, self.prefix_cache_bytes),
            log_format: self.log_format,
            variant,
            forward_token,
            fallback_token_file: self.fallback_token_file,
            forward_connect_timeout,
        })
    }
}

/// The prefix cache's byte budget and where it came from (for the start-up log).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixCacheBudget {
    /// The budget.
    pub bytes: usize,
    /// `--prefix-cache-bytes`, or the memory limit it was derived from.
    pub source: &'static str,
}

/// The default budget is this fraction of the memory limit: a pod's memory also holds the
/// weights (the demo model's 94 MiB file takes about 400 MB loaded) and the KV caches of the
/// running sequences, which the limit must fit first.
const PREFIX_CACHE_SHARE_OF_MEMORY: u64 = 8;

impl PrefixCacheBudget {
    fn new(entries: usize, flag: Option<u64>) -> Self {
        let (bytes, source) = match flag {
            _ if entries == 0 => (0, "--prefix-cache 0"),
            Some(bytes) => (bytes, "--prefix-cache-bytes"),
            None => match crate::memory_limit::memory_limit() {
                Some(limit) => (limit.bytes / PREFIX_CACHE_SHARE_OF_MEMORY, limit.source),
                // Nowhere to read a limit from: as small as a pod's default would be.
                None => (64 << 20, "fallback"),
            },
        };
        Self {
            bytes: usize::try_from(bytes).unwrap_or(usize::MAX),
            source,
        }
    }
}

fn positive_secs(flag: &str, secs: f64) -> Result<Duration> {
    if !(secs.is_finite() && secs > 0.0) {
        return Err(StartupError::Config(format!(
            "{flag} must be a positive number of seconds"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct.Q4_1`.
pub fn default_served_name(model: &Path) -> String {
    model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_owned())
}

/// The config a sidecar runs with when none is given: one local variant, no limits.
pub fn default_sidecar_config(model: &str) -> SidecarConfig {
    SidecarConfig {
        version: SIDECAR_CONFIG_VERSION.to_owned(),
        generation: 0,
        model: model.to_owned(),
        variants: vec![VariantRoute {
            name: "default".to_owned(),
            weight: 100,
            address: None,
        }],
        routing: Default::default(),
        identity: Default::default(),
        auth: None,
        rules: Vec::new(),
        replica_share: 1.0,
        saturation: Default::default(),
        fallback: None,
        cache: None,
        models: Vec::new(),
    }
}

fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("sluice");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache").join("sluice");
    }
    std::env::temp_dir().join("sluice")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn gguf_file() -> tempfile_like::TempFile {
        tempfile_like::TempFile::with_bytes(b"GGUF\x03\x00\x00\x00")
    }

    mod tempfile_like {
        use std::path::PathBuf;
        /// A file in the temp dir removed on drop (no extra dependency for one test helper).
        pub struct TempFile(pub PathBuf);
        impl TempFile {
            pub fn with_bytes(bytes: &[u8]) -> Self {
                static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let path = std::env::temp_dir()
                    .join(format!("sluice-test-{}-{n}.gguf", std::process::id()));
                std::fs::write(&path, bytes).unwrap();
                Self(path)
            }
        }
        impl Drop for TempFile {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn defaults_and_served_name_from_file() {
        let f = gguf_file();
        let cli = Cli::try_parse_from(["x", "--model", f.0.to_str().unwrap()]).unwrap();
        let cfg = cli.serve.validate().unwrap();
        assert_eq!(cfg.listen.port(), 8080);
        assert_eq!(cfg.admin_listen.port(), 9090);
        assert_eq!(cfg.dtype, Activations::Auto);
        assert_eq!(cfg.device, DeviceRequest::Auto);
        assert!(cfg.served_name.starts_with("sluice-test-"));
        assert_eq!(cfg.sidecar.model, cfg.served_name);
        // Routing: the config's first variant, no forwarding.
        assert_eq!(cfg.variant, "default");
        assert!(cfg.forward_token.is_none());
        let cli = Cli::try_parse_from(["x", "--model", f.0.to_str().unwrap(), "--variant", ""]);
        assert!(cli.unwrap().serve.validate().is_err(), "empty --variant");
    }

    #[test]
    fn the_flags_and_defaults_the_operator_relies_on() {
        let f = gguf_file();
        let p = f.0.to_str().unwrap();
        // Unset: the defaults crds documents and the operator counts on.
        let cfg = Cli::try_parse_from(["x", "--model", p])
            .unwrap()
            .serve
            .validate()
            .unwrap();
        assert_eq!(cfg.max_seqs, DEFAULT_MAX_CONCURRENT_SEQUENCES as usize);
        assert_eq!(
            cfg.drain_grace,
            Duration::from_secs(DRAIN_GRACE_SECS.into())
        );
        // The fallback token file under the name the operator writes.
        let flag = format!("--{FALLBACK_TOKEN_FILE_FLAG}");
        let cli = Cli::try_parse_from(["x", "--model", p, &flag, "/f/token"]).unwrap();
        assert_eq!(
            cli.serve.validate().unwrap().fallback_token_file,
            Some(PathBuf::from("/f/token"))
        );
        // The drain flag under the name the operator writes.
        let flag = format!("--{DRAIN_GRACE_SECS_FLAG}");
        let cli = Cli::try_parse_from(["x", "--model", p, &flag, "7"]).unwrap();
        assert_eq!(
            cli.serve.validate().unwrap().drain_grace,
            Duration::from_secs(7)
        );
        let cli = Cli::try_parse_from(["x", "--model", p, &format!("{flag}=0")]).unwrap();
        let err = cli.serve.validate().unwrap_err().to_string();
        assert!(err.contains(&flag), "{err}");
        // The timeouts, as the operator writes them (seconds, fractions allowed).
        assert_eq!(
            cfg.request_timeout,
            Duration::from_secs(REQUEST_TIMEOUT_SECS.into())
        );
        assert_eq!(cfg.first_token_timeout, cfg.request_timeout);
        let (request, first) = (
            format!("--{REQUEST_TIMEOUT_SECS_FLAG}"),
            format!("--{FIRST_TOKEN_TIMEOUT_SECS_FLAG}"),
        );
        let cfg = Cli::try_parse_from(["x", "--model", p, &request, "600", &first, "2.5"])
            .unwrap()
            .serve
            .validate()
            .unwrap();
        assert_eq!(
            (cfg.request_timeout, cfg.first_token_timeout),
            (Duration::from_secs(600), Duration::from_millis(2500))
        );
        let cli = Cli::try_parse_from(["x", "--model", p, &request, "10", &first, "11"]).unwrap();
        let err = cli.serve.validate().unwrap_err().to_string();
        assert!(err.contains(&first) && err.contains("exceeds"), "{err}");
    }

    #[test]
    fn rejects_non_gguf_and_missing_model() {
        let f = tempfile_like::TempFile::with_bytes(b"nope");
        let cli = Cli::try_parse_from(["x", "--model", f.0.to_str().unwrap()]).unwrap();
        let err = cli.serve.validate().unwrap_err().to_string();
        assert!(err.contains("not a GGUF file"), "{err}");
        let cli = Cli::try_parse_from(["x", "--model", "/nonexistent.gguf"]).unwrap();
        let err = cli.serve.validate().unwrap_err().to_string();
        assert!(err.contains("cannot read --model"), "{err}");
    }

    #[test]
    fn rejects_bad_numbers() {
        let f = gguf_file();
        let p = f.0.to_str().unwrap();
        assert!(Cli::try_parse_from(["x", "--model", p, "--max-seqs", "abc"]).is_err());
        let cli = Cli::try_parse_from(["x", "--model", p, "--request-timeout-secs=-1"]).unwrap();
        assert!(cli.serve.validate().is_err());
        assert!(Cli::try_parse_from(["x", "--model", p, "--convert", "q5_k"]).is_err());
        let cli = Cli::try_parse_from(["x", "--model", p, "--convert", "q8_0"]).unwrap();
        assert_eq!(cli.serve.convert, Some(Quant::Q8_0));
        for (nice, ok) in [("0", true), ("19", true), ("20", false), ("-1", false)] {
            let cli = Cli::try_parse_from(["x", "--model", p, &format!("--kernel-nice={nice}")]);
            assert_eq!(
                cli.unwrap().serve.validate().is_ok(),
                ok,
                "--kernel-nice {nice}"
            );
        }
    }

    #[test]
    fn engine_defaults_the_operator_renders() {
        let f = gguf_file();
        let p = f.0.to_str().unwrap();
        let cli = Cli::try_parse_from([
            "x",
            "--model",
            p,
            "--context-length",
            "512",
            "--default-max-tokens",
            "64",
            "--default-temperature",
            "0.7",
            "--default-top-p",
            "0.9",
        ])
        .unwrap();
        let cfg = cli.serve.validate().unwrap();
        assert_eq!(cfg.context_length, Some(512));
        assert_eq!(cfg.default_max_tokens, Some(64));
        assert_eq!(cfg.sampling_defaults.temperature, Some(0.7));
        assert_eq!(cfg.sampling_defaults.top_p, Some(0.9));
        // Unset: the model's window and the engine's sampling.
        let cfg = Cli::try_parse_from(["x", "--model", p])
            .unwrap()
            .serve
            .validate()
            .unwrap();
        assert_eq!(cfg.context_length, None);
        assert_eq!(cfg.sampling_defaults, Default::default());
        // Bounds are inclusive.
        for ok in [
            ["--context-length", "16"],
            ["--default-temperature", "0"],
            ["--default-temperature", "2"],
            ["--default-top-p", "0"],
            ["--default-top-p", "1"],
        ] {
            let cli = Cli::try_parse_from(["x", "--model", p, ok[0], ok[1]]).unwrap();
            assert!(cli.serve.validate().is_ok(), "{ok:?}");
        }
        for bad in [
            "--context-length=15",
            "--default-temperature=2.5",
            "--default-temperature=-0.1",
            "--default-temperature=NaN",
            "--default-top-p=1.5",
            "--default-top-p=-1",
        ] {
            let cli = Cli::try_parse_from(["x", "--model", p, bad]).unwrap();
            let err = cli.serve.validate().unwrap_err().to_string();
            let flag = bad.split('=').next().unwrap_or_default();
            assert!(err.contains(flag), "{bad}: {err}");
        }
        assert!(Cli::try_parse_from(["x", "--model", p, "--context-length", "-1"]).is_err());
    }
}

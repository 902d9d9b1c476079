//! `sluice-sidecar fetch`: downloads a model's weights before the sidecar starts (the operator
//! renders it as the model Deployment's init container).
//!
//! The download goes to `<out>.part` and is renamed into place only once complete and (when a
//! hash is given) verified, so `serve` never sees a half-written file. Connection errors, stalls,
//! 5xx and 429 are retried with exponential backoff, resuming with a `Range` request where the
//! server allows it; other 4xx fail at once. The error is one plain line: Kubernetes shows the
//! end of the log as the `WeightsFetchFailed` reason (terminationMessagePolicy
//! FallbackToLogsOnError).

use std::{
    io::Read,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use http::{HeaderMap, StatusCode, header};
use sha2::{Digest, Sha256};

use crate::error::{Result, StartupError};
use sluice_telemetry::LogFormat;

/// `sluice-sidecar fetch` flags; each can also be set with the `SLUICE_FETCH_*` variable beside it.
#[derive(Clone, Debug, clap::Args)]
pub struct FetchArgs {
    /// http(s) URL of the GGUF file.
    #[arg(long, env = "SLUICE_FETCH_URL")]
    pub url: String,

    /// Expected SHA-256 of the file (64 hex digits, optionally prefixed `sha256:`). A mismatch
    /// fails the fetch and removes the download.
    #[arg(long, env = "SLUICE_FETCH_SHA256")]
    pub sha256: Option<String>,

    /// Where the file goes (written to `<out>.part`, then renamed).
    #[arg(long, env = "SLUICE_FETCH_OUT")]
    pub out: PathBuf,

    /// Attempts before giving up on connection errors, stalls, 5xx and 429.
    #[arg(long, env = "SLUICE_FETCH_ATTEMPTS", default_value_t = 5)]
    pub attempts: u32,

    /// Seconds without a single byte (connecting, waiting for headers or for the body) after
    /// which an attempt counts as stalled.
    #[arg(long, env = "SLUICE_FETCH_STALL_TIMEOUT_SECS", default_value_t = 60.0)]
    pub stall_timeout_secs: f64,

    /// Backoff before the first retry, in seconds; doubles on each retry (at most 60 s). A
    /// server's `Retry-After` is honoured when longer.
    #[arg(long, env = "SLUICE_FETCH_RETRY_BACKOFF_SECS", default_value_t = 1.0)]
    pub retry_backoff_secs: f64,

    /// Seconds between progress log lines.
    #[arg(
        long,
        env = "SLUICE_FETCH_PROGRESS_INTERVAL_SECS",
        default_value_t = 5.0
    )]
    pub progress_interval_secs: f64,

    /// File holding a bearer token sent as `Authorization` (a mounted Secret), for private
    /// model hosts. Never logged.
    #[arg(long, env = "SLUICE_FETCH_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Log format.
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// Validated `fetch` settings.
#[derive(Clone)]
pub struct FetchConfig {
    url: reqwest::Url,
    /// The URL without credentials or query string (presigned URLs carry secrets there).
    shown_url: String,
    sha256: Option<String>,
    out: PathBuf,
    attempts: u32,
    stall_timeout: Duration,
    retry_backoff: Duration,
    progress_interval: Duration,
    token: Option<String>,
    /// Log format, for `main` to install tracing with.
    pub log_format: LogFormat,
}

impl std::fmt::Debug for FetchConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchConfig")
            .field("url", &self.shown_url)
            .field("sha256", &self.sha256)
            .field("out", &self.out)
            .field("attempts", &self.attempts)
            .field("stall_timeout", &self.stall_timeout)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

// === impl FetchArgs ===

impl FetchArgs {
    /// Checks every flag; errors name the flag.
    pub fn validate(self) -> Result<FetchConfig> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| StartupError::Config(format!("--url {:?} is not a URL: {e}", self.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(StartupError::Config(format!(
                "--url must be http or https, not {}",
                url.scheme()
            )));
        }
        let sha256 = self.sha256.as_deref().map(parse_sha256).transpose()?;
        if self.out.as_os_str().is_empty() || self.out.file_name().is_none() {
            return Err(StartupError::Config("--out must name a file".into()));
        }
        if self.attempts == 0 {
            return Err(StartupError::Config("--attempts must be at least 1".into()));
        }
        let stall_timeout = positive("--stall-timeout-secs", self.stall_timeout_secs)?;
        let retry_backoff = non_negative("--retry-backoff-secs", self.retry_backoff_secs)?;
        let progress_interval = positive("--progress-interval-secs", self.progress_interval_secs)?;
        let token = match &self.token_file {
            Some(path) => {
                let token = std::fs::read_to_string(path).map_err(|e| {
                    StartupError::Config(format!("--token-file {}: {e}", path.display()))
                })?;
                let token = token.trim().to_owned();
                if token.is_empty() {
                    return Err(StartupError::Config(format!(
                        "--token-file {} is empty",
                        path.display()
                    )));
                }
                Some(token)
            }
            None => None,
        };
        Ok(FetchConfig {
            shown_url: shown_url(&url),
            url,
            sha256,
            out: self.out,
            attempts: self.attempts,
            stall_timeout,
            retry_backoff,
            progress_interval,
            token,
            log_format: self.log_format,
        })
    }
}

fn positive(flag: &str, secs: f64) -> Result<Duration> {
    if !(secs.is_finite() && secs > 0.0) {
        return Err(StartupError::Config(format!(
            "{flag} must be a positive number of seconds"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn non_negative(flag: &str, secs: f64) -> Result<Duration> {
    if !(secs.is_finite() && secs >= 0.0) {
        return Err(StartupError::Config(format!(
            "{flag} must be zero or a positive number of seconds"
        )));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `sha256:ABC…` or `abc…` (64 hex digits) -> lowercase hex.
fn parse_sha256(s: &str) -> Result<String> {
    let hex = s.trim();
    let hex = hex
        .strip_prefix("sha256:")
        .unwrap_or(hex)
        .to_ascii_lowercase();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StartupError::Config(format!(
            "--sha256 {s:?} is not a SHA-256 hash (64 hex digits)"
        )));
    }
    Ok(hex)
}

/// The URL as logs and errors show it: no user info, no query string.
fn shown_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    let had_query = shown.query().is_some();
    shown.set_query(None);
    shown.set_fragment(None);
    let mut s = shown.to_string();
    if had_query {
        s.push_str("?…");
    }
    s
}

// === fetch ===

/// Why one attempt ended without the whole file.
enum AttemptError {
    /// Worth another attempt (connection error, stall, 5xx, 429, short body).
    Retry {
        reason: String,
        /// The server's `Retry-After`, when it sent one.
        after: Option<Duration>,
    },
    /// Not worth retrying (4xx, disk error).
    Fatal(String),
}

/// What an attempt resumes from: the bytes already in `<out>.part` and the validator (ETag or
/// Last-Modified) of the response they came from.
struct Partial {
    len: u64,
    validator: Option<String>,
    hasher: Sha256,
}

/// Downloads (or keeps) `--out`. Errors are one line, naming the URL and the cause.
pub async fn fetch(config: &FetchConfig) -> Result<()> {
    let started = Instant::now();
    if let Some(parent) = config.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        tokio::fs::create_dir_all(parent).await.map_err(|e| {
            fail(
                config,
                format!("cannot create directory {}: {e}", parent.display()),
            )
        })?;
    }

    if tokio::fs::try_exists(&config.out).await.unwrap_or(false) {
        match &config.sha256 {
            None => {
                tracing::info!(out = %config.out.display(), "file exists and no --sha256 was given; not downloading");
                return Ok(());
            }
            Some(expected) => {
                let actual = hash_file(&config.out).await.map_err(|e| fail(config, e))?;
                if &actual == expected {
                    tracing::info!(out = %config.out.display(), sha256 = %actual, "file exists with the expected sha256; not downloading");
                    return Ok(());
                }
                tracing::warn!(out = %config.out.display(), expected = %expected, actual = %actual, "existing file has another sha256; downloading again");
            }
        }
    }

    let client = reqwest::Client::builder()
        .connect_timeout(config.stall_timeout)
        // Weights are binary: no transparent decompression (none is compiled in anyway), so
        // Range offsets are byte offsets of the file itself.
        .user_agent(concat!("sluice-sidecar/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| fail(config, format!("cannot build the HTTP client: {e}")))?;

    let part = part_path(&config.out);
    let meta = meta_path(&config.out);
    let mut partial = resume_point(config, &part, &meta).await;
    let mut last_reason = String::new();
    for attempt in 1..=config.attempts {
        if attempt > 1 {
            tracing::info!(attempt, attempts = config.attempts, "retrying");
        }
        match attempt_download(config, &client, &part, &meta, &mut partial).await {
            Ok(()) => {
                last_reason.clear();
                break;
            }
            Err(AttemptError::Fatal(reason)) => {
                let _ = tokio::fs::remove_file(&meta).await;
                return Err(fail(config, reason));
            }
            Err(AttemptError::Retry { reason, after }) => {
                if attempt == config.attempts {
                    last_reason = reason;
                    break;
                }
                let backoff = backoff(config.retry_backoff, attempt);
                let wait = after.map_or(backoff, |a| a.max(backoff)).min(MAX_WAIT);
                tracing::warn!(
                    attempt,
                    attempts = config.attempts,
                    reason = %reason,
                    retry_in_ms = wait.as_millis() as u64,
                    "download attempt failed"
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
    if !last_reason.is_empty() {
        // The `.part` file stays: a restarted init container resumes from it.
        return Err(fail(
            config,
            format!("{last_reason} (gave up after {} attempts)", config.attempts),
        ));
    }

    let Some(done) = partial else {
        return Err(fail(config, "download ended without a file".into()));
    };
    let actual = format!("{:x}", done.hasher.finalize());
    if let Some(expected) = &config.sha256
        && &actual != expected
    {
        let _ = tokio::fs::remove_file(&part).await;
        let _ = tokio::fs::remove_file(&meta).await;
        return Err(fail(
            config,
            format!("sha256 mismatch: expected {expected}, got {actual}; the download was removed"),
        ));
    }
    tokio::fs::rename(&part, &config.out).await.map_err(|e| {
        fail(
            config,
            format!(
                "cannot rename {} to {}: {e}",
                part.display(),
                config.out.display()
            ),
        )
    })?;
    let _ = tokio::fs::remove_file(&meta).await;
    let elapsed = started.elapsed();
    tracing::info!(
        out = %config.out.display(),
        bytes = done.len,
        sha256 = %actual,
        verified = config.sha256.is_some(),
        elapsed_s = format!("{:.1}", elapsed.as_secs_f64()),
        rate = %rate(done.len, elapsed),
        "download complete"
    );
    Ok(())
}

const MAX_WAIT: Duration = Duration::from_secs(60);

fn backoff(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1u32 << (attempt - 1).min(16))
        .min(MAX_WAIT)
}

fn fail(config: &FetchConfig, reason: String) -> StartupError {
    StartupError::Fetch(format!("fetch {} failed: {reason}", config.shown_url))
}

fn part_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".part");
    PathBuf::from(name)
}

/// Beside the `.part` file: the URL and validator it was downloaded from, so a restarted fetch
/// resumes only the same file.
fn meta_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".part.meta");
    PathBuf::from(name)
}

/// A `.part` left by an earlier run is resumed when it came from the same URL and the server
/// identified the file (ETag/Last-Modified, sent back as `If-Range`); otherwise it is discarded.
async fn resume_point(config: &FetchConfig, part: &Path, meta: &Path) -> Option<Partial> {
    let len = tokio::fs::metadata(part).await.ok()?.len();
    let text = tokio::fs::read_to_string(meta).await.unwrap_or_default();
    let mut lines = text.lines();
    let (url, validator) = (lines.next(), lines.next());
    let (Some(url), Some(validator)) = (url, validator) else {
        let _ = tokio::fs::remove_file(part).await;
        return None;
    };
    if url != config.url.as_str() || validator.is_empty() || len == 0 {
        let _ = tokio::fs::remove_file(part).await;
        return None;
    }
    let hasher = match hash_prefix(part).await {
        Ok(h) => h,
        Err(_) => {
            let _ = tokio::fs::remove_file(part).await;
            return None;
        }
    };
    tracing::info!(part = %part.display(), bytes = len, "resuming an earlier partial download");
    Some(Partial {
        len,
        validator: Some(validator.to_owned()),
        hasher,
    })
}

async fn attempt_download(
    config: &FetchConfig,
    client: &reqwest::Client,
    part: &Path,
    meta: &Path,
    partial: &mut Option<Partial>,
) -> std::result::Result<(), AttemptError> {
    let mut request = client.get(config.url.clone());
    if let Some(token) = &config.token {
        request = request.bearer_auth(token);
    }
    let resume_from = partial
        .as_ref()
        .filter(|p| p.len > 0)
        .map(|p| (p.len, p.validator.clone()));
    if let Some((len, validator)) = &resume_from {
        request = request.header(header::RANGE, format!("bytes={len}-"));
        if let Some(v) = validator {
            request = request.header(header::IF_RANGE, v);
        }
    }
    let response = match tokio::time::timeout(config.stall_timeout, request.send()).await {
        Err(_) => {
            return Err(retry(format!(
                "stalled: no response within {}",
                secs(config.stall_timeout)
            )));
        }
        Ok(Err(e)) => return Err(retry(transport_reason(&e))),
        Ok(Ok(r)) => r,
    };
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        return Err(AttemptError::Retry {
            reason: format!("server answered HTTP {}", status_text(status)),
            after: retry_after(response.headers()),
        });
    }
    if status == StatusCode::RANGE_NOT_SATISFIABLE {
        // The partial file no longer matches what the server has: start over.
        *partial = None;
        let _ = tokio::fs::remove_file(part).await;
        return Err(retry(
            "server refused to resume (HTTP 416); starting over".into(),
        ));
    }
    if status.is_client_error() {
        let hint = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                "; check the URL and the credentials (--token-file)"
            }
            StatusCode::NOT_FOUND => "; check the URL",
            _ => "",
        };
        return Err(AttemptError::Fatal(format!(
            "server answered HTTP {} (not retried){hint}",
            status_text(status)
        )));
    }
    if !(status == StatusCode::OK || status == StatusCode::PARTIAL_CONTENT) {
        return Err(AttemptError::Fatal(format!(
            "unexpected HTTP {} from the server",
            status_text(status)
        )));
    }

    // 206: append from the offset we asked for; 200: the whole file from the start.
    let resuming = status == StatusCode::PARTIAL_CONTENT;
    let start = match (resuming, resume_from.map(|(len, _)| len)) {
        (true, Some(len)) => {
            let offset = content_range_start(response.headers());
            if offset != Some(len) {
                *partial = None;
                let _ = tokio::fs::remove_file(part).await;
                return Err(retry(format!(
                    "server resumed at the wrong offset ({offset:?} instead of {len}); starting over"
                )));
            }
            len
        }
        (true, None) => {
            return Err(AttemptError::Fatal(
                "server sent partial content (HTTP 206) to a request for the whole file".into(),
            ));
        }
        (false, _) => 0,
    };
    let total = response.content_length().map(|n| n + start);
    let validator = response
        .headers()
        .get(header::ETAG)
        .or_else(|| response.headers().get(header::LAST_MODIFIED))
        .and_then(|v| v.to_str().ok())
        // Weak ETags cannot be used with If-Range.
        .filter(|v| !v.starts_with("W/"))
        .map(str::to_owned);
    let resumable = response
        .headers()
        .get(header::ACCEPT_RANGES)
        .is_some_and(|v| v.as_bytes() == b"bytes")
        || resuming;

    let mut state = if resuming {
        // `resume_from` was Some, so `partial` is.
        partial.take().unwrap_or_else(|| Partial {
            len: start,
            validator: None,
            hasher: Sha256::new(),
        })
    } else {
        if partial.is_some() {
            tracing::info!("server sent the whole file; restarting from byte 0");
        }
        Partial {
            len: 0,
            validator: None,
            hasher: Sha256::new(),
        }
    };
    state.validator = validator.filter(|_| resumable);
    let disk =
        |e: std::io::Error| AttemptError::Fatal(format!("cannot write {}: {e}", part.display()));
    match &state.validator {
        Some(v) => tokio::fs::write(meta, format!("{}\n{v}\n", config.url))
            .await
            .map_err(disk)?,
        None => {
            let _ = tokio::fs::remove_file(meta).await;
        }
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resuming)
        .truncate(!resuming)
        .open(part)
        .await
        .map_err(disk)?;
    tracing::info!(
        url = %config.shown_url,
        from_byte = start,
        total_bytes = total,
        resumable,
        "downloading"
    );

    let mut response = response;
    let mut progress = Progress::new(state.len, total, config.progress_interval);
    let outcome = loop {
        match tokio::time::timeout(config.stall_timeout, response.chunk()).await {
            Err(_) => {
                break Err(retry(format!(
                    "download stalled: no data for {} at {}",
                    secs(config.stall_timeout),
                    progress.position()
                )));
            }
            Ok(Err(e)) => {
                break Err(retry(format!(
                    "{} at {}",
                    transport_reason(&e),
                    progress.position()
                )));
            }
            Ok(Ok(None)) => break Ok(()),
            Ok(Ok(Some(bytes))) => {
                if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut file, &bytes).await {
                    break Err(disk(e));
                }
                state.hasher.update(&bytes);
                state.len += bytes.len() as u64;
                progress.advance(state.len);
            }
        }
    };
    let flushed = async {
        tokio::io::AsyncWriteExt::flush(&mut file).await?;
        file.sync_all().await
    }
    .await;
    let len = state.len;
    let complete = outcome.is_ok() && total.is_none_or(|t| len == t);
    let overran = total.is_some_and(|t| len > t);
    // What the next attempt resumes from: the finished file, or bytes the server can resume
    // (it named the file with a validator); anything else starts over.
    *partial = (complete || (state.validator.is_some() && !overran)).then_some(state);
    outcome?;
    flushed.map_err(disk)?;
    if let Some(total) = total
        && len != total
    {
        return Err(retry(format!(
            "connection closed early at {len} of {total} bytes"
        )));
    }
    Ok(())
}

fn retry(reason: String) -> AttemptError {
    AttemptError::Retry {
        reason,
        after: None,
    }
}

fn transport_reason(e: &reqwest::Error) -> String {
    // reqwest's Display is terse ("error sending request"); the source chain has the cause.
    let mut msg = if e.is_connect() {
        "cannot connect".to_owned()
    } else if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_body() || e.is_decode() {
        "connection failed while reading the body".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut source = std::error::Error::source(e);
    let mut last = None;
    while let Some(s) = source {
        last = Some(s.to_string());
        source = s.source();
    }
    if let Some(cause) = last {
        msg.push_str(": ");
        msg.push_str(&cause);
    }
    msg
}

fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    headers
        .get(header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// `Content-Range: bytes 100-199/200` -> 100.
fn content_range_start(headers: &HeaderMap) -> Option<u64> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let range = v.trim().strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs_f64())
}

fn rate(bytes: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(1e-3);
    format!("{}/s", human_bytes((bytes as f64 / secs) as u64))
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Rate-limited progress lines.
struct Progress {
    total: Option<u64>,
    interval: Duration,
    bytes: u64,
    last_at: Instant,
    last_bytes: u64,
}

impl Progress {
    fn new(bytes: u64, total: Option<u64>, interval: Duration) -> Self {
        Self {
            total,
            interval,
            bytes,
            last_at: Instant::now(),
            last_bytes: bytes,
        }
    }

    fn advance(&mut self, bytes: u64) {
        self.bytes = bytes;
        let elapsed = self.last_at.elapsed();
        if elapsed < self.interval {
            return;
        }
        let rate = rate(bytes - self.last_bytes, elapsed);
        match self.total {
            Some(total) if total > 0 => tracing::info!(
                bytes,
                total,
                percent = format!("{:.1}", bytes as f64 * 100.0 / total as f64),
                rate = %rate,
                "downloading"
            ),
            _ => tracing::info!(bytes, rate = %rate, "downloading"),
        }
        self.last_at = Instant::now();
        self.last_bytes = bytes;
    }

    fn position(&self) -> String {
        match self.total {
            Some(total) => format!("{} of {total} bytes", self.bytes),
            None => format!("{} bytes", self.bytes),
        }
    }
}

/// SHA-256 of a whole file (hex), read off the async runtime.
async fn hash_file(path: &Path) -> std::result::Result<String, String> {
    let hasher = hash_prefix(path).await?;
    Ok(format!("{:x}", hasher.finalize()))
}

/// A hasher fed with the whole file as it is now.
async fn hash_prefix(path: &Path) -> std::result::Result<Sha256, String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file
                .read(&mut buf)
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hasher)
    })
    .await
    .map_err(|e| format!("hashing task failed: {e}"))?
}

#[cfg(test)]
mod tests;

//! Helpers for the integration tests: start the real `sluice-sidecar` binary on the real model
//! and talk to it over real HTTP.
#![allow(dead_code, clippy::unwrap_used)]

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// The model the tests run on; a missing model is a failure that says how to get it.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("SLUICE_TEST_MODEL").map(PathBuf::from);
    match path {
        Some(p) if p.is_file() => p,
        Some(p) => panic!(
            "SLUICE_TEST_MODEL={} does not exist: run `make model` (or `make test`, which fetches it)",
            p.display()
        ),
        None => panic!(
            "SLUICE_TEST_MODEL is not set: run `make model` and the tests through `make test`, \
             or export SLUICE_TEST_MODEL=$PWD/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
        ),
    }
}

/// The engine in-process on `model` (F32 activations, 4 sequences, no prefix cache).
pub async fn load_engine(model: PathBuf) -> sluice_sidecar::engine::Engine {
    sluice_sidecar::engine::Engine::load(&sluice_sidecar::engine::EngineSettings {
        model,
        served_name: "m".into(),
        device: sluice_sidecar::engine::device::select(
            sluice_sidecar::engine::device::DeviceRequest::Cpu,
            sluice_sidecar::engine::Activations::F32,
        )
        .unwrap(),
        threads: None,
        kernel_nice: 10,
        max_seqs: 4,
        max_queue: 4,
        prefix_cache: 0,
        prefix_cache_meter: Default::default(),
        context_length: None,
    })
    .await
    .unwrap()
}

/// A free localhost port, never the same twice in one test process. Taken below the kernel's
/// ephemeral range (32768 and up): a port the kernel hands out for `bind(0)` or a client
/// connection can be taken by another test between our check and the sidecar's bind, which
/// failed tests with "Address already in use" (and could make a port meant to stay dead live).
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Spread processes (one test binary at a time, but a rerun may overlap with an old one).
    let base = std::process::id().wrapping_mul(7919);
    loop {
        let n = base.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed));
        let port = 20_000 + (n % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A running sidecar process; killed on drop.
pub struct Sidecar {
    pub child: Child,
    pub api: String,
    pub admin: String,
    pub name: String,
    log: PathBuf,
}

impl Sidecar {
    /// Starts the binary with `extra` flags on free ports; does not wait for readiness.
    pub fn spawn(extra: &[&str]) -> Self {
        Self::spawn_at(free_port(), free_port(), extra)
    }

    /// Starts the binary with `extra` flags on the given API and admin ports.
    pub fn spawn_at(api: u16, admin: u16, extra: &[&str]) -> Self {
        let bin = Path::new(env!("CARGO_BIN_EXE_sluice-sidecar"));
        Self::launch(bin, &model_path(), api, admin, extra)
    }

    /// [`Sidecar::spawn_at`] with the environment variables `env` set.
    pub fn spawn_at_with_env(api: u16, admin: u16, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_sluice-sidecar"));
        command.envs(env.iter().copied());
        Self::start(command, &model_path(), api, admin, extra)
    }

    /// Starts `bin serve` (this build's or another) on `model` with `extra` flags on the given
    /// ports; does not wait for readiness.
    pub fn launch(bin: &Path, model: &Path, api: u16, admin: u16, extra: &[&str]) -> Self {
        Self::start(Command::new(bin), model, api, admin, extra)
    }

    /// [`Sidecar::spawn`] in a process limited to `open_files` open files (soft and hard).
    pub fn spawn_with_open_files(open_files: u32, extra: &[&str]) -> Self {
        let bin = Path::new(env!("CARGO_BIN_EXE_sluice-sidecar"));
        let mut command = Command::new("sh");
        command
            .args([
                "-c",
                &format!("ulimit -n {open_files} && exec \"$@\""),
                "sh",
            ])
            .arg(bin);
        Self::start(command, &model_path(), free_port(), free_port(), extra)
    }

    /// [`Sidecar::spawn`] serving the model as `name` (instead of `smollm2`).
    pub fn spawn_named(name: &str, extra: &[&str]) -> Self {
        let bin = Path::new(env!("CARGO_BIN_EXE_sluice-sidecar"));
        let (api, admin) = (free_port(), free_port());
        Self::start_as(Command::new(bin), name, &model_path(), api, admin, extra)
    }

    /// Runs `command serve ...` (`command` is the binary, or a wrapper that execs it).
    fn start(command: Command, model: &Path, api: u16, admin: u16, extra: &[&str]) -> Self {
        Self::start_as(command, "smollm2", model, api, admin, extra)
    }

    fn start_as(
        mut command: Command,
        name: &str,
        model: &Path,
        api: u16,
        admin: u16,
        extra: &[&str],
    ) -> Self {
        let log = std::env::temp_dir().join(format!(
            "sluice-sidecar-test-{}-{api}.log",
            std::process::id()
        ));
        let log_file = std::fs::File::create(&log).unwrap();
        let child = command
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--served-name", name])
            .args(["--listen", &format!("127.0.0.1:{api}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap();
        Self {
            child,
            api: format!("http://127.0.0.1:{api}"),
            admin: format!("http://127.0.0.1:{admin}"),
            name: name.to_owned(),
            log,
        }
    }

    /// The sidecar's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for `/readyz` to answer 200; returns the readiness answers seen before that.
    pub async fn wait_ready(&mut self) -> Vec<(u16, String)> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut seen = Vec::new();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("sidecar exited early ({status}):\n{}", self.log());
            }
            if let Ok((status, body)) = get(&format!("{}/readyz", self.admin)).await {
                if status == StatusCode::OK {
                    return seen;
                }
                seen.push((status.as_u16(), body));
            }
            assert!(
                Instant::now() < deadline,
                "not ready after 120s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// One short greedy chat completion, asserted to succeed (it reads every weight).
    pub async fn chat_once(&self) {
        let body = serde_json::json!({
            "model": self.name,
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 4,
            "temperature": 0,
        });
        let (status, body) = post_json(&format!("{}/v1/chat/completions", self.api), &body).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// Its `/metrics` page.
    pub async fn metrics(&self) -> String {
        get(&format!("{}/metrics", self.admin)).await.unwrap().1
    }

    /// Waits (at most a minute) until its metric `name` reads `value`: what the server counts
    /// after a connection closes lands a moment after the client sees it.
    pub async fn wait_for_metric(&self, name: &str, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.metrics().await;
            if metric(&text, name) == Some(value) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never read {value}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GET, whole body as text.
pub async fn get(url: &str) -> Result<(StatusCode, String), String> {
    let req = Request::get(url)
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let res = client().request(req).await.map_err(|e| e.to_string())?;
    let status = res.status();
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// POST raw bytes as JSON; whole response.
pub async fn post_raw(url: &str, body: impl Into<Bytes>) -> (StatusCode, http::HeaderMap, String) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .unwrap();
    let res = client().request(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// POSTs `body` as JSON with `key` as its bearer token (none: no `Authorization`) and `extra`
/// headers; the response with its body unread.
pub async fn post_as(
    url: &str,
    key: Option<&str>,
    extra: &[(&str, &str)],
    body: &serde_json::Value,
) -> http::Response<Incoming> {
    try_post_as(url, key, extra, body).await.unwrap()
}

/// [`post_as`], or the client's error where no answer came (a server killed, a connection cut).
pub async fn try_post_as(
    url: &str,
    key: Option<&str>,
    extra: &[(&str, &str)],
    body: &serde_json::Value,
) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    for (name, value) in extra {
        req = req.header(*name, *value);
    }
    let req = req
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap();
    client().request(req).await
}

/// A response read whole: status, headers and the JSON body.
pub async fn read_json(
    res: http::Response<Incoming>,
) -> (StatusCode, http::HeaderMap, serde_json::Value) {
    let (status, headers) = (res.status(), res.headers().clone());
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status, headers, value)
}

/// POST JSON; status and parsed JSON body.
pub async fn post_json(url: &str, body: &serde_json::Value) -> (StatusCode, serde_json::Value) {
    let (status, _, text) = post_raw(url, serde_json::to_vec(body).unwrap()).await;
    let json = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("response is not JSON ({e}): {text}"));
    (status, json)
}

/// POST and return the streaming response (headers received, body unread).
pub async fn post_stream(url: &str, body: &serde_json::Value) -> http::Response<Incoming> {
    let req = Request::builder()
        .method(Method::POST)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body).unwrap())))
        .unwrap();
    client().request(req).await.unwrap()
}

/// A streamed greedy completion that counts on for far longer than any test waits (2,000
/// tokens): a stream still running when something is done to the server.
pub fn counting_stream(model: &str) -> serde_json::Value {
    serde_json::json!({
        "model": model,
        "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        "max_tokens": 2000,
        "temperature": 0,
        "stream": true,
    })
}

/// The rest of a streamed body after `received`, asserted to end cleanly (a chunked terminator:
/// hyper reports a cut connection as an error) within a minute, and to end with an error
/// event of `code` then `[DONE]`. Returns the whole text.
pub async fn assert_stream_ends_with_error(
    mut received: Vec<u8>,
    body: Incoming,
    code: &str,
) -> String {
    let rest = tokio::time::timeout(Duration::from_secs(60), body.collect())
        .await
        .expect("the stream never ended")
        .expect("the stream was cut instead of ended")
        .to_bytes();
    received.extend_from_slice(&rest);
    let text = String::from_utf8_lossy(&received).into_owned();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{text}");
    let error: serde_json::Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(error["error"]["code"], code, "{text}");
    text
}

/// Splits an SSE body into its `data:` payloads.
pub fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
                .to_owned()
        })
        .collect()
}

/// Reads one metric's value from the Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok())?
    })
}

/// A scratch directory for one test's files, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// An empty directory named after `name` and this process.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// Writes `text` to the file `name` in it; its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `script` with the official `openai` Python client's interpreter (`SLUICE_TEST_PYTHON`,
/// the venv `make test` builds) and `args` as `sys.argv[1..]`; panics with its output unless
/// it exits 0. Its stdout.
pub fn run_openai_client(script: &str, args: &[&str]) -> String {
    let python = std::env::var_os("SLUICE_TEST_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        panic!("SLUICE_TEST_PYTHON is not set: run the tests through `make test` (it builds .cache/venv with the openai client)")
    });
    assert!(
        python.is_file(),
        "SLUICE_TEST_PYTHON={} does not exist: run `make venv`",
        python.display()
    );
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "openai client failed:\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

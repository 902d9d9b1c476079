//! `make bench`: the engine in-process and the sidecar over HTTP, side by side, on the demo model.
//!
//! For each weight/dtype variant (in-process): prompt tok/s (prefill of a ~128-token prompt),
//! single-stream decode tok/s, aggregate tok/s of 8 concurrent streams, and median time to first
//! token of a short chat. Then the sidecar's overhead: one variant in-process and through the
//! real binary over HTTP (SSE), loaded side by side and measured run by run, interleaved:
//! decode and aggregate tokens/s and median time to first token at 1 and 8 streams.
//!
//! With `SLUICE_BENCH_ANCHOR` (a llama-bench binary; `make bench-anchor` builds one) every
//! variant is also run through llama.cpp on the very same GGUF file, prompt 128 and decode 64
//! tokens on the same threads, once before and once after the engine (the better figure is
//! kept), and the ratios are printed beside the sidecar's numbers.
//!
//! Environment: `SLUICE_TEST_MODEL` (the GGUF; the Makefile exports it), `SLUICE_BENCH_VARIANTS`
//! (default `q4_1:f32,q8_0:f32,q4_0:f32`; empty: the overhead comparison alone),
//! `SLUICE_BENCH_HTTP_VARIANT` (default `q8_0:f32`), `SLUICE_THREADS`, `SLUICE_BENCH_ANCHOR`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde_json::json;
use sluice_sidecar::{
    cli::ServeArgs,
    engine::{
        Activations, ChatTurn, Engine, EngineSettings, Event, GenerationParams, Prompt,
        device::{self, DeviceRequest},
    },
    model::convert::{self, Quant},
};
use tokio::sync::oneshot;

const DECODE_TOKENS: usize = 64;
const STREAMS: usize = 8;
const TTFT_RUNS: usize = 21;
/// Idle time before each time-to-first-token sample of the overhead comparison.
const IDLE_BEFORE_TTFT: Duration = Duration::from_millis(200);
/// Rounds of the overhead comparison (each: one stream, then eight, on both targets).
const OVERHEAD_ROUNDS: usize = 7;

#[derive(Clone, Copy, Debug)]
struct Variant {
    quant: Option<Quant>,
    dtype: Activations,
}

impl Variant {
    fn parse(s: &str) -> Self {
        let (q, d) = s.split_once(':').unwrap_or((s, "f32"));
        let quant = match q {
            "q4_1" | "orig" => None,
            "q4_0" => Some(Quant::Q4_0),
            "q8_0" => Some(Quant::Q8_0),
            "f16" => Some(Quant::F16),
            other => panic!("unknown weights {other}"),
        };
        let dtype = match d {
            "f32" => Activations::F32,
            "f16" => Activations::F16,
            "auto" => Activations::Auto,
            "bf16" => Activations::Bf16,
            other => panic!("unknown dtype {other}"),
        };
        Self { quant, dtype }
    }

    fn label(&self) -> String {
        let q = match self.quant {
            None => "q4_1",
            Some(Quant::Q4_0) => "q4_0",
            Some(Quant::Q8_0) => "q8_0",
            Some(Quant::F16) => "f16",
        };
        format!("{q}/{:?}", self.dtype).to_lowercase()
    }
}

/// Numbers of one variant.
#[derive(Debug, Default)]
struct Numbers {
    prompt_tps: f64,
    decode_tps: f64,
    aggregate_tps: f64,
    aggregate_decode_tps: f64,
    ttft_median_ms: f64,
}

fn model() -> PathBuf {
    let p = std::env::var_os("SLUICE_TEST_MODEL")
        .map(PathBuf::from)
        .expect("SLUICE_TEST_MODEL is not set: run `make bench` (after `make model`)");
    assert!(p.is_file(), "{} missing: run `make model`", p.display());
    p
}

fn cache_dir() -> PathBuf {
    std::env::var_os("SLUICE_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(".cache/converted"))
}

fn weights(model: &Path, v: Variant) -> PathBuf {
    match v.quant {
        None => model.to_owned(),
        Some(q) => convert::ensure_converted(
            model,
            q,
            &std::fs::canonicalize(".").unwrap().join(cache_dir()),
        )
        .unwrap(),
    }
}

fn threads() -> Option<usize> {
    std::env::var("SLUICE_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
}

/// llama.cpp's prompt and decode tokens/s on `file` (llama-bench: 128-token prompt, 64 decoded
/// tokens, 3 repetitions, the sidecar's thread count), when `SLUICE_BENCH_ANCHOR` names it.
fn anchor(file: &Path) -> Option<(f64, f64)> {
    let bin = std::env::var_os("SLUICE_BENCH_ANCHOR")?;
    let threads = threads().unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let out = Command::new(bin)
        .arg("-m")
        .arg(file)
        .args(["-p", "128", "-n", "64", "-r", "3", "-o", "json"])
        .args(["-t", &threads.to_string()])
        .stderr(Stdio::null())
        .output()
        .expect("run llama-bench");
    assert!(
        out.status.success(),
        "llama-bench failed on {}",
        file.display()
    );
    let tests: Vec<serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("llama-bench json");
    let rate = |prompt: bool| {
        tests
            .iter()
            .find(|t| (t["n_prompt"].as_u64().unwrap_or(0) > 0) == prompt)
            .and_then(|t| t["avg_ts"].as_f64())
            .expect("llama-bench result")
    };
    Some((rate(true), rate(false)))
}

/// A ~128-token prompt; `salt` keeps runs from sharing a prefix.
fn long_prompt(salt: usize) -> String {
    let mut s = format!("Document {salt}. ");
    while s.split_whitespace().count() < 100 {
        s.push_str(
            "The quick brown fox jumps over the lazy dog while the river flows to the sea. ",
        );
    }
    s
}

/// The short chat turn time to first token is measured on.
fn hello(salt: usize) -> String {
    format!("Say hello to person {salt}.")
}

fn chat_turn(content: String) -> Prompt {
    Prompt::Chat(vec![ChatTurn {
        role: "user".into(),
        content,
    }])
}

fn counting_prompt(salt: usize) -> String {
    format!("Sequence {salt}: 1, 2, 3, 4, 5, 6, 7,")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

// === in-process ===

struct Run {
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
    /// Over HTTP, from the server's `Server-Timing` header: the engine's own time to the first
    /// token plus the prompt's tokenization, which the in-process target does too.
    engine_ms: Option<f64>,
}

async fn run_engine(engine: &Engine, prompt: Prompt, max_tokens: usize) -> (Instant, Run) {
    let params = GenerationParams {
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..Default::default()
    };
    let start = Instant::now();
    // As the server does: template and tokenize on the caller's thread, then submit.
    let prompt = engine.tokenize(&prompt).await.unwrap();
    let mut g = engine.submit(prompt, &params, true).await.unwrap();
    let mut run = Run {
        first: None,
        last: None,
        tokens: 0,
        engine_ms: None,
    };
    while let Some(e) = g.next().await {
        match e {
            Event::Delta { finish_reason, .. } => {
                let now = Instant::now();
                run.first.get_or_insert(now);
                run.last = Some(now);
                run.tokens += 1;
                if finish_reason.is_some() {
                    break;
                }
            }
            Event::Done { usage, .. } => {
                run.tokens = usage.completion_tokens;
                break;
            }
            Event::Failed(e) => panic!("{e}"),
        }
    }
    (start, run)
}

/// The engine in-process with the settings the HTTP server runs with, warmed up.
async fn load_engine(model: &Path, v: Variant) -> Engine {
    let engine = Engine::load(&EngineSettings {
        model: weights(model, v),
        served_name: "bench".into(),
        device: device::select(DeviceRequest::Cpu, v.dtype).unwrap(),
        threads: threads(),
        kernel_nice: 10,
        max_seqs: 16,
        max_queue: 64,
        prefix_cache: 0,
        prefix_cache_meter: Default::default(),
        context_length: None,
    })
    .await
    .unwrap();
    run_engine(&engine, Prompt::Text(counting_prompt(999)), 8).await;
    engine
}

async fn bench_engine(model: &Path, v: Variant) -> Numbers {
    let engine = load_engine(model, v).await;

    let mut prompt_rates = Vec::new();
    for i in 0..3 {
        let prompt = Prompt::Text(long_prompt(i));
        let n = engine.tokenize(&prompt).await.unwrap().len();
        let (start, run) = run_engine(&engine, prompt, 1).await;
        prompt_rates.push(n as f64 / run.first.unwrap().duration_since(start).as_secs_f64());
    }
    let target = Target::Engine(&engine);
    let mut decode_rates = Vec::new();
    for i in 0..3 {
        decode_rates.push(target.decode(i).await);
    }
    let mut concurrent = Vec::new();
    for i in 0..3 {
        concurrent.push(target.concurrent(100 + i * STREAMS).await);
    }
    let aggregate = median(concurrent.iter().map(|c| c.end_to_end).collect());
    let aggregate_decode = median(concurrent.iter().map(|c| c.decode).collect());
    let mut ttfts = Vec::new();
    for i in 0..TTFT_RUNS {
        ttfts.push(target.ttft(i).await);
    }
    Numbers {
        prompt_tps: median(prompt_rates),
        decode_tps: median(decode_rates),
        aggregate_tps: aggregate,
        aggregate_decode_tps: aggregate_decode,
        ttft_median_ms: median(ttfts),
    }
}

// === over HTTP ===

struct Server {
    child: Child,
    api: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start_server(model: &Path, v: Variant) -> Server {
    let (api, admin) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice-sidecar"));
    cmd.arg("serve")
        .arg("--model")
        .arg(weights(model, v))
        .args([
            "--served-name",
            "bench",
            "--prefix-cache",
            "0",
            "--max-seqs",
            "16",
        ])
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(["--dtype", &format!("{:?}", v.dtype).to_lowercase()])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(t) = threads() {
        cmd.args(["--threads", &t.to_string()]);
    }
    let child = cmd.spawn().unwrap();
    let server = Server {
        child,
        api: format!("http://127.0.0.1:{api}"),
    };
    wait_ready(admin).await;
    server
}

/// The sidecar's HTTP API served from this process in front of `engine`, the very engine the
/// in-process target calls: the difference between the two is the HTTP path alone, not the
/// speed of two engine instances (which differ by several percent from process to process).
/// The server runs on a runtime of its own, as in the binary, not on the bench client's.
/// Returns its URL and the sender that stops it.
async fn serve_in_process(
    model: &Path,
    v: Variant,
    engine: &Engine,
) -> (String, oneshot::Sender<()>) {
    #[derive(clap::Parser)]
    struct Args {
        #[command(flatten)]
        serve: ServeArgs,
    }
    let (api, admin) = (free_port(), free_port());
    let args = <Args as clap::Parser>::try_parse_from([
        "bench".to_owned(),
        "--model".to_owned(),
        weights(model, v).display().to_string(),
        "--served-name".to_owned(),
        "bench".to_owned(),
        "--listen".to_owned(),
        format!("127.0.0.1:{api}"),
        "--admin-listen".to_owned(),
        format!("127.0.0.1:{admin}"),
    ])
    .unwrap();
    let config = args.serve.validate().unwrap();
    let engine = engine.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(sluice_sidecar::serve_until(
            config,
            Instant::now(),
            Some(engine),
            async {
                let _ = stopped.await;
            },
        ))
        .unwrap();
    });
    wait_ready(admin).await;
    (format!("http://127.0.0.1:{api}"), stop)
}

/// Waits until the admin port on `admin` says ready.
async fn wait_ready(admin: u16) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let req = Request::get(format!("http://127.0.0.1:{admin}/readyz"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(res) = client.request(req).await
            && res.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "server not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP target: its URL and a client that keeps its connections open between requests, as
/// the official OpenAI clients do (a connection pool), so that connecting is not counted.
struct Api {
    url: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    fn new(url: String) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Self {
            url,
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

async fn run_http(api: &Api, body: serde_json::Value, chat: bool) -> (Instant, Run) {
    let path = if chat {
        "chat/completions"
    } else {
        "completions"
    };
    let req = Request::post(format!("{}/v1/{path}", api.url))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
        .unwrap();
    let start = Instant::now();
    let res = api.client.request(req).await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let timing = res
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let metric = |name: &str| -> Option<f64> {
        timing.split(',').find_map(|m| {
            m.trim()
                .strip_prefix(name)
                .and_then(|m| m.strip_prefix(";dur="))
                .and_then(|d| d.parse().ok())
        })
    };
    let engine_ms = metric("engine-ttft")
        .zip(metric("tokenize"))
        .map(|(e, t)| e + t);
    let mut body = res.into_body();
    let mut run = Run {
        first: None,
        last: None,
        tokens: 0,
        engine_ms,
    };
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.unwrap().into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(pos) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..pos + 2).collect();
            if event.starts_with(b"data: {") {
                let now = Instant::now();
                run.first.get_or_insert(now);
                run.last = Some(now);
                run.tokens += 1;
            }
        }
    }
    (start, run)
}

/// One way of reaching the model: the engine called in-process, or the sidecar's HTTP API.
#[derive(Clone, Copy)]
enum Target<'a> {
    Engine(&'a Engine),
    Http(&'a Api),
}

impl Target<'_> {
    /// A streamed completion of `prompt` (a chat turn when `chat`), greedy, `max_tokens` long.
    async fn run(self, prompt: String, chat: bool, max_tokens: usize) -> (Instant, Run) {
        match self {
            Target::Engine(engine) => {
                let prompt = if chat {
                    chat_turn(prompt)
                } else {
                    Prompt::Text(prompt)
                };
                run_engine(engine, prompt, max_tokens).await
            }
            Target::Http(api) => {
                let body = if chat {
                    json!({"model": "bench", "max_tokens": max_tokens, "temperature": 0,
                        "stream": true, "messages": [{"role": "user", "content": prompt}]})
                } else {
                    json!({"model": "bench", "prompt": prompt, "max_tokens": max_tokens,
                        "temperature": 0, "stream": true})
                };
                run_http(api, body, chat).await
            }
        }
    }

    /// Single-stream decode tokens/s.
    async fn decode(self, salt: usize) -> f64 {
        let (_, run) = self.run(counting_prompt(salt), false, DECODE_TOKENS).await;
        let span = run.last.unwrap().duration_since(run.first.unwrap());
        (run.tokens - 1) as f64 / span.as_secs_f64()
    }

    /// [`STREAMS`] concurrent streams.
    async fn concurrent(self, salt: usize) -> Concurrent {
        let start = Instant::now();
        let runs = futures::future::join_all(
            (0..STREAMS).map(|i| self.run(counting_prompt(salt + i), false, DECODE_TOKENS)),
        )
        .await;
        let end_to_end = runs.iter().map(|(_, r)| r.tokens).sum::<usize>() as f64
            / start.elapsed().as_secs_f64();
        // Like the single-stream decode figure: tokens after each stream's first, over the span
        // from the first stream's first token to the last stream's last.
        let first = runs.iter().filter_map(|(_, r)| r.first).min().unwrap();
        let last = runs.iter().filter_map(|(_, r)| r.last).max().unwrap();
        let decode = runs.iter().map(|(_, r)| r.tokens - 1).sum::<usize>() as f64
            / last.duration_since(first).as_secs_f64();
        Concurrent { end_to_end, decode }
    }

    /// `streams` prompts sent at once (short chats, or when not `chat` a three-token text): the
    /// median time to their first tokens, ms, and over HTTP the median part of it the HTTP path
    /// took (a stream's time to first token less the engine's own and the prompt's
    /// tokenization, which the server reports).
    async fn first_tokens(self, salt: usize, streams: usize, chat: bool) -> (f64, Option<f64>) {
        let prompt = |n: usize| if chat { hello(n) } else { format!("Hi {n}") };
        let runs =
            futures::future::join_all((0..streams).map(|i| self.run(prompt(salt + i), chat, 1)))
                .await;
        let ttft =
            |(s, r): &(Instant, Run)| r.first.unwrap().duration_since(*s).as_secs_f64() * 1e3;
        let path: Option<Vec<f64>> = runs
            .iter()
            .map(|run| run.1.engine_ms.map(|engine| ttft(run) - engine))
            .collect();
        (median(runs.iter().map(ttft).collect()), path.map(median))
    }

    /// Time to first token of a short chat, ms.
    async fn ttft(self, salt: usize) -> f64 {
        self.first_tokens(salt, 1, true).await.0
    }
}

/// What [`STREAMS`] concurrent streams reached.
struct Concurrent {
    /// All tokens over the wall time from the first request sent to the last token (prompts
    /// and queueing included).
    end_to_end: f64,
    /// Tokens after each stream's first over the span of decoding (the like-for-like figure
    /// to set against single-stream decode).
    decode: f64,
}

/// Medians of one target's samples.
#[derive(Debug, Default)]
struct Samples {
    decode: Vec<f64>,
    aggregate: Vec<f64>,
    ttft: Vec<f64>,
    ttft_concurrent: Vec<f64>,
    /// What the HTTP path took of `ttft` and `ttft_concurrent` (HTTP targets only).
    path: Vec<f64>,
    path_concurrent: Vec<f64>,
}

/// The sidecar's overhead: the same workload in-process and over HTTP (SSE), interleaved run by
/// run so that both see the same machine; prints medians and the differences.
async fn overhead(model: &Path, v: Variant) {
    let engine = load_engine(model, v).await;
    let server = start_server(model, v).await;
    let (same_engine, _stop) = serve_in_process(model, v, &engine).await;
    let (binary_api, same_engine_api) = (Api::new(server.api.clone()), Api::new(same_engine));
    let targets = [
        Target::Engine(&engine),
        Target::Http(&binary_api),
        Target::Http(&same_engine_api),
    ];
    // Warm-up, which also opens the connections that the streams reuse.
    for t in &targets {
        futures::future::join_all((0..STREAMS).map(|i| t.run(counting_prompt(990 + i), false, 8)))
            .await;
    }
    let mut samples: [Samples; 3] = Default::default();
    for round in 0..OVERHEAD_ROUNDS {
        for (t, s) in targets.iter().zip(samples.iter_mut()) {
            s.decode.push(t.decode(round).await);
            let c = t.concurrent(100 + round * STREAMS).await;
            s.aggregate.push(c.end_to_end);
        }
    }
    // Time to first token varies with the machine by far more than the HTTP path adds: a short
    // chat's (its template adds a system turn: 8 of them take ~1 s to prefill here) swings by
    // ±15 ms from run to run. So the comparison is on three-token prompts, which the engine
    // answers in ~20 ms, over more rounds of their own. What the HTTP path does per request
    // does not depend on the prompt's length, except the tokenization both targets do.
    for i in 0..TTFT_RUNS {
        for (t, s) in targets.iter().zip(samples.iter_mut()) {
            // Each starts on an idle engine: what the run before leaves behind for the next
            // ~50 ms (kernel threads winding down) would otherwise slow whichever target
            // follows the same engine.
            tokio::time::sleep(IDLE_BEFORE_TTFT).await;
            let (ttft, path) = t.first_tokens(i, 1, false).await;
            s.ttft.push(ttft);
            s.path.extend(path);
            tokio::time::sleep(IDLE_BEFORE_TTFT).await;
            let (ttft, path) = t.first_tokens(1000 + i * STREAMS, STREAMS, false).await;
            s.ttft_concurrent.push(ttft);
            s.path_concurrent.extend(path);
        }
    }
    // A difference is the median of the differences within each round (the runs of a round
    // are back to back, so a slow phase of the machine mostly hits all of them), not the
    // difference of two medians.
    let paired = |a: &[f64], b: &[f64], f: fn(f64, f64) -> f64| {
        median(a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect())
    };
    let pct = |x: f64, y: f64| (y / x - 1.0) * 100.0;
    let ms = |x: f64, y: f64| y - x;
    let ours = &samples[0];
    let diff = |http: &Samples| {
        [
            paired(&ours.decode, &http.decode, pct),
            paired(&ours.aggregate, &http.aggregate, pct),
            paired(&ours.ttft, &http.ttft, ms),
            paired(&ours.ttft_concurrent, &http.ttft_concurrent, ms),
        ]
    };
    let (binary, same) = (diff(&samples[1]), diff(&samples[2]));
    let path = |s: &Samples| {
        format!(
            "{:.2} ms at 1 stream, {:.2} ms at {STREAMS}",
            median(s.path.clone()),
            median(s.path_concurrent.clone())
        )
    };
    let (binary_path, same_path) = (path(&samples[1]), path(&samples[2]));
    let [in_process, http, http_same] = samples.map(|s| {
        [
            median(s.decode),
            median(s.aggregate),
            median(s.ttft),
            median(s.ttft_concurrent),
        ]
    });
    println!(
        "\nsidecar overhead ({}), in-process vs HTTP interleaved, medians of {OVERHEAD_ROUNDS} rounds ({TTFT_RUNS} for TTFT, on three-token prompts); \
         difference: median of the per-round differences. HTTP: the sidecar binary (its own engine); \
         HTTP, same engine: the sidecar's server in this process, in front of the in-process engine",
        v.label()
    );
    println!(
        "|                      | in-process |    HTTP | difference | HTTP, same engine | difference |"
    );
    println!(
        "|----------------------|-----------:|--------:|-----------:|------------------:|-----------:|"
    );
    let rows = [
        "decode t/s, 1 stream".to_owned(),
        format!("t/s, {STREAMS} streams"),
        "TTFT ms, 1 stream".to_owned(),
        format!("TTFT ms, {STREAMS} streams"),
    ];
    for (i, label) in rows.iter().enumerate() {
        let show = |d: f64| {
            if i < 2 {
                format!("{d:>+9.1}%")
            } else {
                format!("{d:>+7.2} ms")
            }
        };
        println!(
            "| {label:<20} | {:>10.1} | {:>7.1} | {:>10} | {:>17.1} | {:>10} |",
            in_process[i],
            http[i],
            show(binary[i]),
            http_same[i],
            show(same[i]),
        );
    }
    println!(
        "the HTTP path's own part of the time to first token (a stream's TTFT less the engine's \
         own and the prompt's tokenization, as the server reports them in Server-Timing), median: \
         HTTP {binary_path}; HTTP, same engine {same_path}"
    );
    // What both targets do before the engine sees a request: template and tokenize its prompt
    // (once: the engine takes the tokens).
    let mut tokenize = Vec::new();
    for i in 0..TTFT_RUNS {
        let start = Instant::now();
        engine.tokenize(&chat_turn(hello(i))).await.unwrap();
        tokenize.push(start.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "templating and tokenizing a short chat, which both do once before the engine takes it: median {:.3} ms",
        median(tokenize)
    );
    println!("targets: throughput at most 3% lower, median TTFT at most 2 ms more");
}

fn print_row(label: &str, n: &Numbers) {
    println!(
        "| {label:<22} | {:>9.1} | {:>9.1} | {:>12.1} | {:>11.1} | {:>6.2}x | {:>9.1} |",
        n.prompt_tps,
        n.decode_tps,
        n.aggregate_decode_tps,
        n.aggregate_tps,
        n.aggregate_decode_tps / n.decode_tps,
        n.ttft_median_ms
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let model = model();
    let variants: Vec<Variant> = std::env::var("SLUICE_BENCH_VARIANTS")
        .unwrap_or_else(|_| "q4_1:f32,q8_0:f32,q4_0:f32".into())
        .split(',')
        .filter(|s| !s.is_empty())
        .map(Variant::parse)
        .collect();
    let http_variant = Variant::parse(
        &std::env::var("SLUICE_BENCH_HTTP_VARIANT").unwrap_or_else(|_| "q8_0:f32".into()),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "model {} | threads {} | prompt ~128 tok, decode {DECODE_TOKENS} tok, {STREAMS} streams, prefix cache off",
        model.display(),
        threads().map_or("all".into(), |t| t.to_string())
    );
    println!(
        "{STREAMS} streams: decode t/s (tokens after the first, over the span of decoding, as for one \
         stream; median of 3) and end to end (all tokens over the wall time, prompts included)"
    );
    println!(
        "| variant                | prompt t/s | decode t/s | {STREAMS}-str decode | {STREAMS}-str e2e | vs 1   | TTFT ms |"
    );
    println!(
        "|------------------------|-----------:|-----------:|-------------:|------------:|-------:|--------:|"
    );
    let mut anchors = Vec::new();
    for v in &variants {
        // llama.cpp runs right before and right after the engine, and the better of its two
        // figures is the anchor: a slow phase of a shared machine never flatters the ratio.
        let file = weights(&model, *v);
        let before = anchor(&file);
        let n = rt.block_on(bench_engine(&model, *v));
        print_row(&format!("engine {}", v.label()), &n);
        let after = anchor(&file);
        if let Some(((p0, d0), (p1, d1))) = before.zip(after) {
            let (prompt, decode) = (p0.max(p1), d0.max(d1));
            anchors.push(format!(
                "| {:<6} | {prompt:>9.1} | {decode:>9.1} | {:>9.2}x | {:>9.2}x | {:>9.2}x |",
                v.label().split('/').next().unwrap_or_default(),
                n.prompt_tps / prompt,
                n.decode_tps / decode,
                n.aggregate_tps / decode,
            ));
        }
    }
    if !anchors.is_empty() {
        println!(
            "\nllama.cpp (llama-bench, the better of a run before and one after the engine's) on \
             the same files, and the sidecar engine's ratio to it:"
        );
        println!("| file   | llama pp t/s | llama tg t/s | prompt | decode | {STREAMS}-stream |");
        println!("|--------|----------:|----------:|----------:|----------:|----------:|");
        for line in &anchors {
            println!("{line}");
        }
        println!();
    }
    rt.block_on(overhead(&model, http_variant));
}

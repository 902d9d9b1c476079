//! `make bench`: the prefix cache's memory and what it buys, on the real binary and model.
//!
//! 1. Resident memory (`RssAnon`, the heap: not the mapped model file) every 50 requests up to
//!    1,000 small chats with distinct prompts (16 tokens out, 4 at a time), with the default
//!    flags and with `--prefix-cache 0`, side by side; with `SLUICE_BENCH_BASELINE` (another
//!    `sluice-sidecar` binary, e.g. the previous build) its default-flags curve too. A run
//!    stops early past 8 GB so that a leaking build cannot take the machine down.
//! 2. Time to first token of chats that share a ~400-token system prompt, one at a time
//!    (median of 21; non-streamed, one token out), with and without the prefix cache.
//!
//! Environment: `SLUICE_TEST_MODEL` (the Makefile exports it), `SLUICE_BENCH_REQUESTS`
//! (default 1000), `SLUICE_BENCH_BASELINE`, `SLUICE_BENCH_BIN` (the binary measured as this
//! build: default the one cargo built beside this bench).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::PathBuf,
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

const STEP: usize = 50;
const CONCURRENCY: usize = 4;
const STOP_ABOVE_BYTES: u64 = 8 << 30;
const TTFT_RUNS: usize = 21;

struct Server {
    child: Child,
    api: String,
    client: Client<HttpConnector, Full<Bytes>>,
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

fn model() -> PathBuf {
    PathBuf::from(
        std::env::var_os("SLUICE_TEST_MODEL").expect("SLUICE_TEST_MODEL (make bench sets it)"),
    )
}

async fn start(bin: &str, extra: &[&str]) -> Server {
    let (api, admin) = (free_port(), free_port());
    let child = Command::new(bin)
        .arg("serve")
        .arg("--model")
        .arg(model())
        .args(["--served-name", "bench"])
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let client = Client::builder(TokioExecutor::new()).build_http();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let req = Request::get(format!("http://127.0.0.1:{admin}/readyz"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        if let Ok(res) = client.request(req).await
            && res.status().is_success()
        {
            break;
        }
        assert!(Instant::now() < deadline, "server not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Server {
        child,
        api: format!("http://127.0.0.1:{api}/v1/chat/completions"),
        client,
    }
}

async fn chat(server: &Server, system: Option<&str>, user: String, max_tokens: usize) {
    let mut messages = Vec::new();
    if let Some(system) = system {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": user}));
    let body =
        json!({"model": "bench", "messages": messages, "max_tokens": max_tokens, "temperature": 0});
    let req = Request::post(&server.api)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
        .unwrap();
    let res = server.client.request(req).await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    res.into_body().collect().await.unwrap();
}

fn rss_anon(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// RssAnon in MB at ready and after every `STEP` requests (fewer when it passed the stop).
async fn curve(bin: &str, extra: &[&str], requests: usize) -> Vec<u64> {
    let server = start(bin, extra).await;
    let pid = server.child.id();
    let mut points = vec![rss_anon(pid) >> 20];
    for step in 0..requests / STEP {
        for batch in (step * STEP..(step + 1) * STEP)
            .collect::<Vec<_>>()
            .chunks(CONCURRENCY)
        {
            futures::future::join_all(batch.iter().map(|i| {
                chat(
                    &server,
                    None,
                    format!("Request {i}: name a colour and say why."),
                    16,
                )
            }))
            .await;
        }
        let rss = rss_anon(pid);
        points.push(rss >> 20);
        if rss > STOP_ABOVE_BYTES {
            break;
        }
    }
    points
}

/// Median milliseconds of a one-token chat sharing a long system prompt.
async fn shared_prompt_ttft(bin: &str, extra: &[&str]) -> f64 {
    let server = start(bin, extra).await;
    let system = "You are the support assistant of a company that sells garden tools. ".repeat(30);
    let mut samples = Vec::new();
    for i in 0..TTFT_RUNS + 1 {
        let started = Instant::now();
        chat(
            &server,
            Some(&system),
            format!("Question {i}: do you ship spades?"),
            1,
        )
        .await;
        // The first request fills the cache (or, without it, warms the engine).
        if i > 0 {
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let requests: usize = std::env::var("SLUICE_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let this = std::env::var("SLUICE_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_sluice-sidecar").to_owned());
    let this = this.as_str();
    let baseline = std::env::var("SLUICE_BENCH_BASELINE").ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut runs: Vec<(String, Vec<u64>)> = Vec::new();
    runs.push(("defaults".into(), rt.block_on(curve(this, &[], requests))));
    runs.push((
        "--prefix-cache 0".into(),
        rt.block_on(curve(this, &["--prefix-cache", "0"], requests)),
    ));
    if let Some(bin) = &baseline {
        runs.push((
            "baseline, defaults".into(),
            rt.block_on(curve(bin, &[], requests)),
        ));
    }
    println!(
        "RssAnon (MB) of the sidecar over {requests} chats with distinct prompts ({CONCURRENCY} at a time, 16 tokens out):"
    );
    print!("| requests ");
    for (label, _) in &runs {
        print!("| {label} ");
    }
    println!("|");
    println!("|---:{}|", "|---:".repeat(runs.len()));
    for row in 0..=requests / STEP {
        print!("| {} ", row * STEP);
        for (_, points) in &runs {
            match points.get(row) {
                Some(mb) => print!("| {mb} "),
                None => print!("| (stopped past {} GB) ", STOP_ABOVE_BYTES >> 30),
            }
        }
        println!("|");
    }

    let with = rt.block_on(shared_prompt_ttft(this, &[]));
    let without = rt.block_on(shared_prompt_ttft(this, &["--prefix-cache", "0"]));
    println!(
        "\nTime to first token, chats sharing a ~400-token system prompt (median of {TTFT_RUNS}, one at a time):"
    );
    println!("| prefix cache | ms |\n|---|---:|");
    println!("| on (defaults) | {with:.1} |");
    println!("| off (--prefix-cache 0) | {without:.1} |");
    println!("| ratio off / on | {:.2}x |", without / with);
}

//! `make bench`: what forwarding to another variant adds to time to first token.
//!
//! Two real sidecars on loopback serve variants `a` (weight 0) and `b` (weight 100) of one model.
//! The same streaming completion goes directly to `b` (served locally) and to `a` (routed,
//! admitted, forwarded to `b`, relayed back), interleaved; time to first token is the time to
//! the first SSE content chunk at the client. The difference of the medians is the forwarding
//! overhead (target: at most 2 ms).
//!
//! Environment: `SLUICE_TEST_MODEL` (the Makefile exports it), `SLUICE_BENCH_FORWARD_RUNS`
//! (default 100).
#![allow(clippy::unwrap_used, dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use common::{Sidecar, client, free_port};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use serde_json::json;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Milliseconds to the first body frame of a streaming completion.
async fn ttft(client: &HttpClient, api: &str) -> f64 {
    // A tiny prompt, so the engine's share of TTFT (and its noise) is small next to the hop.
    let body = json!({
        "model": "smollm2",
        "prompt": "Hi",
        "max_tokens": 2,
        "temperature": 0,
        "stream": true,
    });
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("{api}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(&body).unwrap())))
        .unwrap();
    let started = Instant::now();
    let res = client.request(req).await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    let mut body = res.into_body();
    let mut first = None;
    while let Some(frame) = body.frame().await {
        if frame.unwrap().is_data() && first.is_none() {
            first = Some(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    first.unwrap()
}

fn main() {
    let runs: usize = std::env::var("SLUICE_BENCH_FORWARD_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let dir = std::env::temp_dir().join(format!("sluice-bench-forward-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "bench-forwarding-token").unwrap();
    let (a, b) = (free_port(), free_port());
    let config = dir.join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "version: v1alpha1\nmodel: smollm2\nvariants:\n\
             - {{name: a, weight: 0, address: 'http://127.0.0.1:{a}'}}\n\
             - {{name: b, weight: 100, address: 'http://127.0.0.1:{b}'}}\n"
        ),
    )
    .unwrap();
    let (config, token) = (config.to_str().unwrap(), token.to_str().unwrap());
    // Q8_0 (fast CPU kernels), converted once before both start.
    let cache = dir.join("cache");
    sluice_sidecar::model::convert::ensure_converted(
        &common::model_path(),
        sluice_sidecar::model::convert::Quant::Q8_0,
        &cache,
    )
    .unwrap();
    let cache = cache.to_str().unwrap().to_owned();
    let common_args = [
        "--config",
        config,
        "--forward-token-file",
        token,
        "--convert",
        "q8_0",
        "--cache-dir",
        &cache,
    ];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut entry = Sidecar::spawn_at(a, free_port(), &[&["--variant", "a"][..], &common_args].concat());
        let mut serving = Sidecar::spawn_at(b, free_port(), &[&["--variant", "b"][..], &common_args].concat());
        entry.wait_ready().await;
        serving.wait_ready().await;
        let client = client();
        for _ in 0..5 {
            ttft(&client, &serving.api).await;
            ttft(&client, &entry.api).await;
        }
        let (mut direct, mut forwarded) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            direct.push(ttft(&client, &serving.api).await);
            forwarded.push(ttft(&client, &entry.api).await);
        }
        let (d, f) = (median(&mut direct), median(&mut forwarded));
        println!("\n## Forwarding overhead on time to first token ({runs} interleaved runs, streaming completion, Q8_0)\n");
        println!("| path                          | median TTFT ms | p90 ms |");
        println!("|-------------------------------|---------------:|-------:|");
        println!("| direct (served locally)       | {d:>14.2} | {:>6.2} |", percentile(&mut direct, 0.9));
        println!("| forwarded (entry pod -> b)    | {f:>14.2} | {:>6.2} |", percentile(&mut forwarded, 0.9));
        println!("\nforwarding adds {:.2} ms to the median TTFT (target <= 2 ms)", f - d);
    });
    let _ = std::fs::remove_dir_all(&dir);
}

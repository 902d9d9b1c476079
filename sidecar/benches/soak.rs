//! `make soak`: rate limits under sustained overload, with the config reloaded all along.
//!
//! One real sidecar serves the demo model with a per-key request limit, a per-key token limit
//! and a pod-wide concurrency limit, for 20 API keys. Workers send short chats round-robin over
//! the keys at `SOAK_RATE` requests per second in all (default 60: thirty times what the request
//! limit admits on average) for `SOAK_SECONDS` (default 600). Every 3 s the config file is rewritten: the request limit steps through
//! raised and lowered values, with an invalid edit between two valid ones (each must be
//! rejected, the last good config staying in force). The client notes when each valid config
//! took effect (the generation gauge) and every answer it got (key, sent, received, status).
//!
//! Afterwards it checks, and prints:
//! - per key and 30-s window (a table of the windows), the requests admitted (200) never exceed what a token bucket could
//!   admit: the capacity in force when the window opens, plus every raise inside it, plus the
//!   refill at the highest rate possibly in force (a reload's exact instant is only known to lie
//!   between the write and the gauge showing it). Only answers sent and received inside the
//!   window are counted in it, so the check never blames a request on the wrong window;
//! - the server's own counts (`sluice_requests_total` by status) equal the client's;
//! - the in-flight and queue gauges are back to 0 (every reservation settled);
//! - no 5xx but the designed 503 (saturation);
//! - resident memory at the end within 5% of what it was after the warm-up (the first fifth, at
//!   least two minutes; shorter runs print the curve without judging it).
//!
//! Exits non-zero when a check fails. Environment: `SLUICE_TEST_MODEL` (the Makefile exports it),
//! `SOAK_SECONDS`, `SOAK_RATE`, `SOAK_WORKERS` (default 16).
#![allow(clippy::unwrap_used, dead_code)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Sidecar, TempDir, get, metric};
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use sluice_crds::contract;

const KEYS: usize = 20;
/// The per-key request limits (per minute) the reloads step through: raised and lowered.
const REQUESTS_PER_MINUTE: [u32; 4] = [4, 10, 2, 8];
const RELOAD_EVERY: Duration = Duration::from_secs(3);
const WINDOW: Duration = Duration::from_secs(30);

/// One answer as the client saw it.
#[derive(Clone, Copy, Debug)]
struct Answer {
    key: usize,
    sent: Duration,
    received: Duration,
    status: u16,
}

/// A valid config written at `written` and seen in force (by its generation) at `in_force`.
#[derive(Clone, Copy, Debug)]
struct Applied {
    written: Duration,
    in_force: Duration,
    rpm: u32,
}

fn key(i: usize) -> String {
    format!("sk-soak-{i:02}")
}

fn config(generation: u64, rpm: u32, keys_file: &str) -> String {
    format!(
        "version: v1alpha1\ngeneration: {generation}\nmodel: smollm2\nvariants:\n  - name: default\n    weight: 100\n\
         identity:\n  source: Bearer\n  keysFile: {keys_file}\n\
         rules:\n  - name: soak/per-key-requests\n    per: Key\n    requestsPerMinute: {rpm}\n\
         \x20 - name: soak/per-key-tokens\n    per: Key\n    tokensPerMinute: {tokens}\n\
         \x20 - name: soak/pod-concurrency\n    per: Pod\n    maxConcurrent: 8\n",
        tokens = 400 * u64::from(rpm),
    )
}

/// Invalid edits: each must be rejected with the last good config left in force.
const INVALID: [&str; 3] = [
    "version: v1alpha1\nmodel: smollm2\nvariants: [{{{\n",
    "version: v1alpha1\nmodel: smollm2\nvariants:\n  - name: default\n    weight: 100\nrules:\n  - name: r\n    requestsPerMinute: -5\n",
    "version: v1alpha1\nmodel: smollm2\nvariants:\n  - name: default\n    weight: 100\nrules:\n  - name: r\n    requestsPerMinute: 5\n    typo: 1\n",
];

/// Writes `text` to `path` the way the kubelet updates a mounted ConfigMap: all at once.
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn metrics(admin: &str) -> String {
    get(&format!("{admin}/metrics")).await.unwrap().1
}

fn main() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    let workers: usize = std::env::var("SOAK_WORKERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    let rate: f64 = std::env::var("SOAK_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(soak(Duration::from_secs(seconds), workers, rate));
}

async fn soak(length: Duration, workers: usize, rate: f64) {
    let dir = TempDir::new("soak");
    let keys_yaml: String = (0..KEYS)
        .map(|i| format!("- key: {}\n  tenant: tenant-{i:02}\n", key(i)))
        .collect();
    let keys_file = dir.write("keys.yaml", &keys_yaml);
    let keys_file = keys_file.to_str().unwrap().to_owned();
    let config_path = dir.0.join("sidecar.yaml");
    write_atomically(&config_path, &config(1, REQUESTS_PER_MINUTE[0], &keys_file));
    let mut sidecar = Sidecar::spawn(&["--config", config_path.to_str().unwrap()]);
    sidecar.wait_ready().await;
    let start = Instant::now();
    let pid = sidecar.child.id();
    let api = format!("{}/v1/chat/completions", sidecar.api);
    let admin = sidecar.admin.clone();
    let mut applied = vec![Applied {
        written: Duration::ZERO,
        in_force: Duration::ZERO,
        rpm: REQUESTS_PER_MINUTE[0],
    }];

    // The load: workers round-robin over the keys, one pooled client.
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let answers = Arc::new(Mutex::new(Vec::<Answer>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..workers {
        let (client, api, answers, stop) =
            (client.clone(), api.clone(), answers.clone(), stop.clone());
        load.push(tokio::spawn(async move {
            let mut n = w;
            let mut pace = tokio::time::interval(Duration::from_secs_f64(workers as f64 / rate));
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                pace.tick().await;
                let k = n % KEYS;
                let body = serde_json::json!({
                    "model": "smollm2",
                    "messages": [{"role": "user", "content": format!("Say {n}.")}],
                    "max_tokens": 1,
                    "temperature": 0,
                });
                let request = Request::builder()
                    .method(Method::POST)
                    .uri(&api)
                    .header("content-type", "application/json")
                    .header("authorization", format!("Bearer {}", key(k)))
                    .body(Full::new(Bytes::from(body.to_string())))
                    .unwrap();
                let sent = start.elapsed();
                let status = match client.request(request).await {
                    Ok(response) => {
                        let status = response.status().as_u16();
                        let _ = response.into_body().collect().await;
                        status
                    }
                    Err(e) => panic!("request failed without an answer: {e}"),
                };
                answers.lock().unwrap().push(Answer {
                    key: k,
                    sent,
                    received: start.elapsed(),
                    status,
                });
                n += workers;
            }
        }));
    }

    // Reloads and memory samples until the end.
    let mut rss = Vec::new();
    let mut generation = 1;
    let mut step = 0;
    let mut next_sample = Duration::ZERO;
    let mut invalid_rejected = 0;
    while start.elapsed() < length {
        tokio::time::sleep(RELOAD_EVERY).await;
        if start.elapsed() >= next_sample {
            rss.push((start.elapsed(), rss_kb(pid)));
            next_sample += Duration::from_secs(5);
        }
        step += 1;
        if step % 2 == 1 {
            // An invalid edit: counted as rejected, the generation in force unchanged.
            let errors_before = reload_errors(&admin).await;
            write_atomically(&config_path, INVALID[(step / 2) % INVALID.len()]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while reload_errors(&admin).await <= errors_before {
                assert!(
                    Instant::now() < deadline,
                    "an invalid edit was never rejected"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            invalid_rejected += 1;
            let text = metrics(&admin).await;
            assert_eq!(
                metric(&text, contract::CONFIG_GENERATION_SERIES),
                Some(generation as f64),
                "an invalid edit changed the config in force"
            );
        } else {
            generation += 1;
            let rpm = REQUESTS_PER_MINUTE[(step / 2) % REQUESTS_PER_MINUTE.len()];
            let written = start.elapsed();
            write_atomically(&config_path, &config(generation, rpm, &keys_file));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let text = metrics(&admin).await;
                if metric(&text, contract::CONFIG_GENERATION_SERIES) == Some(generation as f64) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "generation {generation} never applied"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            applied.push(Applied {
                written,
                in_force: start.elapsed(),
                rpm,
            });
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("a worker hung")
            .unwrap();
    }
    let ran = start.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let text = metrics(&admin).await;
    rss.push((start.elapsed(), rss_kb(pid)));
    let answers = answers.lock().unwrap().clone();

    let mut failures = Vec::new();
    report(&answers, ran, workers, invalid_rejected, &applied);
    check_windows(&answers, &applied, ran, &mut failures);
    check_server_counts(&answers, &text, &mut failures);
    check_memory(&rss, length, &mut failures);
    for (gauge, series) in [
        ("in flight", contract::REQUESTS_IN_FLIGHT_SERIES),
        ("queued", contract::QUEUE_DEPTH_SERIES),
    ] {
        let value = metric(&text, series);
        println!("{gauge} after the load: {value:?}");
        if value != Some(0.0) {
            failures.push(format!("{series} reads {value:?} after the load, not 0"));
        }
    }
    drop(sidecar);
    if failures.is_empty() {
        println!("soak: every check passed");
    } else {
        for f in &failures {
            eprintln!("soak: FAILED: {f}");
        }
        std::process::exit(1);
    }
}

async fn reload_errors(admin: &str) -> f64 {
    metric(&metrics(admin).await, "sluice_config_reload_errors_total").unwrap_or(0.0)
}

fn report(answers: &[Answer], ran: Duration, workers: usize, invalid: usize, applied: &[Applied]) {
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    for a in answers {
        *by_status.entry(a.status).or_default() += 1;
    }
    let secs = ran.as_secs_f64();
    println!(
        "soak: {:.0} s, {workers} workers, {KEYS} keys, {} requests ({:.0}/s), {} valid reloads, {invalid} invalid edits rejected",
        secs,
        answers.len(),
        answers.len() as f64 / secs,
        applied.len() - 1,
    );
    let allowed_per_second: f64 = REQUESTS_PER_MINUTE
        .iter()
        .map(|r| f64::from(*r))
        .sum::<f64>()
        / 4.0
        * KEYS as f64
        / 60.0;
    println!(
        "offered {:.0} requests/s against about {allowed_per_second:.1}/s the request limit admits ({:.0}x)",
        answers.len() as f64 / secs,
        answers.len() as f64 / secs / allowed_per_second
    );
    for (status, n) in &by_status {
        println!("  status {status}: {n}");
    }
    let slowest = applied
        .iter()
        .skip(1)
        .map(|a| (a.in_force - a.written).as_millis())
        .max()
        .unwrap_or(0);
    println!("  slowest reload, written to in force: {slowest} ms");
}

/// The rates possibly in force at `t`: the config in force, and the one before it while a
/// reload's instant is uncertain (between its write and its gauge).
fn rates_at(applied: &[Applied], t: Duration) -> (u32, u32) {
    let i = applied.iter().rposition(|a| a.written <= t).unwrap_or(0);
    let a = applied[i];
    if i > 0 && t < a.in_force {
        let prev = applied[i - 1].rpm;
        (prev.min(a.rpm), prev.max(a.rpm))
    } else {
        (a.rpm, a.rpm)
    }
}

/// The most a token bucket of capacity = rate could admit in `[from, to)`: the capacity at
/// `from`, plus every raise in the window, plus the refill at the highest possible rate.
fn most_admissible(applied: &[Applied], from: Duration, to: Duration) -> f64 {
    let step = Duration::from_millis(10);
    let mut bound = f64::from(rates_at(applied, from).1);
    let mut t = from;
    let mut cap = rates_at(applied, from).1;
    while t < to {
        let (_, high) = rates_at(applied, t);
        if high > cap {
            bound += f64::from(high - cap);
        }
        cap = high;
        bound += f64::from(high) / 60.0 * step.as_secs_f64();
        t += step;
    }
    bound
}

fn check_windows(
    answers: &[Answer],
    applied: &[Applied],
    ran: Duration,
    failures: &mut Vec<String>,
) {
    let mut worst: (f64, usize, Duration, usize, f64) = (0.0, 0, Duration::ZERO, 0, 0.0);
    let mut windows = 0;
    let mut from = Duration::ZERO;
    println!("window | most a key may be admitted | admitted per key: fewest, most | all keys");
    while from + WINDOW <= ran {
        let to = from + WINDOW;
        let bound = most_admissible(applied, from, to);
        let mut admitted = [0usize; KEYS];
        for a in answers {
            if a.status == 200 && a.sent >= from && a.received < to {
                admitted[a.key] += 1;
            }
        }
        println!(
            "[{:>3.0} s, {:>3.0} s) | {bound:>5.1} | {:>3}, {:>3} | {:>4}",
            from.as_secs_f64(),
            to.as_secs_f64(),
            admitted.iter().min().unwrap_or(&0),
            admitted.iter().max().unwrap_or(&0),
            admitted.iter().sum::<usize>()
        );
        for (k, n) in admitted.iter().enumerate() {
            windows += 1;
            let ratio = *n as f64 / bound;
            if ratio > worst.0 {
                worst = (ratio, k, from, *n, bound);
            }
            if *n as f64 > bound + 1e-9 {
                failures.push(format!(
                    "{} admitted {n} requests in [{:.0} s, {:.0} s), over the {bound:.1} its limits allow",
                    key(k),
                    from.as_secs_f64(),
                    to.as_secs_f64()
                ));
            }
        }
        from = to;
    }
    println!(
        "admitted vs limit: {windows} key-windows of {} s checked; the fullest: {} in [{:.0} s, ..) admitted {} of at most {:.1} ({:.0}%)",
        WINDOW.as_secs(),
        key(worst.1),
        worst.2.as_secs_f64(),
        worst.3,
        worst.4,
        worst.0 * 100.0
    );
}

fn check_server_counts(answers: &[Answer], text: &str, failures: &mut Vec<String>) {
    let mut client: BTreeMap<u16, usize> = BTreeMap::new();
    for a in answers {
        *client.entry(a.status).or_default() += 1;
    }
    let mut server: BTreeMap<u16, usize> = BTreeMap::new();
    let prefix = format!("{}{{", contract::REQUESTS_TOTAL_SERIES);
    for line in text.lines().filter(|l| l.starts_with(&prefix)) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if !series.contains("route=\"/v1/chat/completions\"") {
            continue;
        }
        let status = series
            .split("status=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .and_then(|s| s.parse::<u16>().ok());
        if let (Some(status), Ok(value)) = (status, value.parse::<f64>()) {
            *server.entry(status).or_default() += value as usize;
        }
    }
    println!("status: client / server");
    for status in client
        .keys()
        .chain(server.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        let (c, s) = (
            client.get(status).copied().unwrap_or(0),
            server.get(status).copied().unwrap_or(0),
        );
        println!("  {status}: {c} / {s}");
        if c != s {
            failures.push(format!(
                "status {status}: the client saw {c}, the server counted {s}"
            ));
        }
        if *status >= 500 && *status != 503 {
            failures.push(format!("{c} answers with status {status}"));
        }
    }
}

fn check_memory(rss: &[(Duration, u64)], length: Duration, failures: &mut Vec<String>) {
    let warm = (length / 5).max(Duration::from_secs(120));
    let judged = length >= 2 * warm;
    let warmed_at = if judged { warm } else { length / 5 };
    let Some(&(_, after_warmup)) = rss.iter().find(|(t, _)| *t >= warmed_at) else {
        return;
    };
    let (_, at_end) = *rss.last().unwrap();
    let peak = rss.iter().map(|(_, r)| *r).max().unwrap();
    let curve: Vec<String> = rss
        .iter()
        .map(|(t, r)| format!("{:.0}s:{}MB", t.as_secs_f64(), r / 1024))
        .collect();
    println!("resident memory: {}", curve.join(" "));
    println!(
        "resident memory after warm-up {} MB, peak {} MB, at the end {} MB ({:+.1}%)",
        after_warmup / 1024,
        peak / 1024,
        at_end / 1024,
        (at_end as f64 / after_warmup as f64 - 1.0) * 100.0
    );
    if !judged {
        println!("(a run this short has no warm-up to judge the memory against)");
    } else if at_end as f64 > after_warmup as f64 * 1.05 {
        failures.push(format!(
            "resident memory grew from {after_warmup} kB after the warm-up to {at_end} kB"
        ));
    }
}

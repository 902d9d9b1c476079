//! Chaos across sidecars, with real sidecar processes on the real model on loopback:
//! a `stable` pod (the entry: clients call it, it admits and routes) and a `canary` pod it
//! forwards to, as routing.rs deploys them. Faults are injected into one of the processes or
//! its network while requests cross between them:
//!
//! 1. the canary is SIGKILLed while it streams a forwarded answer;
//! 2. the entry pod is SIGKILLed while it relays the canary's stream;
//! 3. the canary's network drops every packet (an iptables DROP rule on its port, both ways;
//!    SIGSTOP of the process where no packet filter can be used, which is said plainly);
//! 4. the canary crawls (SIGSTOP/SIGCONT toggled under it).
//!
//! In each, every client request is bounded by [`CLIENT_TIMEOUT`]: it gets a completed answer
//! or an error (a status, an error event, a cut connection) before that, or the test fails as
//! "hung". The entry's reservations are settled (`sluice_ratelimit_in_flight` back to 0, and
//! the victim's `maxConcurrent: 1` slot and `tokensPerMinute` budget usable again), and the
//! breaker and fallback to the entry's own variant engage where they exist. No other timing is
//! asserted.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    future::Future,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::*;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};
use sluice_sidecar::{model::convert::Quant, route::VARIANT_HEADER};

const TOKEN: &str = "chaos-forwarding-token-0123456789abcdef";
const COMPLETIONS: &str = "/v1/completions";
/// The override header of the config: pins a request to a variant (no fallback then).
const PIN: &str = "x-sluice-variant";
/// The tenant whose request is the fault's victim: one request at a time, a token budget that
/// two of its 2,000-token requests exceed unless the first one's reservation is refunded.
const VICTIM: &str = "victim";
/// Bound on every client request (and on every wait for a gauge): past it, the test fails as
/// hung. Well above every server-side bound the scenarios rely on (request timeouts of 8 s,
/// the forward connect timeout of 1 s).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(40);
/// The entry's and canary's `--request-timeout-secs` where a scenario needs one.
const REQUEST_TIMEOUT: &str = "8";
/// Metric of the entry's admitted, unsettled requests (running, queued or forwarded).
const ADMITTED: &str = "sluice_ratelimit_in_flight";
/// Metric of requests running in a pod's engine.
const RUNNING: &str = "sluice_requests_in_flight";

/// The scenarios share the machine's two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `fut`, or a test failure that says `what` hung.
async fn bounded<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(CLIENT_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("hung: {what} did not end within {CLIENT_TIMEOUT:?}"))
}

/// The config both pods read: `stable` and `canary` (weight `canary_weight`) at their ports,
/// the override header, a breaker that opens after 2 failed forwards for a minute, and the
/// victim's limits.
fn config_yaml(stable: u16, canary: u16, canary_weight: u32) -> String {
    format!(
        r#"version: v1alpha1
model: smollm2
variants:
  - name: stable
    weight: {stable_weight}
    address: http://127.0.0.1:{stable}
  - name: canary
    weight: {canary_weight}
    address: http://127.0.0.1:{canary}
routing:
  overrideHeader: {PIN}
  breaker: {{consecutiveFailures: 2, openSeconds: 60}}
rules:
  - name: chaos/victim-one-at-a-time
    per: Key
    match:
      tenants: [{VICTIM}]
    maxConcurrent: 1
  - name: chaos/victim-tokens
    per: Key
    match:
      tenants: [{VICTIM}]
    tokensPerMinute: 3000
"#,
        stable_weight = 100 - canary_weight,
    )
}

/// The two pods of a scenario (fields drop in order: the processes before their files).
struct Pods {
    entry: Sidecar,
    canary: Sidecar,
    canary_port: u16,
    _dir: TempDir,
}

/// Starts `stable` (the entry) and `canary` on the model converted to Q8_0 (fast CPU kernels),
/// each with `extra` flags, and waits until both are ready.
async fn pods(name: &str, canary_weight: u32, extra: &[&str]) -> Pods {
    let dir = TempDir::new(&format!("chaos-{name}"));
    let token = dir.write("token", TOKEN);
    let (stable_port, canary_port) = (free_port(), free_port());
    let config = dir.write(
        "config.yaml",
        &config_yaml(stable_port, canary_port, canary_weight),
    );
    let cache = dir.0.join("cache");
    sluice_sidecar::model::convert::ensure_converted(&model_path(), Quant::Q8_0, &cache).unwrap();
    let spawn = |variant: &str, port: u16| {
        let mut args = vec![
            "--variant",
            variant,
            "--config",
            config.to_str().unwrap(),
            "--forward-token-file",
            token.to_str().unwrap(),
            "--convert",
            "q8_0",
            "--cache-dir",
            cache.to_str().unwrap(),
        ];
        args.extend(extra);
        Sidecar::spawn_at(port, free_port(), &args)
    };
    let mut entry = spawn("stable", stable_port);
    let mut canary = spawn("canary", canary_port);
    entry.wait_ready().await;
    canary.wait_ready().await;
    Pods {
        entry,
        canary,
        canary_port,
        _dir: dir,
    }
}

/// A short greedy completion (`stream` or not).
fn short(max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": "smollm2",
        "prompt": "The colours of the rainbow are",
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    })
}

/// The first `n` data frames of a streamed body (bounded).
async fn first_frames(body: &mut Incoming, n: usize) -> Vec<u8> {
    let mut received = Vec::new();
    let mut frames = 0;
    while frames < n {
        let frame = bounded("the stream's first frames", body.frame())
            .await
            .expect("the stream ended before the fault")
            .expect("the stream failed before the fault");
        if let Ok(data) = frame.into_data() {
            received.extend_from_slice(&data);
            frames += 1;
        }
    }
    received
}

/// Starts the victim's long stream (2,000 tokens, so its reservation is large) through the
/// entry, pinned to the canary, and reads a few chunks of it.
async fn victim_stream_via_canary(pods: &Pods) -> (Vec<u8>, Incoming) {
    let url = format!("{}{COMPLETIONS}", pods.entry.api);
    let res = bounded(
        "the victim's stream",
        try_post_as(
            &url,
            Some(VICTIM),
            &[(PIN, "canary")],
            &counting_stream("smollm2"),
        ),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers()[VARIANT_HEADER], "canary");
    let mut body = res.into_body();
    let received = first_frames(&mut body, 3).await;
    (received, body)
}

/// The sidecar's metrics text (bounded: a frozen pod must not hang the test).
async fn metrics(sidecar: &Sidecar) -> String {
    bounded(
        "a metrics scrape",
        get(&format!("{}/metrics", sidecar.admin)),
    )
    .await
    .unwrap()
    .1
}

/// Waits until `sidecar`'s metric `name` reads `want` (fails as hung after [`CLIENT_TIMEOUT`]);
/// how long that took.
async fn wait_metric(sidecar: &Sidecar, name: &str, want: f64) -> Duration {
    let started = Instant::now();
    loop {
        let text = metrics(sidecar).await;
        if metric(&text, name) == Some(want) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < CLIENT_TIMEOUT,
            "hung: {name} never came back to {want} within {CLIENT_TIMEOUT:?}:\n{text}\n{}",
            sidecar.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A metric's value, 0 when absent.
fn value(text: &str, name: &str) -> f64 {
    metric(text, name).unwrap_or(0.0)
}

/// The victim's reservations were settled, not leaked: a second 2,000-token request of the
/// victim is admitted (its one concurrency slot is free, its token budget of 3,000 a minute
/// was refunded down to what the first one used). Read up to its first chunk, then dropped.
async fn victim_admitted_again(entry: &Sidecar) -> String {
    let url = format!("{}{COMPLETIONS}", entry.api);
    let res = bounded(
        "the victim's next request",
        try_post_as(&url, Some(VICTIM), &[], &counting_stream("smollm2")),
    )
    .await
    .unwrap();
    let status = res.status();
    let variant = res
        .headers()
        .get(VARIANT_HEADER)
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let remaining = res
        .headers()
        .get("x-ratelimit-remaining-tokens")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut body = res.into_body();
    if status != StatusCode::OK {
        let text = bounded("the refusal's body", body.collect()).await.unwrap();
        panic!(
            "the victim's reservation leaked: its next request got {status}: {}",
            String::from_utf8_lossy(&text.to_bytes())
        );
    }
    first_frames(&mut body, 1).await;
    eprintln!("  victim admitted again (served by {variant}, remaining tokens {remaining:?})");
    variant
}

/// How a request ended: answered in full, or with an error.
#[derive(Debug)]
enum Ended {
    /// 200 and a whole answer (a stream up to `[DONE]`), served by the variant.
    Answered(String),
    /// An error status, an error event, or a cut connection.
    Failed(String),
}

/// Sends one request through `entry` and reads its answer whole, bounded.
async fn request(entry: &Sidecar, headers: &[(&str, &str)], body: &Value) -> (Ended, Duration) {
    let started = Instant::now();
    let url = format!("{}{COMPLETIONS}", entry.api);
    let ended = bounded("a request through the entry", async {
        let res = match try_post_as(&url, None, headers, body).await {
            Ok(res) => res,
            Err(e) => return Ended::Failed(format!("connection: {e}")),
        };
        let status = res.status();
        let variant = res
            .headers()
            .get(VARIANT_HEADER)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let text = match res.into_body().collect().await {
            Ok(b) => String::from_utf8_lossy(&b.to_bytes()).into_owned(),
            Err(e) => return Ended::Failed(format!("{status}, body cut: {e}")),
        };
        if status != StatusCode::OK {
            let json: Value = serde_json::from_str(&text).unwrap_or_default();
            return Ended::Failed(format!("{status} {}", json["error"]["code"]));
        }
        if body["stream"] == json!(true) {
            let events = sse_data(&text);
            if let Some(error) = events.iter().find(|e| e.contains("\"error\"")) {
                return Ended::Failed(format!("error event {error}"));
            }
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
        } else {
            let json: Value = serde_json::from_str(&text).unwrap();
            assert!(json["choices"][0]["text"].is_string(), "{json}");
        }
        Ended::Answered(variant)
    })
    .await;
    (ended, started.elapsed())
}

/// The error event of an SSE body that ended with one (then `[DONE]`).
fn last_error(text: &str) -> String {
    let events = sse_data(text);
    events[events.len().saturating_sub(2)].clone()
}

/// Sends `signal` to `sidecar`'s process.
fn signal(sidecar: &Sidecar, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &sidecar.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal}");
}

// --- 1 ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_killed_mid_stream() {
    let _serial = SERIAL.lock().await;
    eprintln!("== 1: the canary is SIGKILLed while it streams a forwarded answer");
    // Most traffic goes to the canary; what cannot reach it falls back to the entry's variant.
    let mut pods = pods("kill-canary", 90, &[]).await;
    let (received, body) = victim_stream_via_canary(&pods).await;
    let m = metrics(&pods.entry).await;
    assert_eq!(metric(&m, ADMITTED), Some(1.0), "{m}");
    eprintln!("  entry {ADMITTED} while the stream runs: 1");

    let killed = Instant::now();
    pods.canary.child.kill().unwrap();
    pods.canary.child.wait().unwrap();
    // The relayed stream ends with an error event and [DONE], a clean end of the body.
    let text = bounded(
        "the client's stream after the canary died",
        assert_stream_ends_with_error(received, body, "variant_unavailable"),
    )
    .await;
    eprintln!(
        "  client's stream ended {:?} after the kill: {}",
        killed.elapsed(),
        last_error(&text)
    );
    let took = wait_metric(&pods.entry, ADMITTED, 0.0).await;
    eprintln!("  entry {ADMITTED} back to 0 ({took:?} after the stream ended)");
    let served_by = victim_admitted_again(&pods.entry).await;
    assert_eq!(served_by, "stable", "the canary is dead");
    wait_metric(&pods.entry, ADMITTED, 0.0).await;

    // Later requests routed to the dead canary fall back to the entry's variant; after two
    // failed connects its breaker opens and they are not even tried.
    let mut outcomes = Vec::new();
    for _ in 0..8 {
        let (ended, took) = request(&pods.entry, &[], &short(4, false)).await;
        match &ended {
            Ended::Answered(v) => assert_eq!(v, "stable", "the canary is dead"),
            Ended::Failed(e) => panic!("not answered by the fallback to stable: {e}"),
        }
        outcomes.push(took);
    }
    eprintln!("  8 later requests answered by stable, in {outcomes:?}");
    // Pinned to the dead canary: no fallback, a prompt 503.
    let (ended, took) = request(&pods.entry, &[(PIN, "canary")], &short(4, false)).await;
    eprintln!("  pinned to the dead canary: {ended:?} in {took:?}");
    let Ended::Failed(error) = ended else {
        panic!("answered by a dead canary")
    };
    assert!(error.contains("variant_unavailable"), "{error}");

    let m = metrics(&pods.entry).await;
    let connect = value(
        &m,
        "sluice_forward_failures_total{variant=\"canary\",kind=\"connect\"}",
    );
    let held_back = value(
        &m,
        "sluice_forward_failures_total{variant=\"canary\",kind=\"breaker_open\"}",
    );
    eprintln!(
        "  entry: forward failures to canary: connect {connect}, breaker_open {held_back}; \
         fallbacks {}; breaker open {:?}",
        value(&m, "sluice_forward_fallbacks_total"),
        metric(&m, "sluice_forward_breaker_open{variant=\"canary\"}")
    );
    assert!(connect >= 2.0, "{m}");
    assert!(value(&m, "sluice_forward_fallbacks_total") >= 2.0, "{m}");
    assert_eq!(
        metric(&m, "sluice_forward_breaker_open{variant=\"canary\"}"),
        Some(1.0),
        "{m}"
    );
    assert!(held_back >= 1.0, "{m}");
    assert_eq!(metric(&m, ADMITTED), Some(0.0), "{m}");
}

// --- 2 ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_killed_mid_forward() {
    let _serial = SERIAL.lock().await;
    eprintln!("== 2: the entry pod is SIGKILLed while it relays the canary's stream");
    let mut pods = pods("kill-entry", 90, &[]).await;
    let (_, mut body) = victim_stream_via_canary(&pods).await;
    let m = metrics(&pods.canary).await;
    assert_eq!(metric(&m, RUNNING), Some(1.0), "{m}");
    let cancelled_before = value(&m, "sluice_generations_cancelled_total");

    let killed = Instant::now();
    pods.entry.child.kill().unwrap();
    pods.entry.child.wait().unwrap();
    // The client's connection is cut: an error, not a clean end and not a hang.
    let cut = bounded("the client's stream after the entry died", async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Ok(e),
                None => return Err("the stream ended cleanly"),
            }
        }
    })
    .await
    .unwrap();
    eprintln!(
        "  client's stream cut {:?} after the kill: {cut}",
        killed.elapsed()
    );
    // A new request to the dead entry is refused at once.
    let refused = bounded(
        "a request to the dead entry",
        try_post_as(
            &format!("{}{COMPLETIONS}", pods.entry.api),
            None,
            &[],
            &short(4, false),
        ),
    )
    .await
    .expect_err("the dead entry answered");
    eprintln!("  a new request to the dead entry: {refused}");

    // The canary notices its caller is gone: the generation is cancelled, its slot freed.
    let took = wait_metric(&pods.canary, RUNNING, 0.0).await;
    let m = metrics(&pods.canary).await;
    eprintln!(
        "  canary {RUNNING} back to 0 {took:?} after the cut; generations cancelled {} -> {}",
        cancelled_before,
        value(&m, "sluice_generations_cancelled_total")
    );
    assert!(
        value(&m, "sluice_generations_cancelled_total") > cancelled_before,
        "{m}"
    );
    assert_eq!(metric(&m, ADMITTED), Some(0.0), "{m}");
    // And it still serves.
    let (ended, _) = request(&pods.canary, &[(PIN, "canary")], &short(4, true)).await;
    eprintln!("  the canary serves again: {ended:?}");
    assert!(
        matches!(&ended, Ended::Answered(v) if v == "canary"),
        "{ended:?}"
    );
}

// --- 3 ---

/// Silences a port on loopback: every TCP packet to or from it dropped (not refused), until
/// dropped itself, also when the test fails.
struct Blackhole {
    port: String,
}

impl Blackhole {
    /// `None` where iptables cannot be used here.
    fn on(port: u16) -> Option<Self> {
        let works = Command::new("iptables")
            .args(["-w", "-L", "INPUT", "-n"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !works {
            return None;
        }
        let hole = Self {
            port: port.to_string(),
        };
        for dir in ["--dport", "--sport"] {
            let status = Command::new("iptables")
                .args([
                    "-w", "-I", "INPUT", "-p", "tcp", dir, &hole.port, "-j", "DROP",
                ])
                .status()
                .unwrap();
            assert!(status.success(), "iptables -I ... {dir} {}", hole.port);
        }
        Some(hole)
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        for dir in ["--dport", "--sport"] {
            let _ = Command::new("iptables")
                .args([
                    "-w", "-D", "INPUT", "-p", "tcp", dir, &self.port, "-j", "DROP",
                ])
                .status();
        }
    }
}

/// A process stopped (SIGSTOP) until dropped (SIGCONT), also when the test fails.
struct Frozen(u32);

impl Frozen {
    fn on(sidecar: &Sidecar) -> Self {
        signal(sidecar, "STOP");
        Self(sidecar.child.id())
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_network_dropped() {
    let _serial = SERIAL.lock().await;
    eprintln!("== 3: every packet to and from the canary is dropped");
    let timeouts = ["--request-timeout-secs", REQUEST_TIMEOUT];
    let pods = pods("blackhole", 90, &timeouts).await;
    // One request forwarded before the fault, so the entry holds a pooled connection to the
    // canary as it would in production.
    let (ended, _) = request(&pods.entry, &[(PIN, "canary")], &short(2, false)).await;
    assert!(
        matches!(&ended, Ended::Answered(v) if v == "canary"),
        "{ended:?}"
    );
    let (received, body) = victim_stream_via_canary(&pods).await;

    let blackhole = Blackhole::on(pods.canary_port);
    let _frozen = match &blackhole {
        Some(_) => {
            eprintln!("  iptables DROP on port {} (both ways)", pods.canary_port);
            None
        }
        None => {
            eprintln!(
                "  NOTE: iptables cannot be used here: the canary is SIGSTOPped instead (the \
                 process freezes; the kernel still accepts connections to it, so this is a \
                 frozen peer, not a silent network)"
            );
            Some(Frozen::on(&pods.canary))
        }
    };
    let dropped = Instant::now();
    // The stream running through it: the entry's request timeout ends it (the canary's own
    // timeout event never arrives), with an error event and a clean end of the body.
    let text = bounded(
        "the client's stream through the silenced canary",
        assert_stream_ends_with_error(received, body, "timeout"),
    )
    .await;
    eprintln!(
        "  client's stream ended {:?} after the drop: {}",
        dropped.elapsed(),
        last_error(&text)
    );

    // New requests, 6 at once: the ones routed to the canary fail to connect within the
    // forward connect timeout (or, sent on a pooled connection, get no answer before the
    // request timeout) and fall back to stable, until the breaker opens.
    let entry = &pods.entry;
    let body = short(4, false);
    let requests = (0..6).map(|_| request(entry, &[], &body));
    let outcomes = futures::future::join_all(requests).await;
    for (ended, took) in &outcomes {
        eprintln!("  unpinned: {ended:?} in {took:?}");
        if let Ended::Failed(e) = ended {
            assert!(e.contains("503"), "{e}");
        }
    }
    assert!(
        outcomes
            .iter()
            .any(|(e, _)| matches!(e, Ended::Answered(v) if v == "stable")),
        "none fell back: {outcomes:?}"
    );
    // Pinned to the silent canary: an error (no fallback for pinned requests).
    let (ended, took) = request(entry, &[(PIN, "canary")], &short(4, false)).await;
    eprintln!("  pinned to the silenced canary: {ended:?} in {took:?}");
    assert!(matches!(ended, Ended::Failed(_)), "{ended:?}");

    let m = metrics(entry).await;
    eprintln!(
        "  entry: forward failures to canary: connect {}, timeout {}, breaker_open {}; \
         breaker open {:?}",
        value(
            &m,
            "sluice_forward_failures_total{variant=\"canary\",kind=\"connect\"}"
        ),
        value(
            &m,
            "sluice_forward_failures_total{variant=\"canary\",kind=\"timeout\"}"
        ),
        value(
            &m,
            "sluice_forward_failures_total{variant=\"canary\",kind=\"breaker_open\"}"
        ),
        metric(&m, "sluice_forward_breaker_open{variant=\"canary\"}")
    );
    assert_eq!(
        metric(&m, "sluice_forward_breaker_open{variant=\"canary\"}"),
        Some(1.0),
        "{m}"
    );
    let took = wait_metric(entry, ADMITTED, 0.0).await;
    eprintln!("  entry {ADMITTED} back to 0 ({took:?})");
    victim_admitted_again(entry).await;
    wait_metric(entry, ADMITTED, 0.0).await;

    // The network comes back: the canary frees the stalled stream's slot and serves again.
    drop(blackhole);
    drop(_frozen);
    let (ended, _) = request(&pods.canary, &[(PIN, "canary")], &short(4, false)).await;
    eprintln!("  the canary serves again: {ended:?}");
    assert!(
        matches!(&ended, Ended::Answered(v) if v == "canary"),
        "{ended:?}"
    );
    let took = wait_metric(&pods.canary, RUNNING, 0.0).await;
    eprintln!("  canary {RUNNING} 0 ({took:?} after the network came back)");
}

// --- 4 ---

/// SIGSTOPs and SIGCONTs a process over and over (stopped 300 ms, running 200 ms) until
/// dropped, which leaves it running.
struct Crawl {
    stop: Arc<AtomicBool>,
    task: Option<std::thread::JoinHandle<()>>,
    pid: u32,
}

impl Crawl {
    fn on(sidecar: &Sidecar) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let pid = sidecar.child.id();
        let task = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let kill = |signal: &str| {
                    let _ = Command::new("kill")
                        .args([signal, &pid.to_string()])
                        .status();
                };
                while !stop.load(Ordering::Relaxed) {
                    kill("-STOP");
                    std::thread::sleep(Duration::from_millis(300));
                    kill("-CONT");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        });
        Self {
            stop,
            task: Some(task),
            pid,
        }
    }
}

impl Drop for Crawl {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(task) = self.task.take() {
            let _ = task.join();
        }
        let _ = Command::new("kill")
            .args(["-CONT", &self.pid.to_string()])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_crawling() {
    let _serial = SERIAL.lock().await;
    eprintln!("== 4: the canary crawls (SIGSTOP 300 ms / SIGCONT 200 ms, over and over)");
    let timeouts = ["--request-timeout-secs", REQUEST_TIMEOUT];
    let pods = pods("crawl", 50, &timeouts).await;
    let crawl = Crawl::on(&pods.canary);
    let entry = &pods.entry;
    let pinned_stream = short(8, true);
    let pinned_json = short(8, false);
    let unpinned = short(8, false);
    let long_stream = counting_stream("smollm2");
    let mut requests = Vec::new();
    for _ in 0..2 {
        requests.push(request(entry, &[(PIN, "canary")], &pinned_stream));
        requests.push(request(entry, &[(PIN, "canary")], &pinned_json));
        requests.push(request(entry, &[], &unpinned));
    }
    // One that cannot finish within the request timeout.
    requests.push(request(entry, &[(PIN, "canary")], &long_stream));
    let outcomes = futures::future::join_all(requests).await;
    drop(crawl);
    let (mut answered, mut failed) = (0, 0);
    for (ended, took) in &outcomes {
        eprintln!("  {ended:?} in {took:?}");
        match ended {
            Ended::Answered(_) => answered += 1,
            Ended::Failed(e) => {
                assert!(
                    e.contains("timeout") || e.contains("variant_unavailable"),
                    "{e}"
                );
                failed += 1;
            }
        }
    }
    eprintln!("  {answered} answered, {failed} failed with a bounded error");
    assert!(
        matches!(&outcomes[6].0, Ended::Failed(e) if e.contains("timeout")),
        "the 2,000-token stream outlived the request timeout: {:?}",
        outcomes[6]
    );
    let took = wait_metric(entry, ADMITTED, 0.0).await;
    eprintln!("  entry {ADMITTED} back to 0 ({took:?} after the last answer)");
    let took = wait_metric(&pods.canary, RUNNING, 0.0).await;
    eprintln!("  canary {RUNNING} back to 0 ({took:?})");
    let m = metrics(entry).await;
    eprintln!(
        "  entry: forward failures to canary: timeout {}, breaker open {:?}",
        value(
            &m,
            "sluice_forward_failures_total{variant=\"canary\",kind=\"timeout\"}"
        ),
        metric(&m, "sluice_forward_breaker_open{variant=\"canary\"}")
    );
    // At full speed again, the canary serves (directly: the entry's breaker may hold it back
    // for its open time after the timeouts).
    let (ended, _) = request(&pods.canary, &[(PIN, "canary")], &short(4, false)).await;
    eprintln!("  the canary serves again: {ended:?}");
    assert!(
        matches!(&ended, Ended::Answered(v) if v == "canary"),
        "{ended:?}"
    );
}

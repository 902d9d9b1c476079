//! Rate-limit benchmarks (`make bench`): the cost of one admission decision next to the
//! `governor` crate (GCRA) on the same request stream, the memory of 1M distinct keys, and the
//! time to reload a 1,000-rule document.
//!
//! A plain harness (no criterion): the admission numbers are latency percentiles of single
//! calls under two threads, which criterion's mean-of-batches does not report.

use std::{
    num::NonZeroU32,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use sluice_crds::SidecarConfig;
use sluice_sidecar::{
    limits::{Identity, LimitMetrics, Limiter, Policy, Request},
    readiness::Readiness,
    reload::Reloader,
};

/// Distinct keys in the admission stream (`SLUICE_BENCH_KEYS`, default 100,000).
fn active_keys() -> usize {
    std::env::var("SLUICE_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}
/// Threads issuing admissions (`SLUICE_BENCH_THREADS`, default 2).
fn threads() -> usize {
    std::env::var("SLUICE_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2)
}
const CALLS_PER_THREAD: usize = 1_000_000;

/// Every rule a request of the stream matches: per-key requests and tokens, a pod-wide
/// concurrency limit, a per-tenant rule for one named tenant group and a variant rule.
const RULES: &str = r#"
version: v1alpha1
model: m
variants:
  - name: default
    weight: 100
rules:
  - name: p/per-key-requests
    per: Key
    requestsPerMinute: 100000
  - name: p/per-key-tokens
    per: Key
    tokensPerMinute: 100000000
  - name: p/pod-concurrency
    per: Pod
    maxConcurrent: 1000
  - name: p/vip
    match:
      tenants: [vip-1, vip-2]
    requestsPerSecond: 10
  - name: p/variant
    per: Variant
    match:
      variants: [default]
    requestsPerSecond: 100000000
"#;

fn main() {
    // `cargo bench` passes `--bench`; a filter argument selects sections.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let run = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    println!(
        "rate-limit benchmarks ({} threads, {} active keys)\n",
        threads(),
        active_keys()
    );
    if run("admission") {
        admission();
    }
    if run("memory") {
        memory();
    }
    if run("reload") {
        reload();
    }
}

fn keys() -> Arc<Vec<String>> {
    Arc::new(
        (0..active_keys())
            .map(|i| format!("sk-bench-{i:08}"))
            .collect(),
    )
}

/// xorshift64*: the same pseudo-random key stream for both limiters.
struct Stream(u64);

impl Stream {
    fn next(&mut self) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize
    }
}

struct Percentiles {
    p50: u64,
    p99: u64,
    p999: u64,
    mean: f64,
}

fn percentiles(mut ns: Vec<u64>) -> Percentiles {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)];
    Percentiles {
        p50: at(0.50),
        p99: at(0.99),
        p999: at(0.999),
        mean: ns.iter().sum::<u64>() as f64 / ns.len() as f64,
    }
}

/// One per-key rule, the same limit governor gets: the like-for-like comparison.
const ONE_RULE: &str = r#"
version: v1alpha1
model: m
variants:
  - name: default
    weight: 100
rules:
  - name: p/per-key-requests
    per: Key
    requestsPerMinute: 100000
"#;

/// A fresh limiter and `rules` compiled for it (with the default bound on keys).
fn compiled(rules: &str) -> (Limiter, Arc<Policy>) {
    let config = Arc::new(SidecarConfig::from_yaml(rules).expect("bench config"));
    let policy = Policy::compile(config, Arc::new(Identity::open()), None, 0, 1 << 20);
    (
        Limiter::with_metrics(LimitMetrics::default()),
        Arc::new(policy),
    )
}

/// What the admission bench compares: sluice's limiter under a policy, and governor.
enum Contender {
    Sluice(Limiter, Arc<Policy>),
    Governor(Arc<governor::DefaultKeyedRateLimiter<String>>),
}

impl Contender {
    /// sluice's admission under `rules`, its buckets warmed for every key.
    fn sluice(rules: &str, keys: &[String]) -> Self {
        let (limiter, policy) = compiled(rules);
        for k in keys {
            let t = limiter.admit(&policy, &request(k)).expect("warm-up admits");
            t.settle(150, 0);
        }
        Self::Sluice(limiter, policy)
    }

    /// governor with the same per-key quota as [`ONE_RULE`], warmed for every key.
    fn governor(keys: &[String]) -> Self {
        let quota = governor::Quota::per_minute(NonZeroU32::new(100_000).expect("non-zero"));
        let gov = governor::RateLimiter::keyed(quota);
        for k in keys {
            let _ = gov.check_key(k);
        }
        Self::Governor(Arc::new(gov))
    }

    /// `calls` timed decisions on each of [`threads`] threads over the key streams `streams`
    /// (one per thread, continued from round to round). Settling a sluice ticket belongs to
    /// the end of the request, not to the decision: it is done after the clock stops.
    fn round(
        self: &Arc<Self>,
        keys: &Arc<Vec<String>>,
        streams: &mut [Stream],
        calls: usize,
    ) -> Vec<u64> {
        let barrier = Arc::new(Barrier::new(streams.len()));
        let handles: Vec<_> = streams
            .iter()
            .map(|stream| {
                let (me, keys, barrier) = (self.clone(), keys.clone(), barrier.clone());
                let mut stream = Stream(stream.0);
                std::thread::spawn(move || {
                    let mut out = Vec::with_capacity(calls);
                    let mut admitted = 0usize;
                    let mut key = String::new();
                    barrier.wait();
                    for _ in 0..calls {
                        // A server admits a key it has just read from the request's headers,
                        // in cache: copying it first keeps the misses of fetching it from 100k
                        // keys out of both contenders' timings.
                        key.clear();
                        key.push_str(&keys[stream.next() % keys.len()]);
                        let key = &key;
                        let start = Instant::now();
                        let ok = match &*me {
                            Self::Sluice(limiter, policy) => {
                                let ticket = limiter.admit(policy, &request(key)).ok();
                                out.push(start.elapsed().as_nanos() as u64);
                                ticket.map(|t| t.settle(150, 0)).is_some()
                            }
                            Self::Governor(gov) => {
                                let ok = gov.check_key(key).is_ok();
                                out.push(start.elapsed().as_nanos() as u64);
                                ok
                            }
                        };
                        admitted += usize::from(ok);
                    }
                    assert!(admitted > calls * 9 / 10, "the stream is mostly admitted");
                    (out, stream)
                })
            })
            .collect();
        let mut all = Vec::with_capacity(calls * streams.len());
        for (h, slot) in handles.into_iter().zip(streams.iter_mut()) {
            let (out, stream) = h.join().expect("bench thread");
            all.extend(out);
            *slot = stream;
        }
        all
    }
}

/// Rounds the contenders take turns in, so that a noisy neighbour's phase hits them alike.
const ROUNDS: usize = 10;

fn admission() {
    let keys = keys();
    let timer = {
        let mut v = Vec::with_capacity(1_000_000);
        for _ in 0..1_000_000 {
            let s = Instant::now();
            v.push(s.elapsed().as_nanos() as u64);
        }
        percentiles(v)
    };
    let contenders = [
        Arc::new(Contender::governor(&keys)),
        Arc::new(Contender::sluice(ONE_RULE, &keys)),
        Arc::new(Contender::sluice(RULES, &keys)),
    ];
    let mut samples: [Vec<u64>; 3] = Default::default();
    let mut streams: Vec<Vec<Stream>> = contenders
        .iter()
        .map(|_| {
            (0..threads())
                .map(|t| Stream(0x9E37_79B9_7F4A_7C15 ^ (t as u64 + 1)))
                .collect()
        })
        .collect();
    for _ in 0..ROUNDS {
        for (i, c) in contenders.iter().enumerate() {
            samples[i].extend(c.round(&keys, &mut streams[i], CALLS_PER_THREAD / ROUNDS));
        }
    }
    let [governor, one, ours] = samples.map(percentiles);

    println!(
        "admission decision (timer overhead p50 {} ns, included below; {ROUNDS} interleaved rounds)",
        timer.p50
    );
    let line = |name: &str, p: &Percentiles| {
        println!(
            "  {name:<32} p50 {:>5} ns  p99 {:>5} ns  p99.9 {:>6} ns  mean {:>7.1} ns",
            p.p50, p.p99, p.p999, p.mean
        )
    };
    line("governor, 1 keyed GCRA quota", &governor);
    line("sluice, the same 1 per-key rule", &one);
    line("sluice, 5 matching rules", &ours);
    println!(
        "  ratio sluice/governor at p99: {:.2}x (1 rule), {:.2}x (5 rules); p50: {:.2}x, {:.2}x",
        one.p99 as f64 / governor.p99 as f64,
        ours.p99 as f64 / governor.p99 as f64,
        one.p50 as f64 / governor.p50 as f64,
        ours.p50 as f64 / governor.p50 as f64,
    );
    println!(
        "  target sluice p99 <= 1000 ns with all rules: {}\n",
        if ours.p99 <= 1000 { "met" } else { "MISSED" }
    );
}

fn request(key: &str) -> Request<'_> {
    Request {
        tenant: key,
        key,
        roles: &[],
        variant: "default",
        prompt_tokens: 100,
        max_tokens: 100,
        request_bytes: 500,
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn memory() {
    const KEYS: usize = 1_000_000;
    let (limiter, policy) = compiled(RULES);
    let before = rss_bytes();
    let mut key = String::new();
    let started = Instant::now();
    for i in 0..KEYS {
        use std::fmt::Write;
        key.clear();
        let _ = write!(key, "attacker-{i:012}");
        if let Ok(t) = limiter.admit(&policy, &request(&key)) {
            t.settle(150, 0);
        }
    }
    let elapsed = started.elapsed();
    let after = rss_bytes();
    let buckets: usize = policy.limits().map(|l| l.table.len()).sum();
    let grown = after.saturating_sub(before);
    println!("memory under a key-cardinality attack ({KEYS} distinct keys, 2 per-key limits)");
    println!(
        "  buckets held {buckets}, RSS grew {:.1} MB ({:.0} bytes per key) in {:.2?}   (bound: <= 200 MB: {})",
        grown as f64 / 1e6,
        grown as f64 / KEYS as f64,
        elapsed,
        if grown <= 200_000_000 {
            "met"
        } else {
            "MISSED"
        }
    );
    // A sweep after the buckets drained frees them (here the per-minute buckets need 60 s to
    // drain, so sweep at a simulated minute later).
    let dropped = limiter.sweep_at(
        &policy,
        limiter.now() + Duration::from_secs(61).as_nanos() as u64,
    );
    println!("  a sweep a minute later drops {dropped} idle buckets\n");
}

fn reload() {
    let doc = |tokens: u64| {
        let mut doc = String::from(
            "version: v1alpha1\nmodel: m\nvariants:\n  - name: default\n    weight: 100\nrules:\n",
        );
        for i in 0..1000 {
            doc.push_str(&format!(
                "  - name: team-{}/rule-{i}\n    per: Key\n    match:\n      tenants: [tenant-{i}, tenant-{}]\n    requestsPerMinute: {}\n    tokensPerMinute: {tokens}\n    maxConcurrent: 4\n",
                i % 10,
                i + 1000,
                i + 1
            ));
        }
        doc
    };
    let (yaml_a, yaml_b) = (doc(10_000), doc(20_000));
    // What the operator writes into the ConfigMap (and so what a pod reloads): the same
    // documents as JSON.
    let json = |yaml: &str| {
        SidecarConfig::from_yaml(yaml)
            .and_then(|c| c.to_json())
            .expect("valid document")
    };
    let (json_a, json_b) = (json(&yaml_a), json(&yaml_b));
    println!(
        "reload of a 1,000-rule document (parse, validate, compile, publish); {} KB as YAML, {} KB as the operator's JSON",
        yaml_a.len() / 1024,
        json_a.len() / 1024
    );
    let yaml = reload_times("YAML (hand-written --config)", &yaml_a, &yaml_b);
    let json = reload_times("JSON (the operator's ConfigMap)", &json_a, &json_b);
    println!(
        "  JSON/YAML reload time at the median: {:.2}x   (target <= 10 ms for the ConfigMap a pod reloads: {})",
        json.as_secs_f64() / yaml.as_secs_f64(),
        if json <= Duration::from_millis(10) {
            "met"
        } else {
            "MISSED"
        }
    );
}

/// Reloads alternating documents `a` and `b` 40 times; prints and returns the median re-rating
/// reload (the first, which creates every table, is printed apart).
fn reload_times(label: &str, a: &str, b: &str) -> Duration {
    let limiter = Limiter::with_metrics(LimitMetrics::default());
    let (ptx, _prx) = tokio::sync::watch::channel(None);
    let (ctx, _crx) = tokio::sync::watch::channel(Arc::new(
        SidecarConfig::from_yaml(RULES).expect("bench config"),
    ));
    let reloader = Reloader::new(limiter, ptx, ctx, Readiness::new());
    let mut times = Vec::new();
    for i in 0..40 {
        let text = if i % 2 == 0 { a } else { b };
        let start = Instant::now();
        reloader.apply("bench", text).expect("valid document");
        times.push(start.elapsed());
    }
    let first = times[0];
    let mut rest: Vec<Duration> = times[1..].to_vec();
    rest.sort();
    let mut parse: Vec<Duration> = (0..20)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(SidecarConfig::from_yaml(a).expect("valid document"));
            start.elapsed()
        })
        .collect();
    parse.sort();
    let median = rest[rest.len() / 2];
    println!(
        "  {label:<32} parse+validate median {:.2?}; first reload {first:.2?}; re-rating reloads median {median:.2?}, max {:.2?}",
        parse[parse.len() / 2],
        rest[rest.len() - 1],
    );
    median
}

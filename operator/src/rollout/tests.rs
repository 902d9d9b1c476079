//! Unit tests of the canary analysis: metrics → counters → verdict → decision.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use sluice_crds::InferenceModel;
use sluice_crds::inference_model::Analysis;

use super::plan::with_step;
use super::*;
use crate::scrape::{parse_prometheus_text, scrape_variants};

const MODEL: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: InferenceModel
metadata: {name: chat, namespace: ns, uid: u1, generation: 1}
spec:
  variants:
    - {name: stable, weight: 90, model: {url: "https://example.com/a.gguf"}}
    - {name: canary, weight: 10, model: {url: "https://example.com/b.gguf"}}
  rollout:
    analysis: {interval: 30s, window: 5m, maxErrorRate: 0.05, maxTtftP95: 2s, minRequests: 20}
"#;

fn model() -> InferenceModel {
    serde_yaml::from_str(MODEL).expect("valid model")
}

fn analysis() -> Analysis {
    model()
        .spec
        .rollout
        .and_then(|r| r.analysis)
        .expect("analysis")
}

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_700_000_000 + s).expect("valid")
}

/// A sidecar's `/metrics` with `ok` 200s, `err` 500s and TTFTs all in the bucket ending at
/// `ttft_le` seconds (buckets 0.5, 1, 2, 4, +Inf).
fn exposition(ok: u64, err: u64, ttft_le: f64) -> String {
    let mut text = String::from(
        "# HELP sluice_requests OpenAI API requests answered, by route and status\n\
         # TYPE sluice_requests counter\n",
    );
    text += &format!(
        "sluice_requests_total{{route=\"/v1/chat/completions\",status=\"200\"}} {ok}\n\
         sluice_requests_total{{route=\"/v1/chat/completions\",status=\"429\"}} 3\n\
         sluice_requests_total{{route=\"/v1/chat/completions\",status=\"500\"}} {err}\n\
         # TYPE sluice_time_to_first_token_seconds histogram\n"
    );
    let n = ok + err;
    for le in [0.5, 1.0, 2.0, 4.0] {
        let c = if le >= ttft_le { n } else { 0 };
        text += &format!("sluice_time_to_first_token_seconds_bucket{{le=\"{le}\"}} {c}\n");
    }
    text += &format!(
        "sluice_time_to_first_token_seconds_bucket{{le=\"+Inf\"}} {n}\n\
         sluice_time_to_first_token_seconds_sum 1.0\n\
         sluice_time_to_first_token_seconds_count {n}\n# EOF\n"
    );
    text
}

fn counters(ok: u64, err: u64, ttft_le: f64) -> Counters {
    let samples = parse_prometheus_text(&exposition(ok, err, ttft_le)).expect("parses");
    Counters::from_samples(&samples, "canary")
}

#[test]
fn counters_come_from_the_sidecar_exposition() {
    let c = counters(37, 3, 1.0);
    assert_eq!(c.requests, 43.0, "every status counts, 429s included");
    assert_eq!(c.errors, 3.0, "only 5xx are errors");
    assert_eq!(c.ttft.len(), 5);
    assert_eq!(c.ttft.last(), Some(&(f64::INFINITY, 40.0)));
}

#[test]
fn samples_labelled_with_another_variant_do_not_count() {
    let text = "sluice_requests_total{status=\"200\",variant=\"stable\"} 100\n\
                sluice_requests_total{status=\"500\",variant=\"canary\"} 7\n\
                sluice_requests_total{status=\"200\",variant=\"canary\"} 3\n";
    let samples = parse_prometheus_text(text).expect("parses");
    let c = Counters::from_samples(&samples, "canary");
    assert_eq!((c.requests, c.errors), (10.0, 7.0));
}

#[test]
fn quantile_interpolates_like_prometheus() {
    // 100 observations: 50 ≤ 0.5, 40 in (0.5, 1], 10 in (1, 2].
    let b = [
        (0.5, 50.0),
        (1.0, 90.0),
        (2.0, 100.0),
        (f64::INFINITY, 100.0),
    ];
    // rank 95 falls in (1, 2]: 1 + 1 * (95 - 90) / 10 = 1.5
    assert_eq!(histogram_quantile(0.95, &b), Some(1.5));
    // rank 25 in the first bucket: from 0, 0.5 * 25 / 50.
    assert_eq!(histogram_quantile(0.25, &b), Some(0.25));
    // In the +Inf bucket: the highest finite bound.
    let b = [(0.5, 1.0), (1.0, 2.0), (f64::INFINITY, 100.0)];
    assert_eq!(histogram_quantile(0.95, &b), Some(1.0));
    assert_eq!(
        histogram_quantile(0.95, &[(1.0, 0.0), (f64::INFINITY, 0.0)]),
        None
    );
    assert_eq!(histogram_quantile(0.95, &[]), None);
}

#[test]
fn a_canary_over_the_error_rate_breaches_with_the_numbers() {
    let start = counters(10, 0, 0.5);
    let now = counters(45, 5, 0.5);
    // 35 + 5 ok/err more; the 429s did not move: 40 requests, 5 errors = 12.5%.
    match verdict(&now, &start, &analysis()) {
        Verdict::Breach { measured, message } => {
            assert_eq!(measured.requests, 40);
            assert_eq!(message, "error rate 12.5% > 5.0% over 40 requests in 5m");
        }
        other => panic!("expected a breach, got {other:?}"),
    }
}

#[test]
fn a_slow_canary_breaches_on_ttft() {
    let now = counters(40, 0, 4.0);
    match verdict(&now, &Counters::default(), &analysis()) {
        Verdict::Breach { measured, message } => {
            // All in (2, 4]: 2 + 2 * 0.95 = 3.9
            assert!((measured.ttft_p95.expect("p95") - 3.9).abs() < 1e-9);
            assert_eq!(
                message,
                "p95 time to first token 3.90s > 2s over 43 requests in 5m"
            );
        }
        other => panic!("expected a breach, got {other:?}"),
    }
}

#[test]
fn a_healthy_canary_and_one_with_too_few_requests() {
    let healthy = verdict(&counters(99, 1, 1.0), &Counters::default(), &analysis());
    assert!(
        matches!(healthy, Verdict::Healthy(ref m) if m.requests == 103),
        "{healthy:?}"
    );
    let quiet = verdict(&counters(5, 5, 4.0), &Counters::default(), &analysis());
    assert!(
        matches!(quiet, Verdict::NotEnoughData(ref m) if m.requests == 13),
        "{quiet:?}"
    );
}

#[test]
fn a_restarted_pod_counts_from_zero() {
    let before = counters(1000, 0, 0.5);
    let after_restart = counters(30, 10, 0.5);
    let d = after_restart.delta(&before);
    assert_eq!((d.requests, d.errors), (43.0, 10.0));
}

#[test]
fn history_keeps_one_window_and_resets_on_a_new_generation() {
    let h = History::default();
    let key = ("ns/chat", "canary", "chat-canary-0");
    let window = Duration::from_secs(300);
    let first = h.observe(key, 1, at(0), counters(0, 0, 0.5), window);
    assert_eq!(first.requests, 0.0, "the first reading is the baseline");
    let d = h.observe(key, 1, at(60), counters(100, 0, 0.5), window);
    assert_eq!(d.requests, 100.0);
    // At 360s the reading of 60s is the newest at least 5 minutes old.
    let d = h.observe(key, 1, at(360), counters(150, 50, 0.5), window);
    assert_eq!((d.requests, d.errors), (100.0, 50.0));
    // A new generation: what came before no longer counts.
    let d = h.observe(key, 2, at(390), counters(160, 60, 0.5), window);
    assert_eq!(d.requests, 0.0);
    let d = h.observe(key, 2, at(420), counters(170, 60, 0.5), window);
    assert_eq!((d.requests, d.errors), (10.0, 0.0));
}

/// Sidecars whose `/metrics` are fixed texts; a pod without one cannot be reached.
struct Expositions(std::sync::Mutex<BTreeMap<String, String>>);

impl crate::scrape::MetricsSource for Expositions {
    fn scrape<'a>(
        &'a self,
        pod: &'a crate::scrape::PodEndpoint,
    ) -> futures::future::BoxFuture<
        'a,
        Result<Vec<crate::scrape::Sample>, crate::scrape::ScrapeError>,
    > {
        let text = self.0.lock().expect("lock").get(&pod.name).cloned();
        Box::pin(
            async move { parse_prometheus_text(&text.ok_or(crate::scrape::ScrapeError::Timeout)?) },
        )
    }
}

fn running_pod(name: &str, variant: &str) -> k8s_openapi::api::core::v1::Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"sluice.dev/model": "chat", "sluice.dev/variant": variant}},
        "status": {"phase": "Running", "podIP": "10.0.0.1"},
    }))
    .expect("pod")
}

#[tokio::test]
async fn a_canary_that_is_down_is_judged_by_the_forwards_to_it_that_failed() {
    // The canary's pod answers no scrape; the stable pod forwarded it 30 requests that all
    // failed to connect (and fell back to stable, so users saw 200s).
    let stable_metrics = |ok: u64, failed: u64| {
        format!(
            "sluice_requests_total{{status=\"200\",variant=\"stable\"}} {ok}\n\
             sluice_forward_failures_total{{variant=\"canary\",kind=\"connect\"}} {failed}\n"
        )
    };
    let sidecars = Expositions(Default::default());
    let pods = [
        running_pod("chat-stable-0", "stable"),
        running_pod("chat-canary-0", "canary"),
    ];
    let (model, history) = (model(), History::default());
    sidecars
        .0
        .lock()
        .expect("lock")
        .insert("chat-stable-0".into(), stable_metrics(100, 0));
    let scrape = || scrape_variants(&sidecars, ["stable", "canary"], &pods);
    measure(&history, &model, &scrape().await, &analysis(), at(0));
    sidecars
        .0
        .lock()
        .expect("lock")
        .insert("chat-stable-0".into(), stable_metrics(160, 30));
    let counters = measure(&history, &model, &scrape().await, &analysis(), at(60));

    let canary = counters.get("canary").expect("the canary is measured");
    assert_eq!((canary.requests, canary.errors), (30.0, 30.0));
    let stable = counters.get("stable").expect("stable is measured");
    assert_eq!(
        (stable.requests, stable.errors),
        (60.0, 0.0),
        "stable is not blamed"
    );
    assert!(matches!(judge(canary, &analysis()), Verdict::Breach { .. }));
}

fn breach(requests: u64) -> Verdict {
    Verdict::Breach {
        measured: Measured {
            requests,
            error_rate: 0.12,
            ttft_p95: None,
        },
        message: format!("error rate 12.0% > 5.0% over {requests} requests in 5m"),
    }
}

fn healthy() -> Verdict {
    Verdict::Healthy(Measured {
        requests: 100,
        error_rate: 0.0,
        ttft_p95: Some(0.2),
    })
}

fn with_rollout(mut m: InferenceModel, d: &Decision) -> InferenceModel {
    m.status.get_or_insert_default().rollout = d.rollout.clone();
    m
}

#[test]
fn a_breaching_canary_is_rolled_back_and_stays_so() {
    let m = model();
    let verdicts = BTreeMap::from([
        ("stable".to_owned(), healthy()),
        ("canary".to_owned(), breach(40)),
    ]);
    let d = decide(&m, &verdicts, at(0));
    assert_eq!(d.rolled_back_now, ["canary"]);
    let m = with_rollout(m, &d);
    let RoutePlan {
        variants: plan,
        rolled_back,
    } = route_plan(&m);
    assert!(rolled_back.contains("canary"));
    assert_eq!(
        plan[1],
        ("canary".to_owned(), 10, 10),
        "targets are spec's; routing zeroes"
    );
    let (reason, message) = problem(&m).expect("degraded");
    assert_eq!(reason, REASON_ROLLED_BACK);
    assert!(
        message.starts_with(
            "variant canary rolled back: error rate 12.0% > 5.0% over 40 requests in 5m"
        ),
        "{message}"
    );
    // Next interval: the canary has no traffic, hence no data; it stays rolled back.
    let d2 = decide(
        &m,
        &BTreeMap::from([("stable".to_owned(), healthy())]),
        at(30),
    );
    assert!(d2.rolled_back_now.is_empty());
    assert_eq!(d2.rollout, d.rollout);
}

#[test]
fn a_healthy_canary_keeps_its_weight() {
    let m = model();
    let verdicts = BTreeMap::from([
        ("stable".to_owned(), healthy()),
        ("canary".to_owned(), healthy()),
    ]);
    let d = decide(&m, &verdicts, at(0));
    assert!(d.rolled_back_now.is_empty());
    let m = with_rollout(m, &d);
    assert_eq!(problem(&m), None);
    assert!(route_plan(&m).rolled_back.is_empty());
}

#[test]
fn a_new_generation_clears_the_rollback() {
    let m = model();
    let d = decide(
        &m,
        &BTreeMap::from([("canary".to_owned(), breach(40))]),
        at(0),
    );
    let mut m = with_rollout(m, &d);
    assert!(problem(&m).is_some());
    m.metadata.generation = Some(2);
    assert_eq!(
        problem(&m),
        None,
        "the old generation's rollback no longer applies"
    );
    assert!(route_plan(&m).rolled_back.is_empty());
    let d = decide(&m, &BTreeMap::new(), at(60));
    let r = d.rollout.expect("state");
    assert_eq!((r.generation, r.rolled_back.len()), (2, 0));
}

#[test]
fn the_last_serving_variant_is_never_rolled_back() {
    let m = model();
    let verdicts = BTreeMap::from([
        ("stable".to_owned(), breach(400)),
        ("canary".to_owned(), breach(40)),
    ]);
    let d = decide(&m, &verdicts, at(0));
    assert_eq!(
        d.rolled_back_now,
        ["canary"],
        "stable has the highest desired weight"
    );
    let m = with_rollout(m, &d);
    let (reason, message) = problem(&m).expect("degraded");
    assert_eq!(reason, REASON_ROLLED_BACK);
    assert!(message.contains("variant stable breaches"), "{message}");
    assert!(
        message.contains("last variant serving traffic"),
        "{message}"
    );
    // Later, stable breaches alone: still kept.
    let d = decide(
        &m,
        &BTreeMap::from([("stable".to_owned(), breach(400))]),
        at(30),
    );
    assert!(d.rolled_back_now.is_empty());
}

#[test]
fn without_auto_rollback_a_breach_is_only_reported() {
    let mut m = model();
    m.spec.rollout.as_mut().expect("rollout").auto_rollback = false;
    let d = decide(
        &m,
        &BTreeMap::from([("canary".to_owned(), breach(40))]),
        at(0),
    );
    assert!(d.rolled_back_now.is_empty());
    let m = with_rollout(m, &d);
    let (reason, message) = problem(&m).expect("reported");
    assert_eq!(reason, REASON_FAILING);
    assert!(message.contains("autoRollback is off"), "{message}");
    assert!(route_plan(&m).rolled_back.is_empty());
}

const STEPPED: &str = r#"
apiVersion: sluice.dev/v1alpha1
kind: InferenceModel
metadata: {name: chat, namespace: ns, uid: u1, generation: 1}
spec:
  variants:
    - {name: stable, weight: 50, model: {url: "https://example.com/a.gguf"}}
    - {name: canary, weight: 50, model: {url: "https://example.com/b.gguf"}}
  rollout:
    analysis: {interval: 30s, window: 5m, maxErrorRate: 0.05, minRequests: 20}
    steps:
      - {weight: 10, pause: 5m}
      - {weight: 25, pause: 5m}
      - {weight: 100, pause: 5m}
"#;

fn targets(m: &InferenceModel) -> Vec<i32> {
    route_plan(m)
        .variants
        .into_iter()
        .map(|(_, _, t)| t)
        .collect()
}

#[test]
fn steps_advance_only_after_the_pause_and_while_healthy() {
    let m: InferenceModel = serde_yaml::from_str(STEPPED).expect("valid");
    assert_eq!(
        step_variant(&m),
        Some("canary"),
        "the last of equal weights"
    );
    let ok = BTreeMap::from([("canary".to_owned(), healthy())]);
    let d = decide(&m, &ok, at(0));
    let m = with_rollout(m, &d);
    assert_eq!(targets(&m), [90, 10]);
    // Healthy but the pause has not passed.
    let m = with_rollout(m.clone(), &decide(&m, &ok, at(200)));
    assert_eq!(targets(&m), [90, 10]);
    // Paused long enough but not enough data: holds.
    let quiet = BTreeMap::from([(
        "canary".to_owned(),
        Verdict::NotEnoughData(Measured {
            requests: 3,
            error_rate: 0.0,
            ttft_p95: None,
        }),
    )]);
    let m = with_rollout(m.clone(), &decide(&m, &quiet, at(300)));
    assert_eq!(targets(&m), [90, 10]);
    // Healthy after the pause: next step.
    let m = with_rollout(m.clone(), &decide(&m, &ok, at(310)));
    assert_eq!(targets(&m), [75, 25]);
    let m = with_rollout(m.clone(), &decide(&m, &ok, at(610)));
    assert_eq!(targets(&m), [50, 50], "capped at the desired weight");
    let m = with_rollout(m.clone(), &decide(&m, &ok, at(910)));
    assert_eq!(targets(&m), [50, 50], "done: desired weights");
    assert_eq!(current(&m).and_then(|r| r.step), Some(3));
}

#[test]
fn a_breach_during_steps_rolls_back_and_freezes_them() {
    let m: InferenceModel = serde_yaml::from_str(STEPPED).expect("valid");
    let m = with_rollout(m.clone(), &decide(&m, &BTreeMap::new(), at(0)));
    let bad = BTreeMap::from([("canary".to_owned(), breach(30))]);
    let m = with_rollout(m.clone(), &decide(&m, &bad, at(400)));
    assert!(route_plan(&m).rolled_back.contains("canary"));
    let m = with_rollout(m.clone(), &decide(&m, &BTreeMap::new(), at(900)));
    assert_eq!(current(&m).and_then(|r| r.step), Some(0));
}

#[test]
fn step_weights_split_the_rest_proportionally() {
    let desired = [
        ("a".to_owned(), 60),
        ("b".to_owned(), 30),
        ("c".to_owned(), 10),
    ];
    let w: Vec<i32> = with_step(&desired, "c", 5)
        .into_iter()
        .map(|(_, _, t)| t)
        .collect();
    // 95 over 60:30 → 63.33, 31.67 → 63, 32.
    assert_eq!(w, [63, 32, 5]);
    assert_eq!(w.iter().sum::<i32>(), 100);
}

#[test]
fn a_full_progressive_rollout_moves_stable_traffic_step_by_step() {
    let m: InferenceModel = serde_yaml::from_str(
        &STEPPED
            .replace(
                "weight: 50, model: {url: \"https://example.com/a",
                "weight: 0, model: {url: \"https://example.com/a",
            )
            .replace(
                "weight: 50, model: {url: \"https://example.com/b",
                "weight: 100, model: {url: \"https://example.com/b",
            ),
    )
    .expect("valid");
    assert_eq!(step_variant(&m), Some("canary"));
    let ok = BTreeMap::from([("canary".to_owned(), healthy())]);
    let m = with_rollout(m.clone(), &decide(&m, &ok, at(0)));
    assert_eq!(targets(&m), [90, 10]);
    let m = with_rollout(m.clone(), &decide(&m, &ok, at(300)));
    assert_eq!(targets(&m), [75, 25]);
    let m = with_rollout(m.clone(), &decide(&m, &ok, at(600)));
    assert_eq!(targets(&m), [0, 100]);
    let mut single = m.clone();
    single.spec.variants.truncate(1);
    single.spec.variants[0].weight = 100;
    assert_eq!(
        step_variant(&single),
        None,
        "a lone variant has nothing to roll out"
    );
}

#[test]
fn requeue_follows_the_interval() {
    assert_eq!(requeue(&model()), Some(Duration::from_secs(30)));
    let mut m = model();
    m.spec.rollout = None;
    assert_eq!(requeue(&m), None);
}

#[test]
fn durations_read_like_the_spec() {
    assert_eq!(format_duration(Duration::from_secs(300)), "5m");
    assert_eq!(format_duration(Duration::from_secs(90)), "90s");
    assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
    assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
}

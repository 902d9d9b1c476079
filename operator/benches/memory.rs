//! Resident memory of the operator with 1,000 InferenceModels watched (target ≤ 100 MB), beside
//! an empty baseline. `make bench` runs it.
//!
//! A mocked API server (tower-test) answers the controller's LIST with 1,000 distinct copies of
//! `examples/inferencemodel-canary.yaml` and then keeps the WATCH open; a real
//! `Controller::run` (no-op reconcile) fills its reflector store and reconciles each model once.
//! The desired state of every model is then computed (what a reconcile builds) and held at once,
//! for the transient cost. RSS and its peak come from `/proc/self/status`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use http::{Request, Response};
use kube::client::Body;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::{Value, json};
use sluice_crds::InferenceModel;
use sluice_operator::controller::render;
use sluice_operator::resources::Settings;

const MODELS: usize = 1_000;
const TARGET_MB: f64 = 100.0;
const EXAMPLE: &str = include_str!("../../examples/inferencemodel-canary.yaml");

/// `VmRSS` and `VmHWM` of this process, in kB.
fn rss_kb() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Resets `VmHWM` to the current RSS (best effort: some kernels or sandboxes refuse).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The LIST answer: `n` distinct copies of the example (own name, uid, resourceVersion).
fn list_body(n: usize) -> Vec<u8> {
    let example: Value = serde_yaml::from_str(EXAMPLE).expect("valid example");
    let items: Vec<Value> = (0..n)
        .map(|i| {
            let mut m = example.clone();
            let meta = m["metadata"].as_object_mut().expect("metadata");
            meta.insert("name".into(), json!(format!("model-{i:04}")));
            meta.insert("namespace".into(), json!("default"));
            meta.insert(
                "uid".into(),
                json!(format!("00000000-0000-4000-8000-{i:012}")),
            );
            meta.insert("resourceVersion".into(), json!((i + 1).to_string()));
            meta.insert("generation".into(), json!(1));
            m["spec"]["servedName"] = json!(format!("model-{i:04}"));
            m
        })
        .collect();
    serde_json::to_vec(&json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "InferenceModelList",
        "metadata": {"resourceVersion": (n + 1).to_string()},
        "items": items,
    }))
    .expect("serialises")
}

/// A controller against a mocked API server that lists `body` and never ends a WATCH.
struct Running {
    reconciled: Arc<AtomicUsize>,
    store: Store<InferenceModel>,
}

fn start(body: Vec<u8>) -> Running {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        let mut open_watches = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            if request.uri().query().unwrap_or("").contains("watch=true") {
                // Kept, never answered: the watch stays open with no events.
                open_watches.push(send);
            } else {
                send.send_response(
                    Response::builder()
                        .body(Body::from(body.clone()))
                        .expect("response"),
                );
            }
        }
    });
    let client = Client::new(service, "default");
    let reconciled = Arc::new(AtomicUsize::new(0));
    let controller = Controller::new(
        Api::<InferenceModel>::all(client),
        watcher::Config::default().any_semantic(),
    );
    let store = controller.store();
    tokio::spawn(
        controller
            .run(
                |_model: Arc<InferenceModel>, count: Arc<AtomicUsize>| async move {
                    count.fetch_add(1, Ordering::Relaxed);
                    Ok::<_, Infallible>(Action::await_change())
                },
                |_, _, _| Action::await_change(),
                reconciled.clone(),
            )
            .for_each(|_| async {}),
    );
    Running { reconciled, store }
}

/// Waits until the store holds `n` models and each was reconciled once.
async fn settle(r: &Running, n: usize) {
    let started = Instant::now();
    loop {
        if r.store.len() == n && r.reconciled.load(Ordering::Relaxed) >= n {
            // A moment for the applier's queues to drain.
            tokio::time::sleep(Duration::from_millis(200)).await;
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not settled: {} stored, {} reconciled",
            r.store.len(),
            r.reconciled.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::main]
async fn main() {
    // The fixture (the LIST bytes the mocked server sends) exists before the baseline, so the
    // differences below are the operator's alone.
    let empty = list_body(0);
    let full = list_body(MODELS);
    let fixture_kb = full.len() / 1024;
    let settings = Settings {
        sidecar_image: "ghcr.io/sluice-dev/sluice-sidecar:0.1.0".to_owned(),
        sidecar_cuda_image: "ghcr.io/sluice-dev/sluice-sidecar-cuda:0.1.0".to_owned(),
    };
    let peak_resets = reset_peak();
    let mut rows: Vec<(String, u64, u64)> = Vec::new();
    let mut row = |label: &str| {
        let (rss, hwm) = rss_kb();
        rows.push((label.to_owned(), rss, hwm));
        rss
    };

    let baseline = row("baseline: runtime + fixture, no controller");

    let idle = start(empty);
    settle(&idle, 0).await;
    row("controller watching, 0 models");

    let loaded = start(full);
    settle(&loaded, MODELS).await;
    let watched = row("controller watching, 1,000 models (each reconciled once)");

    let models = loaded.store.state();
    let desired: Vec<_> = models
        .iter()
        .map(|m| render(m, "default", &settings, &[], &[]).expect("renders"))
        .collect();
    row("+ desired state of all 1,000 held at once");
    let desired_json_kb = serde_json::to_vec(&desired[0].to_values().expect("values"))
        .expect("serialises")
        .len()
        / 1024;
    drop(desired);
    drop(models);
    // glibc keeps freed heap mapped, so this row shows what the process holds on to.
    let after = row("desired state dropped (freed, not returned to the OS)");
    let (_, peak) = rss_kb();

    println!(
        "operator memory, {MODELS} InferenceModels (examples/inferencemodel-canary.yaml, 2 variants; LIST body {fixture_kb} KiB)"
    );
    println!("one model's desired state: {desired_json_kb} KiB as JSON");
    println!("{:<60} {:>10} {:>10}", "phase", "VmRSS MB", "VmHWM MB");
    for (label, rss, hwm) in &rows {
        println!("{label:<60} {:>10.1} {:>10.1}", mb(*rss), mb(*hwm));
    }
    println!(
        "watched 1,000 models: {:.1} MB RSS ({:+.1} MB over baseline, {:.1} KB/model); steady {:.1} MB; peak {:.1} MB{}; target ≤ {TARGET_MB:.0} MB: {}",
        mb(watched),
        mb(watched) - mb(baseline),
        (watched.saturating_sub(baseline)) as f64 / MODELS as f64,
        mb(after),
        mb(peak),
        if peak_resets {
            ""
        } else {
            " (process-lifetime peak: clear_refs refused)"
        },
        if mb(peak) <= TARGET_MB {
            "met"
        } else {
            "MISSED"
        },
    );
}

//! Resident memory of the operator with 1,000 InferenceModels watched (target ≤ 100 MB), beside
//! an empty baseline. `make bench-operator-memory` runs it.
//!
//! Each scenario runs in a fresh child process (this binary, re-run with `--scenario`), so one
//! scenario's freed heap never hides another's, and `VmHWM` is that scenario's peak:
//!
//! - `noop`: the empty-reconcile baseline. A `Controller` over InferenceModels alone (no owned
//!   watches) with a reconcile that only counts, against a mocked API server (tower-test) that
//!   lists 1,000 distinct copies of `examples/inferencemodel-canary.yaml` and keeps the WATCH
//!   open.
//! - `real N`: the real operator, [`sluice_operator::controller::run`] (real reconcile, the eight
//!   owned-object watches, the RateLimitPolicy watch and the policy status controller) with a
//!   reconcile concurrency of N, against a stateful fake API server ([`Fake`]): it lists the same
//!   1,000 models, holds every WATCH open, stores what the reconcile applies and creates, lists
//!   it back by label selector, and answers status patches, Events and deletes. Rows: once every
//!   model was reconciled (its status patched), and after the second round (each model requeues
//!   itself 15 s later; its lists now return the objects it applied). The canary analysis
//!   reads metrics through the real HTTP source, counted: with no pods listed it scrapes nothing.
//!
//! The fake runs in the same process, so its stored objects count in that RSS; their size is
//! printed beside it. RSS and its peak come from `/proc/self/status`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::convert::Infallible;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Api, Client};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use sluice_crds::InferenceModel;
use sluice_operator::controller::{Context, DEFAULT_RECONCILE_CONCURRENCY};
use sluice_operator::desired::Settings;
use sluice_operator::metrics::Metrics;
use sluice_operator::names::FIELD_MANAGER;
use sluice_operator::scrape::{HttpMetricsSource, MetricsSource, PodEndpoint, Sample, ScrapeError};

const MODELS: usize = 1_000;
const TARGET_MB: f64 = 100.0;
const EXAMPLE: &str = include_str!("../../examples/inferencemodel-canary.yaml");
/// `creationTimestamp` of everything the fake stores.
const CREATED: &str = "2025-01-01T00:00:00Z";

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

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

// === fixture ===

/// Model `i`: the example with its own name, uid and resourceVersion, in `default`.
fn model(example: &Value, i: usize) -> Value {
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
    meta.insert("creationTimestamp".into(), json!(CREATED));
    m["spec"]["servedName"] = json!(format!("model-{i:04}"));
    m
}

/// The LIST answer: `n` distinct models.
fn list_body(example: &Value, n: usize) -> Vec<u8> {
    let items: Vec<Value> = (0..n).map(|i| model(example, i)).collect();
    serde_json::to_vec(&json!({
        "apiVersion": "sluice.dev/v1alpha1",
        "kind": "InferenceModelList",
        "metadata": {"resourceVersion": (n + 1).to_string()},
        "items": items,
    }))
    .expect("serialises")
}

fn settings() -> Settings {
    Settings {
        sidecar_image: "ghcr.io/sluice-dev/sluice-sidecar:0.1.0".to_owned(),
        sidecar_cuda_image: "ghcr.io/sluice-dev/sluice-sidecar-cuda:0.1.0".to_owned(),
        tracing_env: Vec::new(),
    }
}

// === the empty-reconcile baseline ===

/// A no-op controller against a mocked API server that lists `body` and never ends a WATCH.
struct Running {
    reconciled: Arc<AtomicUsize>,
    store: Store<InferenceModel>,
}

fn start_noop(body: Vec<u8>) -> Running {
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

// === the fake API server ===

/// What the bench reads from the fake while it runs.
#[derive(Default)]
struct Shared {
    /// Status patches of InferenceModels, all, and of distinct models.
    status_patches: AtomicUsize,
    models_patched: AtomicUsize,
    /// Every request, and when the last one came (ms since `epoch`).
    requests: AtomicU64,
    last_request_ms: AtomicU64,
    /// Requests the fake did not understand (logged, answered 404).
    not_understood: AtomicUsize,
    /// Objects stored and their bytes (JSON).
    stored_objects: AtomicUsize,
    stored_bytes: AtomicUsize,
    /// Bytes of the Events created (the Recorder caches each one it publishes).
    event_bytes: AtomicUsize,
    /// Requests by method and resource.
    counts: Mutex<BTreeMap<String, u64>>,
}

/// The real sidecar-metrics source, counting its scrapes (canary analysis with no pods listed
/// must scrape nothing).
struct CountingSource {
    inner: HttpMetricsSource,
    scrapes: AtomicUsize,
}

impl MetricsSource for CountingSource {
    fn scrape<'a>(
        &'a self,
        pod: &'a PodEndpoint,
    ) -> futures::future::BoxFuture<'a, Result<Vec<Sample>, ScrapeError>> {
        self.scrapes.fetch_add(1, Ordering::Relaxed);
        self.inner.scrape(pod)
    }
}

/// One stored object: its labels (for selectors) and its JSON as served.
struct Stored {
    labels: BTreeMap<String, String>,
    json: Vec<u8>,
}

/// A request's target, from its path.
struct Target {
    /// `/api/v1/pods`, `/apis/apps/v1/deployments`: the key of a kind.
    resource: String,
    plural: String,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let group_version = match *segments.first()? {
        "api" => 2,
        "apis" => 3,
        _ => return None,
    };
    if segments.len() <= group_version {
        return None;
    }
    let prefix = segments[..group_version].join("/");
    let mut rest = &segments[group_version..];
    let mut namespace = None;
    if rest[0] == "namespaces" && rest.len() >= 3 {
        namespace = Some(rest[1].to_owned());
        rest = &rest[2..];
    }
    if rest.len() > 3 || rest.iter().any(|s| s.is_empty()) {
        return None;
    }
    Some(Target {
        resource: format!("/{prefix}/{}", rest[0]),
        plural: rest[0].to_owned(),
        namespace,
        name: rest.get(1).map(|s| (*s).to_owned()),
        subresource: rest.get(2).map(|s| (*s).to_owned()),
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, key: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| percent_decode(v))
}

/// One term of an equality-based label selector.
enum Term {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

/// `a=b,c==d,e!=f,g,!h`; `None` for anything else (set-based forms).
fn parse_selector(selector: &str) -> Option<Vec<Term>> {
    let key_ok = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    };
    selector
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            if t.contains(' ') || t.contains('(') {
                None
            } else if let Some((k, v)) = t.split_once("!=") {
                key_ok(k).then(|| Term::Ne(k.to_owned(), v.to_owned()))
            } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
                key_ok(k).then(|| Term::Eq(k.to_owned(), v.to_owned()))
            } else if let Some(k) = t.strip_prefix('!') {
                key_ok(k).then(|| Term::Absent(k.to_owned()))
            } else {
                key_ok(t).then(|| Term::Exists(t.to_owned()))
            }
        })
        .collect()
}

fn matches(terms: &[Term], labels: &BTreeMap<String, String>) -> bool {
    terms.iter().all(|t| match t {
        Term::Eq(k, v) => labels.get(k) == Some(v),
        Term::Ne(k, v) => labels.get(k) != Some(v),
        Term::Exists(k) => labels.contains_key(k),
        Term::Absent(k) => !labels.contains_key(k),
    })
}

fn status_body(code: u16, reason: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {},
        "status": if code < 400 { "Success" } else { "Failure" },
        "message": message, "reason": reason, "code": code,
    }))
    .expect("serialises")
}

/// A stateful in-process API server: enough of Kubernetes for the operator's requests.
struct Fake {
    example: Value,
    models_list: Vec<u8>,
    /// (kind's resource path, namespace) → name → object.
    objects: HashMap<(String, String), BTreeMap<String, Stored>>,
    resource_version: u64,
    models_patched: HashSet<String>,
    shared: Arc<Shared>,
    epoch: Instant,
}

/// An answer, or `None` for a WATCH (held open).
type Answer = Option<(StatusCode, Vec<u8>)>;

impl Fake {
    fn count(&self, key: String) {
        *self.shared.counts.lock().unwrap().entry(key).or_default() += 1;
    }

    fn not_understood(&self, method: &Method, path: &str, query: &str, why: &str) -> Answer {
        eprintln!("fake API server: not understood ({why}): {method} {path}?{query}");
        self.shared.not_understood.fetch_add(1, Ordering::Relaxed);
        Some((
            StatusCode::NOT_FOUND,
            status_body(404, "NotFound", &format!("the fake does not serve {path}")),
        ))
    }

    fn handle(
        &mut self,
        method: &Method,
        path: &str,
        query: &str,
        content_type: &str,
        body: &[u8],
    ) -> Answer {
        let Some(t) = parse_path(path) else {
            return self.not_understood(method, path, query, "path");
        };
        let watch = query_param(query, "watch").as_deref() == Some("true");
        let verb = match (method, &t.name, watch) {
            (&Method::GET, _, true) => "WATCH",
            (&Method::GET, None, false) => "LIST",
            (m, _, _) => m.as_str(),
        };
        let sub = t
            .subresource
            .as_deref()
            .map(|s| format!("/{s}"))
            .unwrap_or_default();
        self.count(format!("{verb} {}{sub}", t.plural));
        if watch {
            return None;
        }
        let ns = t.namespace.clone().unwrap_or_default();
        match (method, t.name.as_deref(), t.subresource.as_deref()) {
            (&Method::GET, None, None) => {
                let selector = query_param(query, "labelSelector").unwrap_or_default();
                let Some(terms) = parse_selector(&selector) else {
                    return self.not_understood(method, path, query, "label selector");
                };
                if t.plural == "inferencemodels" {
                    if !terms.is_empty() || !matches!(ns.as_str(), "" | "default") {
                        return self.not_understood(method, path, query, "model list");
                    }
                    return Some((StatusCode::OK, self.models_list.clone()));
                }
                Some((StatusCode::OK, self.list(&t, &terms)))
            }
            (&Method::GET, Some(name), None) => Some(self.get(&t, &ns, name)),
            (&Method::PATCH, Some(name), Some("status")) if t.plural == "inferencemodels" => {
                if content_type != "application/apply-patch+yaml" {
                    return self.not_understood(method, path, query, "status patch type");
                }
                let Some(i) = name
                    .strip_prefix("model-")
                    .and_then(|i| i.parse::<usize>().ok())
                    .filter(|i| *i < MODELS)
                else {
                    return self.not_understood(method, path, query, "no such model");
                };
                let patch: Value = serde_json::from_slice(body).expect("JSON patch");
                let mut m = model(&self.example, i);
                m["status"] = patch["status"].clone();
                self.shared.status_patches.fetch_add(1, Ordering::Relaxed);
                if self.models_patched.insert(format!("{ns}/{name}")) {
                    self.shared
                        .models_patched
                        .store(self.models_patched.len(), Ordering::Relaxed);
                }
                Some((StatusCode::OK, serde_json::to_vec(&m).expect("serialises")))
            }
            (&Method::PATCH, Some(_), None) if t.plural == "events" => {
                // The Recorder's merge patch of a repeated Event (its series).
                Some((StatusCode::OK, body.to_vec()))
            }
            (&Method::PATCH, Some(name), None)
                if content_type == "application/apply-patch+yaml" && !ns.is_empty() =>
            {
                let object: Value = serde_json::from_slice(body).expect("JSON apply");
                let (created, json) = self.store(&t, &ns, name, object);
                let code = if created {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                };
                Some((code, json))
            }
            (&Method::POST, None, None) if t.plural == "events" => {
                self.shared
                    .event_bytes
                    .fetch_add(body.len(), Ordering::Relaxed);
                Some((StatusCode::CREATED, body.to_vec()))
            }
            (&Method::POST, None, None) if !ns.is_empty() => {
                let object: Value = serde_json::from_slice(body).expect("JSON create");
                let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
                    return self.not_understood(method, path, query, "create without a name");
                };
                let key = (t.resource.clone(), ns.clone());
                if self
                    .objects
                    .get(&key)
                    .is_some_and(|m| m.contains_key(&name))
                {
                    let message = format!("{} \"{name}\" already exists", t.plural);
                    return Some((
                        StatusCode::CONFLICT,
                        status_body(409, "AlreadyExists", &message),
                    ));
                }
                let (_, json) = self.store(&t, &ns, &name, object);
                Some((StatusCode::CREATED, json))
            }
            (&Method::DELETE, Some(name), None) => {
                let removed = self
                    .objects
                    .get_mut(&(t.resource.clone(), ns))
                    .and_then(|m| m.remove(name));
                match removed {
                    Some(s) => {
                        self.shared.stored_objects.fetch_sub(1, Ordering::Relaxed);
                        self.shared
                            .stored_bytes
                            .fetch_sub(s.json.len(), Ordering::Relaxed);
                        Some((StatusCode::OK, status_body(200, "", "deleted")))
                    }
                    None => Some(self.not_found(&t, name)),
                }
            }
            _ => self.not_understood(method, path, query, "method"),
        }
    }

    fn not_found(&self, t: &Target, name: &str) -> (StatusCode, Vec<u8>) {
        let message = format!("{} \"{name}\" not found", t.plural);
        (
            StatusCode::NOT_FOUND,
            status_body(404, "NotFound", &message),
        )
    }

    fn get(&self, t: &Target, ns: &str, name: &str) -> (StatusCode, Vec<u8>) {
        match self
            .objects
            .get(&(t.resource.clone(), ns.to_owned()))
            .and_then(|m| m.get(name))
        {
            Some(s) => (StatusCode::OK, s.json.clone()),
            None => self.not_found(t, name),
        }
    }

    /// The stored objects of `t`'s kind (in its namespace, or all) that match `terms`.
    fn list(&self, t: &Target, terms: &[Term]) -> Vec<u8> {
        let mut out = format!(
            r#"{{"apiVersion":"v1","kind":"List","metadata":{{"resourceVersion":"{}"}},"items":["#,
            self.resource_version + MODELS as u64 + 1
        )
        .into_bytes();
        let mut first = true;
        for ((resource, ns), objects) in &self.objects {
            if *resource != t.resource || t.namespace.as_ref().is_some_and(|n| n != ns) {
                continue;
            }
            for stored in objects.values().filter(|s| matches(terms, &s.labels)) {
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(&stored.json);
            }
        }
        out.extend_from_slice(b"]}");
        out
    }

    /// Stores `object` (an apply replaces what was there) with server-set metadata; returns
    /// whether it was new and the object as served.
    fn store(&mut self, t: &Target, ns: &str, name: &str, mut object: Value) -> (bool, Vec<u8>) {
        self.resource_version += 1;
        let key = (t.resource.clone(), ns.to_owned());
        let objects = self.objects.entry(key).or_default();
        let previous = objects.get(name);
        let uid = match previous {
            Some(p) => {
                serde_json::from_slice::<Value>(&p.json).expect("stored JSON")["metadata"]["uid"]
                    .clone()
            }
            None => json!(format!(
                "10000000-0000-4000-8000-{:012}",
                self.resource_version
            )),
        };
        let meta = object["metadata"].as_object_mut().expect("metadata");
        meta.insert("name".into(), json!(name));
        meta.insert("namespace".into(), json!(ns));
        meta.insert("uid".into(), uid);
        meta.insert(
            "resourceVersion".into(),
            json!((MODELS as u64 + 1 + self.resource_version).to_string()),
        );
        meta.insert("creationTimestamp".into(), json!(CREATED));
        meta.insert("generation".into(), json!(1));
        let labels = meta
            .get("labels")
            .and_then(Value::as_object)
            .map(|l| {
                l.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        let json = serde_json::to_vec(&object).expect("serialises");
        let served = json.clone();
        let created = previous.is_none();
        let old = objects.insert(name.to_owned(), Stored { labels, json });
        match old {
            Some(o) => {
                self.shared
                    .stored_bytes
                    .fetch_sub(o.json.len(), Ordering::Relaxed);
            }
            None => {
                self.shared.stored_objects.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.shared
            .stored_bytes
            .fetch_add(served.len(), Ordering::Relaxed);
        (created, served)
    }

    async fn serve(mut self, mut handle: Handle) {
        let mut open_watches = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            self.shared.requests.fetch_add(1, Ordering::Relaxed);
            self.shared
                .last_request_ms
                .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
            let method = request.method().clone();
            let path = request.uri().path().to_owned();
            let query = request.uri().query().unwrap_or_default().to_owned();
            let content_type = request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = request
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            match self.handle(&method, &path, &query, &content_type, &body) {
                // Kept, never answered: the watch stays open with no events.
                None => open_watches.push(send),
                Some((status, body)) => send.send_response(
                    Response::builder()
                        .status(status)
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(Body::from(body))
                        .expect("response"),
                ),
            }
        }
    }
}

// === scenarios (child processes) ===

/// A row: label, VmRSS kB, VmHWM kB.
fn emit_row(label: &str) -> u64 {
    let (rss, hwm) = rss_kb();
    println!("ROW\t{label}\t{rss}\t{hwm}");
    rss
}

fn emit_stat(key: &str, value: impl std::fmt::Display) {
    println!("STAT\t{key}\t{value}");
}

async fn scenario_noop(example: &Value) {
    let empty = list_body(example, 0);
    let full = list_body(example, MODELS);
    emit_stat("peak_resets", reset_peak());
    emit_row("baseline: runtime + fixture, no controller");
    let idle = start_noop(empty);
    settle(&idle, 0).await;
    emit_row("controller watching, 0 models");
    let loaded = start_noop(full);
    settle(&loaded, MODELS).await;
    emit_row("controller watching, 1,000 models (each reconciled once)");
}

/// Sum of the reconcile failures in the operator's registry.
fn failures(registry: &Registry) -> u64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).expect("encodes");
    text.lines()
        .filter(|l| l.starts_with("sluice_operator_reconcile_failures_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Waits until `done()` and then for the fake to be idle for a moment (the last reconciles'
/// Events), at most `limit` in all.
async fn wait_until(shared: &Shared, epoch: Instant, limit: Duration, done: impl Fn() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle_since = Instant::now();
    loop {
        let last = Duration::from_millis(shared.last_request_ms.load(Ordering::Relaxed));
        if epoch.elapsed().saturating_sub(last) >= Duration::from_millis(300)
            || idle_since.elapsed() > Duration::from_secs(2)
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn scenario_real(example: Value, concurrency: u16) {
    let models_list = list_body(&example, MODELS);
    emit_stat("peak_resets", reset_peak());
    emit_row("baseline: runtime + fixture, no controller");

    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let shared = Arc::new(Shared::default());
    let epoch = Instant::now();
    let fake = Fake {
        example,
        models_list,
        objects: HashMap::new(),
        resource_version: 0,
        models_patched: HashSet::new(),
        shared: shared.clone(),
        epoch,
    };
    tokio::spawn(fake.serve(handle));

    let client = Client::new(service, "default");
    let mut registry = Registry::default();
    let metrics = Metrics::default().register(&mut registry);
    let reporter = Reporter {
        controller: FIELD_MANAGER.to_owned(),
        instance: Some("bench".to_owned()),
    };
    let source = Arc::new(CountingSource {
        inner: HttpMetricsSource::new(),
        scrapes: AtomicUsize::new(0),
    });
    let ctx = Arc::new(
        Context::new(client, settings(), metrics.clone(), reporter)
            .with_reconcile_concurrency(concurrency)
            .with_metrics_source(source.clone()),
    );
    let started = Instant::now();
    tokio::spawn(sluice_operator::controller::run(
        ctx,
        std::future::pending::<()>(),
    ));

    wait_until(&shared, epoch, Duration::from_secs(300), || {
        shared.models_patched.load(Ordering::Relaxed) >= MODELS
    })
    .await;
    emit_stat(
        "round1_s",
        format!("{:.1}", started.elapsed().as_secs_f64()),
    );
    emit_stat("round1_reconciles", metrics.reconciles.get());
    emit_stat("round1_requests", shared.requests.load(Ordering::Relaxed));
    emit_row("real reconcile: all 1,000 reconciled once");
    emit_stat(
        "stored_objects",
        shared.stored_objects.load(Ordering::Relaxed),
    );
    emit_stat(
        "stored_kb",
        shared.stored_bytes.load(Ordering::Relaxed) / 1024,
    );

    // Each model requeues itself (15 s: not ready, no pods) and reconciles again, now listing
    // the objects it applied.
    wait_until(&shared, epoch, Duration::from_secs(300), || {
        shared.status_patches.load(Ordering::Relaxed) >= 2 * MODELS
    })
    .await;
    emit_row("second round (requeued; lists return what was applied)");
    emit_stat("reconciles", metrics.reconciles.get());
    emit_stat("applies", metrics.applies.get());
    emit_stat("failures", failures(&registry));
    emit_stat("requests", shared.requests.load(Ordering::Relaxed));
    emit_stat("scrapes", source.scrapes.load(Ordering::Relaxed));
    emit_stat(
        "event_kb",
        shared.event_bytes.load(Ordering::Relaxed) / 1024,
    );
    emit_stat(
        "not_understood",
        shared.not_understood.load(Ordering::Relaxed),
    );
    let counts = shared.counts.lock().unwrap();
    let counts: Vec<String> = counts.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    emit_stat("counts", counts.join(", "));
}

// === the report (parent) ===

#[derive(Default)]
struct Report {
    rows: Vec<(String, u64, u64)>,
    stats: BTreeMap<String, String>,
}

impl Report {
    fn stat(&self, key: &str) -> &str {
        self.stats.get(key).map(String::as_str).unwrap_or("?")
    }
    fn row(&self, prefix: &str) -> (u64, u64) {
        self.rows
            .iter()
            .find(|(l, _, _)| l.starts_with(prefix))
            .map(|(_, rss, hwm)| (*rss, *hwm))
            .unwrap_or_default()
    }
    fn peak(&self) -> u64 {
        self.rows.iter().map(|r| r.2).max().unwrap_or(0)
    }
}

fn run_child(args: &[&str]) -> Report {
    let exe = std::env::current_exe().expect("this binary");
    let output = Command::new(exe)
        .arg("--scenario")
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("child runs");
    assert!(
        output.status.success(),
        "scenario {args:?} failed: {}",
        output.status
    );
    let mut report = Report::default();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        match fields.as_slice() {
            ["ROW", label, rss, hwm] => report.rows.push((
                (*label).to_owned(),
                rss.parse().unwrap_or(0),
                hwm.parse().unwrap_or(0),
            )),
            ["STAT", key, value] => {
                report.stats.insert((*key).to_owned(), (*value).to_owned());
            }
            _ => println!("{line}"),
        }
    }
    report
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let example: Value = serde_yaml::from_str(EXAMPLE).expect("valid example");
    if let Some(i) = args.iter().position(|a| a == "--scenario") {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        match args.get(i + 1).map(String::as_str) {
            Some("noop") => runtime.block_on(scenario_noop(&example)),
            Some("real") => {
                let n = args[i + 2].parse().expect("concurrency");
                runtime.block_on(scenario_real(example, n));
            }
            other => panic!("unknown scenario {other:?}"),
        }
        // Open watches and the controllers' tasks are left to the exit.
        std::process::exit(0);
    }

    let fixture_kb = list_body(&example, MODELS).len() / 1024;
    let noop = run_child(&["noop"]);
    let default = DEFAULT_RECONCILE_CONCURRENCY.to_string();
    let real: Vec<(String, Report)> = [default.as_str(), "0"]
        .into_iter()
        .map(|n| {
            let label = match n {
                "0" => "unbounded (0)".to_owned(),
                n => format!("{n} (default)"),
            };
            (label, run_child(&["real", n]))
        })
        .collect();

    println!(
        "operator memory, {MODELS} InferenceModels (examples/inferencemodel-canary.yaml, 2 variants; LIST body {fixture_kb} KiB); one process per scenario, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<66} {:>9} {:>9}",
        "scenario / phase", "VmRSS MB", "VmHWM MB"
    );
    println!("empty reconcile: no-op Controller over InferenceModels only");
    for (label, rss, hwm) in &noop.rows {
        println!("  {label:<64} {:>9.1} {:>9.1}", mb(*rss), mb(*hwm));
    }
    for (label, r) in &real {
        println!(
            "real controller::run (owned watches, policy controller), reconcile concurrency {label}"
        );
        for (row, rss, hwm) in &r.rows {
            println!("  {row:<64} {:>9.1} {:>9.1}", mb(*rss), mb(*hwm));
        }
        println!(
            "  round 1: {} s, {} reconciles, {} requests; fake API server holds {} objects, {:.1} MB of JSON (in this RSS)",
            r.stat("round1_s"),
            r.stat("round1_reconciles"),
            r.stat("round1_requests"),
            r.stat("stored_objects"),
            r.stat("stored_kb").parse::<f64>().unwrap_or(0.0) / 1024.0,
        );
        println!(
            "  both rounds: {} reconciles, {} failed, {} applies, {} requests, {} not understood by the fake, {} canary scrapes (no pods), {} KiB of Events created (the Recorder caches them)",
            r.stat("reconciles"),
            r.stat("failures"),
            r.stat("applies"),
            r.stat("requests"),
            r.stat("not_understood"),
            r.stat("scrapes"),
            r.stat("event_kb"),
        );
        println!("  requests: {}", r.stat("counts"));
    }
    let (empty_rss, _) = noop.row("controller watching, 1,000");
    let (empty_base, _) = noop.row("baseline");
    for (label, r) in &real {
        let (base, _) = r.row("baseline");
        let (once, _) = r.row("real reconcile");
        let peak = r.peak();
        let store_mb = r.stat("stored_kb").parse::<f64>().unwrap_or(0.0) / 1024.0;
        println!(
            "concurrency {label}: reconciled once {:.1} MB ({:+.1} MB over baseline; {:.2}x / {:+.1} MB vs empty reconcile's {:.1} MB, which is {:+.1} over its baseline); peak {:.1} MB ({:.1} MB less the fake's store); target ≤ {TARGET_MB:.0} MB: {}{}",
            mb(once),
            mb(once) - mb(base),
            once as f64 / empty_rss.max(1) as f64,
            mb(once) - mb(empty_rss),
            mb(empty_rss),
            mb(empty_rss) - mb(empty_base),
            mb(peak),
            mb(peak) - store_mb,
            if mb(peak) <= TARGET_MB {
                "met"
            } else {
                "MISSED"
            },
            if r.stat("peak_resets") == "true" {
                ""
            } else {
                " (process-lifetime peak: clear_refs refused)"
            },
        );
    }
}

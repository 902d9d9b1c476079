//! Every series the chart's Grafana dashboard (`charts/sluice/dashboards/*.json`) and alerts
//! (`charts/sluice/templates/prometheusrule.yaml`) query is one the sidecar or its activator
//! exports: the real binaries, driven until each kind of series exists (answers, a 429 of a
//! rule, a stream, forwards to a variant that is down until its breaker opens, a request held
//! by an activator), then scraped. The operator's series (`sluice_operator_*`) are checked
//! against its registry in `operator/src/metrics.rs`.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::{Sidecar, TempDir, free_port, get, post_as};
use http::StatusCode;
use http_body_util::BodyExt;
use serde_json::json;

fn chart() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sluice")
}

/// The metric names a PromQL expression selects: its identifiers, less label matchers (inside
/// `{...}`), grouping labels (`by (...)` and the like), strings and functions, that start with
/// `sluice_`.
fn queried_metrics(expr: &str) -> BTreeSet<String> {
    let mut kept = String::new();
    let mut braces = 0;
    let mut in_string = false;
    for c in expr.chars() {
        match c {
            '"' => in_string = !in_string,
            _ if in_string => {}
            '{' => braces += 1,
            '}' => braces -= 1,
            _ if braces > 0 => {}
            _ => kept.push(c),
        }
    }
    let mut names = BTreeSet::new();
    // Grouping clauses name labels: drop what their parentheses hold.
    let mut text = kept;
    for clause in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        while let Some(at) = find_clause(&text, clause) {
            let open = at + text[at..].find('(').unwrap_or(0);
            let close = open + text[open..].find(')').unwrap_or(0);
            text.replace_range(at..=close, " ");
        }
    }
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("sluice_") {
            names.insert(word.to_owned());
        }
    }
    names
}

/// Where `clause` (a keyword followed by a parenthesised label list) starts in `text`.
fn find_clause(text: &str, clause: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(i) = text[from..].find(clause).map(|i| i + from) {
        let before = i.checked_sub(1).map(|j| bytes[j]);
        let after = text[i + clause.len()..].trim_start();
        let word_start = before.is_none_or(|b| !(b.is_ascii_alphanumeric() || b == b'_'));
        if word_start && after.starts_with('(') {
            return Some(i);
        }
        from = i + clause.len();
    }
    None
}

/// Every expression of the dashboards and the alert rules.
fn queries() -> Vec<String> {
    let mut exprs = Vec::new();
    for entry in std::fs::read_dir(chart().join("dashboards")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
        for panel in dashboard["panels"].as_array().unwrap() {
            for target in panel["targets"].as_array().unwrap() {
                exprs.push(target["expr"].as_str().unwrap().to_owned());
            }
        }
        // Grafana's `label_values(selector, label)`: the selector is PromQL, the label is not.
        for variable in dashboard["templating"]["list"].as_array().unwrap() {
            if let Some(q) = variable["query"]["query"].as_str() {
                let inner = q.strip_prefix("label_values(").unwrap_or(q);
                let selector = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
                exprs.push(selector.to_owned());
            }
        }
    }
    // The rules' `expr: |` blocks, read from the template (their Helm values inlined as text).
    let template = std::fs::read_to_string(chart().join("templates/prometheusrule.yaml")).unwrap();
    let mut lines = template.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() != "expr: |" {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut expr = String::new();
        while let Some(next) = lines.next_if(|l| l.len() - l.trim_start().len() > indent) {
            expr.push_str(next);
            expr.push('\n');
        }
        exprs.push(expr);
    }
    assert!(exprs.len() > 10, "{exprs:?}");
    exprs
}

/// The series names of a Prometheus text exposition.
fn exposed(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// `sluice-sidecar activate` in front of `upstream`, with a kubeconfig that reaches no API
/// server (its scale-ups fail; a request is still held and sent on).
fn spawn_activator(scratch: &TempDir, upstream: &str, api: u16, admin: u16) -> Child {
    let kubeconfig = scratch.write(
        "kubeconfig",
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"http://127.0.0.1:9\"}}]\nusers: [{name: u, user: {}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n",
    );
    Command::new(env!("CARGO_BIN_EXE_sluice-sidecar"))
        .args(["activate", "--namespace", "models", "--wake", "chat-a"])
        .args(["--upstream", upstream])
        .args(["--listen", &format!("127.0.0.1:{api}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
        .env("KUBECONFIG", kubeconfig)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_dashboards_and_alerts_query_is_exported() {
    let scratch = TempDir::new("dashboards");
    let token = scratch.write("token", "dashboards-forwarding-token-0123456789");
    let keys = scratch.write(
        "keys.yaml",
        "- key: k1\n  tenant: t1\n- key: k2\n  tenant: t2\n",
    );
    let (api, ghost) = (free_port(), free_port());
    // A second variant nobody serves (its forwards fail, then its breaker opens), and a rule
    // that refuses a key's second request.
    let config = scratch.write(
        "config.yaml",
        &format!(
            "version: v1alpha1\nmodel: smollm2\nvariants:\n  - {{name: a, weight: 50, address: \"http://127.0.0.1:{api}\"}}\n  - {{name: ghost, weight: 50, address: \"http://127.0.0.1:{ghost}\"}}\nidentity:\n  keysFile: {}\nrules:\n  - name: t/one-per-minute\n    per: Key\n    match: {{tenants: [t1]}}\n    requestsPerMinute: 1\n",
            keys.display()
        ),
    );
    let config = config.to_str().unwrap().to_owned();
    let token = token.to_str().unwrap().to_owned();
    let mut sidecar = Sidecar::spawn_at(
        api,
        free_port(),
        &[
            "--variant",
            "a",
            "--config",
            &config,
            "--forward-token-file",
            &token,
        ],
    );
    sidecar.wait_ready().await;
    let chat = |stream: bool| {
        json!({
            "model": "smollm2",
            "messages": [{"role": "user", "content": "Name a colour."}],
            "max_tokens": 4,
            "stream": stream,
        })
    };
    let url = format!("{}/v1/chat/completions", sidecar.api);
    let send = |key: &'static str, body: serde_json::Value| {
        let url = url.clone();
        async move {
            let res = post_as(&url, Some(key), &[], &body).await;
            let status = res.status();
            // Read to its end: a stream's timings are recorded when it ends.
            let _ = res.into_body().collect().await;
            status
        }
    };
    // Answers (half of them tried on ghost first, until its breaker opens), a stream, a 400.
    for _ in 0..12 {
        assert_eq!(send("k2", chat(false)).await, StatusCode::OK);
    }
    assert_eq!(send("k2", chat(true)).await, StatusCode::OK);
    assert_eq!(
        send("k2", json!({"model": "smollm2"})).await,
        StatusCode::BAD_REQUEST
    );
    // The rule refuses k1's second request.
    let first = send("k1", chat(false)).await;
    let second = send("k1", chat(false)).await;
    assert_eq!(
        (first, second),
        (StatusCode::OK, StatusCode::TOO_MANY_REQUESTS)
    );
    let (_, sidecar_metrics) = get(&format!("{}/metrics", sidecar.admin)).await.unwrap();

    // An activator holds one request and sends it on to the sidecar.
    let (activator_api, activator_admin) = (free_port(), free_port());
    let mut activator = spawn_activator(&scratch, &sidecar.api, activator_api, activator_admin);
    let held = format!("http://127.0.0.1:{activator_api}/v1/chat/completions");
    let mut answered = None;
    for _ in 0..100 {
        if get(&format!("http://127.0.0.1:{activator_admin}/readyz"))
            .await
            .is_ok()
        {
            let res = post_as(&held, Some("k2"), &[], &chat(false)).await;
            answered = Some(res.status());
            let _ = res.into_body().collect().await;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        answered,
        Some(StatusCode::OK),
        "the activator sent the request on"
    );
    let (_, activator_metrics) = get(&format!("http://127.0.0.1:{activator_admin}/metrics"))
        .await
        .unwrap();
    let _ = activator.kill();
    let _ = activator.wait();

    let exported: BTreeSet<String> = exposed(&sidecar_metrics)
        .into_iter()
        .chain(exposed(&activator_metrics))
        .collect();
    let mut missing = Vec::new();
    for expr in queries() {
        for name in queried_metrics(&expr) {
            if !name.starts_with("sluice_operator_") && !exported.contains(&name) {
                missing.push((name, expr.clone()));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "queried but not exported: {missing:#?}\nexported: {exported:#?}"
    );
}

#[test]
fn the_query_reader_finds_metrics_not_labels() {
    let names = queried_metrics(
        r#"sum by (namespace, sluice_dev_model) (rate(sluice_requests_total{status=~"5..", sluice_dev_model="x"}[5m])) / ignoring(rule) group_left sum(sluice_queue_depth) > 1"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["sluice_queue_depth", "sluice_requests_total"]
    );
}

//! Reading the sidecars' admin `/metrics` (Prometheus text format) into samples. The scrape
//! is behind [`MetricsSource`] so tests use a fake; it returns every sample, and each reader
//! picks its series (canary analysis, policy convergence, the breakers in [`breakers`]) by the
//! names in [`sluice_crds::contract`]. A model's pods are scraped once per reconcile
//! ([`scrape_variants`]) and every reader of that reconcile reads the same samples.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use sluice_crds::contract::{CONFIG_GENERATION_SERIES, FORWARD_BREAKER_OPEN_SERIES, LABEL_VARIANT};
use tracing::warn;

use crate::names::{self, ADMIN_PORT};
use crate::observe::Breakers;

/// How long one pod's scrape may take.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest `/metrics` body read (a sidecar's is a few KiB).
const MAX_BODY: usize = 4 << 20;

/// One sample of the text exposition format.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name (with `_total`, `_bucket`... suffixes as exposed).
    pub name: String,
    /// Label pairs.
    pub labels: BTreeMap<String, String>,
    /// The value (`NaN` and `±Inf` included).
    pub value: f64,
}

/// A pod to scrape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEndpoint {
    /// The pod's name.
    pub name: String,
    /// Base URL of its admin server, e.g. `http://10.0.0.7:9090`.
    pub admin_url: String,
}

/// One pod of a model, scraped: its variant, where it was scraped and what it exports.
#[derive(Clone, Debug, PartialEq)]
pub struct Scraped {
    /// The pod's variant.
    pub variant: String,
    /// The pod.
    pub pod: PodEndpoint,
    /// Its samples, or why they could not be read.
    pub samples: Result<Vec<Sample>, ScrapeError>,
}

/// Why a pod's metrics could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScrapeError {
    /// Connecting or reading failed.
    #[error("cannot read metrics: {0}")]
    Http(String),
    /// The endpoint answered with an error status.
    #[error("metrics endpoint answered {0}")]
    Status(u16),
    /// No answer within [`SCRAPE_TIMEOUT`].
    #[error("metrics scrape timed out")]
    Timeout,
    /// A line is not in the text format.
    #[error("metrics line {line}: {message}")]
    Parse {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// The sidecar does not export the gauge (or not as a non-negative integer).
    #[error("no usable {CONFIG_GENERATION_SERIES} sample")]
    NoGeneration,
}

/// Reads the samples a pod exports. Object-safe so the controller can hold any source.
pub trait MetricsSource: Send + Sync {
    /// Scrapes `pod`'s `/metrics`.
    fn scrape<'a>(
        &'a self,
        pod: &'a PodEndpoint,
    ) -> BoxFuture<'a, Result<Vec<Sample>, ScrapeError>>;
}

/// Scrapes over plain HTTP (the admin port is cluster-internal), with a timeout per pod.
#[derive(Clone, Debug)]
pub struct HttpMetricsSource {
    client: Client<HttpConnector, Empty<Bytes>>,
    timeout: Duration,
}

// === impl HttpMetricsSource ===

impl HttpMetricsSource {
    /// A source with [`SCRAPE_TIMEOUT`].
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(SCRAPE_TIMEOUT));
        Self {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout: SCRAPE_TIMEOUT,
        }
    }

    async fn fetch(&self, url: &str) -> Result<String, ScrapeError> {
        let uri: http::Uri = url.parse().map_err(|e| ScrapeError::Http(format!("{e}")))?;
        let response = self
            .client
            .get(uri)
            .await
            .map_err(|e| ScrapeError::Http(e.to_string()))?;
        if !response.status().is_success() {
            return Err(ScrapeError::Status(response.status().as_u16()));
        }
        let body = http_body_util::Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| ScrapeError::Http(e.to_string()))?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|e| ScrapeError::Http(e.to_string()))
    }
}

impl Default for HttpMetricsSource {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsSource for HttpMetricsSource {
    fn scrape<'a>(
        &'a self,
        pod: &'a PodEndpoint,
    ) -> BoxFuture<'a, Result<Vec<Sample>, ScrapeError>> {
        Box::pin(async move {
            let url = format!("{}/metrics", pod.admin_url);
            let text = tokio::time::timeout(self.timeout, self.fetch(&url))
                .await
                .map_err(|_| ScrapeError::Timeout)??;
            parse_prometheus_text(&text)
        })
    }
}

/// The pods worth scraping: running, not being deleted, with an IP. Sorted by name.
pub fn pod_endpoints(pods: &[Pod]) -> Vec<PodEndpoint> {
    let mut out: Vec<PodEndpoint> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            if status.phase.as_deref() != Some("Running") {
                return None;
            }
            let ip = status.pod_ip.as_deref()?;
            let host = if ip.contains(':') {
                format!("[{ip}]")
            } else {
                ip.to_owned()
            };
            Some(PodEndpoint {
                name: p.name_any(),
                admin_url: format!("http://{host}:{ADMIN_PORT}"),
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Scrapes every running pod of each of `variants` at once (see [`pod_endpoints`]), in the
/// order of `variants` then of pod names. A pod that cannot be read is logged and kept with its
/// error: each reader skips it.
pub async fn scrape_variants<'a>(
    source: &dyn MetricsSource,
    variants: impl IntoIterator<Item = &'a str>,
    pods: &[Pod],
) -> Vec<Scraped> {
    let mut targets: Vec<(String, PodEndpoint)> = Vec::new();
    for variant in variants {
        let of_variant: Vec<Pod> = pods
            .iter()
            .filter(|p| p.labels().get(names::LABEL_VARIANT).map(String::as_str) == Some(variant))
            .cloned()
            .collect();
        for ep in pod_endpoints(&of_variant) {
            targets.push((variant.to_owned(), ep));
        }
    }
    let results = futures::future::join_all(targets.iter().map(|(_, ep)| source.scrape(ep))).await;
    targets
        .into_iter()
        .zip(results)
        .map(|((variant, pod), samples)| {
            if let Err(error) = &samples {
                warn!(%error, %variant, pod = %pod.name, "cannot read sidecar metrics");
            }
            Scraped {
                variant,
                pod,
                samples,
            }
        })
        .collect()
}

/// The breakers the scraped pods hold open: a pod holds the breaker of each variant for which
/// it exports [`FORWARD_BREAKER_OPEN_SERIES`] above 0.
pub fn breakers(scraped: &[Scraped]) -> Breakers {
    let mut out = Breakers::default();
    for s in scraped {
        let Ok(samples) = &s.samples else { continue };
        let open = samples
            .iter()
            .filter(|x| x.name == FORWARD_BREAKER_OPEN_SERIES && x.value > 0.0)
            .filter_map(|x| x.labels.get(LABEL_VARIANT).map(String::as_str));
        out.record(&s.variant, open);
    }
    out
}

/// Parses the Prometheus text exposition format (and OpenMetrics text, which
/// `prometheus_client` writes): comments and `# EOF` are skipped; every other non-empty line
/// is `name{label="value",...} value [timestamp]`.
pub fn parse_prometheus_text(text: &str) -> Result<Vec<Sample>, ScrapeError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let sample = parse_line(line).map_err(|message| ScrapeError::Parse {
            line: i + 1,
            message,
        })?;
        out.push(sample);
    }
    Ok(out)
}

fn parse_line(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        || name.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = parse_value(value).ok_or_else(|| format!("bad value {value:?}"))?;
    // An optional timestamp; anything after it is an error (or an OpenMetrics exemplar).
    let mut next = fields.next();
    if next.is_some_and(|ts| ts.parse::<f64>().is_ok()) {
        next = fields.next();
    }
    match next {
        None | Some("#") => {}
        Some(other) => return Err(format!("unexpected {other:?} after the value")),
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `a="x",b="y"}` into `labels`; returns what follows the `}`.
fn parse_labels<'a>(
    mut s: &'a str,
    labels: &mut BTreeMap<String, String>,
) -> Result<&'a str, String> {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let eq = s.find('=').ok_or("label without '='")?;
        let key = s[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {key:?}"));
        }
        s = s[eq + 1..].trim_start();
        s = s.strip_prefix('"').ok_or("label value must be quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err("unterminated label value".to_owned()),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    Some((_, c)) => {
                        value.push('\\');
                        value.push(c);
                    }
                    None => return Err("unterminated label value".to_owned()),
                },
                Some((_, c)) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        s = s[end + 1..].trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err("expected ',' or '}' after a label".to_owned());
        }
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_lines_name_the_line() {
        for (text, line) in [
            ("ok 1\nbad{le=\"1\" 2\n", 2),
            ("1bad 1\n", 1),
            ("a{b=c} 1\n", 1),
            ("a 1 2 3\n", 1),
            ("# c\n\na\n", 3),
            ("a x\n", 1),
        ] {
            match parse_prometheus_text(text) {
                Err(ScrapeError::Parse { line: l, .. }) => assert_eq!(l, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_pod_holds_the_breakers_it_exports_open() {
        let scraped = |variant: &str, pod: &str, text: Option<&str>| Scraped {
            variant: variant.to_owned(),
            pod: PodEndpoint {
                name: pod.to_owned(),
                admin_url: String::new(),
            },
            samples: text
                .map(|t| parse_prometheus_text(t).expect("parses"))
                .ok_or(ScrapeError::Timeout),
        };
        let b = breakers(&[
            scraped(
                "stable",
                "stable-0",
                Some(
                    "sluice_forward_breaker_open{variant=\"canary\"} 1\n\
                     sluice_forward_breaker_open{variant=\"beta\"} 0\n\
                     sluice_forward_breaker_opened_total{variant=\"beta\"} 4\n",
                ),
            ),
            scraped("stable", "stable-1", Some("sluice_requests_in_flight 0\n")),
            scraped(
                "beta",
                "beta-0",
                Some("sluice_forward_breaker_open{variant=\"canary\"} 1\n"),
            ),
            // Unreadable: counts nowhere, neither as open nor among the pods forwarding.
            scraped("stable", "stable-2", None),
            scraped("canary", "canary-0", Some("")),
        ]);
        assert_eq!((b.open("canary"), b.forwarding_to("canary")), (2, 3));
        assert_eq!((b.open("beta"), b.forwarding_to("beta")), (0, 3));
        assert_eq!((b.open("stable"), b.forwarding_to("stable")), (0, 2));
    }

    #[test]
    fn only_running_pods_with_an_ip_are_scraped() {
        let pod = |name: &str, phase: &str, ip: Option<&str>, deleting: bool| -> Pod {
            let mut v = serde_json::json!({
                "metadata": {"name": name},
                "status": {"phase": phase},
            });
            if let Some(ip) = ip {
                v["status"]["podIP"] = ip.into();
            }
            if deleting {
                v["metadata"]["deletionTimestamp"] = "2024-01-01T00:00:00Z".into();
            }
            serde_json::from_value(v).expect("pod")
        };
        let pods = [
            pod("b", "Running", Some("10.0.0.2"), false),
            pod("a", "Running", Some("fd00::1"), false),
            pod("c", "Pending", None, false),
            pod("d", "Running", Some("10.0.0.4"), true),
            pod("e", "Running", None, false),
        ];
        assert_eq!(
            pod_endpoints(&pods),
            [
                PodEndpoint {
                    name: "a".into(),
                    admin_url: "http://[fd00::1]:9090".into()
                },
                PodEndpoint {
                    name: "b".into(),
                    admin_url: "http://10.0.0.2:9090".into()
                },
            ]
        );
    }
}

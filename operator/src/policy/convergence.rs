//! Reading what the sidecars enforce: each pod's admin `/metrics` (Prometheus text format),
//! parsed into samples, and the `sluice_config_generation` gauge among them. The scrape is
//! behind [`MetricsSource`] so tests use a fake, and returns every sample so other readers
//! (canary analysis) can use the same endpoint.

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

use crate::resources::ADMIN_PORT;

/// The gauge each sidecar exports: the generation of the sidecar config it enforces.
pub const CONFIG_GENERATION_METRIC: &str = "sluice_config_generation";
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

/// What one pod enforces: its config generation, or why it is unknown.
#[derive(Clone, Debug, PartialEq)]
pub struct PodGeneration {
    /// The pod's name.
    pub pod: String,
    /// `sluice_config_generation`, or the scrape's failure.
    pub generation: Result<u64, ScrapeError>,
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
    #[error("no usable {CONFIG_GENERATION_METRIC} sample")]
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

/// Scrapes every pod at once and reads its config generation.
pub async fn pod_generations(
    source: &dyn MetricsSource,
    pods: &[PodEndpoint],
) -> Vec<PodGeneration> {
    futures::future::join_all(pods.iter().map(|pod| async move {
        PodGeneration {
            pod: pod.name.clone(),
            generation: source
                .scrape(pod)
                .await
                .and_then(|samples| config_generation(&samples)),
        }
    }))
    .await
}

/// The `sluice_config_generation` value among `samples` (a non-negative integer below 2^53).
pub fn config_generation(samples: &[Sample]) -> Result<u64, ScrapeError> {
    let value = samples
        .iter()
        .find(|s| s.name == CONFIG_GENERATION_METRIC)
        .map(|s| s.value)
        .ok_or(ScrapeError::NoGeneration)?;
    if value.is_finite() && value >= 0.0 && value.fract() == 0.0 && value < 9_007_199_254_740_992.0
    {
        // Exact: an integer below 2^53.
        Ok(value as u64)
    } else {
        Err(ScrapeError::NoGeneration)
    }
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

    const SIDECAR: &str = "# HELP sluice_config_generation The generation of the sidecar config in force.\n\
# TYPE sluice_config_generation gauge\n\
sluice_config_generation 181234567890123\n\
# TYPE sluice_ratelimit_refused counter\n\
sluice_ratelimit_refused_total{rule=\"free-tier/free-per-key\",kind=\"requests\"} 3\n\
sluice_ratelimit_refused_total{rule=\"odd \\\"quoted\\\" \\\\ name\\n\"} 1 1700000000000\n\
sluice_request_duration_seconds_bucket{le=\"+Inf\"} 7\n\
sluice_x{} NaN\n\
# EOF\n";

    #[test]
    fn parses_what_the_sidecar_exports() {
        let samples = parse_prometheus_text(SIDECAR).expect("parses");
        assert_eq!(samples.len(), 5);
        assert_eq!(config_generation(&samples), Ok(181_234_567_890_123));
        assert_eq!(samples[1].name, "sluice_ratelimit_refused_total");
        assert_eq!(samples[1].labels["rule"], "free-tier/free-per-key");
        assert_eq!(samples[1].labels["kind"], "requests");
        assert_eq!(samples[1].value, 3.0);
        assert_eq!(samples[2].labels["rule"], "odd \"quoted\" \\ name\n");
        assert_eq!(samples[3].labels["le"], "+Inf");
        assert!(samples[4].value.is_nan());
    }

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
    fn generation_must_be_a_usable_integer() {
        let g = |text: &str| config_generation(&parse_prometheus_text(text).expect("parses"));
        assert_eq!(g("sluice_config_generation 0\n"), Ok(0));
        assert_eq!(g("other 1\n"), Err(ScrapeError::NoGeneration));
        assert_eq!(
            g("sluice_config_generation 1.5\n"),
            Err(ScrapeError::NoGeneration)
        );
        assert_eq!(
            g("sluice_config_generation -1\n"),
            Err(ScrapeError::NoGeneration)
        );
        // Every sealed generation (< 2^48) survives the float64 gauge exactly.
        let max = (1u64 << 48) - 1;
        assert_eq!(
            g(&format!("sluice_config_generation {}\n", max as f64)),
            Ok(max)
        );
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

    #[tokio::test]
    async fn http_source_reads_a_real_endpoint_and_reports_failures() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            for status in ["200 OK", "503 Service Unavailable"] {
                let (mut conn, _) = listener.accept().await.expect("accepts");
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf).await;
                let body = "sluice_config_generation 42\n";
                let reply = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                conn.write_all(reply.as_bytes()).await.expect("writes");
            }
        });
        let source = HttpMetricsSource::new();
        let pod = PodEndpoint {
            name: "p".into(),
            admin_url: format!("http://{addr}"),
        };
        let got = pod_generations(&source, std::slice::from_ref(&pod)).await;
        assert_eq!(got[0].generation, Ok(42));
        let got = pod_generations(&source, std::slice::from_ref(&pod)).await;
        assert_eq!(got[0].generation, Err(ScrapeError::Status(503)));
    }
}

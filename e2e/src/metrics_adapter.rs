//! A STAND-IN for prometheus-adapter and the Prometheus behind it, so the cluster tests can
//! show that the HorizontalPodAutoscalers the operator renders get their metrics: an HTTPS
//! server in the test binary that serves enough of the custom metrics API
//! (`custom.metrics.k8s.io/v1beta2`) for the HPA controller, registered with the API server's
//! aggregation layer ([`MetricsAdapter::register`]: a Service without a selector, an
//! EndpointSlice at this server, an APIService) so the controller reads the metrics through
//! the API as it would in a cluster.
//!
//! What it serves comes from the chart's own rules file ([`RULES`],
//! `charts/sluice/prometheus-adapter-rules.yaml`, the values users give prometheus-adapter):
//! one metric per rule under `rules.custom`, named by the rule's `name.as`, reading the series
//! its `seriesQuery` names. A name no rule serves is 404, so an HPA that asks for a metric the
//! rules do not serve shows the error in its status: the end-to-end check that the rules and
//! the operator's metric names agree.
//!
//! `GET .../namespaces/{ns}/pods/{pod or *}/{metric}?labelSelector=...` lists the pods through
//! the API (the running ones with an IP), scrapes each one's `/metrics` on its container port
//! named `admin` at request time (the chart's PodMonitor scrapes that port), and answers a
//! `MetricValueList` with one item per pod that exposes the series.
//!
//! What it does not do, unlike the real pair:
//! - no PromQL: a pod's value is the largest sample of the series in its exposition right now,
//!   which is what the rules' `max by (<<.GroupBy>>) (<<.Series>>{...})` over one pod's series
//!   yields (both series are gauges each pod computes itself, so no `rate()` is involved);
//!   `metricsQuery`, `resources` and `name.matches` are not interpreted, and a rule without
//!   `name.as` is refused;
//! - no scrape interval, no staleness, no `windowSeconds`;
//! - `metricLabelSelector` is ignored (the operator's HPAs set no metric selector);
//! - no authentication of the API server: the aggregator's front-proxy client certificate and
//!   `X-Remote-*` headers (see scripts/cluster.sh) are not checked, and every caller may read;
//! - no aggregated discovery (`/apis` is 404; the aggregator then reads the legacy
//!   `/apis/custom.metrics.k8s.io/v1beta2` resource list), no OpenAPI, no `v1beta1`.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio_rustls::TlsAcceptor;

use crate::control_plane::ControlPlane;
use crate::{objects, wait};

/// The chart's prometheus-adapter rules, relative to the workspace.
pub const RULES: &str = "charts/sluice/prometheus-adapter-rules.yaml";
/// The API group and version served.
pub const GROUP: &str = "custom.metrics.k8s.io";
pub const VERSION: &str = "v1beta2";
/// The APIService that registers it.
pub const API_SERVICE: &str = "v1beta2.custom.metrics.k8s.io";
/// The selector-less Service (and its EndpointSlice) the APIService points at.
pub const SERVICE: &str = "custom-metrics-adapter";
/// The container port Prometheus scrapes, by name (the chart's PodMonitor: `port: admin`).
const SCRAPE_PORT: &str = "admin";
/// Who writes the registration objects.
const MANAGER: &str = "e2e-metrics-adapter";

/// One rule of the rules file: a metric name served, and the series it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `name.as`: the name HPAs ask for.
    pub name: String,
    /// The metric name of `seriesQuery` (before its `{`).
    pub series: String,
}

/// The `rules.custom` of a prometheus-adapter values file.
pub fn rules(yaml: &str) -> anyhow::Result<Vec<Rule>> {
    let values: Value = serde_yaml::from_str(yaml)?;
    let custom = values["rules"]["custom"]
        .as_array()
        .context("no rules.custom in the rules file")?;
    custom
        .iter()
        .map(|rule| {
            let query = rule["seriesQuery"]
                .as_str()
                .context("a rule without seriesQuery")?;
            let series = query.split('{').next().unwrap_or_default().trim();
            let name = rule["name"]["as"].as_str().with_context(|| {
                format!("the rule for {query} has no name.as (the stand-in needs one)")
            })?;
            anyhow::ensure!(!series.is_empty(), "seriesQuery {query:?} names no series");
            Ok(Rule {
                name: name.to_owned(),
                series: series.to_owned(),
            })
        })
        .collect()
}

/// The running stand-in; stops serving when dropped (its APIService then reports itself
/// unavailable, which only matters to this test binary's own control plane).
pub struct MetricsAdapter {
    address: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

struct State {
    rules: Vec<Rule>,
    /// Lists the pods (the test's cluster-admin client).
    client: Client,
}

impl MetricsAdapter {
    /// Serves the chart's rules ([`RULES`]) on the control plane's bridge address, where the
    /// API server can dial it, listing pods with `client`.
    pub async fn start(control_plane: &ControlPlane, client: Client) -> anyhow::Result<Self> {
        let path = crate::workspace().join(RULES);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let rules = rules(&text).with_context(|| format!("in {}", path.display()))?;
        // The bridge's host end (scripts/cluster.sh: API_HOST is the pod network's .0.1).
        let network = std::fs::read_to_string(control_plane.dir().join("network"))?;
        let (_, prefix) = network.split_once(' ').context("malformed network file")?;
        let host: Ipv4Addr = format!("{}.0.1", prefix.trim()).parse()?;
        let acceptor = TlsAcceptor::from(Arc::new(tls_config(&control_plane.dir().join("pki"))?));
        let listener = tokio::net::TcpListener::bind((host, 0)).await?;
        let address = listener.local_addr()?;
        let state = Arc::new(State { rules, client });
        let task = tokio::spawn({
            let state = state.clone();
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let (acceptor, state) = (acceptor.clone(), state.clone());
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let service = hyper::service::service_fn(move |request| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(state.handle(request).await) }
                        });
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    });
                }
            }
        });
        Ok(Self {
            address,
            state,
            task,
        })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The rules it serves.
    pub fn rules(&self) -> &[Rule] {
        &self.state.rules
    }

    /// Registers it with the aggregation layer and waits until the API server reports the
    /// APIService Available (it has then read the discovery document through the proxy): in
    /// `namespace`, a Service without a selector and an EndpointSlice at this server's address
    /// (the API server runs with `--enable-aggregator-routing`, so it dials the slice's
    /// address, not a ClusterIP nothing routes here); the APIService skips TLS verification
    /// (the certificate names the bridge address, not the Service).
    pub async fn register(&self, admin: &Client, namespace: &str) -> anyhow::Result<()> {
        let port = self.address.port();
        let service = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": SERVICE},
            "spec": {"ports": [{"name": "https", "port": 443, "targetPort": port, "protocol": "TCP"}]},
        });
        objects::apply(admin, namespace, &service, MANAGER, false).await?;
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": format!("{SERVICE}-host"),
                "labels": {
                    "kubernetes.io/service-name": SERVICE,
                    "endpointslice.kubernetes.io/managed-by": "e2e.sluice.dev",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [self.address.ip().to_string()], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        });
        objects::apply(admin, namespace, &slice, MANAGER, false).await?;
        let api_service = json!({
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": API_SERVICE},
            "spec": {
                "group": GROUP,
                "version": VERSION,
                "service": {"namespace": namespace, "name": SERVICE, "port": 443},
                "insecureSkipTLSVerify": true,
                "groupPriorityMinimum": 100,
                "versionPriority": 100,
            },
        });
        let api_services: Api<APIService> = Api::all(admin.clone());
        api_services
            .patch(
                API_SERVICE,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&api_service),
            )
            .await?;
        wait::until(
            "the custom metrics APIService Available",
            Duration::from_secs(120),
            || async {
                let status = api_services.get(API_SERVICE).await?.status;
                let available = status
                    .and_then(|s| s.conditions)
                    .into_iter()
                    .flatten()
                    .find(|c| c.type_ == "Available");
                match available {
                    Some(c) if c.status == "True" => Ok(Some(())),
                    Some(c) => bail!(
                        "Available {}: {}: {}",
                        c.status,
                        c.reason.unwrap_or_default(),
                        c.message.unwrap_or_default()
                    ),
                    None => Ok(None),
                }
            },
        )
        .await
    }
}

impl Drop for MetricsAdapter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// TLS with the serving certificate scripts/cluster.sh makes for aggregated API servers; h2
/// offered first, as the aggregator's proxy prefers it.
fn tls_config(pki: &Path) -> anyhow::Result<rustls::ServerConfig> {
    let certs = CertificateDer::pem_file_iter(pki.join("aggregated-apiserver.crt"))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(pki.join("aggregated-apiserver.key"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

impl State {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        if request.method() != Method::GET {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "only GET",
            );
        }
        let path = request.uri().path();
        let prefix = format!("/apis/{GROUP}/{VERSION}");
        let Some(rest) = path.strip_prefix(&prefix) else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("no {path} here"),
            );
        };
        // Segments come percent-encoded (`*` as `%2A`).
        let parts: Vec<String> = rest
            .split('/')
            .filter(|p| !p.is_empty())
            .map(|p| percent_decode(p, false))
            .collect();
        let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
        match parts.as_slice() {
            [] => self.discovery(),
            ["namespaces", namespace, "pods", pod, metric] => {
                let selector = query_param(request.uri().query().unwrap_or(""), "labelSelector");
                match self.pod_metric(namespace, pod, metric, &selector).await {
                    Ok(response) => response,
                    Err(e) => status(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "InternalError",
                        &format!("{e:#}"),
                    ),
                }
            }
            _ => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("only pods' metrics are served here, not {path}"),
            ),
        }
    }

    /// The APIResourceList: `pods/<metric>` for every served name.
    fn discovery(&self) -> Response<Full<Bytes>> {
        let resources: Vec<Value> = self
            .rules
            .iter()
            .map(|rule| {
                json!({
                    "name": format!("pods/{}", rule.name),
                    "singularName": "",
                    "namespaced": true,
                    "kind": "MetricValueList",
                    "verbs": ["get"],
                })
            })
            .collect();
        respond(
            StatusCode::OK,
            &json!({
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": format!("{GROUP}/{VERSION}"),
                "resources": resources,
            }),
        )
    }

    /// `metric` of pod `pod` (or `*`: every pod `selector` selects) in `namespace`.
    async fn pod_metric(
        &self,
        namespace: &str,
        pod: &str,
        metric: &str,
        selector: &str,
    ) -> anyhow::Result<Response<Full<Bytes>>> {
        let Some(rule) = self.rules.iter().find(|r| r.name == metric) else {
            return Ok(status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!(
                    "the server could not find the metric {metric} for pods (no rule serves it)"
                ),
            ));
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        let pods = if pod == "*" {
            let mut params = ListParams::default();
            if !selector.is_empty() {
                params = params.labels(selector);
            }
            api.list(&params).await?.items
        } else {
            api.get_opt(pod).await?.into_iter().collect()
        };
        let now = k8s_openapi::jiff::Timestamp::now();
        let timestamp = k8s_openapi::jiff::Timestamp::from_second(now.as_second())?.to_string();
        let mut items = Vec::new();
        for pod in pods {
            let Some(value) = scrape(&pod, &rule.series).await else {
                continue;
            };
            items.push(json!({
                "describedObject": {
                    "kind": "Pod",
                    "namespace": namespace,
                    "name": pod.name_any(),
                    "apiVersion": "/v1",
                },
                "metric": {"name": rule.name},
                "timestamp": timestamp,
                "value": quantity(value),
            }));
        }
        if items.is_empty() && pod != "*" {
            return Ok(status(
                StatusCode::NOT_FOUND,
                "NotFound",
                &format!("the server could not find the metric {metric} for pods {pod}"),
            ));
        }
        Ok(respond(
            StatusCode::OK,
            &json!({
                "kind": "MetricValueList",
                "apiVersion": format!("{GROUP}/{VERSION}"),
                "metadata": {},
                "items": items,
            }),
        ))
    }
}

/// A running pod's current value of `series` (the largest of its samples), scraped from its
/// `admin` port; `None` for a pod Prometheus would have no sample of.
async fn scrape(pod: &Pod, series: &str) -> Option<f64> {
    let status = pod.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ip: Ipv4Addr = status.pod_ip.as_deref()?.parse().ok()?;
    let port = pod
        .spec
        .as_ref()?
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(SCRAPE_PORT))?
        .container_port;
    let response = crate::http::request(ip, port as u16, "GET", "/metrics", &[], None)
        .await
        .ok()?;
    if response.status != 200 {
        return None;
    }
    response
        .body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .filter(|v| v.is_finite())
        .reduce(f64::max)
}

/// A value as a Kubernetes quantity: whole numbers as they are, others in thousandths.
fn quantity(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{:.0}m", value * 1000.0)
    }
}

/// A query parameter, percent-decoded (`+` is a space, as Go's `url.Values` encodes).
fn query_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| percent_decode(value, true))
        .unwrap_or_default()
}

/// `%XX` escapes decoded; `+` as a space where `plus_is_space` (in a query).
fn percent_decode(raw: &str, plus_is_space: bool) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' if plus_is_space => out.push(b' '),
            b'%' if i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit() =>
            {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or_default();
                out.push(u8::from_str_radix(hex, 16).unwrap_or_default());
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn respond(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = code;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// A `metav1.Status` failure, as API servers answer errors.
fn status(code: StatusCode, reason: &str, message: &str) -> Response<Full<Bytes>> {
    respond(
        code,
        &json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "code": code.as_u16(),
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_charts_rules_parse_to_names_and_series() -> anyhow::Result<()> {
        let text = std::fs::read_to_string(crate::workspace().join(RULES))?;
        let rules = rules(&text)?;
        assert!(!rules.is_empty());
        for rule in &rules {
            assert!(rule.series.starts_with("sluice_"), "{rule:?}");
        }
        Ok(())
    }

    #[test]
    fn quantities_and_query_parameters() {
        assert_eq!(quantity(0.0), "0");
        assert_eq!(quantity(2.0), "2");
        assert_eq!(quantity(1.5), "1500m");
        assert_eq!(
            query_param(
                "labelSelector=app%3Dchat%2Cvariant+in+%28a%29&metricLabelSelector=",
                "labelSelector"
            ),
            "app=chat,variant in (a)"
        );
        assert_eq!(query_param("x=1", "labelSelector"), "");
        assert_eq!(percent_decode("%2A", false), "*");
        assert_eq!(percent_decode("a+b%zz", false), "a+b%zz");
    }
}

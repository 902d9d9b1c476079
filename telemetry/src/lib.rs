//! Logs and traces, the same for every sluice binary: log lines on stderr (`RUST_LOG` filters,
//! default `info`), and OpenTelemetry traces over OTLP/HTTP (protobuf) when the standard
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` is set (off otherwise).
//! The exporter reads the other `OTEL_EXPORTER_OTLP_*` variables (headers, timeout) and
//! `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` as every OpenTelemetry SDK does; the
//! sampler follows the caller's `traceparent` (parent-based, always on at the root).
//!
//! Spans of the sluice crates at `info` and above become OpenTelemetry spans: `otel.name` and
//! `otel.kind` fields name them, and fields declared on a span are its attributes.

use std::time::Duration;

use opentelemetry::{propagation::TextMapPropagator, trace::TracerProvider as _};
use opentelemetry_http::{Bytes, HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::{
    EnvFilter, Layer as _,
    filter::{LevelFilter, Targets},
    layer::SubscriberExt as _,
    util::SubscriberInitExt as _,
};

/// The variables that turn trace export on (OpenTelemetry's own names).
pub const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];
/// The variables an operator passes on to the pods it runs (its own values): where traces go and
/// how they are sampled. Not `OTEL_SERVICE_NAME` (each binary names itself) nor the headers
/// (they may hold credentials).
pub const PASSED_ON: [&str; 4] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
];
/// The crates whose spans are exported.
const TRACED_CRATES: [&str; 2] = ["sluice_sidecar", "sluice_operator"];

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (for log collectors).
    Json,
}

/// The installed pipeline; [`Telemetry::shutdown`] sends the spans still buffered.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Installs the global subscriber: logs as `format` says, and trace export to OTLP when an
/// endpoint variable is set, as service `service` unless `OTEL_SERVICE_NAME` names one. Call it
/// within the tokio runtime the process serves on (the exporter sends from it).
pub fn init(format: LogFormat, service: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let logs = match format {
        LogFormat::Json => stderr
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .boxed(),
        LogFormat::Text => stderr.boxed(),
    }
    .with_filter(filter);
    let provider = match provider(service) {
        Ok(provider) => provider,
        Err(error) => {
            eprintln!("traces are off: cannot set up the OTLP exporter: {error}");
            None
        }
    };
    let traces = provider.as_ref().map(|p| {
        let targets = TRACED_CRATES
            .iter()
            .fold(Targets::new(), |t, c| t.with_target(*c, LevelFilter::INFO));
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("sluice"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(targets)
    });
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init();
    if provider.is_some() {
        tracing::info!(service, "exporting traces over OTLP");
    }
    Telemetry { provider }
}

/// The [`PASSED_ON`] variables this process has, with their values.
pub fn passed_on() -> Vec<(String, String)> {
    PASSED_ON
        .iter()
        .filter_map(|name| Some(((*name).to_owned(), std::env::var(name).ok()?)))
        .filter(|(_, value)| !value.is_empty())
        .collect()
}

/// Whether an endpoint variable turns trace export on.
pub fn export_configured() -> bool {
    ENDPOINT_VARS
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| !v.trim().is_empty()))
}

fn provider(service: &str) -> Result<Option<SdkTracerProvider>, Box<dyn std::error::Error>> {
    if !export_configured() {
        return Ok(None);
    }
    let client = OnRuntime {
        client: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
        runtime: tokio::runtime::Handle::try_current()?,
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_http_client(client)
        .build()?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    Ok(Some(
        SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_batch_exporter(exporter)
            .build(),
    ))
}

impl Telemetry {
    /// Whether traces are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still buffered and stops the exporter (on a blocking thread: the SDK's
    /// shutdown blocks until its export thread is done).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            match tokio::task::spawn_blocking(move || provider.shutdown()).await {
                Ok(Ok(())) | Err(_) => {}
                Ok(Err(error)) => eprintln!("trace export shutdown: {error}"),
            }
        }
    }
}

/// The exporter's HTTP client: the SDK exports from a thread of its own, outside any runtime, so
/// each request runs as a task on the process's runtime (with its reqwest client: no second TLS
/// stack).
#[derive(Debug)]
struct OnRuntime {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await?
    }
}

/// Makes the W3C `traceparent` of `headers` (if any) the parent of `span`; call it before the
/// span is first entered. Without trace export, nothing (forwards pass the header on as is).
pub fn set_parent(span: &tracing::Span, headers: &http::HeaderMap) {
    if headers.contains_key("traceparent") {
        let context = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(context);
    }
}

/// Writes the current span's context into `headers` as `traceparent` (and a non-empty
/// `tracestate`), replacing what the client sent. Without trace export, nothing.
pub fn inject(headers: &mut http::HeaderMap) {
    let context = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
    if headers.get("tracestate").is_some_and(|v| v.is_empty()) {
        headers.remove("tracestate");
    }
}

//! Convergence: which config generation each pod's sidecar enforces, read from the
//! `sluice_config_generation` gauge on its admin `/metrics`.

use sluice_crds::contract::CONFIG_GENERATION_SERIES;

use crate::scrape::{MetricsSource, PodEndpoint, Sample, ScrapeError};

/// What one pod enforces: its config generation, or why it is unknown.
#[derive(Clone, Debug, PartialEq)]
pub struct PodGeneration {
    /// The pod's name.
    pub pod: String,
    /// `sluice_config_generation`, or the scrape's failure.
    pub generation: Result<u64, ScrapeError>,
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

/// The [`CONFIG_GENERATION_SERIES`] value among `samples` (a non-negative integer below 2^53).
pub fn config_generation(samples: &[Sample]) -> Result<u64, ScrapeError> {
    let value = samples
        .iter()
        .find(|s| s.name == CONFIG_GENERATION_SERIES)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::{HttpMetricsSource, parse_prometheus_text};

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

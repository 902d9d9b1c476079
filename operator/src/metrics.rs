//! Prometheus metrics of the operator (one registry, `sluice_operator_` prefix).

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Labels of a failed reconcile.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    /// [`crate::Error::reason`].
    pub reason: String,
}

/// Reconcile counters and durations, and whether this replica leads.
#[derive(Clone)]
pub struct Metrics {
    /// Reconciles started.
    pub reconciles: Counter,
    /// Reconciles that failed, by reason.
    pub failures: Family<FailureLabels, Counter>,
    /// Reconcile durations.
    pub duration: Histogram,
    /// Objects applied (changed or drifted), not counting skipped up-to-date ones.
    pub applies: Counter,
    /// 1 while this replica holds the leader Lease.
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            reconciles: Counter::default(),
            failures: Family::default(),
            duration: Histogram::new([
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            applies: Counter::default(),
            leader: Gauge::default(),
        }
    }
}

// === impl Metrics ===

impl Metrics {
    /// Registers every metric under `sluice_operator_`.
    pub fn register(self, registry: &mut Registry) -> Self {
        let r = registry.sub_registry_with_prefix("sluice_operator");
        r.register(
            "reconciles",
            "Reconciles of InferenceModels",
            self.reconciles.clone(),
        );
        r.register(
            "reconcile_failures",
            "Failed reconciles, by reason",
            self.failures.clone(),
        );
        r.register_with_unit(
            "reconcile_duration",
            "Time one reconcile takes",
            prometheus_client::registry::Unit::Seconds,
            self.duration.clone(),
        );
        r.register(
            "applies",
            "Objects applied because they changed or drifted",
            self.applies.clone(),
        );
        r.register(
            "leader",
            "1 while this replica is the leader",
            self.leader.clone(),
        );
        self
    }

    /// Counts a reconcile and returns a guard that records its duration when dropped.
    pub fn reconcile_started(&self) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.duration.clone(),
        }
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Observes a reconcile's duration on drop.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;

    /// The `sluice_operator_*` names in a text.
    fn operator_names(text: &str) -> BTreeSet<String> {
        let mut names = BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find("sluice_operator_") {
            let name: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[at + name.len()..];
            names.insert(name);
        }
        names
    }

    /// The operator's series the chart's dashboard and alerts query are the ones it exports
    /// (every metric recorded once; the sidecars' are checked in sidecar/tests/dashboards.rs).
    #[test]
    fn every_operator_series_the_dashboards_and_alerts_query_is_exported() {
        let mut registry = Registry::default();
        let metrics = Metrics::default().register(&mut registry);
        drop(metrics.reconcile_started());
        metrics.reconcile_failed("ServerError");
        metrics.applies.inc();
        metrics.leader.set(1);
        let mut exposition = String::new();
        prometheus_client::encoding::text::encode(&mut exposition, &registry).expect("encodes");
        let exported: BTreeSet<String> = exposition
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect();

        let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/sluice");
        let mut queried = BTreeSet::new();
        for file in [
            chart.join("dashboards/sluice-models.json"),
            chart.join("templates/prometheusrule.yaml"),
        ] {
            let text = std::fs::read_to_string(&file).expect("chart file");
            queried.extend(operator_names(&text));
        }
        assert!(queried.len() >= 3, "{queried:?}");
        let missing: Vec<_> = queried.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "queried, not exported: {missing:?}\n{exposition}"
        );
    }
}

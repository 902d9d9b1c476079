//! Metrics of config reloads: the generation in force (which the operator reads back from each
//! pod to report convergence), documents applied and documents rejected.

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge},
    registry::Registry,
};
use sluice_crds::contract;

/// Metrics of config reloads.
#[derive(Clone, Debug, Default)]
pub struct ReloadMetrics {
    /// `sluice_config_generation`: the generation of the config in force.
    pub generation: Gauge,
    /// `sluice_config_reloads_total`: documents applied.
    pub reloads: Counter,
    /// `sluice_config_reload_errors_total`: documents rejected.
    pub reload_errors: Counter,
}

impl ReloadMetrics {
    /// Registers the metrics in `registry` (prefix `sluice_` comes from the registry).
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            contract::CONFIG_GENERATION,
            "Generation of the sidecar config in force",
            m.generation.clone(),
        );
        registry.register(
            "config_reloads",
            "Sidecar config documents applied",
            m.reloads.clone(),
        );
        registry.register(
            "config_reload_errors",
            "Sidecar config documents rejected (the last good one stays in force)",
            m.reload_errors.clone(),
        );
        m
    }
}

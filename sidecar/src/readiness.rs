//! Readiness as a latch: ready only once the model is loaded and the config is valid, and never
//! again once draining has begun; and liveness, lost while the engine is wedged.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

/// Shared readiness state. Cheap to clone; every clone sees the same latch.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    loaded: AtomicBool,
    config_valid: AtomicBool,
    draining: AtomicBool,
}

// === impl Readiness ===

impl Readiness {
    /// A latch that is not ready: nothing loaded, no config accepted yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The model is loaded and the engine accepts requests.
    pub fn set_loaded(&self) {
        self.0.loaded.store(true, Ordering::SeqCst);
    }

    /// Whether the current sidecar config is valid (the config watcher flips this).
    pub fn set_config_valid(&self, valid: bool) {
        self.0.config_valid.store(valid, Ordering::SeqCst);
    }

    /// Shutdown began: readiness goes false for good.
    pub fn start_drain(&self) {
        self.0.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the sidecar is draining.
    pub fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::SeqCst)
    }

    /// Whether the model is loaded.
    pub fn is_loaded(&self) -> bool {
        self.0.loaded.load(Ordering::SeqCst)
    }

    /// Ready: loaded, config valid and not draining.
    pub fn is_ready(&self) -> bool {
        self.is_loaded() && self.0.config_valid.load(Ordering::SeqCst) && !self.is_draining()
    }
}

/// Liveness beyond "the process answers": false only while the engine is wedged (the engine's
/// watchdog sets it). Cheap to clone; every clone sees the same flag.
#[derive(Clone, Debug, Default)]
pub struct Liveness(Arc<AtomicBool>);

impl Liveness {
    /// Marks the engine wedged (`/healthz` fails) or live again.
    pub fn set_wedged(&self, wedged: bool) {
        self.0.store(wedged, Ordering::SeqCst);
    }

    /// Whether the engine is wedged.
    pub fn is_wedged(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_loaded_and_valid_until_drain() {
        let r = Readiness::new();
        assert!(!r.is_ready());
        r.set_config_valid(true);
        assert!(!r.is_ready(), "not ready before the model is loaded");
        r.set_loaded();
        assert!(r.is_ready());
        r.clone().start_drain();
        assert!(!r.is_ready(), "draining is visible through every clone");
        r.set_loaded();
        assert!(!r.is_ready(), "drain is a latch");
    }
}

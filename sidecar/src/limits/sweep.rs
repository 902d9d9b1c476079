//! The bucket sweeper: a task that drops idle buckets from the tables of the policy in force, so
//! that memory follows the keys that are active (see [`super::table`]).

use std::time::Duration;

use tokio::sync::watch;

use super::{Limiter, PolicySlot};

/// How often idle buckets are swept.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

/// Sweeps idle buckets of the policy in force every `every` until `shutdown`, and keeps
/// `sluice_ratelimit_buckets` current.
pub async fn sweep_buckets(
    limiter: Limiter,
    policy: watch::Receiver<PolicySlot>,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let current = policy.borrow().clone();
        if let Some(p) = current {
            // A sweep of a large table takes milliseconds: keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || limiter.sweep(&p)).await;
        }
    }
}

//! Liveness that sees a wedged engine. The engine loop handles requests between its steps, so
//! while work is pending the watchdog sends it a probe (a tokenization, which the loop answers
//! itself) and marks the engine wedged when the probe goes unanswered for the stall bound:
//! `/healthz` then fails and Kubernetes restarts the pod. An idle engine is never probed, so
//! never wedged; a probe answered at last clears the mark.
//!
//! The stall bound is the first-token timeout: a step longer than that (a prompt that big)
//! fails its request anyway.

use std::{future::Future, time::Duration};

use crate::readiness::Liveness;

/// How often the watchdog looks at a busy engine.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Watches the engine for as long as the process runs: every [`PROBE_INTERVAL`] while `busy()`
/// (requests in the engine or waiting for it), runs `probe()` through the engine loop; one not
/// done within `stall` marks `liveness` wedged until it is done.
pub async fn watch<B, P, F>(busy: B, probe: P, stall: Duration, liveness: Liveness)
where
    B: Fn() -> bool,
    P: Fn() -> F,
    F: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(PROBE_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !busy() {
            continue;
        }
        let mut answer = std::pin::pin!(probe());
        if tokio::time::timeout(stall, &mut answer).await.is_ok() {
            continue;
        }
        tracing::error!(
            stall_secs = stall.as_secs_f64(),
            "the engine answered no probe while requests were pending; /healthz fails until it does"
        );
        liveness.set_wedged(true);
        answer.await;
        tracing::warn!("the engine answers again; /healthz passes");
        liveness.set_wedged(false);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use tokio::sync::Notify;

    use super::*;

    const STALL: Duration = Duration::from_secs(30);

    /// A deliberately stalled engine: its probe completes only once `release` is notified.
    fn stalled(
        release: Arc<Notify>,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        move || {
            let release = release.clone();
            Box::pin(async move { release.notified().await })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_engine_that_answers_no_probe_is_wedged_until_it_does() {
        let liveness = Liveness::default();
        let release = Arc::new(Notify::new());
        let watching = tokio::spawn(watch(
            || true,
            stalled(release.clone()),
            STALL,
            liveness.clone(),
        ));
        // Time is virtual here (paused clock): this advances it, it does not wait.
        tokio::time::sleep(PROBE_INTERVAL + STALL / 2).await;
        assert!(!liveness.is_wedged(), "within the stall bound");
        tokio::time::sleep(STALL).await;
        assert!(
            liveness.is_wedged(),
            "past the stall bound with work pending"
        );
        release.notify_one();
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(!liveness.is_wedged(), "the probe was answered");
        watching.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_engine_is_never_probed_so_never_wedged() {
        let liveness = Liveness::default();
        let probed = Arc::new(AtomicBool::new(false));
        let seen = probed.clone();
        let watching = tokio::spawn(watch(
            || false,
            move || {
                seen.store(true, Ordering::SeqCst);
                std::future::pending::<()>()
            },
            STALL,
            liveness.clone(),
        ));
        tokio::time::sleep(STALL * 10).await;
        assert!(!liveness.is_wedged());
        assert!(!probed.load(Ordering::SeqCst));
        watching.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn an_engine_that_answers_in_time_stays_live() {
        let liveness = Liveness::default();
        let watching = tokio::spawn(watch(
            || true,
            || tokio::time::sleep(STALL / 2),
            STALL,
            liveness.clone(),
        ));
        for _ in 0..20 {
            tokio::time::sleep(PROBE_INTERVAL).await;
            assert!(!liveness.is_wedged());
        }
        watching.abort();
    }
}

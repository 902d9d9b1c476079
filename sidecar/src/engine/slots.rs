//! The bounded queue in front of the engine: `max_seqs` requests run (batched), at most
//! `max_queue` wait for one of them; beyond that a request is refused at once.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::Semaphore;

use super::error::EngineError;

/// Bounds the requests the engine holds: `max_seqs` run (batched), `max_queue` wait.
#[derive(Clone, Debug)]
pub struct Slots {
    running: Arc<Semaphore>,
    max_running: usize,
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
}

/// A held engine slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

// === impl Slots ===

impl Slots {
    /// `running` slots, at most `max_queue` waiters.
    pub fn new(running: usize, max_queue: usize) -> Self {
        Self {
            running: Arc::new(Semaphore::new(running)),
            max_running: running,
            waiting: Arc::new(AtomicUsize::new(0)),
            max_queue,
        }
    }

    /// Whether any request holds a slot or waits for one: work the engine has pending.
    pub fn busy(&self) -> bool {
        self.running.available_permits() < self.max_running || self.waiting() > 0
    }

    /// Requests waiting for a slot right now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    /// Takes a slot, waiting in the bounded queue when all are busy; a full queue is
    /// [`EngineError::Overloaded`]. The caller bounds the wait with its request timeout.
    pub async fn acquire(&self) -> Result<Slot, EngineError> {
        if let Ok(permit) = self.running.clone().try_acquire_owned() {
            return Ok(Slot { _permit: permit });
        }
        let queued = self.waiting.fetch_add(1, Ordering::SeqCst);
        let _leave = LeaveQueue(&self.waiting);
        if queued >= self.max_queue {
            return Err(EngineError::Overloaded { queued });
        }
        let permit = self
            .running
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| EngineError::Draining)?;
        Ok(Slot { _permit: permit })
    }
}

/// Leaves the queue when the waiter is done or dropped (timeout, disconnect).
struct LeaveQueue<'a>(&'a AtomicUsize);

impl Drop for LeaveQueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn slots_queue_then_refuse() {
        let slots = Slots::new(1, 1);
        let first = slots.acquire().await.unwrap();
        let s2 = slots.clone();
        let waiter = tokio::spawn(async move { s2.acquire().await.map(|_| ()) });
        // Let the waiter enter the queue.
        while slots.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = slots.acquire().await.unwrap_err();
        assert!(matches!(refused, EngineError::Overloaded { queued: 1 }));
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(slots.waiting(), 0);
    }
}

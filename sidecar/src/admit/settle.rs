//! Settling a reservation exactly once, whichever way the request ends.

use super::{Outcome, Reservation};
use crate::usage::Usage;

/// Settles a reservation exactly once: explicitly, or on drop (client gone) as `Cancelled`.
pub struct Settlement {
    reservation: Option<Box<dyn Reservation>>,
    usage: Usage,
}

impl Settlement {
    /// Holds `reservation` for a request of `prompt_tokens` that has generated nothing yet.
    pub fn new(reservation: Box<dyn Reservation>, prompt_tokens: usize) -> Self {
        Self {
            reservation: Some(reservation),
            usage: Usage::new(prompt_tokens, 0),
        }
    }

    /// Settles with the usage known so far (the prompt, until [`Settlement::settle_with`]).
    pub fn settle(&mut self, outcome: Outcome) {
        if let Some(r) = self.reservation.take() {
            r.settle(self.usage, outcome);
        }
    }

    /// Settles with `usage`.
    pub fn settle_with(&mut self, usage: Usage, outcome: Outcome) {
        self.usage = usage;
        self.settle(outcome);
    }

    /// The caller's tenant, as admission identified it.
    pub fn tenant(&self) -> Option<&str> {
        self.reservation.as_ref().and_then(|r| r.tenant())
    }

    /// Hands the reservation back unsettled, for whoever serves the request instead (a
    /// fallback model).
    pub fn hand_over(mut self) -> Option<Box<dyn Reservation>> {
        self.reservation.take()
    }

    /// Counts response body bytes sent (for byte limits).
    pub fn add_response_bytes(&mut self, bytes: u64) {
        if let Some(r) = &mut self.reservation {
            r.add_response_bytes(bytes);
        }
    }
}

impl Drop for Settlement {
    fn drop(&mut self) {
        self.settle(Outcome::Cancelled);
    }
}

//! Status conditions and their transitions, shared by the InferenceModel status
//! ([`crate::status`]) and the RateLimitPolicy status ([`crate::policy::status`]). Pure.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event, EventType};

/// A condition that changed: the controller publishes one Event per transition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The condition type.
    pub type_: String,
    /// The new status (`True`/`False`).
    pub status: String,
    /// The new reason.
    pub reason: String,
    /// The new message.
    pub message: String,
    /// Whether it deserves a Warning event (degraded, or no longer ready).
    pub warning: bool,
}

// === impl Transition ===

impl Transition {
    /// A transition of condition `new`.
    pub fn of(new: &Condition, warning: bool) -> Self {
        Self {
            type_: new.type_.clone(),
            status: new.status.clone(),
            reason: new.reason.clone(),
            message: new.message.clone(),
            warning,
        }
    }

    /// The Event that announces it.
    pub fn event(&self) -> Event {
        Event {
            type_: if self.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: self.reason.clone(),
            note: Some(format!(
                "{} is {}: {}",
                self.type_, self.status, self.message
            )),
            action: "Reconcile".to_owned(),
            secondary: None,
        }
    }
}

/// A condition; its `lastTransitionTime` moves only when the status does (it is kept from the
/// condition of the same type and status in `prev`).
pub fn condition(
    prev: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = prev
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or(Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// `message` cut to at most `max` bytes, on a character boundary.
pub fn truncated(mut message: String, max: usize) -> String {
    if message.len() > max {
        let mut cut = max;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    message
}

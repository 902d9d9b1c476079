//! The limiter behind the request path's admission hook ([`Admission`]): identifies the caller,
//! picks the policy in force (one `watch` borrow, no lock held past it), admits or refuses, and
//! settles the ticket when the response ends.

use std::sync::Arc;

use http::HeaderMap;
use tokio::sync::watch;

use super::{Admission, AdmissionRequest, AdmitError, Outcome, Reservation, caller};
use crate::{
    auth::{Caller, Grant},
    limits::{Limiter, PolicySlot, RateInfo, Request, Ticket},
    usage::Usage,
};

/// Rate-limit admission for the API routes.
#[derive(Debug)]
pub struct LimitAdmission {
    limiter: Limiter,
    policy: watch::Receiver<PolicySlot>,
}

impl LimitAdmission {
    /// Admission with `limiter` under the policies published on `policy`.
    pub fn new(limiter: Limiter, policy: watch::Receiver<PolicySlot>) -> Self {
        Self { limiter, policy }
    }
}

impl Admission for LimitAdmission {
    fn authenticate(&self, headers: &mut HeaderMap) -> Result<(Caller, Grant), AdmitError> {
        let Some(policy) = self.limiter.in_force(&self.policy) else {
            return Err(AdmitError::NoPolicy);
        };
        let caller = caller::identify(&policy.identity, headers).map_err(|reason| {
            tracing::info!(?reason, "caller refused");
            AdmitError::Unauthorized(reason)
        })?;
        let grant = policy.identity.grant(&caller).map_err(|refused| {
            tracing::info!(tenant = %caller.shown_tenant(), key_hash = %caller.key_hash(), "caller forbidden");
            AdmitError::Forbidden(refused)
        })?;
        Ok((caller, grant))
    }

    fn admit(&self, req: &AdmissionRequest<'_>) -> Result<Box<dyn Reservation>, AdmitError> {
        // Until a valid config arrives (without `--allow-unlimited`), requests are refused.
        let Some(policy) = self.limiter.in_force(&self.policy) else {
            return Err(AdmitError::NoPolicy);
        };
        let caller = req.caller;
        let request = Request {
            tenant: &caller.tenant,
            key: &caller.key,
            roles: &caller.roles,
            variant: req.variant,
            prompt_tokens: req.prompt_tokens as u64,
            max_tokens: req.max_completion_tokens as u64,
            request_bytes: req.request_bytes as u64,
        };
        let admitted = if req.overflow {
            self.limiter.admit_or_overflow(&policy, &request)
        } else {
            self.limiter.admit(&policy, &request)
        };
        match admitted {
            Ok(ticket) => Ok(Box::new(TicketReservation {
                ticket: Some(ticket),
                // Only the response cache asks (its entries are per tenant); cloning the shared
                // `Arc` otherwise would touch its count on every request.
                tenant: req.config.cache.as_ref().map(|_| caller.tenant.clone()),
                response_bytes: 0,
            })),
            Err(refusal) => {
                tracing::info!(
                    key_hash = %caller.key_hash(),
                    rule = refusal.rule.as_deref().unwrap_or(""),
                    reason = refusal.cause.reason(),
                    retry_after_ms = refusal.retry_after_ns.map(|n| n / 1_000_000),
                    "rate limited"
                );
                Err(AdmitError::Limited(refusal))
            }
        }
    }
}

/// An admitted request's ticket as the request path holds it.
struct TicketReservation {
    ticket: Option<Ticket>,
    tenant: Option<Arc<str>>,
    response_bytes: u64,
}

impl Reservation for TicketReservation {
    fn rate(&self) -> RateInfo {
        self.ticket.as_ref().map(|t| t.rate).unwrap_or_default()
    }

    fn add_response_bytes(&mut self, bytes: u64) {
        self.response_bytes = self.response_bytes.saturating_add(bytes);
    }

    fn shed(&self) -> bool {
        self.ticket.as_ref().is_some_and(|t| t.shed)
    }

    fn tenant(&self) -> Option<&str> {
        self.tenant.as_deref()
    }

    fn settle(mut self: Box<Self>, usage: Usage, _outcome: Outcome) {
        if let Some(ticket) = self.ticket.take() {
            ticket.settle(usage.total_tokens as u64, self.response_bytes);
        }
    }
}

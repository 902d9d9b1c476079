//! The limiter behind the request path's admission hook ([`crate::server::Admission`]):
//! identifies the caller, picks the policy in force (one `watch` borrow, no lock held past it),
//! admits or refuses, and settles the ticket when the response ends.

use http::{HeaderName, HeaderValue, StatusCode};
use tokio::sync::watch;

use super::{Limiter, RateInfo, Refusal, Request, Ticket, bucket::SECOND};
use crate::{
    error::{Error, Result},
    server::{Admission, AdmissionRequest, Outcome, Reservation},
    stream::Usage,
    watch::PolicySlot,
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
    fn admit(&self, req: &AdmissionRequest<'_>) -> Result<Box<dyn Reservation>> {
        let Some(policy) = self.limiter.in_force(&self.policy) else {
            return Err(Error::Limited(Box::new(no_config())));
        };
        let caller = policy.identity.identify(req.headers).map_err(|reason| {
            tracing::info!(?reason, "unknown API key refused");
            Error::Limited(Box::new(Refusal::unauthorized(&reason)))
        })?;
        let request = Request {
            tenant: &caller.tenant,
            key: &caller.key,
            variant: req.variant,
            prompt_tokens: req.prompt_tokens as u64,
            max_tokens: req.max_completion_tokens as u64,
            request_bytes: req.request_bytes as u64,
        };
        match self.limiter.admit(&policy, &request) {
            Ok(ticket) => Ok(Box::new(TicketReservation {
                ticket: Some(ticket),
                response_bytes: 0,
            })),
            Err(refusal) => {
                tracing::info!(
                    key_hash = %caller.key_hash(),
                    rule = refusal.rule.as_deref().unwrap_or(""),
                    code = refusal.code,
                    retry_after_ms = refusal.retry_after_ns.map(|n| n / 1_000_000),
                    "rate limited"
                );
                Err(Error::Limited(refusal))
            }
        }
    }
}

/// Until a valid config arrives (without `--allow-unlimited`), requests are refused.
fn no_config() -> Refusal {
    Refusal {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "server_error",
        code: "config_invalid",
        param: None,
        message: "the server has no valid rate-limit configuration yet; retry shortly".into(),
        rule: None,
        retry_after_ns: Some(SECOND),
        rate: RateInfo::default(),
    }
}

/// An admitted request's ticket as the request path holds it.
struct TicketReservation {
    ticket: Option<Ticket>,
    response_bytes: u64,
}

impl Reservation for TicketReservation {
    fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        self.ticket
            .as_ref()
            .map(Ticket::headers)
            .unwrap_or_default()
    }

    fn add_response_bytes(&mut self, bytes: u64) {
        self.response_bytes = self.response_bytes.saturating_add(bytes);
    }

    fn settle(mut self: Box<Self>, usage: Usage, _outcome: Outcome) {
        if let Some(ticket) = self.ticket.take() {
            ticket.settle(usage.total_tokens as u64, self.response_bytes);
        }
    }
}

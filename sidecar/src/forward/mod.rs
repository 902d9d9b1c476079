//! Forwarding a routed request to another variant's Service, and relaying its response.
//!
//! The entry pod has already parsed, validated and admitted the request (limits are charged
//! there, once); it sends the same body over a pooled HTTP/1.1 connection, signed with
//! [`FORWARDED_HEADER`], and streams the response back frame by frame as it arrives (SSE chunks
//! pass through with no added buffering). The reservation is settled when the relayed body ends,
//! with the usage read from the response (the `usage` object, else one token per streamed
//! delta), or as cancelled when the client goes away (which also closes the upstream connection,
//! so the serving pod stops generating).
//!
//! A forward that fails to connect (no endpoints, connection refused, connect timeout) falls back
//! to this pod when its variant has weight, else to another variant; other failures and pinned
//! (override) requests get 503. Every outcome feeds the destination's breaker
//! ([`Router::record_forward`]), which keeps routing away from a variant that keeps failing.
//!
//! Where a request goes is [`crate::route`]'s decision; this module carries it out. The same
//! client also carries requests this model cannot serve to its fallback model ([`fallback`])
//! and requests naming another model of the namespace to that model ([`gateway`]).

pub mod fallback;
pub mod gateway;
mod relay;

pub use self::relay::UsageScan;

use std::time::Duration;

use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use sluice_crds::SidecarConfig;
use tokio::time::Instant as TokioInstant;
use tracing::Instrument;

use self::relay::copy_end_to_end;
use crate::{
    admit::{NoReservation, Reservation},
    auth::{Caller, Grant},
    openai::ApiError,
    route::{
        CALLER_HEADER, FORWARDED_HEADER, ForwardAuth, ForwardFailureLabels, RouteDecision, Router,
        caller_header,
    },
    stream::{body::ResponseBody, timing::DrainCut},
};

/// A routed request as it is forwarded: the body the entry pod already read and validated.
#[derive(Clone, Debug)]
pub struct Outbound<'a> {
    /// The API path, e.g. `/v1/chat/completions`.
    pub path: &'a str,
    /// The client's headers (hop-by-hop and internal ones are dropped).
    pub headers: &'a HeaderMap,
    /// The request body.
    pub body: Bytes,
    /// The entry pod's request id, so both pods log the same id.
    pub request_id: &'a str,
    /// Prompt tokens counted at the entry pod (usage when the response reports none).
    pub prompt_tokens: usize,
    /// When the request times out (also ending a relayed answer still running then).
    pub deadline: TokioInstant,
    /// The request's timeout (for the error at `deadline`).
    pub timeout: Duration,
    /// Ends a relayed answer at the end of the drain's grace period (`None`: never).
    pub drain_cut: Option<DrainCut>,
    /// The caller the entry pod identified, which a signed forward names in
    /// [`CALLER_HEADER`] (the client's credential was removed with identification).
    pub caller: Option<&'a Caller>,
}

/// What became of a routed request.
pub enum Dispatched {
    /// Another variant answered; this is its response, relayed.
    Remote(Response<ResponseBody>),
    /// Serve it here (routing chose this pod, or forwarding fell back to it); the reservation
    /// is handed back.
    Local(Box<dyn Reservation>),
    /// No variant can take it: the answer is `error` (503) unless a fallback model takes it
    /// with the reservation, handed back unsettled.
    Unavailable(Box<dyn Reservation>, ApiError),
}

impl std::fmt::Debug for Dispatched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Remote(res) => f.debug_tuple("Remote").field(&res.status()).finish(),
            Self::Local(_) => f.write_str("Local"),
            Self::Unavailable(_, e) => f.debug_tuple("Unavailable").field(e).finish(),
        }
    }
}

/// Why a forward failed.
#[derive(Debug)]
pub enum ForwardError {
    /// No connection could be made: safe to try elsewhere (nothing was sent).
    Connect(String),
    /// No response headers before the request's deadline.
    Timeout,
    /// The connection failed after the request was (maybe) sent.
    Other(String),
}

impl ForwardError {
    /// The metric label: `connect`, `timeout` or `error`.
    fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Timeout => "timeout",
            Self::Other(_) => "error",
        }
    }
}

impl std::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Connect(e) => write!(f, "cannot connect: {e}"),
            Self::Timeout => f.write_str("no response before the request timed out"),
            Self::Other(e) => write!(f, "{e}"),
        }
    }
}

/// The HTTP client forwards go through: one per process, connections pooled per variant.
#[derive(Clone, Debug)]
pub struct Forwarder {
    client: Client<HttpConnector, Full<Bytes>>,
}

// === impl Forwarder ===

impl Forwarder {
    /// A client that gives up connecting after `connect_timeout` (then the request falls back).
    pub fn new(connect_timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(http);
        Self { client }
    }

    /// Sends `out` to the variant at `address` (a base URL) and returns its response as soon as
    /// its headers arrive.
    pub async fn send(
        &self,
        auth: &ForwardAuth,
        address: &str,
        out: &Outbound<'_>,
    ) -> Result<Response<Incoming>, ForwardError> {
        self.request(Some(auth), address, out).await
    }

    /// Sends `out` to the Service at `address` as its client sent it, unsigned: the sidecars
    /// there route and admit it like any client's request (see [`gateway`]).
    pub async fn send_unsigned(
        &self,
        address: &str,
        out: &Outbound<'_>,
    ) -> Result<Response<Incoming>, ForwardError> {
        self.request(None, address, out).await
    }

    /// `out` as a POST to `address`, with the client's end-to-end headers, signed with `auth`
    /// when given; its response once the headers arrive (before `out.deadline`). Traced as a
    /// client span, whose context the request carries on (`traceparent`).
    async fn request(
        &self,
        auth: Option<&ForwardAuth>,
        address: &str,
        out: &Outbound<'_>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let span = tracing::info_span!(
            "forward",
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            server.address = address,
            http.response.status_code = tracing::field::Empty,
        );
        let sent = self
            .request_in_span(auth, address, out)
            .instrument(span.clone());
        let answer = sent.await;
        match &answer {
            Ok(res) => span.record("http.response.status_code", res.status().as_u16()),
            Err(_) => span.record("otel.status_code", "error"),
        };
        answer
    }

    async fn request_in_span(
        &self,
        auth: Option<&ForwardAuth>,
        address: &str,
        out: &Outbound<'_>,
    ) -> Result<Response<Incoming>, ForwardError> {
        let uri: Uri = format!("{}{}", address.trim_end_matches('/'), out.path)
            .parse()
            .map_err(|e| ForwardError::Connect(format!("invalid address {address:?}: {e}")))?;
        let mut req = Request::new(Full::new(out.body.clone()));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        copy_end_to_end(out.headers, headers);
        headers.remove(header::HOST);
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(FORWARDED_HEADER);
        headers.remove(CALLER_HEADER);
        if let Some(auth) = auth {
            let caller = out
                .caller
                .map_or_else(|| HeaderValue::from_static(""), caller_header);
            headers.insert(FORWARDED_HEADER, auth.sign(out.path, caller.as_bytes()));
            headers.insert(CALLER_HEADER, caller);
        }
        if let Ok(id) = HeaderValue::from_str(out.request_id) {
            headers.insert("x-request-id", id);
        }
        sluice_telemetry::inject(headers);
        match tokio::time::timeout_at(out.deadline, self.client.request(req)).await {
            Err(_) => Err(ForwardError::Timeout),
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) if e.is_connect() => Err(ForwardError::Connect(error_chain(&e))),
            Ok(Err(e)) => Err(ForwardError::Other(error_chain(&e))),
        }
    }
}

/// Relays a response to a request sent on unsigned ([`Forwarder::send_unsigned`]): the pod
/// that answered admitted it, so there is nothing to settle here.
pub fn relay_as_is(res: Response<Incoming>) -> Response<ResponseBody> {
    relay::relay(res, Box::new(NoReservation), 0, None, None)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

// === dispatch ===

/// Carries out `decision` for an admitted request: returns its reservation for local serving,
/// or forwards it with `forwarder` (falling back as `router` says when the variant cannot be
/// reached) and returns the relayed response, or the reservation and the error when no variant
/// can take it.
pub async fn dispatch(
    router: &Router,
    forwarder: Option<&Forwarder>,
    config: &SidecarConfig,
    decision: RouteDecision,
    grant: &Grant,
    out: Outbound<'_>,
    reservation: Box<dyn Reservation>,
) -> Result<Dispatched, ApiError> {
    let RouteDecision::Forward {
        mut variant,
        mut address,
    } = decision
    else {
        return Ok(Dispatched::Local(reservation));
    };
    let (Some(auth), Some(forwarder)) = (router.auth(), forwarder) else {
        // Routing never forwards without a token; an invariant, handled as local.
        return Ok(Dispatched::Local(reservation));
    };
    let pinned = Router::override_of(config, out.headers).is_some();
    let mut failed: Vec<String> = Vec::new();
    loop {
        match forwarder.send(auth, &address, &out).await {
            Ok(res) => {
                tracing::debug!(%variant, status = res.status().as_u16(), "forwarded");
                router.record_forward(config, &variant, !res.status().is_server_error());
                return Ok(Dispatched::Remote(relay::relay(
                    res,
                    reservation,
                    out.prompt_tokens,
                    out.drain_cut.clone(),
                    Some((out.deadline, out.timeout)),
                )));
            }
            Err(error) => {
                tracing::warn!(%variant, %address, %error, "forwarding failed");
                router.record_forward(config, &variant, false);
                router
                    .metrics()
                    .forward_failures
                    .get_or_create(&ForwardFailureLabels {
                        variant: variant.clone(),
                        kind: error.kind().to_owned(),
                    })
                    .inc();
                let retry = matches!(error, ForwardError::Connect(_)) && !pinned;
                failed.push(variant.clone());
                let next = if retry {
                    router.fallback(config, out.headers, &failed, grant)
                } else {
                    None
                };
                match next {
                    Some(RouteDecision::Forward {
                        variant: v,
                        address: a,
                    }) => {
                        tracing::info!(from = %failed.join(","), to = %v, "falling back");
                        (variant, address) = (v, a);
                    }
                    Some(_) => {
                        tracing::info!(from = %failed.join(","), "falling back to this pod");
                        return Ok(Dispatched::Local(reservation));
                    }
                    None => {
                        let error = ApiError::VariantUnavailable {
                            message: format!(
                                "variant {variant:?} cannot be reached ({error}) and no other \
                                 variant can take the request"
                            ),
                            variant: Some(variant),
                        };
                        return Ok(Dispatched::Unavailable(reservation, error));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::{
        admit::Outcome,
        route::{ForwardToken, RoutingMetrics, VARIANT_HEADER},
        usage::Usage,
    };
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use sluice_crds::sidecar_config::BreakerConfig;
    use std::{convert::Infallible, sync::Arc, sync::Mutex};

    /// Records how a reservation was settled.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(Usage, Outcome)>>>);

    impl Reservation for Recorder {
        fn settle(self: Box<Self>, usage: Usage, outcome: Outcome) {
            self.0.lock().unwrap().push((usage, outcome));
        }
    }

    impl Recorder {
        fn settled(&self) -> Vec<(Usage, Outcome)> {
            self.0.lock().unwrap().clone()
        }
    }

    /// An upstream sidecar stand-in: `/json` answers with usage, `/sse` streams three chunks
    /// without it; every answer names variant `b` and echoes whether the request was signed.
    async fn upstream() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let signed = req.headers().contains_key(FORWARDED_HEADER).to_string();
                    let (content_type, body) = if req.uri().path() == "/json" {
                        (
                            "application/json",
                            r#"{"choices":[{"text":"a"}],"usage":{"prompt_tokens":4,"completion_tokens":1,"total_tokens":5}}"#.to_owned(),
                        )
                    } else {
                        let chunk = "data: {\"choices\":[{\"text\":\"x\"}]}\n\n";
                        (
                            "text/event-stream",
                            format!("{chunk}{chunk}{chunk}data: [DONE]\n\n"),
                        )
                    };
                    Ok::<_, Infallible>(
                        Response::builder()
                            .header("content-type", content_type)
                            .header(VARIANT_HEADER, "b")
                            .header("x-signed", signed)
                            .header("connection", "keep-alive")
                            .body(Full::new(Bytes::from(body)))
                            .unwrap(),
                    )
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        format!("http://{addr}")
    }

    fn two_variants(local_weight: u32, remote: &str) -> SidecarConfig {
        let mut c = crate::cli::default_sidecar_config("m");
        c.variants = vec![
            sluice_crds::sidecar_config::VariantRoute {
                name: "a".into(),
                weight: local_weight,
                address: None,
            },
            sluice_crds::sidecar_config::VariantRoute {
                name: "b".into(),
                weight: 100 - local_weight,
                address: Some(remote.into()),
            },
        ];
        c
    }

    /// A router of variant `a` that can forward, and its client.
    fn routing() -> (Router, Forwarder) {
        (
            Router::new(
                "a",
                Some(&ForwardToken::new("t")),
                RoutingMetrics::default(),
            ),
            Forwarder::new(Duration::from_millis(500)),
        )
    }

    async fn send(
        (router, forwarder): &(Router, Forwarder),
        config: &SidecarConfig,
        path: &str,
        rec: &Recorder,
    ) -> Dispatched {
        let headers = HeaderMap::new();
        let decision = router.decide(config, &headers, &Grant::all()).unwrap();
        let out = Outbound {
            path,
            headers: &headers,
            body: Bytes::from_static(b"{}"),
            request_id: "id-1",
            prompt_tokens: 3,
            deadline: TokioInstant::now() + Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            drain_cut: None,
            caller: None,
        };
        dispatch(
            router,
            Some(forwarder),
            config,
            decision,
            &Grant::all(),
            out,
            Box::new(rec.clone()),
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn relayed_responses_settle_once_with_their_usage() {
        let remote = upstream().await;
        let (routing, config) = (routing(), two_variants(0, &remote));
        for (path, usage) in [("/json", Usage::new(4, 1)), ("/sse", Usage::new(3, 3))] {
            let rec = Recorder::default();
            let Dispatched::Remote(res) = send(&routing, &config, path, &rec).await else {
                panic!("forwarded")
            };
            assert_eq!(res.headers()[VARIANT_HEADER], "b");
            assert_eq!(res.headers()["x-signed"], "true");
            assert!(
                !res.headers().contains_key("connection"),
                "hop-by-hop dropped"
            );
            assert!(
                rec.settled().is_empty(),
                "settled when the body ends, not before"
            );
            let body = res.into_body().collect().await.unwrap().to_bytes();
            assert!(!body.is_empty());
            assert_eq!(rec.settled(), vec![(usage, Outcome::Completed)], "{path}");
        }
        // The client going away mid-body settles as cancelled.
        let rec = Recorder::default();
        let Dispatched::Remote(res) = send(&routing, &config, "/sse", &rec).await else {
            panic!("forwarded")
        };
        drop(res);
        assert_eq!(rec.settled(), vec![(Usage::new(3, 0), Outcome::Cancelled)]);
    }

    #[tokio::test]
    async fn connect_failures_fall_back_or_fail_with_503() {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let routing = routing();
        // The local variant has weight: served here, reservation handed back unsettled.
        let rec = Recorder::default();
        let config = two_variants(1, &dead);
        let mut local = 0;
        for _ in 0..200 {
            if let Dispatched::Local(_) = send(&routing, &config, "/json", &rec).await {
                local += 1;
            }
        }
        assert_eq!(local, 200);
        assert!(rec.settled().is_empty());
        // The first failed connects fell back; then the breaker opened and the rest were routed
        // here without trying the dead variant.
        let failures = BreakerConfig::default().consecutive_failures;
        assert_eq!(routing.0.metrics().fallbacks.get(), u64::from(failures));
        let dead_failures = routing
            .0
            .metrics()
            .forward_failures
            .get_or_create(&ForwardFailureLabels {
                variant: "b".into(),
                kind: "connect".into(),
            })
            .get();
        assert_eq!(dead_failures, u64::from(failures));
        // Requests routed to it while its breaker was open still count against it (the canary
        // analysis would otherwise see an idle variant, not a broken one).
        let held_back = routing
            .0
            .metrics()
            .forward_failures
            .get_or_create(&ForwardFailureLabels {
                variant: "b".into(),
                kind: crate::route::BREAKER_OPEN_KIND.into(),
            })
            .get();
        assert!(
            (150..=200 - u64::from(failures)).contains(&held_back),
            "{held_back} of the ~99% routed to b"
        );
        // It has none (and a router whose breaker is still closed): 503, and the reservation
        // is settled as failed.
        let routing = super::tests::routing();
        let config = two_variants(0, &dead);
        let headers = HeaderMap::new();
        let decision = routing.0.decide(&config, &headers, &Grant::all()).unwrap();
        let out = Outbound {
            path: "/json",
            headers: &headers,
            body: Bytes::new(),
            request_id: "id-2",
            prompt_tokens: 3,
            deadline: TokioInstant::now() + Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            drain_cut: None,
            caller: None,
        };
        let rec = Recorder::default();
        let dispatched = dispatch(
            &routing.0,
            Some(&routing.1),
            &config,
            decision,
            &Grant::all(),
            out,
            Box::new(rec.clone()),
        )
        .await
        .unwrap();
        let Dispatched::Unavailable(reservation, err) = dispatched else {
            panic!("unavailable: {dispatched:?}")
        };
        assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(rec.settled().is_empty(), "handed back for a fallback");
        drop(reservation);
    }
}

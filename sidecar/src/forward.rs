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
//! (override) requests get 503.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Mutex,
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use sluice_crds::SidecarConfig;
use tokio::time::Instant as TokioInstant;

use crate::{
    error::{Error, Result},
    routing::{FORWARDED_HEADER, ForwardAuth, ForwardFailureLabels, RouteDecision, Routing},
    server::{Outcome, Reservation, ResponseBody},
    stream::{self, Usage},
};

/// Largest non-streaming response body kept (besides relaying it) to read its `usage`.
const MAX_SCANNED_JSON: usize = 1 << 20;

/// A routed request as it is forwarded: the body the entry pod already read and validated.
#[derive(Debug)]
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
    /// When the request times out.
    pub deadline: TokioInstant,
}

/// What became of a routed request.
pub enum Dispatched {
    /// Another variant answered; this is its response, relayed.
    Remote(Response<ResponseBody>),
    /// Serve it here (routing chose this pod, or forwarding fell back to it); the reservation
    /// is handed back.
    Local(Box<dyn Reservation>),
}

impl std::fmt::Debug for Dispatched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Remote(res) => f.debug_tuple("Remote").field(&res.status()).finish(),
            Self::Local(_) => f.write_str("Local"),
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
    ) -> std::result::Result<Response<Incoming>, ForwardError> {
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
        headers.insert(FORWARDED_HEADER, auth.sign(out.path));
        if let Ok(id) = HeaderValue::from_str(out.request_id) {
            headers.insert("x-request-id", id);
        }
        match tokio::time::timeout_at(out.deadline, self.client.request(req)).await {
            Err(_) => Err(ForwardError::Timeout),
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) if e.is_connect() => Err(ForwardError::Connect(error_chain(&e))),
            Ok(Err(e)) => Err(ForwardError::Other(error_chain(&e))),
        }
    }
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

/// Headers that describe one connection, not the message (RFC 9110 7.6.1), plus those the
/// `Connection` header names.
fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap) {
    const HOP_BY_HOP: [&str; 8] = [
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
    ];
    let listed: Vec<HeaderName> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for (name, value) in from {
        if HOP_BY_HOP.contains(&name.as_str()) || name == header::UPGRADE || listed.contains(name) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

// === dispatch ===

impl Routing {
    /// Carries out `decision` for an admitted request: returns its reservation for local
    /// serving, or forwards it (falling back when the variant cannot be reached) and returns
    /// the relayed response. On an error the reservation has been settled as failed.
    pub async fn dispatch(
        &self,
        config: &SidecarConfig,
        decision: RouteDecision,
        out: Outbound<'_>,
        reservation: Box<dyn Reservation>,
    ) -> Result<Dispatched> {
        let RouteDecision::Forward {
            mut variant,
            mut address,
        } = decision
        else {
            return Ok(Dispatched::Local(reservation));
        };
        let (Some(auth), Some(forwarder)) = (self.auth(), self.forwarder()) else {
            // Routing never forwards without a token; an invariant, handled as local.
            return Ok(Dispatched::Local(reservation));
        };
        let pinned = Routing::override_of(config, out.headers).is_some();
        let mut failed: Vec<String> = Vec::new();
        loop {
            match forwarder.send(auth, &address, &out).await {
                Ok(res) => {
                    tracing::debug!(%variant, status = res.status().as_u16(), "forwarded");
                    return Ok(Dispatched::Remote(relay(
                        res,
                        reservation,
                        out.prompt_tokens,
                    )));
                }
                Err(error) => {
                    tracing::warn!(%variant, %address, %error, "forwarding failed");
                    self.metrics()
                        .forward_failures
                        .get_or_create(&ForwardFailureLabels {
                            variant: variant.clone(),
                            kind: error.kind().to_owned(),
                        })
                        .inc();
                    let retry = matches!(error, ForwardError::Connect(_)) && !pinned;
                    failed.push(variant.clone());
                    let next = if retry {
                        self.fallback(config, out.headers, &failed)
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
                            reservation.settle(Usage::new(out.prompt_tokens, 0), Outcome::Failed);
                            return Err(Error::VariantUnavailable(format!(
                                "variant {variant:?} cannot be reached ({error}) and no other \
                                 variant can take the request"
                            )));
                        }
                    }
                }
            }
        }
    }
}

/// The response of another variant, relayed: status and end-to-end headers as they came, the
/// body frame by frame.
fn relay(
    res: Response<Incoming>,
    reservation: Box<dyn Reservation>,
    prompt_tokens: usize,
) -> Response<ResponseBody> {
    let (mut parts, body) = res.into_parts();
    let mut headers = HeaderMap::with_capacity(parts.headers.len());
    copy_end_to_end(&parts.headers, &mut headers);
    // The relayed body reports its exact size when the upstream did; hyper derives the length.
    headers.remove(header::CONTENT_LENGTH);
    parts.headers = headers;
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let body = RelayBody {
        inner: body,
        reservation: Mutex::new(Some(reservation)),
        ok: parts.status.is_success(),
        scan: UsageScan::new(sse, prompt_tokens),
        tail: None,
        finished: false,
    };
    Response::from_parts(parts, body.boxed())
}

/// Passes the upstream body through unchanged while reading the usage off it, and settles the
/// reservation exactly once: when the body ends, fails, or is dropped (client gone).
struct RelayBody {
    inner: Incoming,
    /// In a mutex only so the body is `Sync` (as response bodies must be); never contended.
    reservation: Mutex<Option<Box<dyn Reservation>>>,
    ok: bool,
    scan: UsageScan,
    /// An error event to send after an upstream failure mid-stream (SSE only).
    tail: Option<Bytes>,
    finished: bool,
}

impl RelayBody {
    /// The upstream body ended normally.
    fn finish(&mut self) {
        self.finished = true;
        let outcome = if self.ok {
            Outcome::Completed
        } else {
            Outcome::Failed
        };
        self.settle(outcome);
    }

    /// Settles once; returns whether this call did.
    fn settle(&mut self, outcome: Outcome) -> bool {
        let reservation = match self.reservation.get_mut() {
            Ok(r) => r.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        match reservation {
            Some(r) => {
                r.settle(self.scan.usage(), outcome);
                true
            }
            None => false,
        }
    }
}

impl Body for RelayBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if let Some(tail) = this.tail.take() {
            return Poll::Ready(Some(Ok(Frame::data(tail))));
        }
        if this.finished {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    this.scan.feed(data);
                }
                // With a known length hyper stops polling after the last byte: settle now.
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "forwarded response failed mid-body");
                this.finished = true;
                this.settle(Outcome::Failed);
                if this.scan.sse {
                    let e = Error::VariantUnavailable(format!(
                        "the variant serving this request failed mid-stream: {error}"
                    ));
                    let mut bytes = stream::data_event(&e.body()).to_vec();
                    bytes.extend_from_slice(stream::DONE);
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(bytes)))));
                }
                // A JSON body cut short: the connection is closed, which clients see as an error.
                Poll::Ready(None)
            }
            None => {
                this.finish();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished && self.tail.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.finished {
            SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

impl Drop for RelayBody {
    fn drop(&mut self) {
        if self.settle(Outcome::Cancelled) {
            tracing::info!("client disconnected from a forwarded response");
        }
    }
}

/// Reads token usage off a relayed response: the `usage` object when the upstream sends one,
/// else the counted prompt plus one token per streamed content chunk.
struct UsageScan {
    sse: bool,
    prompt_tokens: usize,
    buf: Vec<u8>,
    deltas: usize,
    reported: Option<Usage>,
    overflow: bool,
}

impl UsageScan {
    fn new(sse: bool, prompt_tokens: usize) -> Self {
        Self {
            sse,
            prompt_tokens,
            buf: Vec::new(),
            deltas: 0,
            reported: None,
            overflow: false,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        if !self.sse {
            if self.buf.len() + data.len() <= MAX_SCANNED_JSON {
                self.buf.extend_from_slice(data);
            } else {
                self.overflow = true;
            }
            return;
        }
        self.buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(end) = find(&self.buf[start..], b"\n\n") {
            let event = &self.buf[start..start + end];
            if let Some(json) = event.strip_prefix(b"data: ")
                && json != b"[DONE]"
            {
                if find(json, b"\"usage\":{").is_some() {
                    self.reported = parse_usage(json).or(self.reported);
                } else if find(json, b"\"choices\":[{").is_some() {
                    self.deltas += 1;
                }
            }
            start += end + 2;
        }
        self.buf.drain(..start);
    }

    fn usage(&mut self) -> Usage {
        if !self.sse && !self.overflow && self.reported.is_none() {
            self.reported = parse_usage(&self.buf);
        }
        self.reported
            .unwrap_or_else(|| Usage::new(self.prompt_tokens, self.deltas))
    }
}

fn parse_usage(json: &[u8]) -> Option<Usage> {
    let value: serde_json::Value = serde_json::from_slice(json).ok()?;
    let usage = value.get("usage")?;
    let count = |k: &str| {
        usage
            .get(k)
            .and_then(serde_json::Value::as_u64)
            .and_then(|v| usize::try_from(v).ok())
    };
    Some(Usage::new(
        count("prompt_tokens")?,
        count("completion_tokens")?,
    ))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::routing::{ForwardToken, RoutingMetrics, VARIANT_HEADER};
    use hyper_util::rt::TokioIo;
    use std::sync::Arc;

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
        let mut c = crate::config::default_sidecar_config("m");
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

    fn routing() -> Routing {
        Routing::new(
            "a",
            Some(&ForwardToken::new("t")),
            Duration::from_millis(500),
            RoutingMetrics::default(),
        )
    }

    async fn send(
        routing: &Routing,
        config: &SidecarConfig,
        path: &str,
        rec: &Recorder,
    ) -> Dispatched {
        let headers = HeaderMap::new();
        let decision = routing.decide(config, &headers, path).unwrap();
        let out = Outbound {
            path,
            headers: &headers,
            body: Bytes::from_static(b"{}"),
            request_id: "id-1",
            prompt_tokens: 3,
            deadline: TokioInstant::now() + Duration::from_secs(5),
        };
        routing
            .dispatch(config, decision, out, Box::new(rec.clone()))
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
        assert!(routing.metrics().fallbacks.get() >= 190);
        // It has none: 503, and the reservation is settled as failed.
        let config = two_variants(0, &dead);
        let headers = HeaderMap::new();
        let decision = routing.decide(&config, &headers, "/json").unwrap();
        let out = Outbound {
            path: "/json",
            headers: &headers,
            body: Bytes::new(),
            request_id: "id-2",
            prompt_tokens: 3,
            deadline: TokioInstant::now() + Duration::from_secs(5),
        };
        let rec = Recorder::default();
        let err = routing
            .dispatch(&config, decision, out, Box::new(rec.clone()))
            .await
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(rec.settled(), vec![(Usage::new(3, 0), Outcome::Failed)]);
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_are_dropped() {
        let mut from = HeaderMap::new();
        from.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-private"),
        );
        from.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        from.insert("x-private", HeaderValue::from_static("1"));
        from.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        from.insert("authorization", HeaderValue::from_static("Bearer k"));
        from.append("x-multi", HeaderValue::from_static("a"));
        from.append("x-multi", HeaderValue::from_static("b"));
        let mut to = HeaderMap::new();
        copy_end_to_end(&from, &mut to);
        assert_eq!(to.len(), 3, "{to:?}");
        assert_eq!(to["authorization"], "Bearer k");
        assert_eq!(to.get_all("x-multi").iter().count(), 2);
    }

    #[test]
    fn usage_is_read_from_streams_split_anywhere() {
        let stream = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"!\"}}],\"usage\":null}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2,\"total_tokens\":9}}\n\n",
            "data: [DONE]\n\n"
        )
        .as_bytes();
        for split in [1, 5, 17, stream.len()] {
            let mut scan = UsageScan::new(true, 3);
            for chunk in stream.chunks(split) {
                scan.feed(chunk);
            }
            assert_eq!(scan.usage(), Usage::new(7, 2), "split {split}");
        }
        // Without a usage chunk: counted prompt, one token per content chunk.
        let mut scan = UsageScan::new(true, 3);
        let cut = find(stream, b"data: {\"choices\":[]").unwrap();
        scan.feed(&stream[..cut]);
        assert_eq!(scan.usage(), Usage::new(3, 2));
        // JSON bodies.
        let mut scan = UsageScan::new(false, 3);
        scan.feed(br#"{"id":"x","choices":[{"text":"a"}],"usage":{"prompt_tokens":4,"#);
        scan.feed(br#""completion_tokens":1,"total_tokens":5}}"#);
        assert_eq!(scan.usage(), Usage::new(4, 1));
    }
}

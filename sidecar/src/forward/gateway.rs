//! One endpoint for all models: a request whose `model` names another model of the namespace
//! (the config's `models`, written by the operator) is sent on to that model's Service, and
//! its answer relayed as it comes: status, headers and body, an SSE stream frame by frame. So
//! any sidecar (and a Service over all of them) answers for every model of the namespace.
//!
//! The request goes out as its client sent it (the same body, the client's end-to-end headers,
//! `Authorization` included) and unsigned, so it is an ordinary client request to the target's
//! sidecars. That is where its limits are: this pod neither admits nor charges it, and the
//! target's sidecars route it among the target's variants and admit it under the target's own
//! RateLimitPolicy, so it is charged exactly once, under the policy of the model that serves
//! it. Only the target's pods hold that policy's state: its buckets, its share of
//! cluster-scoped limits (divided over the target's pods, not this model's) and the saturation
//! mark its priority shedding reads; charging here would count it against the wrong model, or
//! twice.
//!
//! Requests another sidecar sent never go on from here: a forward between variants or to a
//! fallback model (signed; it names the model it was first sent to, which may be listed here)
//! was routed already, and a request this gateway sent (marked [`GATEWAY_HEADER`]) is the
//! target's to serve: configs that disagree for a moment (a served name moving between models)
//! must not bounce it between pods.

use std::borrow::Cow;

use http::{HeaderMap, HeaderValue, Response};
use hyper::body::Bytes;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use serde::Deserialize;
use sluice_crds::{SidecarConfig, sidecar_config::ModelAddress};

use super::{ForwardError, Forwarder, Outbound, relay};
use crate::{
    admit::NoReservation,
    openai::ApiError,
    route::FORWARDED_HEADER,
    stream::{body::ResponseBody, timing::Deadline},
};

/// Set on a request the gateway sent on (its value: the model of the pod that sent it); the
/// pod receiving it serves it or refuses it, never sends it on again.
pub const GATEWAY_HEADER: &str = "x-sluice-gateway";

/// Labels of `sluice_gateway_forwards_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    /// The model the request named (one of the config's `models`).
    pub model: String,
    /// `forwarded` (the model answered, whatever its status), or why not: `connect`, `timeout`
    /// or `error`.
    pub outcome: String,
}

/// Marks a response that another model gave (or failed to give): the request is that model's,
/// counted by it under its own variants, not in this pod's `sluice_requests_total`.
#[derive(Clone, Copy, Debug)]
pub struct OtherModel;

/// Sends requests naming another model of the namespace to it.
#[derive(Clone, Debug)]
pub struct Gateway {
    forwarder: Forwarder,
    sent: Family<GatewayLabels, Counter>,
}

// === impl Gateway ===

impl Gateway {
    /// Sends through `forwarder`; the metric is registered in `registry`.
    pub fn new(forwarder: Forwarder, registry: &mut Registry) -> Self {
        let sent = Family::default();
        registry.register(
            "gateway_forwards",
            "Requests sent on to the other model of the namespace they named, by model and outcome",
            sent.clone(),
        );
        Self { forwarder, sent }
    }

    /// Sends the request on when it names another model of the namespace, and answers with that
    /// model's response; `None` when this pod is the one to serve (or refuse) it. Only the
    /// `model` field of `body` is read here: the target validates the rest.
    pub async fn forward(
        &self,
        config: &SidecarConfig,
        path: &str,
        headers: &HeaderMap,
        body: &Bytes,
        request_id: &str,
        deadline: &Deadline,
    ) -> Option<Result<Response<ResponseBody>, ApiError>> {
        let target = target(config, headers, body)?;
        let mut marked = headers.clone();
        if let Ok(v) = HeaderValue::from_str(&config.model) {
            marked.insert(GATEWAY_HEADER, v);
        }
        let out = Outbound {
            path,
            headers: &marked,
            body: body.clone(),
            request_id,
            prompt_tokens: 0,
            deadline: deadline.at,
            timeout: deadline.timeout,
            drain_cut: Some(deadline.drain_cut.clone()),
            caller: None,
        };
        Some(self.send(target, &out, deadline).await)
    }

    async fn send(
        &self,
        target: &ModelAddress,
        out: &Outbound<'_>,
        deadline: &Deadline,
    ) -> Result<Response<ResponseBody>, ApiError> {
        let sent = self.forwarder.send_unsigned(&target.address, out).await;
        let outcome = match &sent {
            Ok(_) => "forwarded",
            Err(e) => e.kind(),
        };
        self.sent
            .get_or_create(&GatewayLabels {
                model: target.name.clone(),
                outcome: outcome.to_owned(),
            })
            .inc();
        match sent {
            Ok(res) => {
                let status = res.status().as_u16();
                tracing::debug!(model = %target.name, status, "sent on to the model named");
                // Nothing to settle: the target admitted (and charges) the request.
                let deadline = Some((out.deadline, out.timeout));
                let mut res = relay::relay(
                    res,
                    Box::new(NoReservation),
                    0,
                    out.drain_cut.clone(),
                    deadline,
                );
                res.extensions_mut().insert(OtherModel);
                Ok(res)
            }
            Err(error) => {
                let address = &target.address;
                tracing::warn!(model = %target.name, %address, %error, "the model named cannot be reached");
                Err(unreachable(&target.name, &error, deadline))
            }
        }
    }
}

/// The other model `body` names, when this pod is to send the request on to it: a client's
/// request (not one another sidecar sent) naming one of the config's `models`.
fn target<'c>(
    config: &'c SidecarConfig,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<&'c ModelAddress> {
    if config.models.is_empty()
        || headers.contains_key(FORWARDED_HEADER)
        || headers.contains_key(GATEWAY_HEADER)
    {
        return None;
    }
    let named = named_model(body)?;
    config.models.iter().find(|m| m.name == named)
}

/// The `model` field of a JSON request body, if it has a string one; the rest is skipped
/// unread (a body that is no JSON object is the validation's to refuse).
fn named_model(body: &[u8]) -> Option<Cow<'_, str>> {
    #[derive(Deserialize)]
    struct Named<'a> {
        #[serde(borrow)]
        model: Option<Cow<'a, str>>,
    }
    // A struct also reads from a JSON array (its fields in order): only an object names one.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    serde_json::from_slice::<Named<'_>>(body).ok()?.model
}

/// What the client is told when `model` could not be reached: 503 when no connection was made
/// (nothing was sent: retrying is safe), the request's timeout, or 502 when the connection
/// failed once the request was (maybe) sent. The address and the cause stay in the log.
fn unreachable(model: &str, error: &ForwardError, deadline: &Deadline) -> ApiError {
    match error {
        ForwardError::Timeout => ApiError::Timeout(deadline.timeout),
        ForwardError::Connect(_) => ApiError::ModelUnreachable {
            model: model.to_owned(),
            sent: false,
        },
        ForwardError::Other(_) => ApiError::ModelUnreachable {
            model: model.to_owned(),
            sent: true,
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::{convert::Infallible, time::Duration};

    use http::{Request, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::rt::TokioIo;
    use tokio::time::Instant as TokioInstant;

    use super::*;
    use crate::stream::timing::DrainCut;

    fn config(models: &[(&str, &str)]) -> SidecarConfig {
        let mut c = crate::cli::default_sidecar_config("a");
        c.models = models
            .iter()
            .map(|(name, address)| ModelAddress {
                name: (*name).to_owned(),
                address: (*address).to_owned(),
            })
            .collect();
        c
    }

    fn deadline() -> Deadline {
        let (_tx, signal) = tokio::sync::watch::channel(false);
        Deadline {
            at: TokioInstant::now() + Duration::from_secs(5),
            timeout: Duration::from_secs(5),
            first_token: None,
            drain_cut: DrainCut {
                signal,
                count: Counter::default(),
            },
        }
    }

    #[test]
    fn only_clients_requests_naming_a_listed_model_go_on() {
        let c = config(&[("b", "http://b.ns.svc:8080")]);
        let plain = HeaderMap::new();
        let named = |body: &str, headers: &HeaderMap| {
            target(&c, headers, body.as_bytes()).map(|m| m.name.clone())
        };
        assert_eq!(
            named(r#"{"model":"b","messages":[]}"#, &plain).as_deref(),
            Some("b")
        );
        // Whatever else the body holds, and wherever the field is.
        assert_eq!(
            named(r#"{"x":{"model":"a"},"stream":true,"model":"b"}"#, &plain).as_deref(),
            Some("b")
        );
        for not_listed in [
            r#"{"model":"a"}"#,
            r#"{"model":"c"}"#,
            r#"{"model":"B"}"#,
            r#"{"messages":[]}"#,
            r#"{"model":7}"#,
            r#"["b"]"#,
            "not json",
            r#"{"model":"b""#,
        ] {
            assert_eq!(named(not_listed, &plain), None, "{not_listed}");
        }
        // Requests other sidecars sent are this pod's to serve or refuse.
        for header in [FORWARDED_HEADER, GATEWAY_HEADER] {
            let mut h = HeaderMap::new();
            h.insert(header, HeaderValue::from_static("x"));
            assert_eq!(named(r#"{"model":"b"}"#, &h), None, "{header}");
        }
        assert_eq!(
            target(&config(&[]), &plain, br#"{"model":"b"}"#).map(|m| &m.name),
            None
        );
    }

    /// The target model's sidecar stand-in: echoes what it received in headers, answers with a
    /// 429 and an SSE body.
    async fn upstream() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let h = req.headers().clone();
                    let seen = |name: &str| {
                        h.get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-")
                            .to_owned()
                    };
                    let res = Response::builder()
                        .status(StatusCode::TOO_MANY_REQUESTS)
                        .header("content-type", "text/event-stream")
                        .header("x-ratelimit-remaining-requests", "0")
                        .header("connection", "keep-alive")
                        .header("x-seen-auth", seen("authorization"))
                        .header("x-seen-signed", seen(FORWARDED_HEADER))
                        .header("x-seen-gateway", seen(GATEWAY_HEADER))
                        .header("x-seen-private", seen("x-private"))
                        .header("x-seen-id", seen("x-request-id"))
                        .header("x-seen-path", req.uri().path().to_owned());
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    Ok::<_, Infallible>(
                        res.body(Full::new(Bytes::from(format!(
                            "data: {}\n\n",
                            String::from_utf8_lossy(&body)
                        ))))
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

    fn count(gateway: &Gateway, model: &str, outcome: &str) -> u64 {
        gateway
            .sent
            .get_or_create(&GatewayLabels {
                model: model.into(),
                outcome: outcome.into(),
            })
            .get()
    }

    #[tokio::test]
    async fn requests_go_on_as_the_client_sent_them_and_answers_come_back_as_given() {
        let b = upstream().await;
        let c = config(&[("b", &b)]);
        let gateway = Gateway::new(
            Forwarder::new(Duration::from_millis(500)),
            &mut Registry::default(),
        );
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer key-1"));
        headers.insert("connection", HeaderValue::from_static("x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        let body = Bytes::from_static(br#"{"model":"b","stream":true}"#);
        let res = gateway
            .forward(
                &c,
                "/v1/chat/completions",
                &headers,
                &body,
                "id-7",
                &deadline(),
            )
            .await
            .expect("sent on")
            .expect("answered");
        assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(res.extensions().get::<OtherModel>().is_some());
        let h = res.headers().clone();
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["content-type"], "text/event-stream");
        assert!(!h.contains_key("connection"), "hop-by-hop dropped");
        assert_eq!(h["x-seen-auth"], "Bearer key-1");
        assert_eq!(h["x-seen-signed"], "-", "not signed: the target admits it");
        assert_eq!(h["x-seen-gateway"], "a");
        assert_eq!(h["x-seen-private"], "-", "named by Connection: hop-by-hop");
        assert_eq!(h["x-seen-id"], "id-7");
        assert_eq!(h["x-seen-path"], "/v1/chat/completions");
        let text = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(
            &text[..],
            b"data: {\"model\":\"b\",\"stream\":true}\n\n".as_slice()
        );
        assert_eq!(count(&gateway, "b", "forwarded"), 1);
    }

    #[tokio::test]
    async fn a_model_that_cannot_be_reached_is_a_503_naming_only_the_model() {
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let c = config(&[("b", &dead)]);
        let gateway = Gateway::new(
            Forwarder::new(Duration::from_millis(500)),
            &mut Registry::default(),
        );
        let body = Bytes::from_static(br#"{"model":"b"}"#);
        let error = gateway
            .forward(
                &c,
                "/v1/completions",
                &HeaderMap::new(),
                &body,
                "id",
                &deadline(),
            )
            .await
            .expect("sent on")
            .expect_err("nothing listens");
        assert_eq!(error.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error.retry_after(), Some(1));
        let json: serde_json::Value = serde_json::from_slice(&error.to_json()).unwrap();
        assert_eq!(json["error"]["code"], "model_unavailable");
        assert_eq!(json["error"]["type"], "server_error");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains("`b`"), "{message}");
        assert!(!message.contains("127.0.0.1"), "no address: {message}");
        assert_eq!(count(&gateway, "b", "connect"), 1);
        // Once the request may have been sent: 502, not to be retried blindly.
        let sent = unreachable("b", &ForwardError::Other("reset".into()), &deadline());
        assert_eq!(sent.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(sent.retry_after(), None);
        let late = unreachable("b", &ForwardError::Timeout, &deadline());
        assert!(matches!(late, ApiError::Timeout(_)), "{late:?}");
    }
}

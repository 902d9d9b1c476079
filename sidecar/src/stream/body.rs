//! Response bodies: the one body type every route answers with, whole bodies, and a body fed
//! through a channel whose closing tells the producer that the client went away.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
};

use http::{HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Body, Bytes, Frame};
use serde::Serialize;
use tokio::sync::mpsc;

/// Response body of every route.
pub type ResponseBody = BoxBody<Bytes, Infallible>;

/// A whole response of `content_type`.
pub fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<ResponseBody> {
    let mut res = Response::new(Full::new(body.into()).boxed());
    *res.status_mut() = status;
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    res
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ResponseBody> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    full(status, "application/json", body)
}

/// Adds `headers` to a response (rate-limit headers on answers and refusals).
pub fn add_headers(res: &mut Response<ResponseBody>, headers: Vec<(HeaderName, HeaderValue)>) {
    for (name, value) in headers {
        res.headers_mut().insert(name, value);
    }
}

/// The sending half of a [`ChannelBody`].
pub type BodySender = mpsc::UnboundedSender<Bytes>;

/// A response body fed through a channel. When hyper drops it (the client disconnected or the
/// connection closed) the sender sees a closed channel and stops the generation.
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::UnboundedReceiver<Bytes>,
}

/// A body and its sender. Unbounded so the engine is never held up by a slow reader; a
/// response is bounded by `max_tokens` anyway.
pub fn channel() -> (BodySender, ChannelBody) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, ChannelBody { rx })
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn body_relays_and_reports_disconnect() {
        let (tx, body) = channel();
        tx.send(Bytes::from_static(b"data: {}\n\n")).unwrap();
        tx.send(Bytes::from_static(crate::stream::sse::DONE))
            .unwrap();
        drop(tx);
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"data: {}\n\ndata: [DONE]\n\n");

        let (tx, body) = channel();
        drop(body);
        assert!(
            tx.send(Bytes::from_static(crate::stream::sse::DONE))
                .is_err(),
            "closed body is visible"
        );
        assert!(tx.is_closed());
    }
}

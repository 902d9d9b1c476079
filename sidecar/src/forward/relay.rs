//! A forwarded request's response on its way back: relayed frame by frame, with the usage read
//! off it as it passes, and the reservation settled exactly once.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Mutex, PoisonError},
    task::{Context, Poll, ready},
    time::Duration,
};

use http::{HeaderMap, HeaderName, Response, header};
use http_body_util::BodyExt;
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::time::{Instant as TokioInstant, Sleep};

use crate::{
    admit::{Outcome, Reservation},
    openai::ApiError,
    stream::{
        body::ResponseBody,
        sse::{self, find},
        timing::DrainCut,
    },
    usage::Usage,
};

/// Largest non-streaming response body, or streamed event, kept (besides relaying it) to read
/// its `usage`.
const MAX_SCANNED_JSON: usize = 1 << 20;

/// The response of another variant, relayed: status and end-to-end headers as they came, the
/// body frame by frame, ended at `deadline` (when the request times out, and its timeout for
/// the error) if it is still running then.
pub(super) fn relay(
    res: Response<Incoming>,
    reservation: Box<dyn Reservation>,
    prompt_tokens: usize,
    drain_cut: Option<DrainCut>,
    deadline: Option<(TokioInstant, Duration)>,
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
        cut: drain_cut.map(|mut cut| {
            let count = cut.count.clone();
            let wait: DrainWait = Box::pin(async move { cut.wait().await });
            (Mutex::new(wait), count)
        }),
        timeout: deadline.map(|(at, after)| (Box::pin(tokio::time::sleep_until(at)), after)),
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
    /// Resolves when the drain's grace period is over (in a mutex only so the body is `Sync`),
    /// and the counter of answers it ended.
    cut: Option<(Mutex<DrainWait>, Counter)>,
    /// Fires when the request times out, and the timeout (for the error). Without it a variant
    /// gone silent mid-answer (its network down, its process frozen) would hold the client and
    /// the reservation until TCP gives up on the connection, many minutes later: nothing else
    /// reads a deadline once the response's headers have come.
    timeout: Option<(Pin<Box<Sleep>>, Duration)>,
}

/// Resolves when the drain's grace period is over.
type DrainWait = Pin<Box<dyn Future<Output = ()> + Send>>;

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

    /// At the end of the drain's grace period, ends the answer: a stream with an error event and
    /// `[DONE]` (after the end of an event cut in two, so the error parses), a JSON body by
    /// ending it short. `None` while the grace period lasts.
    fn poll_cut(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Option<Option<Result<Frame<Bytes>, Infallible>>> {
        let (wait, count) = self.cut.as_mut()?;
        let wait = wait.get_mut().unwrap_or_else(PoisonError::into_inner);
        if wait.as_mut().poll(cx).is_pending() {
            return None;
        }
        count.inc();
        self.cut = None;
        self.finished = true;
        tracing::warn!("grace period over; forwarded answer ended");
        self.settle(Outcome::Failed);
        Some(self.end_with(&ApiError::Draining))
    }

    /// When the request times out, ends the answer as [`Self::poll_cut`] does, with a timeout
    /// error. `None` until then.
    fn poll_timeout(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Option<Option<Result<Frame<Bytes>, Infallible>>> {
        let (sleep, after) = self.timeout.as_mut()?;
        if sleep.as_mut().poll(cx).is_pending() {
            return None;
        }
        let error = ApiError::Timeout(*after);
        self.timeout = None;
        self.finished = true;
        tracing::warn!("the request timed out while a forwarded answer was relayed; ended");
        self.settle(Outcome::Failed);
        Some(self.end_with(&error))
    }

    /// The last frame of an answer ended early with `error`: a stream's error event and
    /// `[DONE]` (after the end of an event cut in two, so the error parses); none for a JSON
    /// body, which is ended short.
    fn end_with(&self, error: &ApiError) -> Option<Result<Frame<Bytes>, Infallible>> {
        if !self.scan.sse {
            return None;
        }
        let mut bytes = if self.scan.mid_event() {
            b"\n\n".to_vec()
        } else {
            Vec::new()
        };
        bytes.extend_from_slice(&sse::data_event(&error.body()));
        bytes.extend_from_slice(sse::DONE);
        Some(Ok(Frame::data(Bytes::from(bytes))))
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
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if let Some(tail) = this.tail.take() {
            return Poll::Ready(Some(Ok(Frame::data(tail))));
        }
        if this.finished {
            return Poll::Ready(None);
        }
        if let Some(ended) = this.poll_cut(cx) {
            return Poll::Ready(ended);
        }
        if let Some(ended) = this.poll_timeout(cx) {
            return Poll::Ready(ended);
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
                    let e = ApiError::VariantUnavailable {
                        variant: None,
                        message: format!(
                            "the variant serving this request failed mid-stream: {error}"
                        ),
                    };
                    let mut bytes = sse::data_event(&e.body()).to_vec();
                    bytes.extend_from_slice(sse::DONE);
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
/// else the counted prompt plus one token per streamed content chunk. Public for the fuzzer
/// (`fuzz/`): it parses bytes another pod sent.
#[derive(Debug)]
pub struct UsageScan {
    sse: bool,
    prompt_tokens: usize,
    buf: Vec<u8>,
    deltas: usize,
    reported: Option<Usage>,
    overflow: bool,
}

impl UsageScan {
    /// A scan of an SSE (`sse`) or JSON response to a request of `prompt_tokens`.
    pub fn new(sse: bool, prompt_tokens: usize) -> Self {
        Self {
            sse,
            prompt_tokens,
            buf: Vec::new(),
            deltas: 0,
            reported: None,
            overflow: false,
        }
    }

    /// Reads the next chunk of the body, as it arrived.
    pub fn feed(&mut self, data: &[u8]) {
        if !self.sse {
            if self.buf.len() + data.len() <= MAX_SCANNED_JSON {
                self.buf.extend_from_slice(data);
            } else {
                self.overflow = true;
            }
            return;
        }
        // Only a chunk that ends an event is worth splitting (rescanning the buffer on every
        // chunk of a long event would be quadratic); an event over the bound is no chunk of
        // ours and is dropped unread (the tail left of it is no `data:` event either).
        let scanned = self.buf.len().saturating_sub(1);
        self.buf.extend_from_slice(data);
        if find(&self.buf[scanned..], b"\n\n").is_none() {
            if self.buf.len() > MAX_SCANNED_JSON {
                self.buf.clear();
            }
            return;
        }
        let (reported, deltas) = (&mut self.reported, &mut self.deltas);
        sse::split_events(&mut self.buf, |json| {
            if json == sse::DONE_PAYLOAD {
                return;
            }
            if find(json, b"\"usage\":{").is_some() {
                *reported = parse_usage(json).or(*reported);
            } else if find(json, b"\"choices\":[{").is_some() {
                *deltas += 1;
            }
        });
    }

    /// Whether the stream relayed so far stops in the middle of an event.
    pub fn mid_event(&self) -> bool {
        self.sse && !self.buf.is_empty()
    }

    /// The usage of the response read so far.
    pub fn usage(&mut self) -> Usage {
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

/// Headers that describe one connection, not the message (RFC 9110 7.6.1), plus those the
/// `Connection` header names.
pub(super) fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;

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
        // An event over the bound, sent a byte at a time, is dropped; the next ones still count.
        let mut scan = UsageScan::new(true, 3);
        scan.feed(b"data: {\"choices\":[{\"x\":\"");
        for _ in 0..MAX_SCANNED_JSON {
            scan.feed(b"a");
        }
        scan.feed(b"\"}]}\n\n");
        scan.feed(&stream[..cut]);
        assert_eq!(scan.usage(), Usage::new(3, 2));
        // JSON bodies.
        let mut scan = UsageScan::new(false, 3);
        scan.feed(br#"{"id":"x","choices":[{"text":"a"}],"usage":{"prompt_tokens":4,"#);
        scan.feed(br#""completion_tokens":1,"total_tokens":5}}"#);
        assert_eq!(scan.usage(), Usage::new(4, 1));
    }
}

//! Connections before and between requests: how many a listener holds (in all and per client),
//! and how long one may wait for a request or take to send its head; and the pace a request's
//! body must keep ([`BodyPace`]), which the request path enforces as it reads the body.
//!
//! hyper closes a connection whose head is slow without a word and never closes one that sends
//! nothing (its header timer starts at the first byte), so a flood of silent sockets used to hold
//! file descriptors until the process could not accept its own probes. Each connection's socket
//! is therefore wrapped in a [`TimedIo`], which learns from [`Activity`] whether a request is in
//! flight and otherwise ends the connection when its wait is over: silently when it is idle, with
//! a 408 when a request head was begun.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::IpAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::task::AtomicWaker;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use prometheus_client::metrics::gauge::Gauge;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
    sync::Semaphore,
    time::{Instant, Sleep},
};

use crate::{
    metrics::{ConnectionMetrics, ConnectionReasonLabels, ListenerLabels},
    openai::ApiError,
};

/// Refused connections answered at once; past this many, further ones are closed unanswered
/// (each answer holds its socket for up to [`REFUSAL_LINGER`], out of the descriptors
/// `open_files::RESERVED` keeps).
const REFUSALS_IN_FLIGHT: usize = 16;

/// How long a refused connection is kept to read what the client sent, so that closing it does
/// not reset the connection and lose the 503 before the client reads it.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// The limits of one listener's connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once; more are answered 503 and closed.
    pub max_connections: usize,
    /// Connections open at once from one client address (`None`: no such limit).
    pub max_per_client: Option<usize>,
    /// Time to send a whole request head: on a new connection from when it opens, on a kept-alive
    /// one from its first byte. Over it: 408 and closed (closed silently if nothing came).
    pub header_timeout: Duration,
    /// Time a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
}

/// The pace a request body must keep, as Apache's `mod_reqtimeout` (`body=20,MinRate=500`)
/// measures it: the body may take `allowance`, plus a second for every `min_bytes_per_sec` bytes
/// received. A stalled or trickled body is cut early; a large one sent at any usable pace is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BodyPace {
    /// Time any body may take, however small.
    pub allowance: Duration,
    /// Bytes per second that earn a body more time.
    pub min_bytes_per_sec: u64,
}

impl BodyPace {
    /// When a body begun at `start` that has `received` bytes so far must be whole.
    pub(super) fn deadline(&self, start: Instant, received: usize) -> Instant {
        let earned = received as f64 / self.min_bytes_per_sec.max(1) as f64;
        start + self.allowance + Duration::from_secs_f64(earned)
    }
}

/// One listener's connections: counts them, refuses those over its limits, and wraps the
/// admitted ones in [`TimedIo`].
#[derive(Debug)]
pub struct Connections {
    listener: &'static str,
    limits: ConnectionLimits,
    /// Open connections, in all and per client address.
    open: Mutex<OpenCount>,
    /// `sluice_connections_open` of this listener.
    open_gauge: Gauge,
    metrics: ConnectionMetrics,
    /// The 408 a connection gets when its head is too slow (the same for every connection).
    header_timeout_response: Bytes,
    refusals: Arc<Semaphore>,
}

#[derive(Debug, Default)]
struct OpenCount {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
    /// The most connections open at once since the heap was last trimmed.
    peak: usize,
}

/// A burst of at least this many connections has its memory given back once it subsides to an
/// eighth of its peak ([`crate::heap`]).
const TRIM_AFTER_CONNECTIONS: usize = 512;

/// An admitted connection's place in the count; given back when it is dropped.
#[derive(Debug)]
pub struct Permit {
    connections: Arc<Connections>,
    peer: IpAddr,
}

impl Connections {
    /// The connections of `listener` (`api` or `admin`, the metrics' label) under `limits`.
    pub fn new(
        listener: &'static str,
        limits: ConnectionLimits,
        metrics: ConnectionMetrics,
    ) -> Arc<Self> {
        let timeout = ApiError::ReadTimeout(format!(
            "the request head did not arrive within {}s",
            limits.header_timeout.as_secs_f64()
        ));
        let open_gauge = metrics
            .open
            .get_or_create(&ListenerLabels { listener })
            .clone();
        Arc::new(Self {
            listener,
            limits,
            open: Mutex::default(),
            open_gauge,
            metrics,
            header_timeout_response: raw_response(&timeout),
            refusals: Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT)),
        })
    }

    /// Counts a new connection from `peer` in, or says which limit it is over.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.total >= self.limits.max_connections {
            return Err(self.refused(self.limits.max_connections, false));
        }
        if let Some(max) = self.limits.max_per_client {
            let from_peer = open.per_client.entry(peer).or_default();
            if *from_peer >= max {
                return Err(self.refused(max, true));
            }
            *from_peer += 1;
        }
        open.total += 1;
        open.peak = open.peak.max(open.total);
        self.open_gauge.inc();
        Ok(Permit {
            connections: self.clone(),
            peer,
        })
    }

    fn refused(&self, limit: usize, per_client: bool) -> ApiError {
        let reason = if per_client {
            "max_connections_per_client"
        } else {
            "max_connections"
        };
        self.metrics
            .refused
            .get_or_create(&ConnectionReasonLabels {
                listener: self.listener,
                reason,
            })
            .inc();
        ApiError::TooManyConnections { limit, per_client }
    }

    /// Answers a refused connection with `error` and closes it, in a task of its own so the
    /// accept loop goes on; past [`REFUSALS_IN_FLIGHT`] answers at once, closes it unanswered.
    pub fn refuse(&self, mut stream: TcpStream, error: &ApiError) {
        let Ok(permit) = self.refusals.clone().try_acquire_owned() else {
            return;
        };
        let response = raw_response(error);
        tokio::spawn(async move {
            let _permit = permit;
            let answer = async {
                stream.write_all(&response).await?;
                stream.shutdown().await?;
                // Read until the client closes, so closing does not reset the connection
                // (unread data at close sends a RST, which can discard the 503 unread).
                let mut sink = [0u8; 1024];
                while stream.read(&mut sink).await? > 0 {}
                io::Result::Ok(())
            };
            let _ = tokio::time::timeout(REFUSAL_LINGER, answer).await;
        });
    }

    /// Wraps an admitted connection's socket; `activity` is what its requests report to.
    pub fn wrap(&self, stream: TcpStream, permit: Permit, activity: Arc<Activity>) -> TimedIo {
        TimedIo {
            inner: stream,
            permit,
            activity,
            wait: Wait::Head,
            since: Instant::now(),
            head_begun: false,
            answered: 0,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            timer_at: None,
            closed: false,
        }
    }

    fn timed_out(&self, reason: &'static str) {
        self.metrics
            .timed_out
            .get_or_create(&ConnectionReasonLabels {
                listener: self.listener,
                reason,
            })
            .inc();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let c = &self.connections;
        let mut open = c.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.total = open.total.saturating_sub(1);
        if c.limits.max_per_client.is_some()
            && let Some(n) = open.per_client.get_mut(&self.peer)
        {
            *n -= 1;
            if *n == 0 {
                open.per_client.remove(&self.peer);
            }
        }
        c.open_gauge.dec();
        if open.peak >= TRIM_AFTER_CONNECTIONS && open.total * 8 <= open.peak {
            open.peak = open.total;
            drop(open);
            crate::heap::release_free_memory();
        }
    }
}

/// An HTTP/1.1 response written straight to a socket, for the answers given where hyper has no
/// request to answer (a refused connection, a head that never finished).
fn raw_response(error: &ApiError) -> Bytes {
    let status = error.status();
    let body = error.to_json();
    let retry_after = error
        .retry_after()
        .map(|secs| format!("retry-after: {secs}\r\n"))
        .unwrap_or_default();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         {retry_after}connection: close\r\n\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
    )
    .into_bytes();
    out.extend_from_slice(&body);
    Bytes::from(out)
}

/// What a connection's requests tell its [`TimedIo`]: whether one is in flight (then the
/// connection is not waiting for anything) and how many have been answered.
#[derive(Debug, Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    answered: AtomicU64,
    /// The connection's reader, woken when the last request in flight ends: hyper may have
    /// polled it while the answer was still held, and the idle timer starts only on a poll.
    reader: AtomicWaker,
}

impl Activity {
    /// A request began (hyper has its head); it is in flight until the guard drops, which
    /// [`Guarded`] does when the response body ends or is dropped.
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestGuard(self.clone())
    }
}

/// Holds a request in flight on its connection.
#[derive(Debug)]
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.answered.fetch_add(1, Ordering::AcqRel);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.reader.wake();
        }
    }
}

/// A response body that keeps its request in flight until it ends.
#[derive(Debug)]
pub struct Guarded<B> {
    body: B,
    _guard: RequestGuard,
}

impl<B> Guarded<B> {
    /// `body`, holding `guard` until it is dropped.
    pub fn new(body: B, guard: RequestGuard) -> Self {
        Self {
            body,
            _guard: guard,
        }
    }
}

impl<B: Body + Unpin> Body for Guarded<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// What a connection with no request in flight is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// A request is in flight: nothing to time here.
    Busy,
    /// The next request, after an answer.
    Idle,
    /// The rest of a request head (or, on a new connection, its first request).
    Head,
}

/// A connection's socket that ends the connection when it has waited too long for a request
/// (see the module's comment). Reads return end-of-file once it has.
#[derive(Debug)]
pub struct TimedIo {
    inner: TcpStream,
    permit: Permit,
    activity: Arc<Activity>,
    wait: Wait,
    /// When the current wait began.
    since: Instant,
    /// Whether bytes of the awaited head have come (a timeout is then answered 408).
    head_begun: bool,
    /// Requests answered when last looked at.
    answered: u64,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<Instant>,
    closed: bool,
}

impl TimedIo {
    /// Moves to the wait the connection is in now; `read` says whether bytes just came.
    fn observe(&mut self, read: bool, cx: &Context<'_>) {
        // Registered before the count is read, so an answer ending in between still wakes us.
        self.activity.reader.register(cx.waker());
        if self.activity.in_flight.load(Ordering::Acquire) > 0 {
            self.wait = Wait::Busy;
            return;
        }
        let answered = self.activity.answered.load(Ordering::Acquire);
        if self.wait == Wait::Busy || answered != self.answered {
            self.answered = answered;
            self.wait = Wait::Idle;
            self.since = Instant::now();
            self.head_begun = false;
        }
        if read {
            if self.wait == Wait::Idle {
                self.wait = Wait::Head;
                self.since = Instant::now();
            }
            self.head_begun = true;
        }
    }

    fn deadline(&self) -> Option<Instant> {
        let limits = &self.permit.connections.limits;
        match self.wait {
            Wait::Busy => None,
            Wait::Idle => Some(self.since + limits.idle_timeout),
            Wait::Head => Some(self.since + limits.header_timeout),
        }
    }

    /// The wait is over: answers 408 if a head was begun, shuts the socket and reports
    /// end-of-file to hyper, which then closes the connection.
    fn expire(&mut self, cx: &mut Context<'_>) {
        self.closed = true;
        let connections = self.permit.connections.clone();
        if self.head_begun {
            connections.timed_out("header");
            tracing::debug!(
                listener = connections.listener,
                "request head too slow; 408"
            );
            // A fresh socket's send buffer takes these few hundred bytes at once; if it
            // cannot, the connection closes without them.
            let _ = Pin::new(&mut self.inner).poll_write(cx, &connections.header_timeout_response);
        } else {
            connections.timed_out("idle");
        }
        let _ = Pin::new(&mut self.inner).poll_shutdown(cx);
    }
}

impl AsyncRead for TimedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.closed {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before;
        self.observe(read, cx);
        if polled.is_ready() {
            return polled;
        }
        let Some(deadline) = self.deadline() else {
            return Poll::Pending;
        };
        if self.timer_at != Some(deadline) {
            self.timer.as_mut().reset(deadline);
            self.timer_at = Some(deadline);
        }
        if self.timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.expire(cx);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TimedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{self, ConnectionMetrics};

    fn limits(max: usize, per_client: Option<usize>) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: max,
            max_per_client: per_client,
            header_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn limits_refuse_past_the_count_and_give_back_on_drop() {
        let mut registry = metrics::new_registry();
        let m = ConnectionMetrics::register(&mut registry);
        let c = Connections::new("api", limits(2, Some(1)), m);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let first = c.admit(a).unwrap();
        let e = c.admit(a).unwrap_err();
        assert!(matches!(
            e,
            ApiError::TooManyConnections {
                limit: 1,
                per_client: true
            }
        ));
        let _second = c.admit(b).unwrap();
        let e = c.admit("10.0.0.3".parse().unwrap()).unwrap_err();
        assert!(matches!(
            e,
            ApiError::TooManyConnections {
                limit: 2,
                per_client: false
            }
        ));
        drop(first);
        let _again = c.admit(a).unwrap();
        let text = metrics::encode(&registry);
        assert!(
            text.contains("sluice_connections_open{listener=\"api\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "sluice_connections_refused_total{listener=\"api\",reason=\"max_connections\"} 1"
            ),
            "{text}"
        );
    }

    #[test]
    fn raw_answers_are_http_with_openai_bodies() {
        let e = ApiError::TooManyConnections {
            limit: 4,
            per_client: false,
        };
        let raw = raw_response(&e);
        let text = std::str::from_utf8(&raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{head}"
        );
        assert!(head.contains("retry-after: 1\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}\r\n", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "too_many_connections");
    }
}

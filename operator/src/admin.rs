//! The admin server: `/metrics`, `/healthz` (the process is alive) and `/readyz` (the API
//! server was reached; true on followers too, so a rollout of the operator never stalls).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info};

use crate::Result;

/// What the admin routes read.
pub struct AdminState {
    /// Every metric of the binary.
    pub registry: Registry,
    /// Set once the operator reached the API server; never unset (a latch).
    pub ready: watch::Receiver<bool>,
}

/// Binds `addr` and serves until `shutdown` fires.
pub async fn serve(
    addr: SocketAddr,
    state: Arc<AdminState>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, "admin server listening");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| route(req, state.clone()));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(error) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(%error, "admin connection closed");
            }
        });
    }
}

async fn route(
    req: Request<Incoming>,
    state: Arc<AdminState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = |code: StatusCode, body: String, ct: &'static str| {
        let mut resp = Response::new(Full::new(Bytes::from(body)));
        *resp.status_mut() = code;
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
        resp
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    Ok(match req.uri().path() {
        "/metrics" => {
            let mut body = String::new();
            match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
                Ok(()) => text(
                    StatusCode::OK,
                    body,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
                Err(_) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "cannot encode metrics\n".into(),
                    PLAIN,
                ),
            }
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into(), PLAIN),
        "/readyz" if *state.ready.borrow() => text(StatusCode::OK, "ready\n".into(), PLAIN),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: API server not reached yet\n".into(),
            PLAIN,
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), PLAIN),
    })
}

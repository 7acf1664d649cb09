//! The Prometheus metrics listener: plain HTTP on `metrics_listen`, apart from the API,
//! answering only `GET /metrics` (404 for anything else) with [`crate::metrics`]'
//! exposition. Apart because Prometheus' `authorization` setting sends `Type credentials`,
//! which PVE's `PVEAPIToken=...` header is not, and because scrapes must neither take the
//! API's connection slots (`max_connections`) nor be refused by them. Bind it to loopback
//! or a management network: it has no authentication. Each connection serves one request
//! and is closed; one that sends no request head within [`HEADER_TIMEOUT`] is dropped; past
//! [`MAX_CONNECTIONS`] open ones a new connection is answered 503, so idle connections can
//! neither queue nor starve a scrape.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;

use crate::lifecycle::ShutdownWatch;
use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE};

/// Connections open at once at most; one more is answered 503 at once rather than queued
/// behind them (a queued scrape would outlast Prometheus' 10 s scrape timeout).
pub const MAX_CONNECTIONS: usize = 64;
/// How long a connection may take to send its request head. A scraper sends it right
/// after connecting; an idle connection is dropped after this, freeing its place.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// The longest one connection lives, the answer included (a reader that stalls).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// A running metrics listener; it stops accepting when its [`ShutdownWatch`] says so.
pub struct MetricsServer {
    pub addr: SocketAddr,
}

impl MetricsServer {
    /// The scrape URL, e.g. `http://127.0.0.1:9710/metrics`.
    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }
}

/// Binds `addr` and serves `GET /metrics` from `metrics` in the background.
pub async fn serve(
    metrics: Arc<Metrics>,
    addr: SocketAddr,
    mut shutdown: ShutdownWatch,
) -> anyhow::Result<MetricsServer> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener {addr} (metrics_listen)"))?;
    let addr = listener.local_addr()?;
    let router = Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "only GET /metrics is served here\n") })
        .with_state(metrics);
    let busy = Router::new().fallback(|| async {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many metrics connections (at most {MAX_CONNECTIONS}) - try again later\n"),
        )
    });
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.requested() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("metrics listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // Accepted always, so a full listener answers instead of leaving the
            // scraper in the kernel's queue.
            let slot = Arc::clone(&slots).try_acquire_owned().ok();
            let service = match slot {
                Some(_) => router.clone(),
                None => {
                    tracing::debug!(%peer, "metrics listener full ({MAX_CONNECTIONS} connections)");
                    busy.clone()
                }
            };
            tokio::spawn(async move {
                let _slot = slot;
                serve_one(tcp, peer, service).await;
            });
        }
    });
    Ok(MetricsServer { addr })
}

/// One request on `tcp`, then the connection closes (`Connection: close`): a kept-alive or
/// idle connection would hold its place between scrapes.
async fn serve_one(tcp: tokio::net::TcpStream, peer: SocketAddr, router: Router) {
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(false)
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router));
    match tokio::time::timeout(CONNECTION_TIMEOUT, conn).await {
        Ok(Err(e)) => tracing::debug!(%peer, "metrics connection ended: {e}"),
        Err(_) => tracing::debug!(%peer, "metrics connection timed out"),
        Ok(Ok(())) => {}
    }
}

/// OpenMetrics when the scraper accepts it (Prometheus asks for it first), else the
/// Prometheus text format 0.0.4 (curl, `promtool check metrics`).
async fn scrape(State(metrics): State<Arc<Metrics>>, headers: HeaderMap) -> Response {
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let (body, content_type) = if openmetrics {
        (metrics.encode(true), OPENMETRICS_CONTENT_TYPE)
    } else {
        (metrics.encode(false), TEXT_CONTENT_TYPE)
    };
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

//! The Prometheus metrics listener: plain HTTP on `metrics_listen`, apart from the API,
//! answering only `GET /metrics` (404 for anything else) with [`crate::metrics`]'
//! exposition. Apart because Prometheus' `authorization` setting sends `Type credentials`,
//! which PVE's `PVEAPIToken=...` header is not, and because scrapes must neither take the
//! API's connection slots (`max_connections`) nor be refused by them. Bind it to loopback
//! or a management network: it has no authentication.

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

use crate::metrics::{Metrics, OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE};

/// Scrapes served at once at most; more wait in the kernel's accept queue.
const MAX_SCRAPES: usize = 16;

/// A running metrics listener; stops when aborted (with `serve`).
pub struct MetricsServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl MetricsServer {
    /// The scrape URL, e.g. `http://127.0.0.1:9710/metrics`.
    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }

    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Binds `addr` and serves `GET /metrics` from `metrics` in the background.
pub async fn serve(metrics: Arc<Metrics>, addr: SocketAddr) -> anyhow::Result<MetricsServer> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener {addr} (metrics_listen)"))?;
    let addr = listener.local_addr()?;
    let router = Router::new()
        .route("/metrics", axum::routing::get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "only GET /metrics is served here\n") })
        .with_state(metrics);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPES));
    let task = tokio::spawn(async move {
        loop {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!("metrics listener: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = TowerToHyperService::new(router.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(tcp), service);
                // A scraper that stalls must not hold a slot forever.
                match tokio::time::timeout(Duration::from_secs(60), conn).await {
                    Ok(Err(e)) => tracing::debug!(%peer, "metrics connection ended: {e}"),
                    Err(_) => tracing::debug!(%peer, "metrics connection timed out"),
                    Ok(Ok(())) => {}
                }
            });
        }
    });
    Ok(MetricsServer { addr, task })
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

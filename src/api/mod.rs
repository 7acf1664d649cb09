//! The HTTPS API under `/api2/json/` (and `/api2/extjs/`): TLS accept loop (plain HTTP when
//! the node is configured with `tls = false`), HTTP/1.1 with upgrades, routing, parameter
//! parsing and PVE's reply envelope. `routes` holds one router per path area; each
//! endpoint is declared as data (`endpoint::Endpoint`: parameters, path parameters,
//! privilege and their order) and run by the one checked-request function
//! (`endpoint::route`), so a typed handler only translates its arguments and calls into
//! [`crate::tunnel`], [`crate::task`] and friends; no business logic lives here. The same listener serves the status page at `/` (`status_page`: static
//! files, and the data through the API). The Prometheus metrics listener ([`metrics`]) is a
//! separate plain-HTTP server beside it.

mod endpoint;
pub mod metrics;
pub mod proxy;
pub mod reply;
pub mod request;
mod routes;
mod status_page;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio_rustls::TlsAcceptor;

use crate::lifecycle::ShutdownWatch;
use crate::node::Node;
use crate::tunnel::Tunnels;
use tls::TlsIdentity;

/// Largest request head (request line and headers) accepted; larger ones get 431.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// What every endpoint can reach.
pub struct AppState {
    pub node: Arc<Node>,
    /// The node's tunnel layer (its services are `node`'s).
    pub tunnels: Arc<Tunnels>,
    pub tls: TlsIdentity,
}

/// A running API server.
pub struct Server {
    pub addr: SocketAddr,
    pub fingerprint: String,
    /// Whether the listener speaks TLS (`https://`) or plain HTTP (`http://`).
    pub tls: bool,
}

impl Server {
    /// The API's base URL, e.g. `https://127.0.0.1:8006/api2/json`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/api2/json", self.addr)
    }
}

/// Binds the listen address and serves the API in the background, over TLS unless the
/// node is configured with `tls = false`.
/// Stops accepting when `shutdown` says so (connections already accepted go on: a
/// tunnel's WebSockets end with its task).
pub async fn serve(
    node: Arc<Node>,
    tunnels: Arc<Tunnels>,
    tls: TlsIdentity,
    mut shutdown: ShutdownWatch,
) -> anyhow::Result<Server> {
    // Buffers sized for long fat paths (src/net/sockbuf.rs), inherited by accepted sockets.
    crate::net::sockbuf::set_tcp_buffer(node.cfg.tcp_buffer);
    let listener = crate::net::sockbuf::listen(node.cfg.listen)?;
    let addr = listener.local_addr()?;
    let acceptor = if node.cfg.tls {
        Some(TlsAcceptor::from(tls.server_config()?))
    } else {
        None
    };
    let use_tls = acceptor.is_some();
    let fingerprint = tls.fingerprint.clone();
    let limits = ConnLimits {
        slots: Arc::new(tokio::sync::Semaphore::new(node.cfg.max_connections)),
        max: node.cfg.max_connections,
        keepalive: node.cfg.peer_timeout,
        cluster_node: node.cluster.is_some().then(|| node.cfg.node.clone()),
    };
    let state = Arc::new(AppState { node, tunnels, tls });
    let router = routes::router(state);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.requested() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // TCP_NODELAY and the unsent cap of client connections (src/net/stream.rs).
            crate::net::stream::tune(&tcp);
            set_keepalive(&tcp, limits.keepalive);
            // Held until the connection ends or is upgraded: hyper hands an upgraded
            // stream off after its 101, and the stream itself holds no slot.
            let slot = Arc::clone(&limits.slots).try_acquire_owned().ok();
            let (router, keep_alive) = match slot {
                Some(_) => (router.clone(), true),
                None => {
                    tracing::warn!(%peer, "connection limit reached (max_connections = {})", limits.max);
                    (busy_router(&limits, router.clone()), false)
                }
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let Some(acceptor) = acceptor else {
                    serve_connection(tcp, router, peer, keep_alive).await;
                    return;
                };
                let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, "TLS handshake failed: {e}");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                serve_connection(tls, router, peer, keep_alive).await;
            });
        }
    });
    Ok(Server {
        addr,
        fingerprint,
        tls: use_tls,
    })
}

/// The connection cap and TCP keepalive of accepted connections.
struct ConnLimits {
    slots: Arc<tokio::sync::Semaphore>,
    max: usize,
    keepalive: Duration,
    /// This node's name when it is in a cluster (and so forwards `/nodes/{other}/...`).
    cluster_node: Option<String>,
}

/// A connection over the cap: one request, then closed. It gets 503 with PVE's envelope,
/// except a WebSocket of a tunnel open on this node (its ticket is checked as always): a
/// stream of a running migration must not fail because strangers hold the slots. A
/// WebSocket this node would forward to another member gets the 503 too: it would hold
/// connections here and there that no slot accounts for.
fn busy_router(limits: &ConnLimits, real: axum::Router) -> axum::Router {
    use tower::ServiceExt;
    let max = limits.max;
    let cluster_node = limits.cluster_node.clone();
    axum::Router::new().fallback(move |req: axum::extract::Request| {
        let real = real.clone();
        let path = req.uri().path();
        let forwarded = cluster_node
            .as_deref()
            .is_some_and(|local| proxy::forwarded_node(path, local).is_some());
        let exempt = path.ends_with("/mtunnelwebsocket") && !forwarded;
        async move {
            if exempt {
                return match real.oneshot(req).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
            }
            reply::render(
                reply::Format::from_path(req.uri().path()),
                Err(crate::error::Error::Unavailable(format!(
                    "too many connections (max_connections = {max}) - try again later"
                ))),
            )
        }
    })
}

/// TCP keepalive probes a silent peer (idle a third of `peer_timeout`, then every few
/// seconds). No TCP_USER_TIMEOUT: it would also cut a live peer that only reads slowly;
/// the WebSocket watchdog notices a vanished peer whatever we send.
fn set_keepalive(tcp: &tokio::net::TcpStream, peer_timeout: Duration) {
    use nix::sys::socket::{setsockopt, sockopt};
    let secs = peer_timeout.as_secs().clamp(3, 86_400);
    let idle = (secs / 3).max(1) as u32;
    let probes = 3u32;
    let interval = ((secs - u64::from(idle)) / u64::from(probes)).max(1) as u32;
    let set = setsockopt(tcp, sockopt::KeepAlive, &true)
        .and_then(|()| setsockopt(tcp, sockopt::TcpKeepIdle, &idle))
        .and_then(|()| setsockopt(tcp, sockopt::TcpKeepInterval, &interval))
        .and_then(|()| setsockopt(tcp, sockopt::TcpKeepCount, &probes));
    if let Err(e) = set {
        tracing::debug!("setting TCP keepalive: {e}");
    }
}

/// HTTP/1.1 with upgrades on one accepted connection (TLS or plain).
async fn serve_connection<S>(io: S, router: axum::Router, peer: SocketAddr, keep_alive: bool)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(keep_alive)
        .header_read_timeout(Duration::from_secs(30))
        .max_buf_size(64 * 1024)
        // Without this the buffer limit only applies to headers that arrive
        // in pieces; one large read could slip through.
        .max_header_size(MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, "connection ended: {e}");
    }
}

//! One address for the fleet: a request for `/nodes/{other}/...` that reaches this node is
//! passed on to the cluster member `other`, as pveproxy does inside a PVE cluster. The
//! member's address and certificate fingerprint come from its membership record; the TLS
//! connection to it is pinned to that fingerprint. A WebSocket upgrade is passed on too,
//! and after the owner's `101` the bytes are copied both ways until either side closes.
//!
//! Who is forwarded: only a caller this node authenticates, exactly as its own routes do
//! (the `Authorization: PVEAPIToken=...` header, which PVE's clients send on the tunnel's
//! WebSocket upgrades as well). The rule is the simplest honest one: the token must exist
//! on this node and its secret must match here; anything else (no header, one that does
//! not parse, a token id this node does not know, a wrong secret) gets this node's own 401
//! after `auth_failure_delay`, before etcd is asked anything. So an unauthenticated caller
//! gets one answer for a live member and for a name that is none, and cannot make this
//! node read etcd. The owning node authenticates the token again and checks privileges and
//! the tunnel ticket (tickets stay verifiable only by the node that made them), so a
//! forwarded token must exist with the same secret on both nodes. Member lookups are
//! cached for a second ([`crate::cluster::Cluster::member`]). Failures to reach etcd or
//! the member are answered with generic texts; their causes (addresses, etcd URLs) go to
//! the log only.
//!
//! A request forwarded once carries [`FORWARDED_BY`]; a second hop is refused, so two nodes
//! that disagree about membership cannot bounce a request between them.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Request, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use hyper_util::rt::TokioIo;

use super::reply::{Format, render};
use crate::error::Error;

/// Set on a request this node passes on, to the name of this node.
pub const FORWARDED_BY: &str = "x-mtunnel-forwarded-by";

/// How long connecting and the TLS handshake to a member may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the member may take to answer with a response head (a tunnel's `POST` waits
/// for its worker to start; PVE's clients wait up to a few minutes for API calls).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(180);

/// Where a request for another node goes.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The member's node name (for messages).
    pub node: String,
    /// Its API base, `https://host:port` (or `http://` for a node with `tls = false`).
    pub api_url: String,
    /// Its certificate's SHA-256 fingerprint (ignored for `http://`).
    pub fingerprint: String,
}

/// Router middleware: a request for `/nodes/{other}/...` goes to the cluster member
/// `other`; everything else (and every request without `[cluster]`) is served here.
/// The caller must first authenticate here (see the module doc); only then is etcd asked.
pub(super) async fn route_to_owner(
    State(st): State<Arc<super::AppState>>,
    req: Request<Body>,
    next: Next,
) -> Response {
    let Some(cluster) = st.node.cluster.as_ref() else {
        return next.run(req).await;
    };
    let Some(target) = forwarded_node(req.uri().path(), &st.node.cfg.node).map(str::to_string)
    else {
        return next.run(req).await;
    };
    // An unknown format is answered here (501), as for a local path.
    let Ok(format) = Format::known(req.uri().path()) else {
        return next.run(req).await;
    };
    if let Err(e) = super::request::authenticate(&st, req.headers()).await {
        return render(format, Err(e));
    }
    let local = &st.node.cfg.node;
    match cluster.member(&target).await {
        Ok(Some(member)) => {
            let upstream = Upstream {
                node: member.node,
                api_url: member.api_url,
                fingerprint: member.fingerprint,
            };
            forward(&upstream, &hop(&st), req).await
        }
        // PVE's wording for a node it cannot reach (`PVE::Cluster::remote_node_ip`).
        Ok(None) => render(
            format,
            Err(Error::internal(format!(
                "unable to get IP for node '{target}' - node offline?"
            ))),
        ),
        Err(e) => {
            // The cause names etcd's addresses: for the log, not for the caller.
            tracing::warn!(node = %target, "looking up the member to forward to: {e:#}");
            render(
                format,
                Err(Error::internal(crate::cluster::no_quorum(format!(
                    "node '{local}' cannot read the cluster membership; details in its log"
                )))),
            )
        }
    }
}

/// The node a path is forwarded to in a cluster: the one it names, unless that is this
/// node (`local`) or `localhost`.
pub fn forwarded_node<'a>(path: &'a str, local: &str) -> Option<&'a str> {
    node_of_path(path).filter(|n| *n != "localhost" && *n != local)
}

/// How this node forwards: its name (for [`FORWARDED_BY`]) and how long a forwarded
/// WebSocket may carry no bytes either way before both connections are closed.
#[derive(Clone, Debug)]
pub struct Hop {
    pub local_node: String,
    pub idle_timeout: Duration,
}

fn hop(st: &super::AppState) -> Hop {
    Hop {
        local_node: st.node.cfg.node.clone(),
        idle_timeout: st.node.cfg.peer_timeout,
    }
}

/// The node a `/api2/{fmt}/nodes/{node}/...` path names, if it names one.
pub fn node_of_path(path: &str) -> Option<&str> {
    let mut parts = path.trim_start_matches('/').split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("api2"), Some(_fmt), Some("nodes"), Some(node)) if !node.is_empty() => Some(node),
        _ => None,
    }
}

/// Passes `req` on to `upstream` and returns its answer (for an upgrade, the `101` — the
/// two upgraded connections are then joined in the background). Failures to reach the
/// member answer in PVE's envelope with status 595, like pveproxy's proxy errors.
pub async fn forward(upstream: &Upstream, hop: &Hop, req: Request<Body>) -> Response {
    let local_node = hop.local_node.as_str();
    let format = Format::from_path(req.uri().path());
    if let Some(by) = req.headers().get(FORWARDED_BY) {
        let by = String::from_utf8_lossy(by.as_bytes()).into_owned();
        return render(
            format,
            Err(Error::BadRequest(format!(
                "request for node '{}' was already forwarded by node '{by}': the cluster \
                 members disagree about where '{}' is - refusing a second hop",
                upstream.node, upstream.node
            ))),
        );
    }
    match forward_inner(upstream, hop, req).await {
        Ok(response) => response,
        Err(msg) => {
            // The cause names the member's address: for the log, not for the caller.
            tracing::warn!(node = %upstream.node, "forwarding failed: {msg}");
            let generic = format!(
                "proxy error - node '{local_node}' cannot reach node '{}'; details in its log",
                upstream.node
            );
            let mut response = render(format, Err(Error::internal(generic)));
            *response.status_mut() = StatusCode::from_u16(595).unwrap_or(StatusCode::BAD_GATEWAY);
            response
        }
    }
}

async fn forward_inner(
    upstream: &Upstream,
    hop: &Hop,
    mut req: Request<Body>,
) -> Result<Response, String> {
    let wants_upgrade = req.headers().contains_key(header::UPGRADE);
    let incoming_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    let (host, port, tls) = parse_api_url(&upstream.api_url)?;
    let (mut sender, connection) = tokio::time::timeout(CONNECT_TIMEOUT, async {
        let io = connect(&host, port, tls.then_some(upstream.fingerprint.as_str())).await?;
        hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| format!("HTTP handshake with node '{}': {e}", upstream.node))
    })
    .await
    .map_err(|_| {
        format!(
            "connecting to node '{}' at {} timed out",
            upstream.node, upstream.api_url
        )
    })??;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!("connection to cluster member ended: {e}");
        }
    });
    let outgoing = outgoing_request(req, &host, port, &hop.local_node, wants_upgrade)?;
    let mut response = tokio::time::timeout(RESPONSE_TIMEOUT, sender.send_request(outgoing))
        .await
        .map_err(|_| format!("node '{}' did not answer in time", upstream.node))?
        .map_err(|e| format!("request to node '{}' failed: {e}", upstream.node))?;
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        let theirs = hyper::upgrade::on(&mut response);
        if let Some(ours) = incoming_upgrade {
            let join = join_upgraded(ours, theirs, upstream.node.clone(), hop.idle_timeout);
            tokio::spawn(join);
        }
    }
    let (parts, body) = response.into_parts();
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// The request as the member gets it: same method, path, query, headers (minus the
/// hop-by-hop ones; `Connection`/`Upgrade` kept for an upgrade) and streamed body.
fn outgoing_request(
    req: Request<Body>,
    host: &str,
    port: u16,
    local_node: &str,
    wants_upgrade: bool,
) -> Result<Request<Body>, String> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|pq| pq.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    parts.uri = path
        .parse()
        .map_err(|e| format!("request path '{path}': {e}"))?;
    parts.version = axum::http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, wants_upgrade);
    let host_value = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    if let Ok(v) = HeaderValue::from_str(&host_value) {
        parts.headers.insert(header::HOST, v);
    }
    if let Ok(v) = HeaderValue::from_str(local_node) {
        parts
            .headers
            .insert(HeaderName::from_static(FORWARDED_BY), v);
    }
    Ok(Request::from_parts(parts, body))
}

fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    for name in [
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// Copies the client's upgraded connection and the member's both ways until one ends, or
/// until no byte went either way for `idle` (the owner pings a live tunnel WebSocket every
/// third of its peer timeout; silence means one side is gone, e.g. an owner that closed
/// while the client keeps its half open): then both are closed.
async fn join_upgraded(
    ours: hyper::upgrade::OnUpgrade,
    theirs: hyper::upgrade::OnUpgrade,
    node: String,
    idle: Duration,
) {
    let (ours, theirs) = match tokio::join!(ours, theirs) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            tracing::info!(node, "forwarded upgrade failed: {e}");
            return;
        }
    };
    let activity = Arc::new(Activity::new());
    let mut ours = Touching::new(TokioIo::new(ours), &activity);
    let mut theirs = Touching::new(TokioIo::new(theirs), &activity);
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut ours, &mut theirs, 1 << 17, 1 << 17);
    tokio::select! {
        done = copy => match done {
            Ok((up, down)) => tracing::debug!(node, up, down, "forwarded WebSocket finished"),
            Err(e) => tracing::info!(node, "forwarded WebSocket ended: {e}"),
        },
        () = activity.idle_for(idle) => tracing::info!(
            node,
            "forwarded WebSocket closed: no bytes either way for {} s (peer_timeout_secs)",
            idle.as_secs()
        ),
    }
}

/// When bytes last went through either side of a forwarded connection.
struct Activity {
    epoch: std::time::Instant,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            epoch: std::time::Instant::now(),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_ms
            .store(now, std::sync::atomic::Ordering::Relaxed);
    }

    /// Returns once nothing was touched for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.last_ms.load(std::sync::atomic::Ordering::Relaxed);
            let quiet = self
                .epoch
                .elapsed()
                .saturating_sub(Duration::from_millis(last));
            if quiet >= idle {
                return;
            }
            tokio::time::sleep(idle - quiet).await;
        }
    }
}

/// A stream that touches an [`Activity`] on every read or write that moved bytes.
struct Touching<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Touching<S> {
    fn new(inner: S, activity: &Arc<Activity>) -> Self {
        Touching {
            inner,
            activity: Arc::clone(activity),
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Touching<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Touching<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// `https://host:port` → (host, port, tls). IPv6 hosts in brackets.
fn parse_api_url(url: &str) -> Result<(String, u16, bool), String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(format!(
            "member API address '{url}' is not http(s)://host:port"
        ));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, p),
        _ => (authority, if tls { "8006" } else { "80" }),
    };
    let port: u16 = port
        .parse()
        .map_err(|_| format!("member API address '{url}': bad port '{port}'"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("member API address '{url}' has no host"));
    }
    Ok((host.to_string(), port, tls))
}

/// A connection to the member: TLS pinned to `fingerprint`, or plain TCP (the source
/// side's connections, with their socket tuning).
async fn connect(
    host: &str,
    port: u16,
    fingerprint: Option<&str>,
) -> Result<TokioIo<crate::net::stream::Stream>, String> {
    use crate::net::stream::{Stream, connect_plain};
    let stream = match fingerprint {
        Some(fp) => {
            let config = crate::net::tls::client_config(Some(fp)).map_err(|e| e.to_string())?;
            let tls = crate::net::tls::connect(host, port, &config).await;
            Stream::Tls(Box::new(tls.map_err(|e| e.to_string())?))
        }
        None => connect_plain(host, port).await.map_err(|e| e.to_string())?,
    };
    Ok(TokioIo::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_from_paths() {
        assert_eq!(
            node_of_path("/api2/json/nodes/b/qemu/100/mtunnel"),
            Some("b")
        );
        assert_eq!(node_of_path("/api2/extjs/nodes/n2/tasks"), Some("n2"));
        assert_eq!(node_of_path("/api2/json/nodes"), None);
        assert_eq!(node_of_path("/api2/json/nodes/"), None);
        assert_eq!(node_of_path("/api2/json/cluster/status"), None);
    }

    #[test]
    fn api_urls() {
        assert_eq!(
            parse_api_url("https://10.0.0.2:8006").unwrap(),
            ("10.0.0.2".into(), 8006, true)
        );
        assert_eq!(
            parse_api_url("http://[::1]:99/").unwrap(),
            ("::1".into(), 99, false)
        );
        assert_eq!(
            parse_api_url("https://host").unwrap(),
            ("host".into(), 8006, true)
        );
        assert!(parse_api_url("ftp://x:1").is_err());
        assert!(parse_api_url("https://x:port").is_err());
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("x"));
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        assert!(plain.get(header::UPGRADE).is_none());
        assert!(plain.get(header::CONNECTION).is_none());
        assert!(plain.get("keep-alive").is_none());
        assert!(plain.get(header::AUTHORIZATION).is_some());
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }
}

//! Opening a tunnel WebSocket as `proxmox-websocket-tunnel` does: `wss://` (or `https://`)
//! URL with the ticket and socket in the query, extra headers (the `Authorization` token),
//! the remote pinned by fingerprint. The TLS stream is ours ([`super::tls`]); tungstenite
//! only runs the handshake, so it needs none of its TLS features. `ws://` (or `http://`)
//! URLs reach a node with `tls = false` over plain TCP; no fingerprint is needed there.

use std::sync::Arc;

use hyper::Uri;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::stream::{Stream, connect_plain};
use super::{ApiError, tls};

/// A WebSocket to a remote node (over TLS, or plain TCP for `ws://` URLs).
pub type WsStream = WebSocketStream<Stream>;

/// Frame and message limits: generous, since a single `config` line may arrive as one
/// frame, yet bounded.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// Whether a URL's scheme asks for TLS: `https://`/`wss://` yes, `http://`/`ws://` no.
///
/// # Errors
/// Any other scheme.
pub fn url_uses_tls(url: &str) -> Result<bool, ApiError> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("https") | Some("wss") => Ok(true),
        Some("http") | Some("ws") => Ok(false),
        _ => Err(ApiError::Request(format!(
            "unsupported URL '{url}': only https://, wss://, http:// and ws:// are supported"
        ))),
    }
}

/// Host, port (443 or 80 if none is given) and TLS-ness of a WebSocket URL.
fn endpoint(uri: &Uri, url: &str) -> Result<(String, u16, bool), ApiError> {
    let tls = url_uses_tls(url)?;
    let host = uri
        .host()
        .ok_or_else(|| ApiError::Request(format!("URL '{url}' has no host")))?;
    let default_port = if tls { 443 } else { 80 };
    Ok((
        host.to_string(),
        uri.port_u16().unwrap_or(default_port),
        tls,
    ))
}

/// Connects to `url`, sends `headers` with the upgrade request, and trusts only the
/// certificate with `fingerprint` (ignored for plain `ws://`/`http://` URLs).
///
/// # Errors
/// A refused upgrade is an [`ApiError::Http`] carrying the status and the body's
/// `message`/`errors`; connection and TLS failures as in [`tls::connect`].
pub async fn connect(
    url: &str,
    headers: &[(String, String)],
    fingerprint: &str,
) -> Result<WsStream, ApiError> {
    connect_opt(url, headers, Some(fingerprint)).await
}

/// [`connect`] where the fingerprint may be absent, which only plain URLs allow.
///
/// # Errors
/// As [`connect`]; a `wss://`/`https://` URL without fingerprint fails with
/// "no fingerprint given".
pub async fn connect_opt(
    url: &str,
    headers: &[(String, String)],
    fingerprint: Option<&str>,
) -> Result<WsStream, ApiError> {
    if url_uses_tls(url)? {
        let config = tls::client_config(fingerprint)?;
        connect_inner(url, headers, Some(&config)).await
    } else {
        connect_inner(url, headers, None).await
    }
}

/// [`connect`] with a prepared TLS configuration (unused for plain URLs).
pub async fn connect_with(
    url: &str,
    headers: &[(String, String)],
    config: &Arc<rustls::ClientConfig>,
) -> Result<WsStream, ApiError> {
    connect_inner(url, headers, Some(config)).await
}

async fn connect_inner(
    url: &str,
    headers: &[(String, String)],
    config: Option<&Arc<rustls::ClientConfig>>,
) -> Result<WsStream, ApiError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| ApiError::Request(format!("invalid URL '{url}': {e}")))?;
    let (host, port, use_tls) = endpoint(&uri, url)?;
    // PVE hands out `https://` URLs for the tunnel; the WebSocket handshake wants `wss://`
    // (and `ws://` for `http://`).
    let ws_url = if let Some(rest) = url.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = url.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        url.to_string()
    };
    let mut request = ws_url
        .into_client_request()
        .map_err(|e| ApiError::Request(format!("invalid URL '{url}': {e}")))?;
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| ApiError::Request(format!("invalid header name '{name}': {e}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| ApiError::Request(format!("invalid value of header '{name}': {e}")))?;
        request.headers_mut().insert(name, value);
    }
    let stream = if use_tls {
        let config = config.ok_or_else(|| ApiError::Request("no fingerprint given".into()))?;
        Stream::Tls(Box::new(tls::connect(&host, port, config).await?))
    } else {
        connect_plain(&host, port).await?
    };
    match tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())).await {
        Ok((ws, _response)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status();
            let body = response.body().clone().unwrap_or_default();
            // tungstenite keeps no reason phrase; the body's message says the same.
            Err(ApiError::from_reply(
                status.as_u16(),
                status.canonical_reason().unwrap_or("").to_string(),
                &body,
            ))
        }
        Err(e) => Err(ApiError::Protocol(format!(
            "websocket handshake failed - {e}"
        ))),
    }
}

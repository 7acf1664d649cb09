//! Opening a tunnel WebSocket as `proxmox-websocket-tunnel` does: `wss://` (or `https://`)
//! URL with the ticket and socket in the query, extra headers (the `Authorization` token),
//! the remote pinned by fingerprint. The TLS stream is ours ([`super::tls`]); tungstenite
//! only runs the handshake, so it needs none of its TLS features.

use std::sync::Arc;

use hyper::Uri;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::{ApiError, tls};

/// A WebSocket to a remote node.
pub type WsStream = WebSocketStream<TlsStream<TcpStream>>;

/// Frame and message limits: generous, since a single `config` line may arrive as one
/// frame, yet bounded.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// Host and port of an `https://`/`wss://` URL (port 443 if none is given).
fn endpoint(uri: &Uri, url: &str) -> Result<(String, u16), ApiError> {
    match uri.scheme_str() {
        Some("https") | Some("wss") => {}
        _ => {
            return Err(ApiError::Request(format!(
                "unsupported URL '{url}': only https:// and wss:// are supported"
            )));
        }
    }
    let host = uri
        .host()
        .ok_or_else(|| ApiError::Request(format!("URL '{url}' has no host")))?;
    Ok((host.to_string(), uri.port_u16().unwrap_or(443)))
}

/// Connects to `url`, sends `headers` with the upgrade request, and trusts only the
/// certificate with `fingerprint`.
///
/// # Errors
/// A refused upgrade is an [`ApiError::Http`] carrying the status and the body's
/// `message`/`errors`; connection and TLS failures as in [`tls::connect`].
pub async fn connect(
    url: &str,
    headers: &[(String, String)],
    fingerprint: &str,
) -> Result<WsStream, ApiError> {
    let config = tls::client_config(Some(fingerprint))?;
    connect_with(url, headers, &config).await
}

/// [`connect`] with a prepared TLS configuration.
pub async fn connect_with(
    url: &str,
    headers: &[(String, String)],
    config: &Arc<rustls::ClientConfig>,
) -> Result<WsStream, ApiError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| ApiError::Request(format!("invalid URL '{url}': {e}")))?;
    let (host, port) = endpoint(&uri, url)?;
    // PVE hands out `https://` URLs for the tunnel; the WebSocket handshake wants `wss://`.
    let ws_url = match url.strip_prefix("https://") {
        Some(rest) => format!("wss://{rest}"),
        None => url.to_string(),
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
    let stream = tls::connect(&host, port, config).await?;
    match tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())).await {
        Ok((ws, _response)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status();
            let body = response.body().clone().unwrap_or_default();
            // tungstenite keeps no reason phrase; PVE puts the same text (its first line) in
            // the body's message, so take it from there for what the error displays.
            let mut err = ApiError::from_reply(
                status.as_u16(),
                status.canonical_reason().unwrap_or("").to_string(),
                &body,
            );
            if let ApiError::Http {
                reason, message, ..
            } = &mut err
                && let Some(first) = message.lines().next().filter(|l| !l.trim().is_empty())
            {
                *reason = first.trim().to_string();
            }
            Err(err)
        }
        Err(e) => Err(ApiError::Protocol(format!(
            "websocket handshake failed - {e}"
        ))),
    }
}

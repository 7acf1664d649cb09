//! Opening a tunnel WebSocket as `proxmox-websocket-tunnel` does: `wss://` (or `https://`)
//! URL with the ticket and socket in the query, extra headers (the `Authorization` token),
//! the remote pinned by fingerprint. The TLS stream is ours ([`super::tls`]); tungstenite
//! only runs the handshake, so it needs none of its TLS features. `ws://` (or `http://`)
//! URLs reach a node with `tls = false` over plain TCP; no fingerprint is needed there.
//! [`connect_raw`] hands the raw connection to [`super::relay`], which frames bytes itself.

use std::sync::Arc;

use hyper::Uri;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::NetError;
use super::stream::{Stream, connect_plain};
use super::tls;

/// Why a WebSocket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum WsError {
    /// No connection, or a bad URL, header or fingerprint (as [`NetError`] says).
    #[error(transparent)]
    Net(#[from] NetError),
    /// The server refused the upgrade: its status (other than 101), a reason (the first
    /// line of the body's PVE `message`, else the status line's phrase) and its body (PVE's
    /// error envelope, which `client::ApiError` reads whole).
    #[error("{status} {reason}")]
    Refused {
        status: u16,
        reason: String,
        body: Vec<u8>,
    },
    /// The handshake failed otherwise (a bad reply, a closed connection).
    #[error("{0}")]
    Protocol(String),
}

impl WsError {
    fn request(msg: String) -> Self {
        WsError::Net(NetError::Request(msg))
    }
}

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
pub fn url_uses_tls(url: &str) -> Result<bool, WsError> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("https") | Some("wss") => Ok(true),
        Some("http") | Some("ws") => Ok(false),
        _ => Err(WsError::request(format!(
            "unsupported URL '{url}': only https://, wss://, http:// and ws:// are supported"
        ))),
    }
}

/// Host, port (443 or 80 if none is given) and TLS-ness of a WebSocket URL.
fn endpoint(uri: &Uri, url: &str) -> Result<(String, u16, bool), WsError> {
    let tls = url_uses_tls(url)?;
    let host = uri
        .host()
        .ok_or_else(|| WsError::request(format!("URL '{url}' has no host")))?;
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
/// A refused upgrade is a [`WsError::Refused`] carrying the status and the body;
/// connection and TLS failures as in [`tls::connect`].
pub async fn connect(
    url: &str,
    headers: &[(String, String)],
    fingerprint: &str,
) -> Result<WsStream, WsError> {
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
) -> Result<WsStream, WsError> {
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
) -> Result<WsStream, WsError> {
    connect_inner(url, headers, Some(config)).await
}

async fn connect_inner(
    url: &str,
    headers: &[(String, String)],
    config: Option<&Arc<rustls::ClientConfig>>,
) -> Result<WsStream, WsError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| WsError::request(format!("invalid URL '{url}': {e}")))?;
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
        .map_err(|e| WsError::request(format!("invalid URL '{url}': {e}")))?;
    for (name, value) in headers {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|e| WsError::request(format!("invalid header name '{name}': {e}")))?;
        let value = HeaderValue::from_str(value)
            .map_err(|e| WsError::request(format!("invalid value of header '{name}': {e}")))?;
        request.headers_mut().insert(name, value);
    }
    let stream = if use_tls {
        let config = config.ok_or_else(|| WsError::request("no fingerprint given".into()))?;
        Stream::Tls(Box::new(tls::connect(&host, port, config).await?))
    } else {
        connect_plain(&host, port).await?
    };
    match tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config())).await {
        Ok((ws, _response)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status();
            let body = response.body().clone().unwrap_or_default();
            // tungstenite keeps no reason phrase; PVE puts the same text (its first line) in
            // the body's message, so take it from there for what the error displays.
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|b| b.get("message")?.as_str().map(str::to_string))
                .unwrap_or_default();
            let reason = match message.lines().next().filter(|l| !l.trim().is_empty()) {
                Some(first) => first.trim().to_string(),
                None => status.canonical_reason().unwrap_or("").to_string(),
            };
            Err(WsError::Refused {
                status: status.as_u16(),
                reason,
                body,
            })
        }
        Err(e) => Err(WsError::Protocol(format!(
            "websocket handshake failed - {e}"
        ))),
    }
}

/// A connection upgraded to WebSocket by [`connect_raw`]: the stream and the bytes already
/// read past the handshake.
pub struct RawWs {
    pub stream: Stream,
    pub leftover: Vec<u8>,
}

/// Like [`connect_with`], but hands back the raw stream for [`super::relay::relay`], which
/// frames bytes itself.
pub async fn connect_raw(
    url: &str,
    headers: &[(String, String)],
    fingerprint: Option<&str>,
) -> Result<RawWs, WsError> {
    use base64::Engine;
    use rand::RngCore;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let uri: Uri = url
        .parse()
        .map_err(|e| WsError::request(format!("invalid URL '{url}': {e}")))?;
    let (host, port, use_tls) = endpoint(&uri, url)?;
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut key = [0u8; 16];
    rand::rng().fill_bytes(&mut key);
    let key = base64::engine::general_purpose::STANDARD.encode(key);
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
    );
    for (name, value) in headers {
        if name.contains(['\r', '\n', ':']) || value.contains(['\r', '\n']) {
            return Err(WsError::request(format!("invalid header '{name}'")));
        }
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");

    let mut stream = if use_tls {
        let config = tls::client_config(fingerprint)?;
        Stream::Tls(Box::new(tls::connect(&host, port, &config).await?))
    } else {
        connect_plain(&host, port).await?
    };
    let proto = |e: std::io::Error| WsError::Protocol(format!("websocket handshake failed - {e}"));
    stream.write_all(request.as_bytes()).await.map_err(proto)?;
    // A TLS stream may still hold the request in its buffer.
    stream.flush().await.map_err(proto)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_len = loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > 64 * 1024 {
            return Err(WsError::Protocol(
                "websocket handshake reply too large".into(),
            ));
        }
        let n = stream.read(&mut chunk).await.map_err(proto)?;
        if n == 0 {
            return Err(WsError::Protocol(
                "connection closed during the websocket handshake".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let mut parsed_headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut parsed_headers);
    response
        .parse(&buf[..head_len])
        .map_err(|e| WsError::Protocol(format!("bad websocket handshake reply: {e}")))?;
    let status = response.code.unwrap_or(0);
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).into_owned())
    };
    if status != 101 {
        let reason = response.reason.unwrap_or("").to_string();
        let want: usize = header("content-length")
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0)
            .min(64 * 1024);
        let mut body = buf[head_len..].to_vec();
        while body.len() < want {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => body.extend_from_slice(&chunk[..n]),
            }
        }
        return Err(WsError::Refused {
            status,
            reason,
            body,
        });
    }
    let expected = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    if header("sec-websocket-accept").as_deref() != Some(expected.as_str()) {
        return Err(WsError::Protocol(
            "websocket handshake failed - wrong Sec-WebSocket-Accept".into(),
        ));
    }
    Ok(RawWs {
        stream,
        leftover: buf[head_len..].to_vec(),
    })
}

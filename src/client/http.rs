//! An `/api2/json` client as PVE's own clients behave: `Authorization: PVEAPIToken=..`,
//! GET/DELETE parameters in the query string, POST parameters form-urlencoded, success is
//! `{"data": ..}`, errors carry their message in the reason phrase and the body.
//!
//! [`ApiClient::plain`] talks plain HTTP to a node configured with `tls = false`.
//!
//! One TLS connection per request (hyper's HTTP/1 client over tokio-rustls), unless
//! [`ApiClient::keep_alive`] asks to reuse a connection that just answered: over a long
//! link that saves the TCP and TLS round trips of the next request (`mtunnel migrate`'s
//! `POST .../mtunnel` after its checks). [`ApiClient::raw`] exposes the exchange byte for
//! byte for callers that need exact control.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use serde_json::{Value, json};

use super::ApiError;
use crate::net::stream::{Stream, connect_plain};
use crate::net::tls;

/// Default bound on one whole request, from connect to the last body byte.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Characters left as they are when a path segment is encoded: RFC 3986 unreserved.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encodes one path segment (a UPID, say) so it survives any server.
pub fn encode_segment(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, SEGMENT).to_string()
}

/// A response exactly as it came.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// The reason phrase as sent (the canonical one if the server sent that).
    pub reason: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The body as JSON (`Value::Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// The `Content-Type` header, if any and readable.
    pub fn content_type(&self) -> Option<&str> {
        self.headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
    }
}

/// A client for one remote node's API.
#[derive(Clone)]
pub struct ApiClient {
    host: String,
    port: u16,
    token_header: String,
    /// `None`: plain HTTP (a `tls = false` node).
    tls: Option<Arc<ClientConfig>>,
    fingerprint: String,
    timeout: Duration,
    /// With [`ApiClient::keep_alive`]: connections that answered a request and may take
    /// the next one, with when they became idle. Shared by clones.
    idle: Option<Arc<std::sync::Mutex<Vec<Idle>>>>,
}

/// An idle kept-alive connection.
struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: std::time::Instant,
}

/// A kept-alive connection idle longer than this is not reused: well below any server's
/// keep-alive timeout (pveproxy's is several seconds), so a reused connection is not one
/// the server is closing just then.
const IDLE_REUSE: Duration = Duration::from_secs(2);

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The token header holds the secret: never print it.
        f.debug_struct("ApiClient")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl ApiClient {
    /// The node a migration or replica run goes to: the one answering (`local` in
    /// `/cluster/status`), or `asked`, which must be an online member of the target's cluster.
    pub async fn target_node(&self, asked: Option<&str>) -> anyhow::Result<String> {
        let status = self
            .get("/cluster/status", &[])
            .await
            .context("querying the target's cluster status")?;
        let nodes: Vec<&Value> = status
            .as_array()
            .map(|a| a.iter().filter(|e| e["type"] == json!("node")).collect())
            .unwrap_or_default();
        let flag =
            |e: &Value, key: &str| e.get(key).and_then(crate::util::lenient_bool) == Some(true);
        let Some(asked) = asked else {
            return nodes
                .iter()
                .find(|e| flag(e, "local"))
                .and_then(|e| e["name"].as_str())
                .map(str::to_string)
                .context("target's /cluster/status has no local node entry");
        };
        match nodes.iter().find(|e| e["name"] == json!(asked)) {
            Some(e) if flag(e, "online") => Ok(asked.to_string()),
            Some(_) => bail!("target node '{asked}' is offline"),
            None => {
                let names: Vec<&str> = nodes.iter().filter_map(|e| e["name"].as_str()).collect();
                bail!(
                    "target node '{asked}' is not a member of the target's cluster (members: {})",
                    names.join(", ")
                )
            }
        }
    }

    /// A client for `https://host:port`, sending `token_header` (e.g.
    /// `PVEAPIToken=root@pam!mig=<secret>`) as `Authorization` on every request (none if it
    /// is empty), and trusting only the certificate with `fingerprint`.
    ///
    /// # Errors
    /// A missing or malformed fingerprint (see [`tls::client_config`]).
    pub fn new(
        host: impl Into<String>,
        port: u16,
        token_header: String,
        fingerprint: String,
    ) -> Result<Self, ApiError> {
        Ok(ApiClient {
            host: host.into(),
            port,
            token_header,
            tls: Some(tls::client_config(Some(&fingerprint))?),
            fingerprint,
            timeout: DEFAULT_TIMEOUT,
            idle: None,
        })
    }

    /// A client for `http://host:port` (a node with `tls = false`): no TLS, no fingerprint.
    pub fn plain(host: impl Into<String>, port: u16, token_header: String) -> Self {
        ApiClient {
            host: host.into(),
            port,
            token_header,
            tls: None,
            fingerprint: String::new(),
            timeout: DEFAULT_TIMEOUT,
            idle: None,
        }
    }

    /// A client for `https://host:port` that verifies the server by the Mozilla root CAs and
    /// its host name instead of a pinned fingerprint ([`ApiClient::fingerprint`] is empty).
    ///
    /// # Errors
    /// See [`tls::ca_client_config`].
    pub fn with_ca_verification(
        host: impl Into<String>,
        port: u16,
        token_header: String,
    ) -> Result<Self, ApiError> {
        Ok(ApiClient {
            host: host.into(),
            port,
            token_header,
            tls: Some(tls::ca_client_config()?),
            fingerprint: String::new(),
            timeout: DEFAULT_TIMEOUT,
            idle: None,
        })
    }

    /// The same client reusing connections: one that answered a request takes the next
    /// one if it is idle for less than 2 s (never retried: a request that fails on a
    /// reused connection fails). Connections close when the last clone is dropped.
    pub fn keep_alive(mut self) -> Self {
        self.idle = Some(Arc::default());
        self
    }

    /// Whether requests go over TLS (`https://`).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The same client with another bound per request (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The pinned certificate fingerprint (empty for a plain client).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn token_header(&self) -> &str {
        &self.token_header
    }

    /// `GET /api2/json{path}?params`; returns `data`.
    pub async fn get(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, ApiError> {
        self.call(Method::GET, path, params).await
    }

    /// `POST /api2/json{path}` with a form-urlencoded body; returns `data`.
    pub async fn post(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, ApiError> {
        self.call(Method::POST, path, params).await
    }

    /// `DELETE /api2/json{path}?params`; returns `data`.
    pub async fn delete(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, ApiError> {
        self.call(Method::DELETE, path, params).await
    }

    /// One API call. `path` is relative to `/api2/json` unless it starts with `/api2/`;
    /// its segments must already be encoded as the caller wants them on the wire.
    ///
    /// # Errors
    /// [`ApiError::Http`] for a non-2xx reply; [`ApiError::Protocol`] if a 2xx reply has
    /// no JSON `data`; connection and timeout errors otherwise.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        params: &[(&str, &str)],
    ) -> Result<Value, ApiError> {
        let mut full = api_path(path);
        let form = form_encode(params);
        let body = if method == Method::POST || method == Method::PUT {
            form.into_bytes()
        } else {
            if !form.is_empty() {
                full.push(if full.contains('?') { '&' } else { '?' });
                full.push_str(&form);
            }
            Vec::new()
        };
        let headers: &[(&str, &str)] = if body.is_empty() {
            &[]
        } else {
            &[("Content-Type", "application/x-www-form-urlencoded")]
        };
        let reply = self.raw(method, &full, headers, body).await?;
        if !(200..300).contains(&reply.status) {
            return Err(ApiError::from_reply(
                reply.status,
                reply.reason,
                &reply.body,
            ));
        }
        let mut parsed: serde_json::Map<String, Value> = serde_json::from_slice(&reply.body)
            .map_err(|e| ApiError::Protocol(format!("reply is not a JSON object - {e}")))?;
        parsed
            .remove("data")
            .ok_or_else(|| ApiError::Protocol("undefined result data".into()))
    }

    /// Sends one request exactly as given: `path` verbatim as the request target,
    /// `headers` added in order (an `Authorization` among them replaces the client's token),
    /// `body` with its `Content-Length` and no `Content-Type` unless `headers` has one.
    ///
    /// # Errors
    /// Only when no response arrived; any status is a successful [`RawResponse`].
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Vec<u8>>,
    ) -> Result<RawResponse, ApiError> {
        let body: Vec<u8> = body.into();
        let request = self.build(method, path, headers, body)?;
        let seconds = self.timeout.as_secs();
        tokio::time::timeout(self.timeout, self.exchange(request))
            .await
            .map_err(|_| ApiError::Timeout(seconds))?
    }

    fn build(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Request<Full<Bytes>>, ApiError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| ApiError::Request(format!("{what}: {e}"));
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| bad(&format!("invalid request for '{path}'"), &e))?;
        let map = request.headers_mut();
        let host = if self.host.contains(':') && !self.host.starts_with('[') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        map.insert(
            header::HOST,
            HeaderValue::from_str(&host).map_err(|e| bad("invalid host", &e))?,
        );
        let overrides_auth = headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("authorization"));
        if !self.token_header.is_empty() && !overrides_auth {
            map.insert(
                header::AUTHORIZATION,
                HeaderValue::from_str(&self.token_header)
                    .map_err(|e| bad("invalid token header", &e))?,
            );
        }
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| bad(&format!("invalid header name '{name}'"), &e))?;
            let value = HeaderValue::from_bytes(value.as_bytes())
                .map_err(|e| bad(&format!("invalid value of header '{name}'"), &e))?;
            map.append(name, value);
        }
        Ok(request)
    }

    /// A kept-alive connection ready for a request, if there is one young enough.
    fn reusable(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self
            .idle
            .as_ref()?
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while let Some(i) = idle.pop() {
            if i.since.elapsed() < IDLE_REUSE && i.sender.is_ready() {
                return Some(i.sender);
            }
        }
        None
    }

    async fn exchange(&self, request: Request<Full<Bytes>>) -> Result<RawResponse, ApiError> {
        let (mut sender, conn) = match self.reusable() {
            Some(sender) => (sender, None),
            None => {
                let (sender, conn) = self.connect().await?;
                (sender, Some(conn))
            }
        };
        let result = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| ApiError::Protocol(format!("request failed - {e}")))?;
            let status = response.status();
            let reason = response
                .extensions()
                .get::<hyper::ext::ReasonPhrase>()
                .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned())
                .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string());
            let (parts, body) = response.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| ApiError::Protocol(format!("reading the reply failed - {e}")))?
                .to_bytes()
                .to_vec();
            Ok(RawResponse {
                status: status.as_u16(),
                reason,
                headers: parts.headers,
                body,
            })
        }
        .await;
        match (&self.idle, &result) {
            (Some(idle), Ok(_)) => idle.lock().unwrap_or_else(|e| e.into_inner()).push(Idle {
                sender,
                since: std::time::Instant::now(),
            }),
            // The connection task ends once `sender` is dropped.
            _ => drop(sender),
        }
        if result.is_err()
            && let Some(conn) = conn
        {
            conn.abort();
        }
        result
    }

    /// A new connection (TCP, TLS if configured, HTTP/1) and its task.
    async fn connect(
        &self,
    ) -> Result<(SendRequest<Full<Bytes>>, tokio::task::JoinHandle<()>), ApiError> {
        let stream = match &self.tls {
            Some(config) => {
                Stream::Tls(Box::new(tls::connect(&self.host, self.port, config).await?))
            }
            None => connect_plain(&self.host, self.port).await?,
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ApiError::Protocol(format!("HTTP handshake failed - {e}")))?;
        let conn = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("API connection ended: {e}");
            }
        });
        Ok((sender, conn))
    }
}

/// `/api2/json` + `path`, unless `path` already names an API format.
fn api_path(path: &str) -> String {
    if path.starts_with("/api2/") {
        path.to_string()
    } else if path.starts_with('/') {
        format!("/api2/json{path}")
    } else {
        format!("/api2/json/{path}")
    }
}

fn form_encode(params: &[(&str, &str)]) -> String {
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        form.append_pair(k, v);
    }
    form.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_segments() {
        assert_eq!(api_path("/version"), "/api2/json/version");
        assert_eq!(api_path("nodes"), "/api2/json/nodes");
        assert_eq!(api_path("/api2/extjs/version"), "/api2/extjs/version");
        assert_eq!(
            encode_segment("UPID:n1:0001:root@pam!t:"),
            "UPID%3An1%3A0001%3Aroot%40pam%21t%3A"
        );
        assert_eq!(
            form_encode(&[("storages", "a,b"), ("x", "1 2")]),
            "storages=a%2Cb&x=1+2"
        );
    }
}

//! The source side of a migration: talking to a remote PVE-compatible API as Proxmox's own
//! clients do, over [`crate::net`] (TLS pinned by the remote's SHA-256 fingerprint, the
//! `fingerprint=` of a PVE `target-endpoint`, or plain HTTP to a node configured with
//! `tls = false`). [`http`] is the `/api2/json` client with token auth and PVE's error
//! envelope; the tunnel's WebSocket connections are opened by [`crate::net::ws`].
//!
//! On top of them: [`tunnel`] (the `proxmox-websocket-tunnel` compatible client and its
//! socket forwards), [`migrate`] (`mtunnel migrate`, one file per phase under
//! `client/migrate/`), [`vm`] (`mtunnel vm`), [`endpoint`] and [`progress`] for the CLI.
//! Only [`migrate`] and [`vm`] touch the local node (its configs, storage and QEMU); the
//! protocol modules know nothing of it.

pub mod doctor;
pub mod endpoint;
pub mod http;
pub mod migrate;
pub mod progress;
pub mod replicate;
pub mod tunnel;
pub mod vm;

use serde_json::{Map, Value};

pub use http::{ApiClient, RawResponse};

impl From<crate::net::NetError> for ApiError {
    fn from(e: crate::net::NetError) -> Self {
        match e {
            crate::net::NetError::Connect(msg) => ApiError::Connect(msg),
            crate::net::NetError::Request(msg) => ApiError::Request(msg),
        }
    }
}

impl From<crate::net::ws::WsError> for ApiError {
    fn from(e: crate::net::ws::WsError) -> Self {
        match e {
            crate::net::ws::WsError::Net(e) => e.into(),
            crate::net::ws::WsError::Refused {
                status,
                reason,
                body,
            } => ApiError::from_reply(status, reason, &body),
            crate::net::ws::WsError::Protocol(msg) => ApiError::Protocol(msg),
        }
    }
}

/// Why a call to a remote API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The server answered with a status other than 2xx (or, for WebSockets, other than 101).
    #[error("{}", http_error_text(*.status, .reason, .errors))]
    Http {
        status: u16,
        /// The reason phrase of the status line, where PVE puts its error message (the
        /// canonical phrase when the server sent none).
        reason: String,
        /// The body's `message` field verbatim (PVE ends it with a newline); empty if none.
        message: String,
        /// The body's `errors` object: per-parameter messages of a 400.
        errors: Map<String, Value>,
    },
    /// No connection, or the TLS handshake failed (a fingerprint mismatch reads
    /// `fingerprint 'AA:..' not verified, abort!`, as PVE's client says).
    #[error("{0}")]
    Connect(String),
    /// The server answered something that is not PVE's envelope, or HTTP itself failed.
    #[error("{0}")]
    Protocol(String),
    /// No complete answer within the client's timeout.
    #[error("request timed out after {0} s")]
    Timeout(u64),
    /// The request could not be built (bad header value, bad URL, bad fingerprint).
    #[error("{0}")]
    Request(String),
}

impl ApiError {
    /// The HTTP status of an [`ApiError::Http`].
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The reason phrase of an [`ApiError::Http`].
    pub fn reason(&self) -> Option<&str> {
        match self {
            ApiError::Http { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// The per-parameter error of `field` in an [`ApiError::Http`].
    pub fn field_error(&self, field: &str) -> Option<&str> {
        match self {
            ApiError::Http { errors, .. } => errors.get(field).and_then(Value::as_str),
            _ => None,
        }
    }

    /// Builds an [`ApiError::Http`] from a status, a reason phrase and an error body
    /// (`{"data":null,"message":..,"errors":{..}}`; anything else counts as empty).
    pub fn from_reply(status: u16, reason: String, body: &[u8]) -> Self {
        let parsed: Option<Map<String, Value>> = serde_json::from_slice(body).ok();
        let message = parsed
            .as_ref()
            .and_then(|b| b.get("message"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let errors = parsed
            .as_ref()
            .and_then(|b| b.get("errors"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        ApiError::Http {
            status,
            reason,
            message,
            errors,
        }
    }
}

/// `400 Parameter verification failed.` plus one `field: message` line per error, the way
/// PVE's Perl client reports it.
fn http_error_text(status: u16, reason: &str, errors: &Map<String, Value>) -> String {
    let mut text = format!("{status} {reason}");
    for (field, msg) in errors {
        let msg = msg.as_str().map(str::to_string).unwrap_or(msg.to_string());
        text.push_str(&format!("\n{field}: {msg}"));
    }
    text
}

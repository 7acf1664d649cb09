//! The error kinds every layer above storage reports, independent of HTTP: the API layer
//! maps them to PVE's status codes (400 with per-parameter `errors`, 401, 403, 501, 500).

use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// One or more parameters are invalid: HTTP 400 "Parameter verification failed.".
    #[error("Parameter verification failed.")]
    Param(BTreeMap<String, String>),
    /// A request that is well-formed but cannot be done: HTTP 400 with this message.
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    /// The request body exceeds the limit: HTTP 413.
    #[error("{0}")]
    TooLarge(String),
    /// The request body did not arrive in time: HTTP 408.
    #[error("{0}")]
    Timeout(String),
    /// Missing privilege: HTTP 403.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotImplemented(String),
    /// The node is at a configured limit (tunnels, connections): HTTP 503.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl Error {
    /// A parameter error for one field.
    pub fn param(field: &str, msg: impl Into<String>) -> Self {
        Error::Param(BTreeMap::from([(field.to_string(), msg.into())]))
    }

    /// PVE's text for a failed privilege check.
    pub fn permission(path: &str, privilege: &str) -> Self {
        Error::Forbidden(format!("Permission check failed ({path}, {privilege})"))
    }

    pub fn internal(msg: impl std::fmt::Display) -> Self {
        Error::Internal(anyhow::anyhow!("{msg}"))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

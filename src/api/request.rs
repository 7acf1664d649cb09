//! Turning an HTTP request into what an endpoint needs: the API format (`json`/`extjs`),
//! the authenticated token id, and the parameters merged from query string and body with
//! PVE's leniency (form bodies with or without Content-Type, JSON bodies, booleans as
//! 0/1/true/false/"True"). Endpoints declare their parameters in the [`crate::schema`]
//! language; `endpoint` checks them with [`Params::only_declared`] and [`Params::checked`].

use std::sync::Arc;

use axum::body::Body;
use axum::extract::FromRequest;
use axum::http::{HeaderMap, Method, Request, header};
use hyper::upgrade::OnUpgrade;
use serde_json::{Map, Value};

use super::AppState;
use super::reply::{ApiFailure, Format};
use crate::error::Error;
use crate::schema::{self, Prop, Schema};

/// A route's declared parameters (path parameters apart).
pub type Props = std::collections::BTreeMap<String, Prop>;

/// An authenticated API request.
pub struct ApiReq {
    pub format: Format,
    pub authid: String,
    pub method: Method,
    pub headers: HeaderMap,
    pub params: Params,
    pub upgrade: Option<OnUpgrade>,
}

impl FromRequest<Arc<AppState>> for ApiReq {
    type Rejection = ApiFailure;

    async fn from_request(
        req: Request<Body>,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        // An unknown format is refused before anything runs (an endpoint must not act and
        // only then find out it cannot answer).
        let format = Format::known(parts.uri.path()).map_err(|name| ApiFailure {
            format: Format::Json,
            error: Error::NotImplemented(format!("unknown API format '{name}'")),
        })?;
        let fail = |e: Error| ApiFailure { format, error: e };

        let authid = authenticate(state, &parts.headers).await.map_err(fail)?;

        let limit = state.node.cfg.max_body_bytes;
        let timeout = state.node.cfg.body_read_timeout;
        let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(_)) => {
                return Err(fail(Error::TooLarge(format!(
                    "request entity too large (limit {limit} bytes)"
                ))));
            }
            Err(_) => {
                tracing::info!("request body not received within {timeout:?}");
                return Err(fail(Error::Timeout(format!(
                    "request body not received within {} s (body_read_timeout_secs)",
                    timeout.as_secs()
                ))));
            }
        };
        let mut params = Map::new();
        if !bytes.is_empty() {
            if parts.method == Method::GET || parts.method == Method::DELETE {
                return Err(fail(Error::NotImplemented(format!(
                    "Unexpected content for method '{}'",
                    parts.method
                ))));
            }
            let is_json = parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| ct.trim_start().starts_with("application/json"));
            if is_json {
                match serde_json::from_slice::<Value>(&bytes) {
                    Ok(Value::Object(map)) => params = map,
                    Ok(_) => {
                        return Err(fail(Error::BadRequest(
                            "JSON body must be an object".into(),
                        )));
                    }
                    Err(e) => {
                        return Err(fail(Error::BadRequest(format!("invalid JSON body - {e}"))));
                    }
                }
            } else {
                merge_form(&mut params, &bytes);
            }
        }
        if let Some(query) = parts.uri.query() {
            // As pveproxy: query parameters override body parameters of the same name.
            let mut from_query = Map::new();
            merge_form(&mut from_query, query.as_bytes());
            params.extend(from_query);
        }
        Ok(ApiReq {
            format,
            authid,
            method: parts.method.clone(),
            upgrade: parts.extensions.remove::<OnUpgrade>(),
            headers: parts.headers,
            params: Params(params),
        })
    }
}

/// The token id of the request's `Authorization: PVEAPIToken=...` header, or (after
/// `auth_failure_delay`, counted and logged) the 401 every route answers for a missing,
/// malformed or wrong token. The cluster proxy asks this too before forwarding.
pub(super) async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<String, Error> {
    let header = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.node.tokens.authenticate(header) {
        Ok(id) => Ok(id),
        Err(e) => {
            tracing::info!("authentication failure: {e}");
            (state.node.metrics).auth_failure(crate::metrics::AuthFailure::BadToken);
            tokio::time::sleep(state.node.cfg.auth_failure_delay).await;
            Err(Error::Unauthorized(format!("authentication failure - {e}")))
        }
    }
}

/// Adds `key=value` pairs; a repeated key becomes an array (proxmoxer sends lists so).
fn merge_form(params: &mut Map<String, Value>, data: &[u8]) {
    for (k, v) in form_urlencoded::parse(data) {
        let v = Value::String(v.into_owned());
        match params.get_mut(k.as_ref()) {
            Some(Value::Array(list)) => list.push(v),
            Some(existing) => {
                let first = existing.take();
                *existing = Value::Array(vec![first, v]);
            }
            None => {
                params.insert(k.into_owned(), v);
            }
        }
    }
}

/// Request parameters, checked against a route's declared schema.
pub struct Params(pub Map<String, Value>);

impl Params {
    /// Rejects parameters not in `allowed` with PVE's message.
    pub fn only(&self, allowed: &[&str]) -> Result<(), Error> {
        let extra: std::collections::BTreeMap<String, String> = self
            .0
            .keys()
            .filter(|k| !allowed.contains(&k.as_str()))
            .map(|k| {
                (
                    k.clone(),
                    "property is not defined in schema and the schema does not allow additional properties".to_string(),
                )
            })
            .collect();
        if extra.is_empty() {
            Ok(())
        } else {
            Err(Error::Param(extra))
        }
    }

    /// Rejects parameters `props` does not declare, with PVE's message (before the path
    /// parameters are checked, as PVE does).
    pub fn only_declared(&self, props: &Props) -> Result<(), Error> {
        let keys: Vec<&str> = props.keys().map(String::as_str).collect();
        self.only(&keys)
    }

    /// Checks and normalizes the parameters against `props` (booleans become booleans,
    /// integers numbers); every failing parameter is named with PVE's text. A
    /// `*-id-list` parameter given several times (a list) counts as one joined by `,`.
    pub fn checked(&self, props: &Props) -> Result<Map<String, Value>, Error> {
        let mut map = self.0.clone();
        for (key, prop) in props {
            if let (
                Schema::String {
                    format: Some(f), ..
                },
                Some(Value::Array(items)),
            ) = (&prop.schema, map.get(key))
                && f.ends_with("-list")
                && let Some(parts) = items.iter().map(Value::as_str).collect::<Option<Vec<_>>>()
            {
                let joined = Value::String(parts.join(","));
                map.insert(key.clone(), joined);
            }
        }
        match schema::validate_object("", props, false, &map) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) => Ok(Map::new()),
            Err(errors) => Err(Error::Param(errors)),
        }
    }
}

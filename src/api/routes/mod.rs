//! The route table: one router per path area, as PVE's API files divide it (`cluster`,
//! `nodes`, `access`, the node's `tasks`, `storage` and `qemu`), merged with the status
//! page's files and PVE's answer for everything else. Each area declares its endpoints as
//! [`super::endpoint::Endpoint`] values next to their typed handlers.

mod access;
mod cluster;
mod nodes;
mod qemu;
mod storage;
mod tasks;

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{Method, Uri};
use axum::response::Response;
use axum::routing::get;
use serde_json::json;

use super::AppState;
use super::endpoint::{self, Call, Endpoint, NoArgs};
use super::reply::{Data, Format, render};
use crate::error::Error;

type Areas = Router<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> Router {
    use super::status_page as page;
    Router::new()
        .route("/", get(page::index))
        .route(page::APP_JS_PATH, get(page::app_js))
        .route(page::STYLE_CSS_PATH, get(page::style_css))
        .route("/api2/{fmt}/version", endpoint::get(&VERSION, version))
        .merge(cluster::routes())
        .merge(access::routes())
        .merge(nodes::routes())
        .merge(tasks::routes())
        .merge(storage::routes())
        .merge(qemu::routes())
        .fallback(not_implemented)
        // A known path with a method it lacks is PVE's 501 as well, not axum's bare 405.
        .method_not_allowed_fallback(not_implemented)
        .layer(axum::middleware::map_response_with_state(
            Arc::clone(&state),
            count_denied,
        ))
        // In a cluster, `/nodes/{other}/...` is answered by `other` (pveproxy's proxying);
        // outermost, so that what the other node answers is counted there, not here.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            super::proxy::route_to_owner,
        ))
        .with_state(state)
}

/// Counts every 403 in the metrics, whichever check refused (privilege, tunnel owner):
/// one place instead of one call per `require`.
async fn count_denied(State(st): State<Arc<AppState>>, response: Response) -> Response {
    if response.status() == axum::http::StatusCode::FORBIDDEN {
        (st.node.metrics).auth_failure(crate::metrics::AuthFailure::PermissionDenied);
    }
    response
}

async fn not_implemented(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let rest = path
        .strip_prefix("/api2/json")
        .or_else(|| path.strip_prefix("/api2/extjs"));
    let msg = match rest {
        Some(rest) => format!("Method '{method} {rest}' not implemented"),
        None => format!("no such API format or path '{path}'"),
    };
    render(Format::from_path(path), Err(Error::NotImplemented(msg)))
}

/// `GET /version`: a PVE-compatible version, and ours.
static VERSION: Endpoint = Endpoint::PLAIN;

async fn version(_call: Call<NoArgs>) -> Result<Data, Error> {
    Ok(Data::new(json!({
        "version": "9.0.0",
        "release": "9.0",
        "repoid": "mtunnel",
        "mtunnel": env!("CARGO_PKG_VERSION"),
    })))
}

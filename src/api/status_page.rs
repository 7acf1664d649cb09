//! The status page at `/` (where pveproxy serves its UI) and the one JSON route it needs
//! besides PVE's own. The page is three static files built into the binary
//! (`status_page/`): served to anyone, they hold no data. The page asks for an API token,
//! keeps it in the browser's `sessionStorage`, and reads everything through the JSON API
//! with it: `GET /nodes/{node}/mtunnel-status` (open tunnels, from
//! [`crate::tunnel::status`]; in `routes::nodes`), `/nodes/{node}/tasks` with their logs, and
//! `/cluster/status`. So it shows a token nothing its privileges would not give it.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

const INDEX_HTML: &str = include_str!("status_page/index.html");
const APP_JS: &str = include_str!("status_page/app.js");
const STYLE_CSS: &str = include_str!("status_page/style.css");

/// Where the page's script and style sheet are served.
pub(super) const APP_JS_PATH: &str = "/mtunnel/status.js";
pub(super) const STYLE_CSS_PATH: &str = "/mtunnel/status.css";

/// `GET /`: the page.
pub(super) async fn index() -> Response {
    static_file(INDEX_HTML, "text/html; charset=utf-8")
}

pub(super) async fn app_js() -> Response {
    static_file(APP_JS, "text/javascript; charset=utf-8")
}

pub(super) async fn style_css() -> Response {
    static_file(STYLE_CSS, "text/css; charset=utf-8")
}

/// A static file, with headers that keep the page from loading anything from elsewhere
/// (its own script and style only; `connect-src 'self'` for the API) and from leaking the
/// URL (which may carry a token in its fragment) as a referrer.
fn static_file(body: &'static str, content_type: &'static str) -> Response {
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    let set = [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, "no-cache"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
        ),
    ];
    for (name, value) in set {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

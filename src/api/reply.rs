//! PVE's reply envelope. `json`: HTTP 200 with `{"data":..}` and
//! `application/json;charset=UTF-8`; errors carry the message in the reason phrase (its
//! first line, at most [`MAX_REASON_BYTES`]) AND in full in the body (`message`, plus
//! `errors` for parameter errors). `extjs`: always HTTP 200 with
//! `success`, `status`, `message` and `errors` in the body.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::ext::ReasonPhrase;
use serde_json::{Map, Value, json};

use crate::error::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Extjs,
}

impl Format {
    /// The format named by `/api2/<format>/...`; unknown formats answer as `json`.
    pub fn from_path(path: &str) -> Format {
        Format::known(path).unwrap_or(Format::Json)
    }

    /// The format named by `/api2/<format>/...`, or the unknown format's name.
    pub fn known(path: &str) -> Result<Format, &str> {
        if path.starts_with("/api2/json/") {
            Ok(Format::Json)
        } else if path.starts_with("/api2/extjs/") {
            Ok(Format::Extjs)
        } else {
            let rest = path.strip_prefix("/api2/").unwrap_or("");
            Err(rest.split('/').next().unwrap_or(""))
        }
    }
}

/// A successful result: `data` plus optional top-level extras (`total`).
pub struct Data {
    pub data: Value,
    pub extra: Map<String, Value>,
}

impl Data {
    pub fn new(data: Value) -> Self {
        Data {
            data,
            extra: Map::new(),
        }
    }

    pub fn with(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }
}

impl From<Value> for Data {
    fn from(data: Value) -> Self {
        Data::new(data)
    }
}

/// An error on its way out, remembering the format it must be rendered in.
pub struct ApiFailure {
    pub format: Format,
    pub error: Error,
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        render(self.format, Err(self.error))
    }
}

fn status_of(error: &Error) -> StatusCode {
    match error {
        Error::Param(_) | Error::BadRequest(_) => StatusCode::BAD_REQUEST,
        Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        Error::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        Error::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
        Error::Forbidden(_) => StatusCode::FORBIDDEN,
        Error::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        Error::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Renders a result in `format`.
pub fn render(format: Format, result: Result<Data, Error>) -> Response {
    let (status, body, reason) = match result {
        Ok(Data { data, extra }) => {
            let mut body = Map::new();
            body.insert("data".into(), data);
            body.extend(extra);
            if format == Format::Extjs {
                body.insert("success".into(), json!(1));
                body.insert("status".into(), json!(200));
            }
            (StatusCode::OK, Value::Object(body), None)
        }
        Err(error) => {
            let status = status_of(&error);
            if status == StatusCode::INTERNAL_SERVER_ERROR {
                tracing::warn!("request failed: {error}");
            }
            let message = error.to_string();
            let first_line = cap_reason(message.lines().next().unwrap_or("error")).to_string();
            let mut body = Map::new();
            body.insert("data".into(), Value::Null);
            body.insert("message".into(), json!(format!("{message}\n")));
            if let Error::Param(errors) = &error {
                body.insert("errors".into(), json!(errors));
            }
            if format == Format::Extjs {
                body.insert("success".into(), json!(0));
                body.insert("status".into(), json!(status.as_u16()));
                (StatusCode::OK, Value::Object(body), None)
            } else {
                (status, Value::Object(body), Some(first_line))
            }
        }
    };
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=UTF-8"),
    );
    if let Some(reason) = reason.and_then(|r| ReasonPhrase::try_from(sanitize_reason(&r)).ok()) {
        response.extensions_mut().insert(reason);
    }
    response
}

/// Longest reason phrase sent, in bytes. Clients refuse status lines of 100 KB (a message
/// can quote a whole parameter); the full text stays in the body's `message`.
pub const MAX_REASON_BYTES: usize = 200;

/// `reason` cut to at most [`MAX_REASON_BYTES`] on a character boundary, marked with `...`
/// when cut.
fn cap_reason(reason: &str) -> std::borrow::Cow<'_, str> {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.into();
    }
    let mut end = MAX_REASON_BYTES - 3;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &reason[..end]).into()
}

/// A reason phrase may hold only tab, space and visible bytes.
fn sanitize_reason(reason: &str) -> Vec<u8> {
    reason
        .bytes()
        .map(|b| {
            if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 {
                b
            } else {
                b' '
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_is_capped_on_a_char_boundary() {
        assert_eq!(cap_reason("short"), "short");
        let exact = "x".repeat(MAX_REASON_BYTES);
        assert_eq!(cap_reason(&exact), exact);
        // 'é' is two bytes: a cut at byte 197 would split one.
        let long = format!("a{}", "é".repeat(200));
        let capped = cap_reason(&long);
        assert!(capped.len() <= MAX_REASON_BYTES, "{}", capped.len());
        assert!(capped.ends_with("..."));
        assert!(long.starts_with(capped.trim_end_matches("...")));
    }
}

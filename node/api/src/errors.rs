//! Request failures as HTTP answers, chosen by the error's variant (never
//! by its words), the same for every endpoint family.

use axum::extract::rejection::JsonRejection;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use cluster::RequestError;
use serde::Serialize;
use serde_json::{json, Value};

/// Seconds a client refused for a full queue is told to wait.
pub const RETRY_AFTER_SECS: u64 = 1;

/// The status a failed request gets: the client's prompt is at fault (400),
/// the node is full (429), the cluster has no plan for the model (503),
/// anything else is the server's (500).
pub fn status_of(e: &RequestError) -> StatusCode {
    if e.is_client_error() {
        StatusCode::BAD_REQUEST
    } else if matches!(e, RequestError::Overloaded { .. }) {
        StatusCode::TOO_MANY_REQUESTS
    } else if e.is_unavailable() {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

/// 429 with `Retry-After`, in OpenAI's error shape (which `shoal ask` and
/// Ollama clients read too): the one answer to a full queue.
pub fn too_busy(e: &RequestError) -> Response {
    let body = serde_json::json!({"error": {
        "message": e.to_string(),
        "type": "rate_limit_error", "param": null, "code": "queue_full"}});
    (
        StatusCode::TOO_MANY_REQUESTS,
        [(header::RETRY_AFTER, RETRY_AFTER_SECS.to_string())],
        Json(body),
    )
        .into_response()
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
}

/// `{"error": "..."}` with `code`: shoal's and Ollama's error shape.
pub fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(ErrorBody { error: msg.into() })).into_response()
}

/// An error in OpenAI's shape.
pub struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    pub(crate) kind: &'static str,
    pub(crate) param: Option<&'static str>,
    pub(crate) code: Option<&'static str>,
}

impl ApiError {
    /// A 400 about parameter `param`.
    pub fn bad(param: Option<&'static str>, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
            code: None,
        }
    }

    pub(crate) fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        ApiError {
            status: e.status(),
            message: e.body_text(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_variant() {
        let cases = [
            (RequestError::EmptyPrompt, 400),
            (
                RequestError::ContextFull {
                    needed: 9,
                    context: 8,
                },
                400,
            ),
            (RequestError::BadInput("x".into()), 400),
            (RequestError::Overloaded { queued: 3 }, 429),
            (RequestError::NoPlan, 503),
            (RequestError::Unservable("too big".into()), 503),
            (RequestError::Replanned, 500),
            (RequestError::Timeout { secs: 120 }, 500),
            (
                RequestError::Stage {
                    node: "a".into(),
                    why: "compute".into(),
                },
                500,
            ),
            (RequestError::Model("bad template".into()), 500),
        ];
        for (e, code) in cases {
            assert_eq!(status_of(&e).as_u16(), code, "{e}");
        }
    }
}

//! The HTTP/1 server under the API: hyper's connection loop with a cap on
//! connections, deadlines for headers and bodies, a body size limit, and
//! the API-key check.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::errors::error;
use crate::AppState;

/// Largest request body: a prompt of up to 1 MiB of text (the tokenizer's
/// own limit) plus its JSON.
pub const BODY_BYTES_MAX: usize = (1 << 20) + 4096;

/// Time a client has to send a request's headers: a connection that
/// trickles them (slowloris) is closed instead of holding a slot forever.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Time a client has to send a request's body once its headers are in: a
/// body trickled a byte at a time gets 408 instead of holding a handler.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads the whole body (within [`BODY_BYTES_MAX`]) before the handler
/// runs, under [`BODY_READ_TIMEOUT`].
pub(crate) async fn read_body_in_time(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, BODY_BYTES_MAX);
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(Ok(bytes)) => {
            next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
                .await
        }
        Ok(Err(_)) => error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body over {BODY_BYTES_MAX} bytes (or broken off)"),
        ),
        Err(_) => error(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "request body not received within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        ),
    }
}

/// Connections served at once; more wait in the kernel's backlog.
pub const CONNECTIONS_MAX: usize = 512;

/// hyper's HTTP/1 server, one task per connection, with a header timeout
/// and a connection cap (axum's `serve` has neither).
pub(crate) async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Router,
    stop: CancellationToken,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p.expect("semaphore open"),
            _ = stop.cancelled() => return,
        };
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // Out of file descriptors and the like: back off a moment.
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Refuses requests without `Authorization: Bearer <--api-key>` when the
/// node has a key (401, OpenAI's shape).
pub(crate) async fn require_key(
    State(app): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(key) = &app.config.api_key else {
        return next.run(req).await;
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared through blake3 so the time taken does not depend on the prefix matched.
    if given.is_some_and(|g| blake3::hash(g.as_bytes()) == blake3::hash(key.as_bytes())) {
        return next.run(req).await;
    }
    let body = serde_json::json!({"error": {
        "message": "missing or wrong API key (Authorization: Bearer ...)",
        "type": "invalid_request_error", "param": null, "code": "invalid_api_key"}});
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

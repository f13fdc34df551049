//! The cluster for people and monitors: the status page at `/`, its data
//! at `/api/status` (and live at `/api/events`), Prometheus at `/metrics`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cluster::status::Status;

use crate::errors::error;
use crate::AppState;

/// The read-only routes (behind the API key when there is one).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(page))
        .route("/api/status", get(status))
        .route("/api/events", get(events))
        .route("/metrics", get(metrics))
        .route("/health", get(health))
}

/// `GET /health`: 200 `{"status":"ok"}` while a plan is in force (the node
/// can answer), 503 with the reason otherwise, as llama-server's.
async fn health(State(app): State<AppState>) -> Response {
    let s = app.cluster.status();
    match (&s.plan, &s.plan_error) {
        (Some(_), _) => Json(serde_json::json!({"status": "ok"})).into_response(),
        (None, why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "status": "no plan",
                "error": why.clone().unwrap_or_else(|| "the cluster is still forming".into()),
            })),
        )
            .into_response(),
    }
}

/// The status page, embedded in the binary (works offline, no CDN).
const PAGE: &str = include_str!("page/index.html");

/// Live status streams open at once: each costs a task and a snapshot per
/// second; beyond this many, new ones get 503.
pub const EVENT_STREAMS_MAX: usize = 64;

/// How often a live stream gets a fresh snapshot: membership changes show
/// within this (the page promises 2 s).
const EVENT_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// The page with the current status inlined, so it renders complete on
/// first paint (the live feed takes over from there).
async fn page(State(app): State<AppState>) -> Response {
    let json = serde_json::to_string(&app.cluster.status()).expect("status serializes");
    let html = page_html(Some(&json), app.config.api_key.is_some());
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

/// The page, with `status` inlined when given and told whether its
/// requests need the API key (it then asks for it once per tab).
pub(crate) fn page_html(status: Option<&str>, needs_key: bool) -> String {
    // Inside a <script>: no "</" may close it early.
    let json = status.map_or_else(|| "null".to_string(), |j| j.replace("</", "<\\/"));
    PAGE.replacen("/*STATUS*/null", &json, 1).replacen(
        "/*NEEDS_KEY*/false",
        if needs_key { "true" } else { "false" },
        1,
    )
}

/// `GET /api/events`: the status as server-sent events, one per second.
async fn events(State(app): State<AppState>) -> Response {
    static STREAMS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    let sem = STREAMS.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(EVENT_STREAMS_MAX)));
    let Ok(permit) = sem.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many live status streams",
        );
    };
    let stream = futures::stream::unfold((app, permit, true), |(app, permit, first)| async move {
        if !first {
            tokio::time::sleep(EVENT_PERIOD).await;
        }
        let json = serde_json::to_string(&app.cluster.status()).expect("status serializes");
        let chunk = format!("data: {json}\n\n").into_bytes();
        Some((
            Ok::<_, std::convert::Infallible>(chunk),
            (app, permit, false),
        ))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

/// `GET /metrics`: Prometheus/OpenMetrics text.
async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.cluster.metrics_text(),
    )
        .into_response()
}

async fn status(State(app): State<AppState>) -> Json<Status> {
    Json(app.cluster.status())
}

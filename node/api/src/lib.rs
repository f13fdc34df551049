//! A shoal node's HTTP API: OpenAI's and Ollama's endpoints, shoal's own
//! (`/api/shoal/generate` for `shoal ask`, `/api/status`, `/api/events`),
//! the status page and Prometheus metrics. Handlers only translate: the
//! work is the cluster's, reached through [`cluster::Handle`] alone
//! (submit a request and read its events, read a status snapshot).
//!
//! # Layout
//! - `server`: the HTTP/1 accept loop with its limits (connections,
//!   header and body deadlines, body size), the Host/Origin guard and the
//!   API-key check.
//! - `errors`: a [`cluster::RequestError`] as an HTTP status (by variant).
//! - `shoal`: `POST /api/shoal/generate` (NDJSON events).
//! - `status`: `/`, `/api/status`, `/api/events`, `/metrics`.
//! - `openai`: `/v1/chat/completions`, `/v1/completions`, `/v1/models`.
//! - `ollama`: `/api/chat`, `/api/generate`, `/api/tags`, `/api/version`.
//!
//! Architecture Invariant: the API never sees membership, plans or the
//! data plane: `cluster` exports only [`cluster::Handle`] for it, and the
//! compiler holds the line.

mod errors;
mod ollama;
mod openai;
pub mod route;
mod server;
mod shoal;
mod status;
mod tools;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::post;
use axum::Router;
use cluster::Handle;
use tokio_util::sync::CancellationToken;

pub use server::{
    host_allowed, BODY_BYTES_MAX, BODY_READ_TIMEOUT, CONNECTIONS_MAX, HEADER_READ_TIMEOUT,
};
pub use shoal::GenerateBody;

/// Most tokens one request may ask for.
pub const MAX_TOKENS_MAX: usize = 1 << 20;

/// Most messages in one chat request (OpenAI's and Ollama's).
pub const MESSAGES_MAX: usize = 1024;

/// The generation endpoints whose bodies [`check_body`] checks.
pub const REQUEST_PATHS: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/api/chat",
    "/api/generate",
    "/api/shoal/generate",
];

/// Runs a request body of `path` through the parsing and checks its
/// handler runs before the request reaches the cluster (for fuzzing):
/// `Err` with why it would be refused. Never panics, whatever the bytes.
pub fn check_body(path: &str, body: &[u8]) -> Result<(), String> {
    if body.len() > BODY_BYTES_MAX {
        return Err("body too large".into());
    }
    match path {
        "/api/shoal/generate" => shoal::check(body),
        _ => {
            let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
            match path {
                "/v1/chat/completions" | "/v1/completions" => openai::check(path, v),
                "/api/chat" | "/api/generate" => ollama::check(path, v),
                _ => Err(format!("no such endpoint {path}")),
            }
        }
    }
}

/// Settings of the API.
#[derive(Debug, Clone, Default)]
pub struct ApiConfig {
    /// Bearer token every route requires (none: open).
    pub api_key: Option<String>,
    /// `Host` names answered besides IP literals, `localhost` and this
    /// machine's own names (see [`server::host_allowed`]).
    pub allowed_hosts: Vec<String>,
    /// Origins (`https://app.example`) whose pages may call the API (CORS);
    /// pages of any other origin are refused.
    pub cors_origins: Vec<String>,
    /// A second key whose requests are private: never sent upstream.
    pub private_api_key: Option<String>,
    /// Upstreams and the policy for sending requests to them.
    pub routing: route::Routing,
}

/// What every handler gets.
pub(crate) struct App {
    /// The cluster member behind this API.
    pub cluster: Handle,
    /// The API's settings.
    pub config: ApiConfig,
}

/// Handlers' state.
pub(crate) type AppState = Arc<App>;

/// Serves the API on `listener` until `stop`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cluster: Handle,
    config: ApiConfig,
    stop: CancellationToken,
) {
    let mut config = config;
    config.allowed_hosts.extend(server::own_names());
    cluster
        .routes()
        .set_policy(config.routing.policy(), config.routing.shown());
    let app: AppState = Arc::new(App { cluster, config });
    // Outermost first: the Host/Origin guard, then the API key (every
    // route when there is one), then the body read under its limits.
    let router = Router::new()
        .route("/api/shoal/generate", post(shoal::generate))
        .merge(openai::routes())
        .merge(ollama::routes())
        .merge(status::routes())
        .merge(ollama::info_routes())
        .layer(axum::middleware::from_fn(server::read_body_in_time))
        .layer(DefaultBodyLimit::max(BODY_BYTES_MAX))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            server::require_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            server::check_host_origin,
        ))
        .with_state(app);
    server::accept_loop(listener, router, stop).await;
}

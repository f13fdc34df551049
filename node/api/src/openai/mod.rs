//! OpenAI-compatible endpoints: `POST /v1/chat/completions`,
//! `POST /v1/completions` (streaming as server-sent events, or whole),
//! `GET /v1/models`. Errors use OpenAI's JSON shape and status codes, so the
//! official clients raise their usual exception types.

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use axum::http::HeaderMap;
use cluster::routes::Outcome;
use cluster::{AskEvent, AskRequest, RequestError};
use engine::chat::tools::ToolStyle;
use engine::sampling::SamplingParams;
use engine::stop::StopMatcher;

use crate::errors::{too_busy, ApiError};
use crate::route::{self, Decision, Local};
use crate::{AppState, MAX_TOKENS_MAX};

mod body;
mod reply;
use body::{chat_body, completion_body, response_format, Asked, Stop};
use reply::{respond, Shape};

/// Default `max_tokens` when a request names none: the model may use the
/// rest of its context, as OpenAI's chat endpoint does (bounded here).
const DEFAULT_MAX_TOKENS: usize = 1024;

/// The routes, to merge into the node's router.
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
}

/// The model this cluster serves, then the upstreams' under their names.
async fn models(State(app): State<AppState>) -> Json<Value> {
    let mut data = vec![
        json!({"id": app.cluster.model().name, "object": "model", "created": 0, "owned_by": "shoal"}),
    ];
    data.extend(route::upstream_models(&app).await);
    Json(json!({"object": "list", "data": data}))
}

/// Which endpoint, for response shapes.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Chat,
    Text,
}

impl Kind {
    /// The endpoint's path under `/v1` (for upstreams).
    fn path(self) -> &'static str {
        match self {
            Kind::Chat => "chat/completions",
            Kind::Text => "completions",
        }
    }
}

async fn chat_completions(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    handle(app, Kind::Chat, &headers, body).await
}

async fn completions(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    handle(app, Kind::Text, &headers, body).await
}

/// Either endpoint: the body checked, then served here or upstream (which
/// gets the body as it came).
async fn handle(
    app: AppState,
    kind: Kind,
    headers: &HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(v) = body?;
    let raw = v.clone();
    let (asked, default_max) = match kind {
        Kind::Chat => (chat_body(v)?, DEFAULT_MAX_TOKENS),
        // OpenAI's default for completions.
        Kind::Text => (completion_body(v)?, 16),
    };
    serve(app, asked, kind, default_max, raw, headers).await
}

/// The checks a body of `path` goes through before it becomes a request
/// (for fuzzing and tests: no cluster needed; `m` is the model served).
pub(crate) fn check(path: &str, v: Value) -> Result<(), String> {
    let asked = match path {
        "/v1/chat/completions" => chat_body(v),
        _ => completion_body(v),
    }
    .map_err(|e| e.message)?;
    let known = asked.common.model == "m";
    ask_request(asked, "m", known, ToolStyle::of(None), DEFAULT_MAX_TOKENS)
        .map(drop)
        .map_err(|e| e.message)
}

/// Validates the common settings and runs the request, here or — where
/// the routing policy allows — upstream (`raw`: the body as it came).
async fn serve(
    app: AppState,
    asked: Asked,
    kind: Kind,
    default_max: usize,
    raw: Value,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let private = route::is_private(headers);
    let routing = &app.config.routing;
    let named = routing.named(&asked.common.model);
    let local = if named.is_none() && !app.cluster.has_plan() {
        Local::NoPlan
    } else {
        Local::Ready
    };
    let upstream_model = |named: Option<(usize, &str)>| {
        named
            .map(|n| n.1.to_string())
            .or_else(|| routing.spill_model.clone())
            .unwrap_or_else(|| asked.common.model.clone())
    };
    match routing.decide(named.map(|n| n.0), private, local) {
        Decision::Upstream(i) => {
            let model = upstream_model(named);
            return route::forward(app.clone(), i, kind.path(), raw, &model).await;
        }
        Decision::Refuse(why) => return Err(refuse(&app, named.map_or(0, |n| n.0), why)),
        Decision::Local => {}
    }
    let served = app.cluster.model();
    let model = served.name.clone();
    let known = served.answers_to(&asked.common.model);
    let style = ToolStyle::of(served.template.as_deref());
    let shape = Shape {
        kind,
        tools: asked.tools.active().then_some(style),
        logprobs: asked.logprobs.is_some(),
    };
    let spill_model = upstream_model(None);
    let (req, stream) = ask_request(asked, &model, known, style, default_max)?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    if let Err(e) = app.cluster.submit(req, tx) {
        return match routing.decide(None, private, Local::QueueFull) {
            Decision::Upstream(i) => {
                route::forward(app.clone(), i, kind.path(), raw, &spill_model).await
            }
            Decision::Refuse(why) => {
                app.cluster
                    .routes()
                    .record(&routing.upstreams[0].name, Outcome::Refused, 0, 0.0);
                tracing::info!("{why}");
                Ok(too_busy(&e))
            }
            Decision::Local => Ok(too_busy(&e)),
        };
    }
    // The first event decides whether the cluster answers: a prompt over
    // its context may go upstream, before any byte went to the client.
    let first = rx.recv().await;
    if let Some(AskEvent::Error {
        error: RequestError::ContextFull { .. },
        ..
    }) = &first
    {
        match routing.decide(None, private, Local::TooLong) {
            Decision::Upstream(i) => {
                return route::forward(app.clone(), i, kind.path(), raw, &spill_model).await
            }
            Decision::Refuse(why) => return Err(refuse(&app, 0, why)),
            Decision::Local => {}
        }
    }
    app.cluster
        .routes()
        .record(cluster::routes::LOCAL, Outcome::Sent, 0, 0.0);
    respond(first, rx, model, shape, stream).await
}

/// A request the policy keeps in, counted against the upstream it would
/// have gone to.
fn refuse(app: &AppState, upstream: usize, why: String) -> ApiError {
    if let Some(up) = app.config.routing.upstreams.get(upstream) {
        app.cluster
            .routes()
            .record(&up.name, Outcome::Refused, 0, 0.0);
    }
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: why,
        kind: "routing_error",
        param: None,
        code: Some("kept_local"),
    }
}

/// The request a body asks for, checked: the model served, OpenAI's
/// ranges, stop sequences, sampling, the grammar its tool choice or
/// response format puts on the answer. Also whether to stream (and with
/// usage).
fn ask_request(
    asked: Asked,
    model: &str,
    known: bool,
    style: ToolStyle,
    default_max: usize,
) -> Result<(AskRequest, Option<bool>), ApiError> {
    let c = asked.common;
    if !known {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model '{}' does not exist; this cluster serves '{model}'",
                c.model
            ),
            kind: "invalid_request_error",
            param: Some("model"),
            code: Some("model_not_found"),
        });
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad(Some("n"), "only n=1 is supported"));
    }
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    StopMatcher::validate(&stop).map_err(|e| ApiError::bad(Some("stop"), e))?;
    let d = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: c.temperature.unwrap_or(1.0),
        top_k: c.top_k.unwrap_or(0),
        top_p: c.top_p.unwrap_or(1.0),
        min_p: c.min_p.unwrap_or(0.0),
        repeat_penalty: c.repeat_penalty.unwrap_or(1.0),
        repeat_last_n: d.repeat_last_n,
        presence_penalty: c.presence_penalty.unwrap_or(0.0),
        frequency_penalty: c.frequency_penalty.unwrap_or(0.0),
        seed: c.seed.unwrap_or_else(rand::random),
    };
    if !(0.0..=2.0).contains(&sampling.temperature) {
        return Err(ApiError::bad(
            Some("temperature"),
            "temperature must be in [0, 2]",
        ));
    }
    sampling.validate().map_err(|e| ApiError::bad(None, e))?;
    let max_tokens = c.max_tokens.map_or(default_max, |m| m as usize);
    if max_tokens == 0 || max_tokens > MAX_TOKENS_MAX {
        return Err(ApiError::bad(
            Some("max_tokens"),
            format!("max_tokens must be 1 to {MAX_TOKENS_MAX}"),
        ));
    }
    let constraint = match asked.tools.constraint(style) {
        Some(c) => Some(c),
        None => response_format(c.response_format.as_ref())?,
    };
    let req = AskRequest {
        prompt: asked.prompt,
        stop,
        max_tokens,
        sampling,
        context: None,
        tools: asked.tools.shown(),
        constraint,
        logprobs: asked.logprobs,
        speculate: true,
    };
    let stream = c.stream.then(|| {
        c.stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    });
    Ok((req, stream))
}

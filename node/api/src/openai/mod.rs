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
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use axum::http::HeaderMap;
use cluster::routes::Outcome;
use cluster::{AskEvent, AskRequest, Prompt, RequestError};
use engine::chat;
use engine::chat::tools::{Tool, ToolCall, ToolStyle};
use engine::sampling::SamplingParams;
use engine::stop::StopMatcher;

use crate::errors::{too_busy, ApiError};
use crate::route::{self, Decision, Local};
use crate::tools::{json_constraint, Choice, Tools};
use crate::{AppState, MAX_TOKENS_MAX, MESSAGES_MAX};

mod reply;
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

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Chat message content: text, or a list of parts of which text ones count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatMessage {
    role: String,
    content: Option<Content>,
    #[allow(dead_code)]
    name: Option<String>,
    /// An assistant turn's calls.
    tool_calls: Option<Vec<InCall>>,
    /// The call a `tool` turn answers.
    tool_call_id: Option<String>,
    /// Accepted (reasoning models' output sent back); not shown again.
    #[allow(dead_code)]
    refusal: Option<Value>,
}

/// A call in an earlier assistant turn: `{"id", "type": "function",
/// "function": {"name", "arguments": "<JSON text>"}}`.
#[derive(Debug, Deserialize)]
struct InCall {
    #[allow(dead_code)]
    id: Option<String>,
    function: InFunctionCall,
}

#[derive(Debug, Deserialize)]
struct InFunctionCall {
    name: String,
    arguments: Value,
}

/// A tool offered: `{"type": "function", "function": {...}}`.
#[derive(Debug, Deserialize)]
struct InTool {
    #[serde(rename = "type")]
    kind: String,
    function: Tool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    include_usage: Option<bool>,
}

/// Settings both endpoints share (flattened into each body).
#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<Stop>,
    n: Option<u32>,
    /// Accepted for compatibility; not used.
    #[allow(dead_code)]
    user: Option<String>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    // llama.cpp-style extensions.
    top_k: Option<usize>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}`.
    response_format: Option<Value>,
}

/// Fields every endpoint takes (the [`Common`] ones).
const COMMON_FIELDS: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "n",
    "user",
    "presence_penalty",
    "frequency_penalty",
    "top_k",
    "min_p",
    "repeat_penalty",
    "response_format",
    // Bookkeeping fields that change nothing about the answer.
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
];

/// OpenAI fields that would change the answer and are not built yet: named
/// as such, not as typos.
const NOT_YET: &[&str] = &["functions", "function_call", "logit_bias"];

/// Refuses fields the endpoint does not know, as OpenAI does (a typo in a
/// parameter name should not be silently ignored).
fn check_fields(v: &Value, own: &[&str]) -> Result<(), ApiError> {
    let Some(obj) = v.as_object() else {
        return Err(ApiError::bad(None, "the body must be a JSON object"));
    };
    for (k, v) in obj {
        if own.contains(&k.as_str()) || COMMON_FIELDS.contains(&k.as_str()) {
            continue;
        }
        if let Some(name) = NOT_YET.iter().find(|n| **n == k) {
            // `null`, `false` and empty lists ask for nothing.
            if v.is_null() || v.as_array().is_some_and(Vec::is_empty) || *v == json!(false) {
                continue;
            }
            return Err(ApiError::bad(
                Some(name),
                format!("'{k}' is not supported by this shoal version (use 'tools' for functions)"),
            ));
        }
        return Err(ApiError::bad(
            None,
            format!("Unrecognized request argument supplied: {k}"),
        ));
    }
    Ok(())
}

/// Parses a checked body into `T`; type errors name the field.
fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::bad(None, format!("invalid request: {e}")))
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    messages: Vec<ChatMessage>,
    max_completion_tokens: Option<u32>,
    tools: Option<Vec<InTool>>,
    tool_choice: Option<Value>,
    #[serde(default)]
    logprobs: bool,
    top_logprobs: Option<u8>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: Value,
    suffix: Option<String>,
    logprobs: Option<u8>,
    #[serde(flatten)]
    common: Common,
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

/// What a body asks for beyond the common settings.
#[derive(Debug)]
struct Asked {
    prompt: Prompt,
    tools: Tools,
    /// `Some(n)`: log-probabilities with `n` alternatives.
    logprobs: Option<u8>,
    common: Common,
}

async fn chat_completions(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(v) = body?;
    let raw = v.clone();
    let asked = chat_body(v)?;
    serve(app, asked, Kind::Chat, DEFAULT_MAX_TOKENS, raw, &headers).await
}

/// A chat completion's body, checked: its messages as a prompt, its tools,
/// and the common settings.
fn chat_body(v: Value) -> Result<Asked, ApiError> {
    check_fields(
        &v,
        &[
            "messages",
            "max_completion_tokens",
            "tools",
            "tool_choice",
            "logprobs",
            "top_logprobs",
        ],
    )?;
    let b: ChatBody = parse(v)?;
    if b.messages.is_empty() || b.messages.len() > MESSAGES_MAX {
        return Err(ApiError::bad(
            Some("messages"),
            format!("messages must hold 1 to {MESSAGES_MAX} entries"),
        ));
    }
    let mut msgs = Vec::with_capacity(b.messages.len());
    for m in b.messages {
        msgs.push(chat_message(m)?);
    }
    let mut list = Vec::new();
    for t in b.tools.unwrap_or_default() {
        if t.kind != "function" {
            return Err(ApiError::bad(
                Some("tools"),
                format!(
                    "tools of type '{}' are not supported (function only)",
                    t.kind
                ),
            ));
        }
        list.push(t.function);
    }
    let choice = match b.tool_choice {
        None | Some(Value::Null) => Choice::Auto,
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Choice::Auto,
            "none" => Choice::None,
            "required" => Choice::Required,
            _ => {
                return Err(ApiError::bad(
                    Some("tool_choice"),
                    format!("unknown tool_choice '{s}'"),
                ))
            }
        },
        Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
            Some(n) => Choice::Named(n.to_string()),
            None => {
                return Err(ApiError::bad(
                    Some("tool_choice"),
                    "tool_choice must be auto, none, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                ))
            }
        },
    };
    let logprobs = match (b.logprobs, b.top_logprobs) {
        (false, None | Some(0)) => None,
        (false, Some(_)) => {
            return Err(ApiError::bad(
                Some("top_logprobs"),
                "top_logprobs needs logprobs: true",
            ))
        }
        (true, n) => Some(n.unwrap_or(0)),
    };
    let mut common = b.common;
    common.max_tokens = b.max_completion_tokens.or(common.max_tokens);
    Ok(Asked {
        prompt: Prompt::Chat(msgs),
        tools: Tools::new(list, choice)?,
        logprobs,
        common,
    })
}

/// One message of a chat body: text content (parts of type text joined),
/// a `tool` turn's answer, an assistant turn's calls.
fn chat_message(m: ChatMessage) -> Result<chat::Message, ApiError> {
    if !matches!(
        m.role.as_str(),
        "system" | "user" | "assistant" | "developer" | "tool"
    ) {
        return Err(ApiError::bad(
            Some("messages"),
            format!("unknown role '{}'", m.role),
        ));
    }
    let content = match m.content {
        None => String::new(),
        Some(Content::Text(t)) => t,
        Some(Content::Parts(parts)) => {
            let mut t = String::new();
            for p in parts {
                if p.kind != "text" {
                    return Err(ApiError::bad(
                        Some("messages"),
                        format!(
                            "content parts of type '{}' are not supported (text only)",
                            p.kind
                        ),
                    ));
                }
                t += p.text.as_deref().unwrap_or("");
            }
            t
        }
    };
    let role = if m.role == "developer" {
        "system".into()
    } else {
        m.role
    };
    let mut msg = chat::Message::new(role, content);
    msg.tool_call_id = m.tool_call_id;
    for c in m.tool_calls.unwrap_or_default() {
        // OpenAI sends the arguments as JSON text.
        let arguments = match c.function.arguments {
            Value::String(s) => serde_json::from_str(&s).map_err(|e| {
                ApiError::bad(
                    Some("messages"),
                    format!("tool call arguments are not JSON: {e}"),
                )
            })?,
            v => v,
        };
        msg.tool_calls.push(ToolCall {
            name: c.function.name,
            arguments,
        });
    }
    Ok(msg)
}

async fn completions(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(v) = body?;
    let raw = v.clone();
    let asked = completion_body(v)?;
    // OpenAI's default for completions.
    serve(app, asked, Kind::Text, 16, raw, &headers).await
}

/// A completion's body, checked.
fn completion_body(v: Value) -> Result<Asked, ApiError> {
    check_fields(&v, &["prompt", "suffix", "logprobs", "echo", "best_of"])?;
    if v.get("echo").is_some_and(|e| *e == json!(true)) {
        return Err(ApiError::bad(Some("echo"), "echo is not supported"));
    }
    if v.get("best_of")
        .is_some_and(|b| !b.is_null() && *b != json!(1))
    {
        return Err(ApiError::bad(
            Some("best_of"),
            "only best_of=1 is supported",
        ));
    }
    let b: CompletionBody = parse(v)?;
    let prompt = match b.prompt {
        Value::String(s) => s,
        Value::Array(a) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or("").to_string()
        }
        _ => {
            return Err(ApiError::bad(
                Some("prompt"),
                "prompt must be a string (or a list of one string)",
            ))
        }
    };
    let prompt = match b.suffix.filter(|s| !s.is_empty()) {
        Some(suffix) => Prompt::Infill {
            prefix: prompt,
            suffix,
        },
        None => Prompt::Raw(prompt),
    };
    if b.logprobs
        .is_some_and(|n| n > protocol::limits::TOP_LOGPROBS_MAX)
    {
        return Err(ApiError::bad(
            Some("logprobs"),
            format!(
                "logprobs must be 0 to {}",
                protocol::limits::TOP_LOGPROBS_MAX
            ),
        ));
    }
    Ok(Asked {
        prompt,
        tools: Tools::new(Vec::new(), Choice::None)?,
        logprobs: b.logprobs,
        common: b.common,
    })
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
    };
    let stream = c.stream.then(|| {
        c.stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    });
    Ok((req, stream))
}

/// The grammar `response_format` asks for: none for text, any JSON object
/// for `json_object`, the schema's for `json_schema`.
fn response_format(v: Option<&Value>) -> Result<Option<protocol::Constraint>, ApiError> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match v.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => json_constraint(None).map(Some),
        Some("json_schema") => match v.pointer("/json_schema/schema") {
            Some(schema) => json_constraint(Some(schema)).map(Some),
            None => Err(ApiError::bad(
                Some("response_format"),
                "json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}",
            )),
        },
        _ => Err(ApiError::bad(
            Some("response_format"),
            "response_format type must be text, json_object or json_schema",
        )),
    }
}

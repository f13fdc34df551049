//! Ollama-compatible endpoints, because many tools speak Ollama's API:
//! `POST /api/chat`, `POST /api/generate` (NDJSON streams, or whole with
//! `"stream": false`), `GET /api/tags`, `GET /api/version`.
//!
//! Ollama's sampling defaults apply (temperature 0.8, top-k 40, top-p 0.9,
//! repeat penalty 1.1 over the last 64 tokens), set through `options` as in
//! Ollama. Like Ollama, unknown fields are ignored; wrong types are 400.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use cluster::{AskEvent, AskRequest, Prompt, RequestError};
use engine::chat;
use engine::chat::tools::{Tool, ToolCall, ToolStyle};
use engine::local::{GenerationStats, StopReason};
use engine::sampling::SamplingParams;
use engine::stop::StopMatcher;

use crate::errors::{error as err, status_of, too_busy};
use crate::tools::{json_constraint, Answer, Choice, Tools};
use crate::{AppState, MAX_TOKENS_MAX, MESSAGES_MAX};

/// Tokens generated when `num_predict` is not set (Ollama: until the end
/// of the context; bounded here as the OpenAI endpoints are).
const DEFAULT_NUM_PREDICT: usize = 1024;

/// Generation routes (behind the API key when one is set).
pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
}

/// Read-only routes.
pub(crate) fn info_routes() -> Router<AppState> {
    Router::new()
        .route("/api/tags", get(tags))
        .route("/api/version", get(version))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
}

#[derive(Debug, Default, Deserialize)]
struct Options {
    num_predict: Option<i64>,
    temperature: Option<f32>,
    top_k: Option<usize>,
    top_p: Option<f32>,
    min_p: Option<f32>,
    repeat_penalty: Option<f32>,
    repeat_last_n: Option<usize>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
    num_ctx: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct OllamaMessage {
    role: String,
    #[serde(default)]
    content: String,
    /// An assistant turn's calls: `[{"function": {"name", "arguments": {...}}}]`.
    tool_calls: Option<Vec<OllamaCall>>,
}

#[derive(Debug, Deserialize)]
struct OllamaCall {
    function: ToolCall,
}

/// A tool offered: `{"type": "function", "function": {...}}`.
#[derive(Debug, Deserialize)]
struct OllamaTool {
    function: Tool,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    model: String,
    messages: Vec<OllamaMessage>,
    #[serde(default)]
    options: Options,
    stream: Option<bool>,
    #[serde(flatten)]
    extra: Extras,
}

/// Ollama's fields beyond the prompt and options.
#[derive(Debug, Default, Deserialize)]
struct Extras {
    /// `"json"` or a JSON schema.
    format: Option<Value>,
    tools: Option<Vec<OllamaTool>>,
    /// How long to keep the model loaded: a node holds its layers while
    /// it runs, so any value is honoured by doing nothing.
    #[allow(dead_code)]
    keep_alive: Option<Value>,
}

impl Extras {
    /// The tools offered (Ollama lets the model choose) and the grammar
    /// `format` asks for: `"json"` any JSON object, an object a schema.
    // The error is the response itself, as in `parse`.
    #[allow(clippy::result_large_err)]
    fn parts(self) -> Result<(Tools, Option<protocol::Constraint>), Response> {
        let bad = |e: crate::errors::ApiError| err(StatusCode::BAD_REQUEST, e.message);
        let list = self
            .tools
            .unwrap_or_default()
            .into_iter()
            .map(|t| t.function)
            .collect();
        let tools = Tools::new(list, Choice::Auto).map_err(bad)?;
        let format = match self.format {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) if s == "json" => Some(json_constraint(None).map_err(bad)?),
            Some(schema @ Value::Object(_)) => Some(json_constraint(Some(&schema)).map_err(bad)?),
            Some(other) => {
                return Err(err(
                    StatusCode::BAD_REQUEST,
                    format!("format must be \"json\" or a JSON schema, not {other}"),
                ))
            }
        };
        Ok((tools, format))
    }
}

#[derive(Debug, Deserialize)]
struct GenerateBody {
    model: String,
    #[serde(default)]
    prompt: String,
    system: Option<String>,
    #[serde(default)]
    raw: bool,
    #[serde(default)]
    options: Options,
    stream: Option<bool>,
    #[serde(flatten)]
    extra: Extras,
}

fn bad_json(e: JsonRejection) -> Response {
    err(StatusCode::BAD_REQUEST, e.body_text())
}

/// Which endpoint, for response shapes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Generate,
}

/// The body as `T`, or the 400 to answer.
// The error is the response itself, built once per bad request: boxing it
// would only add an allocation.
#[allow(clippy::result_large_err)]
fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Json<Value>, JsonRejection>,
) -> Result<T, Response> {
    let Json(v) = body.map_err(bad_json)?;
    serde_json::from_value(v)
        .map_err(|e| err(StatusCode::BAD_REQUEST, format!("invalid request: {e}")))
}

async fn chat(State(app): State<AppState>, body: Result<Json<Value>, JsonRejection>) -> Response {
    match parse(body).and_then(chat_body) {
        Ok(asked) => serve(app, asked, Kind::Chat).await,
        Err(r) => r,
    }
}

/// What a request asks for.
struct Asked {
    model: String,
    prompt: Prompt,
    options: Options,
    /// Whether to stream (Ollama's default: yes).
    stream: Option<bool>,
    tools: Tools,
    /// The grammar of `format`.
    format: Option<protocol::Constraint>,
}

// The error is the response itself, as in `parse`.
#[allow(clippy::result_large_err)]
fn chat_body(b: ChatBody) -> Result<Asked, Response> {
    let (tools, format) = b.extra.parts()?;
    if b.messages.is_empty() || b.messages.len() > MESSAGES_MAX {
        return Err(err(
            StatusCode::BAD_REQUEST,
            format!("messages must hold 1 to {MESSAGES_MAX} entries"),
        ));
    }
    let mut msgs = Vec::with_capacity(b.messages.len());
    for m in b.messages {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool") {
            return Err(err(
                StatusCode::BAD_REQUEST,
                format!("unknown role '{}'", m.role),
            ));
        }
        let mut msg = chat::Message::new(m.role, m.content);
        msg.tool_calls = m
            .tool_calls
            .unwrap_or_default()
            .into_iter()
            .map(|c| c.function)
            .collect();
        msgs.push(msg);
    }
    Ok(Asked {
        model: b.model,
        prompt: Prompt::Chat(msgs),
        options: b.options,
        stream: b.stream,
        tools,
        format,
    })
}

async fn generate(
    State(app): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    match parse(body).and_then(generate_body) {
        Ok(asked) => serve(app, asked, Kind::Generate).await,
        Err(r) => r,
    }
}

// The error is the response itself, as in `parse`.
#[allow(clippy::result_large_err)]
fn generate_body(b: GenerateBody) -> Result<Asked, Response> {
    let (tools, format) = b.extra.parts()?;
    let prompt = if b.raw {
        Prompt::Raw(b.prompt)
    } else {
        let mut msgs = Vec::new();
        if let Some(s) = b.system {
            msgs.push(chat::Message::new("system", s));
        }
        msgs.push(chat::Message::new("user", b.prompt));
        Prompt::Chat(msgs)
    };
    Ok(Asked {
        model: b.model,
        prompt,
        options: b.options,
        stream: b.stream,
        tools,
        format,
    })
}

/// The checks a body of `path` goes through before it becomes a request
/// (for fuzzing and tests: no cluster needed).
pub(crate) fn check(path: &str, v: Value) -> Result<(), String> {
    let asked = match path {
        "/api/chat" => parse(Ok(Json(v))).and_then(chat_body),
        _ => parse(Ok(Json(v))).and_then(generate_body),
    };
    let asked = asked.map_err(|r| r.status().to_string())?;
    ask_request(asked, ToolStyle::of(None))
        .map(drop)
        .map_err(|r| r.status().to_string())
}

async fn serve(app: AppState, asked: Asked, kind: Kind) -> Response {
    let served = app.cluster.model();
    if !served.answers_to(&asked.model) {
        return err(
            StatusCode::NOT_FOUND,
            format!(
                "model '{}' not found; this cluster serves '{}'",
                asked.model, served.name
            ),
        );
    }
    let style = ToolStyle::of(served.template.as_deref());
    let meta = Meta {
        model: asked.model.clone(),
        kind,
        tools: asked.tools.active().then_some(style),
    };
    let stream = asked.stream;
    let req = match ask_request(asked, style) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    if let Err(e) = app.cluster.submit(req, tx) {
        return too_busy(&e);
    }
    if stream.unwrap_or(true) {
        return ndjson(rx, meta);
    }
    whole(rx, meta).await
}

/// The request `options` ask for, with Ollama's defaults, checked.
// The error is the response itself, as in `parse`.
#[allow(clippy::result_large_err)]
fn ask_request(asked: Asked, style: ToolStyle) -> Result<AskRequest, Response> {
    let o = asked.options;
    let stop = o.stop.unwrap_or_default();
    if let Err(e) = StopMatcher::validate(&stop) {
        return Err(err(StatusCode::BAD_REQUEST, e));
    }
    let sampling = SamplingParams {
        temperature: o.temperature.unwrap_or(0.8),
        top_k: o.top_k.unwrap_or(40),
        top_p: o.top_p.unwrap_or(0.9),
        min_p: o.min_p.unwrap_or(0.0),
        repeat_penalty: o.repeat_penalty.unwrap_or(1.1),
        repeat_last_n: o.repeat_last_n.unwrap_or(64),
        presence_penalty: o.presence_penalty.unwrap_or(0.0),
        frequency_penalty: o.frequency_penalty.unwrap_or(0.0),
        seed: o.seed.unwrap_or_else(rand::random),
    };
    if let Err(e) = sampling.validate() {
        return Err(err(StatusCode::BAD_REQUEST, e));
    }
    let max_tokens = match o.num_predict {
        None | Some(-1) | Some(-2) => DEFAULT_NUM_PREDICT,
        Some(n) if n > 0 && n as usize <= MAX_TOKENS_MAX => n as usize,
        Some(n) => {
            return Err(err(
                StatusCode::BAD_REQUEST,
                format!("num_predict {n} is out of range"),
            ))
        }
    };
    Ok(AskRequest {
        prompt: asked.prompt,
        stop,
        max_tokens,
        sampling,
        context: o.num_ctx,
        constraint: asked.tools.constraint(style).or(asked.format),
        tools: asked.tools.shown(),
        logprobs: None,
        speculate: true,
    })
}

/// The whole answer in one object (`"stream": false`).
async fn whole(mut rx: mpsc::UnboundedReceiver<AskEvent>, meta: Meta) -> Response {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(AskEvent::Token { text: t, .. }) | Some(AskEvent::Tail { text: t }) => text += &t,
            Some(AskEvent::Done { stats }) => {
                let (text, calls) = match meta.tools {
                    Some(style) => Answer::whole(style, true, &text),
                    None => (text, Vec::new()),
                };
                let mut v = meta.chunk(&text);
                meta.with_calls(&mut v, &calls);
                meta.finish(&mut v, &stats);
                return Json(v).into_response();
            }
            Some(AskEvent::Error { error, .. }) => return failure(&error),
            None => return failure(&RequestError::Cancelled),
        }
    }
}

fn failure(e: &RequestError) -> Response {
    err(status_of(e), e.to_string())
}

struct Meta {
    model: String,
    kind: Kind,
    /// The answer may hold tool calls, in this style.
    tools: Option<ToolStyle>,
}

impl Meta {
    /// Adds calls to a chat chunk's message, as Ollama writes them.
    fn with_calls(&self, v: &mut Value, calls: &[ToolCall]) {
        if !calls.is_empty() && self.kind == Kind::Chat {
            let calls: Vec<Value> = calls.iter().map(|c| json!({"function": c})).collect();
            v["message"]["tool_calls"] = json!(calls);
        }
    }

    fn chunk(&self, text: &str) -> Value {
        let mut v = json!({
            "model": self.model,
            "created_at": rfc3339_now(),
            "done": false,
        });
        match self.kind {
            Kind::Chat => v["message"] = json!({"role": "assistant", "content": text}),
            Kind::Generate => v["response"] = json!(text),
        }
        v
    }

    /// Marks `v` as the last object, with Ollama's counters (nanoseconds).
    fn finish(&self, v: &mut Value, s: &GenerationStats) {
        let ns = |ms: f64| (ms * 1e6) as u64;
        v["done"] = json!(true);
        v["done_reason"] = json!(match s.stop {
            StopReason::MaxTokens | StopReason::ContextFull => "length",
            _ => "stop",
        });
        v["total_duration"] = json!(ns(s.ttft_ms + s.gen_ms));
        v["load_duration"] = json!(0);
        v["prompt_eval_count"] = json!(s.prompt_tokens);
        v["prompt_eval_duration"] = json!(ns(s.prompt_ms));
        v["eval_count"] = json!(s.gen_tokens);
        v["eval_duration"] = json!(ns(s.gen_ms));
    }
}

/// One JSON object per line: a chunk per piece of text, then the last
/// object with the counters. Dropping the stream cancels the request.
fn ndjson(rx: mpsc::UnboundedReceiver<AskEvent>, meta: Meta) -> Response {
    let answer = match meta.tools {
        Some(style) => Answer::new(style, true),
        None => Answer::new(ToolStyle::of(None), false),
    };
    let state = (rx, meta, answer, false);
    let body = futures::stream::unfold(state, |(mut rx, meta, mut answer, done)| async move {
        if done {
            return None;
        }
        let mut lines = Vec::new();
        let done = match rx.recv().await? {
            AskEvent::Token { text, .. } | AskEvent::Tail { text } => {
                lines.push(meta.chunk(&answer.push(&text)));
                false
            }
            AskEvent::Done { stats } => {
                let (text, calls) = answer.finish();
                if !text.is_empty() || !calls.is_empty() {
                    let mut v = meta.chunk(&text);
                    meta.with_calls(&mut v, &calls);
                    lines.push(v);
                }
                let mut v = meta.chunk("");
                meta.finish(&mut v, &stats);
                lines.push(v);
                true
            }
            AskEvent::Error { error, .. } => {
                lines.push(json!({ "error": error.to_string() }));
                true
            }
        };
        let mut out = Vec::new();
        for v in lines {
            out.extend(serde_json::to_vec(&v).expect("json"));
            out.push(b'\n');
        }
        Some((
            Ok::<_, std::convert::Infallible>(out),
            (rx, meta, answer, done),
        ))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(body))
        .expect("valid response")
}

/// The model's `details` as Ollama lists them.
fn details(m: &cluster::ModelInfo) -> Value {
    json!({
        "format": "gguf",
        "family": m.architecture,
        "families": [m.architecture],
        "parameter_size": m.parameter_size,
        "quantization_level": m.quantization.clone().unwrap_or_default(),
    })
}

async fn tags(State(app): State<AppState>) -> Json<Value> {
    let m = app.cluster.model();
    Json(json!({ "models": [{
        "name": m.name,
        "model": m.name,
        "modified_at": rfc3339_now(),
        "size": m.bytes,
        "digest": m.hash,
        "details": details(m),
    }]}))
}

/// `GET /api/ps`: the model this node serves is always loaded.
async fn ps(State(app): State<AppState>) -> Json<Value> {
    let m = app.cluster.model();
    Json(json!({ "models": [{
        "name": m.name,
        "model": m.name,
        "size": m.bytes,
        "digest": m.hash,
        "details": details(m),
        "expires_at": "2999-01-01T00:00:00Z",
        "size_vram": 0,
    }]}))
}

/// `POST /api/show {"model": NAME}` (or `name`, older clients).
async fn show(State(app): State<AppState>, body: Result<Json<Value>, JsonRejection>) -> Response {
    let Ok(Json(v)) = body else {
        return err(StatusCode::BAD_REQUEST, "expected a JSON body with 'model'");
    };
    let asked = v["model"]
        .as_str()
        .or(v["name"].as_str())
        .unwrap_or_default();
    let m = app.cluster.model();
    if !m.answers_to(asked) {
        return err(
            StatusCode::NOT_FOUND,
            format!(
                "model '{asked}' not found; this cluster serves '{}'",
                m.name
            ),
        );
    }
    let arch = &m.architecture;
    let mut info = serde_json::Map::new();
    info.insert("general.architecture".into(), json!(arch));
    info.insert("general.parameter_count".into(), json!(m.parameters));
    info.insert(format!("{arch}.context_length"), json!(m.context));
    Json(json!({
        "modelfile": format!("FROM {}\n", m.name),
        "parameters": "",
        "template": m.template.clone().unwrap_or_default(),
        "details": details(m),
        "model_info": info,
        "capabilities": ["completion", "tools"],
        "modified_at": rfc3339_now(),
    }))
    .into_response()
}

async fn version() -> Json<Value> {
    Json(json!({ "version": env!("CARGO_PKG_VERSION") }))
}

/// Now as RFC 3339 UTC (`2026-11-26T10:00:00.123Z`).
fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    chat::rfc3339(d.as_secs() as i64, d.subsec_millis())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let t = rfc3339_now();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }
}

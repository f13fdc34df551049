//! OpenAI-compatible endpoints: `POST /v1/chat/completions`,
//! `POST /v1/completions` (streaming as server-sent events, or whole),
//! `GET /v1/models`. Errors use OpenAI's JSON shape and status codes, so the
//! official clients raise their usual exception types.

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
use engine::local::{GenerationStats, StopReason};
use engine::sampling::SamplingParams;
use engine::stop::StopMatcher;

use crate::errors::{status_of, too_busy, ApiError};
use crate::{AppState, MAX_TOKENS_MAX, MESSAGES_MAX};

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

async fn models(State(app): State<AppState>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": app.cluster.model().name, "object": "model", "created": 0, "owned_by": "shoal"}],
    }))
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
    // Bookkeeping fields that change nothing about the answer.
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
];

/// OpenAI fields that would change the answer and are not built yet: named
/// as such, not as typos.
const NOT_YET: &[&str] = &[
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "response_format",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "suffix",
];

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
                format!("'{k}' (structured output, tool calls, logprobs) is not supported by this shoal version yet"),
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
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    prompt: Value,
    #[serde(flatten)]
    common: Common,
}

/// Which endpoint, for response shapes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Text,
}

async fn chat_completions(
    State(app): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(v) = body?;
    let (prompt, common) = chat_body(v)?;
    serve(app, prompt, common, Kind::Chat, DEFAULT_MAX_TOKENS).await
}

/// A chat completion's body, checked: its messages as a prompt, and the
/// common settings.
fn chat_body(v: Value) -> Result<(Prompt, Common), ApiError> {
    check_fields(&v, &["messages", "max_completion_tokens"])?;
    let b: ChatBody = parse(v)?;
    if b.messages.is_empty() || b.messages.len() > MESSAGES_MAX {
        return Err(ApiError::bad(
            Some("messages"),
            format!("messages must hold 1 to {MESSAGES_MAX} entries"),
        ));
    }
    let mut msgs = Vec::with_capacity(b.messages.len());
    for m in b.messages {
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
        msgs.push(chat::Message { role, content });
    }
    let mut common = b.common;
    common.max_tokens = b.max_completion_tokens.or(common.max_tokens);
    Ok((Prompt::Chat(msgs), common))
}

async fn completions(
    State(app): State<AppState>,
    body: Result<Json<Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(v) = body?;
    let (prompt, common) = completion_body(v)?;
    // OpenAI's default for completions.
    serve(app, prompt, common, Kind::Text, 16).await
}

/// A completion's body, checked.
fn completion_body(v: Value) -> Result<(Prompt, Common), ApiError> {
    check_fields(&v, &["prompt"])?;
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
    Ok((Prompt::Raw(prompt), b.common))
}

/// The checks a body of `path` goes through before it becomes a request
/// (for fuzzing and tests: no cluster needed; `m` is the model served).
pub(crate) fn check(path: &str, v: Value) -> Result<(), String> {
    let (prompt, common) = match path {
        "/v1/chat/completions" => chat_body(v),
        _ => completion_body(v),
    }
    .map_err(|e| e.message)?;
    let known = common.model == "m";
    ask_request(common, prompt, "m", known, DEFAULT_MAX_TOKENS)
        .map(drop)
        .map_err(|e| e.message)
}

/// Validates the common settings and runs the request.
async fn serve(
    app: AppState,
    prompt: Prompt,
    c: Common,
    kind: Kind,
    default_max: usize,
) -> Result<Response, ApiError> {
    let served = app.cluster.model();
    let model = served.name.clone();
    let known = served.answers_to(&c.model);
    let (req, stream) = ask_request(c, prompt, &model, known, default_max)?;
    let (tx, rx) = mpsc::unbounded_channel();
    if let Err(e) = app.cluster.submit(req, tx) {
        return Ok(too_busy(&e));
    }
    respond(rx, model, kind, stream).await
}

/// The request a body asks for, checked: the model served, OpenAI's
/// ranges, stop sequences, sampling. Also whether to stream (and with usage).
fn ask_request(
    c: Common,
    prompt: Prompt,
    model: &str,
    known: bool,
    default_max: usize,
) -> Result<(AskRequest, Option<bool>), ApiError> {
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
    let req = AskRequest {
        prompt,
        stop,
        max_tokens,
        sampling,
        context: None,
    };
    let stream = c.stream.then(|| {
        c.stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false)
    });
    Ok((req, stream))
}

/// The answer: server-sent events when streaming (`Some(with_usage)`),
/// else the whole text once done, with an error before any text as an
/// error status.
async fn respond(
    mut rx: mpsc::UnboundedReceiver<AskEvent>,
    model: String,
    kind: Kind,
    stream_usage: Option<bool>,
) -> Result<Response, ApiError> {
    let id = format!(
        "{}-{:016x}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        rand::random::<u64>()
    );
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let meta = Meta {
        id,
        created,
        model,
        kind,
    };
    if let Some(usage) = stream_usage {
        return Ok(stream(rx, meta, usage));
    }
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(AskEvent::Token { text: t, .. }) | Some(AskEvent::Tail { text: t }) => text += &t,
            Some(AskEvent::Done { stats }) => {
                return Ok(Json(meta.whole(&text, &stats)).into_response());
            }
            Some(AskEvent::Error { error, .. }) => return Err(failure(&error)),
            None => return Err(failure(&RequestError::Cancelled)),
        }
    }
}

/// A failed request in OpenAI's shape; the status follows the variant.
fn failure(e: &RequestError) -> ApiError {
    let status = status_of(e);
    let (kind, param) = if e.is_client_error() {
        ("invalid_request_error", Some("messages"))
    } else {
        ("server_error", None)
    };
    ApiError {
        status,
        message: e.to_string(),
        kind,
        param,
        code: None,
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        _ => "stop",
    }
}

fn usage(stats: &GenerationStats) -> Value {
    json!({
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.gen_tokens,
        "total_tokens": stats.prompt_tokens + stats.gen_tokens,
    })
}

impl Meta {
    fn whole(&self, text: &str, stats: &GenerationStats) -> Value {
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(stats.stop),
                "logprobs": null,
            }),
            Kind::Text => json!({
                "index": 0,
                "text": text,
                "finish_reason": finish_reason(stats.stop),
                "logprobs": null,
            }),
        };
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(stats),
        })
    }

    /// One streamed chunk: `delta` text (chat) or `text` (completions).
    fn chunk(&self, text: Option<&str>, role: bool, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if role {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
            }
            Kind::Text => {
                json!({"index": 0, "text": text.unwrap_or(""), "finish_reason": finish, "logprobs": null})
            }
        };
        json!({
            "id": self.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }
}

fn sse(v: &Value) -> Vec<u8> {
    format!("data: {v}\n\n").into_bytes()
}

/// Streams events as SSE: a role chunk (chat), text chunks, a final chunk
/// with the finish reason, usage if asked, then `data: [DONE]`. Dropping
/// the stream (client gone) drops the receiver, which cancels the request.
fn stream(rx: mpsc::UnboundedReceiver<AskEvent>, meta: Meta, with_usage: bool) -> Response {
    struct St {
        rx: mpsc::UnboundedReceiver<AskEvent>,
        meta: Meta,
        with_usage: bool,
        started: bool,
        done: bool,
    }
    let st = St {
        rx,
        meta,
        with_usage,
        started: false,
        done: false,
    };
    let body = futures::stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        let mut out = Vec::new();
        if !st.started && st.meta.kind == Kind::Chat {
            out.extend(sse(&st.meta.chunk(Some(""), true, None)));
        }
        st.started = true;
        match st.rx.recv().await {
            Some(AskEvent::Token { text, .. }) | Some(AskEvent::Tail { text }) => {
                if !text.is_empty() {
                    out.extend(sse(&st.meta.chunk(Some(&text), false, None)));
                }
            }
            Some(AskEvent::Done { stats }) => {
                out.extend(sse(&st.meta.chunk(
                    None,
                    false,
                    Some(finish_reason(stats.stop)),
                )));
                if st.with_usage {
                    let mut u = st.meta.chunk(None, false, None);
                    u["choices"] = json!([]);
                    u["usage"] = usage(&stats);
                    out.extend(sse(&u));
                }
                out.extend(b"data: [DONE]\n\n");
                st.done = true;
            }
            Some(AskEvent::Error { error, .. }) => {
                out.extend(sse(&failure(&error).body()));
                out.extend(b"data: [DONE]\n\n");
                st.done = true;
            }
            None => return None,
        }
        Some((Ok::<_, std::convert::Infallible>(out), st))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .expect("valid response")
}

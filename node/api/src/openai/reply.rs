//! OpenAI's response shapes: a whole completion, or server-sent events;
//! with tool calls and log-probabilities when asked for.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use cluster::{AskEvent, Logprob, RequestError};
use engine::chat::tools::{ToolCall, ToolStyle};
use engine::local::{GenerationStats, StopReason};

use super::Kind;
use crate::errors::{status_of, ApiError};
use crate::tools::{call_id, Answer};

/// How the answer is written: which endpoint, whether it may hold tool
/// calls (in this style), whether tokens carry log-probabilities.
#[derive(Debug, Clone, Copy)]
pub(super) struct Shape {
    pub kind: Kind,
    pub tools: Option<ToolStyle>,
    pub logprobs: bool,
}

/// The answer: server-sent events when streaming (`Some(with_usage)`),
/// else the whole text once done, with an error before any text as an
/// error status.
pub(super) async fn respond(
    first: Option<AskEvent>,
    rx: mpsc::UnboundedReceiver<AskEvent>,
    model: String,
    shape: Shape,
    stream_usage: Option<bool>,
) -> Result<Response, ApiError> {
    let id = format!(
        "{}-{:016x}",
        if shape.kind == Kind::Chat {
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
        shape,
    };
    let mut rx = Events { first, rx };
    if let Some(usage) = stream_usage {
        return Ok(stream(rx, meta, usage));
    }
    let mut text = String::new();
    let mut logprobs = Vec::new();
    loop {
        match rx.next().await {
            Some(AskEvent::Token {
                text: t, logprob, ..
            }) => {
                text += &t;
                logprobs.extend(logprob);
            }
            Some(AskEvent::Tail { text: t }) => text += &t,
            Some(AskEvent::Done { stats }) => {
                return Ok(Json(meta.whole(&text, &logprobs, &stats)).into_response());
            }
            Some(AskEvent::Error { error, .. }) => return Err(failure(&error)),
            None => return Err(failure(&RequestError::Cancelled)),
        }
    }
}

/// A request's events, the first of which the handler read already (to
/// decide its route) and hands back first. Dropping it drops the
/// receiver, which cancels the request.
struct Events {
    first: Option<AskEvent>,
    rx: mpsc::UnboundedReceiver<AskEvent>,
}

impl Events {
    async fn next(&mut self) -> Option<AskEvent> {
        match self.first.take() {
            Some(e) => Some(e),
            None => self.rx.recv().await,
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
    shape: Shape,
}

fn finish_reason(stop: StopReason, calls: bool) -> &'static str {
    match stop {
        _ if calls => "tool_calls",
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

/// Calls in OpenAI's shape (arguments as JSON text); `index` for deltas.
fn calls_json(calls: &[ToolCall], indexed: bool) -> Value {
    calls
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut v = json!({
                "id": call_id(),
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments.to_string()},
            });
            if indexed {
                v["index"] = json!(i);
            }
            v
        })
        .collect()
}

/// Chat log-probabilities: `{"content": [{token, logprob, bytes, top_logprobs}]}`.
fn chat_logprobs(lps: &[Logprob]) -> Value {
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            json!({
                "token": l.token, "logprob": l.logprob, "bytes": l.bytes,
                "top_logprobs": l.top.iter().map(|t| json!({
                    "token": t.token, "logprob": t.logprob, "bytes": t.bytes,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions' (legacy) log-probabilities: parallel lists.
fn text_logprobs(lps: &[Logprob]) -> Value {
    let mut offset = 0;
    let mut offsets = Vec::with_capacity(lps.len());
    for l in lps {
        offsets.push(offset);
        offset += l.token.len();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| {
            l.top.iter().map(|t| (t.token.clone(), json!(t.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

impl Meta {
    fn logprobs(&self, lps: &[Logprob]) -> Value {
        match (self.shape.logprobs, self.shape.kind) {
            (false, _) => Value::Null,
            (true, Kind::Chat) => chat_logprobs(lps),
            (true, Kind::Text) => text_logprobs(lps),
        }
    }

    fn whole(&self, text: &str, lps: &[Logprob], stats: &GenerationStats) -> Value {
        let choice = match self.shape.kind {
            Kind::Chat => {
                let (content, calls) = match self.shape.tools {
                    Some(style) => Answer::whole(style, true, text),
                    None => (text.to_string(), Vec::new()),
                };
                let mut message = json!({"role": "assistant", "content": content});
                if !calls.is_empty() {
                    message["tool_calls"] = calls_json(&calls, false);
                    if content.is_empty() {
                        message["content"] = Value::Null;
                    }
                }
                json!({
                    "index": 0,
                    "message": message,
                    "finish_reason": finish_reason(stats.stop, !calls.is_empty()),
                    "logprobs": self.logprobs(lps),
                })
            }
            Kind::Text => json!({
                "index": 0,
                "text": text,
                "finish_reason": finish_reason(stats.stop, false),
                "logprobs": self.logprobs(lps),
            }),
        };
        json!({
            "id": self.id,
            "object": if self.shape.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(stats),
        })
    }

    /// One streamed chunk: a `delta` (chat) or `text` (completions).
    fn chunk(&self, delta: Delta<'_>, finish: Option<&str>) -> Value {
        let logprobs = if delta.logprobs.is_empty() {
            Value::Null
        } else {
            self.logprobs(delta.logprobs)
        };
        let choice = match self.shape.kind {
            Kind::Chat => {
                let mut d = serde_json::Map::new();
                if delta.role {
                    d.insert("role".into(), "assistant".into());
                }
                if let Some(t) = delta.text {
                    d.insert("content".into(), t.into());
                }
                if !delta.calls.is_empty() {
                    d.insert("tool_calls".into(), calls_json(delta.calls, true));
                }
                json!({"index": 0, "delta": d, "finish_reason": finish, "logprobs": logprobs})
            }
            Kind::Text => {
                json!({"index": 0, "text": delta.text.unwrap_or(""), "finish_reason": finish, "logprobs": logprobs})
            }
        };
        json!({
            "id": self.id,
            "object": if self.shape.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }
}

/// What one streamed chunk carries.
#[derive(Default)]
struct Delta<'a> {
    role: bool,
    text: Option<&'a str>,
    calls: &'a [ToolCall],
    logprobs: &'a [Logprob],
}

fn sse(v: &Value) -> Vec<u8> {
    format!("data: {v}\n\n").into_bytes()
}

/// Streams events as SSE: a role chunk (chat), text chunks, the calls (in
/// one chunk once the answer is complete: a call is only known when its
/// JSON is), a final chunk with the finish reason, usage if asked, then
/// `data: [DONE]`. Dropping the stream (client gone) drops the receiver,
/// which cancels the request.
fn stream(rx: Events, meta: Meta, with_usage: bool) -> Response {
    struct St {
        rx: Events,
        answer: Answer,
        meta: Meta,
        with_usage: bool,
        started: bool,
        done: bool,
    }
    let st = St {
        rx,
        answer: match meta.shape.tools {
            Some(style) => Answer::new(style, true),
            None => Answer::new(ToolStyle::of(None), false),
        },
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
        if !st.started && st.meta.shape.kind == Kind::Chat {
            let role = Delta {
                role: true,
                text: Some(""),
                ..Delta::default()
            };
            out.extend(sse(&st.meta.chunk(role, None)));
        }
        st.started = true;
        match st.rx.next().await {
            Some(AskEvent::Token { text, logprob, .. }) => {
                let text = st.answer.push(&text);
                let lps: Vec<Logprob> = logprob.into_iter().collect();
                if !text.is_empty() || !lps.is_empty() {
                    let d = Delta {
                        text: Some(&text),
                        logprobs: &lps,
                        ..Delta::default()
                    };
                    out.extend(sse(&st.meta.chunk(d, None)));
                }
            }
            Some(AskEvent::Tail { text }) => {
                let text = st.answer.push(&text);
                if !text.is_empty() {
                    let d = Delta {
                        text: Some(&text),
                        ..Delta::default()
                    };
                    out.extend(sse(&st.meta.chunk(d, None)));
                }
            }
            Some(AskEvent::Done { stats }) => {
                let (text, calls) = st.answer.finish();
                if !text.is_empty() || !calls.is_empty() {
                    let d = Delta {
                        text: (!text.is_empty()).then_some(&text),
                        calls: &calls,
                        ..Delta::default()
                    };
                    out.extend(sse(&st.meta.chunk(d, None)));
                }
                let reason = finish_reason(stats.stop, !calls.is_empty());
                out.extend(sse(&st.meta.chunk(Delta::default(), Some(reason))));
                if st.with_usage {
                    let mut u = st.meta.chunk(Delta::default(), None);
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

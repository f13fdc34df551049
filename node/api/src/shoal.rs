//! `POST /api/shoal/generate`: shoal's own streaming endpoint, used by
//! `shoal ask` and `shoal bench --cluster`: one JSON event per line
//! ([`cluster::AskEvent`]), ending with `done` or `error`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Json;
use cluster::{AskRequest, Prompt};
use engine::chat;
use engine::sampling::SamplingParams;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::errors::{error, too_busy};
use crate::tools::json_constraint;
use crate::{AppState, MAX_TOKENS_MAX};

/// The body of `POST /api/shoal/generate` (shoal's own, used by `shoal ask`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    /// Prompt text.
    pub prompt: String,
    /// Skip the chat template.
    #[serde(default)]
    pub raw: bool,
    /// System message.
    pub system: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<usize>,
    /// Temperature.
    pub temperature: Option<f32>,
    /// Top-k.
    pub top_k: Option<usize>,
    /// Top-p.
    pub top_p: Option<f32>,
    /// Min-p.
    pub min_p: Option<f32>,
    /// Repetition penalty.
    pub repeat_penalty: Option<f32>,
    /// Presence penalty (-2..=2).
    pub presence_penalty: Option<f32>,
    /// Frequency penalty (-2..=2).
    pub frequency_penalty: Option<f32>,
    /// Seed.
    pub seed: Option<u64>,
    /// Context window.
    pub context: Option<usize>,
    /// `"json"` (any JSON object) or a JSON schema the answer follows.
    #[serde(default)]
    pub format: Option<serde_json::Value>,
    /// `false`: no speculative decoding for this request (the node's
    /// `--speculate` otherwise).
    #[serde(default = "yes")]
    pub speculate: bool,
}

fn yes() -> bool {
    true
}

pub(crate) async fn generate(
    State(app): State<AppState>,
    body: Result<Json<GenerateBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(b) = match body {
        Ok(b) => b,
        Err(e) => return error(e.status(), e.body_text()),
    };
    let req = match ask_request(b) {
        Ok(r) => r,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    if let Err(e) = app.cluster.submit(req, tx) {
        return too_busy(&e);
    }
    // One JSON object per line; the stream ends after `done` or `error`.
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let mut line = serde_json::to_vec(&ev).expect("events serialize");
        line.push(b'\n');
        Some((Ok::<_, std::convert::Infallible>(line), rx))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(Body::from_stream(stream))
        .expect("valid response")
}

/// The request a body asks for, checked (sampling ranges, the token cap).
fn ask_request(b: GenerateBody) -> Result<AskRequest, String> {
    let d = SamplingParams::default();
    let sampling = SamplingParams {
        temperature: b.temperature.unwrap_or(d.temperature),
        top_k: b.top_k.unwrap_or(d.top_k),
        top_p: b.top_p.unwrap_or(d.top_p),
        min_p: b.min_p.unwrap_or(d.min_p),
        repeat_penalty: b.repeat_penalty.unwrap_or(d.repeat_penalty),
        repeat_last_n: d.repeat_last_n,
        presence_penalty: b.presence_penalty.unwrap_or(0.0),
        frequency_penalty: b.frequency_penalty.unwrap_or(0.0),
        seed: b.seed.unwrap_or_else(rand::random),
    };
    sampling.validate()?;
    let max_tokens = b.max_tokens.unwrap_or(512);
    if max_tokens > MAX_TOKENS_MAX {
        return Err(format!("max_tokens {max_tokens} is above {MAX_TOKENS_MAX}"));
    }
    let prompt = if b.raw {
        Prompt::Raw(b.prompt)
    } else {
        let mut msgs: Vec<chat::Message> = b
            .system
            .iter()
            .map(|s| chat::Message::new("system", s))
            .collect();
        msgs.push(chat::Message::new("user", b.prompt));
        Prompt::Chat(msgs)
    };
    let constraint = match &b.format {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if s == "json" => Some(json_constraint(None)),
        Some(schema) => Some(json_constraint(Some(schema))),
    }
    .transpose()
    .map_err(|e| e.message)?;
    Ok(AskRequest {
        prompt,
        stop: Vec::new(),
        max_tokens,
        sampling,
        context: b.context,
        tools: Vec::new(),
        constraint,
        logprobs: None,
        speculate: b.speculate,
    })
}

/// The checks a body goes through before it becomes a request (fuzzing).
pub(crate) fn check(body: &[u8]) -> Result<(), String> {
    let b: GenerateBody = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    ask_request(b).map(drop)
}

//! OpenAI request bodies: their shapes, checked field by field (unknown
//! fields refused, like OpenAI), into what the request asks for.

use serde::Deserialize;
use serde_json::{json, Value};

use cluster::Prompt;
use engine::chat;
use engine::chat::tools::{Tool, ToolCall};

use crate::errors::ApiError;
use crate::tools::{json_constraint, Choice, Tools};
use crate::MESSAGES_MAX;

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Stop {
    One(String),
    Many(Vec<String>),
}

/// Chat message content: text, or a list of parts of which text ones count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
pub(super) struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ChatMessage {
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
pub(super) struct InCall {
    #[allow(dead_code)]
    id: Option<String>,
    function: InFunctionCall,
}

#[derive(Debug, Deserialize)]
pub(super) struct InFunctionCall {
    name: String,
    arguments: Value,
}

/// A tool offered: `{"type": "function", "function": {...}}`.
#[derive(Debug, Deserialize)]
pub(super) struct InTool {
    #[serde(rename = "type")]
    kind: String,
    function: Tool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StreamOptions {
    pub(super) include_usage: Option<bool>,
}

/// Settings both endpoints share (flattened into each body).
#[derive(Debug, Deserialize)]
pub(super) struct Common {
    pub(super) model: String,
    #[serde(default)]
    pub(super) stream: bool,
    pub(super) stream_options: Option<StreamOptions>,
    pub(super) max_tokens: Option<u32>,
    pub(super) temperature: Option<f32>,
    pub(super) top_p: Option<f32>,
    pub(super) seed: Option<u64>,
    pub(super) stop: Option<Stop>,
    pub(super) n: Option<u32>,
    /// Accepted for compatibility; not used.
    #[allow(dead_code)]
    pub(super) user: Option<String>,
    pub(super) presence_penalty: Option<f32>,
    pub(super) frequency_penalty: Option<f32>,
    // llama.cpp-style extensions.
    pub(super) top_k: Option<usize>,
    pub(super) min_p: Option<f32>,
    pub(super) repeat_penalty: Option<f32>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}`.
    pub(super) response_format: Option<Value>,
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
pub(super) fn check_fields(v: &Value, own: &[&str]) -> Result<(), ApiError> {
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
pub(super) fn parse<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ApiError> {
    serde_json::from_value(v).map_err(|e| ApiError::bad(None, format!("invalid request: {e}")))
}

#[derive(Debug, Deserialize)]
pub(super) struct ChatBody {
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
pub(super) struct CompletionBody {
    prompt: Value,
    suffix: Option<String>,
    logprobs: Option<u8>,
    #[serde(flatten)]
    common: Common,
}

/// What a body asks for beyond the common settings.
#[derive(Debug)]
pub(super) struct Asked {
    pub(super) prompt: Prompt,
    pub(super) tools: Tools,
    /// `Some(n)`: log-probabilities with `n` alternatives.
    pub(super) logprobs: Option<u8>,
    pub(super) common: Common,
}

/// A chat completion's body, checked: its messages as a prompt, its tools,
/// and the common settings.
pub(super) fn chat_body(v: Value) -> Result<Asked, ApiError> {
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
pub(super) fn chat_message(m: ChatMessage) -> Result<chat::Message, ApiError> {
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

/// A completion's body, checked.
pub(super) fn completion_body(v: Value) -> Result<Asked, ApiError> {
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

/// The grammar `response_format` asks for: none for text, any JSON object
/// for `json_object`, the schema's for `json_schema`.
pub(super) fn response_format(v: Option<&Value>) -> Result<Option<protocol::Constraint>, ApiError> {
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

//! Structured output and tool calls, shared by the OpenAI and Ollama
//! shapes: which grammar a request's answer follows, and how an answer's
//! text becomes tool calls (whole, or held back while streaming).

use engine::chat::tools::{Tool, ToolCall, ToolStyle};
use protocol::Constraint;
use serde_json::{json, Value};

use crate::errors::ApiError;

/// Most tools one request may list.
pub(crate) const TOOLS_MAX: usize = 128;

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Choice {
    /// The model decides (the default when tools are given).
    Auto,
    /// No call: the tools are not even shown.
    None,
    /// Some call, enforced by a grammar.
    Required,
    /// A call of this function, enforced by a grammar.
    Named(String),
}

/// The functions a request offers and how it wants them used.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    pub list: Vec<Tool>,
    pub choice: Choice,
}

impl Tools {
    /// Checks names and limits (a named choice must be offered).
    pub(crate) fn new(list: Vec<Tool>, choice: Choice) -> Result<Tools, ApiError> {
        if list.len() > TOOLS_MAX {
            return Err(ApiError::bad(
                Some("tools"),
                format!("at most {TOOLS_MAX} tools"),
            ));
        }
        for t in &list {
            let ok = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
            if !ok {
                return Err(ApiError::bad(
                    Some("tools"),
                    format!(
                        "invalid function name '{}' (a-z, A-Z, 0-9, _ . -, up to 64)",
                        t.name
                    ),
                ));
            }
            if !t.parameters.is_object() {
                return Err(ApiError::bad(
                    Some("tools"),
                    format!(
                        "the parameters of '{}' must be a JSON Schema object",
                        t.name
                    ),
                ));
            }
        }
        if list.is_empty() && matches!(choice, Choice::Required | Choice::Named(_)) {
            return Err(ApiError::bad(
                Some("tool_choice"),
                "tool_choice asks for a call but no tools are given",
            ));
        }
        if let Choice::Named(n) = &choice {
            if !list.iter().any(|t| &t.name == n) {
                return Err(ApiError::bad(
                    Some("tool_choice"),
                    format!("tool_choice names '{n}', which is not among the tools"),
                ));
            }
        }
        Ok(Tools { list, choice })
    }

    /// The tools the model is shown (none for `tool_choice: none`).
    pub(crate) fn shown(&self) -> Vec<Tool> {
        match self.choice {
            Choice::None => Vec::new(),
            _ => self.list.clone(),
        }
    }

    /// Whether the answer may hold calls to look for.
    pub(crate) fn active(&self) -> bool {
        !self.list.is_empty() && self.choice != Choice::None
    }

    /// The grammar a `required` or named choice puts on the answer.
    pub(crate) fn constraint(&self, style: ToolStyle) -> Option<Constraint> {
        match &self.choice {
            Choice::Required => Some(Constraint::Lark(style.grammar(&self.list, None))),
            Choice::Named(n) => Some(Constraint::Lark(style.grammar(&self.list, Some(n)))),
            _ => None,
        }
    }
}

/// The grammar of a JSON answer: any object without a schema (JSON mode),
/// else one valid against it.
pub(crate) fn json_constraint(schema: Option<&Value>) -> Result<Constraint, ApiError> {
    let schema = match schema {
        None => json!({"type": "object"}),
        Some(s) if s.is_object() || s.is_boolean() => s.clone(),
        Some(_) => {
            return Err(ApiError::bad(
                Some("response_format"),
                "the schema must be a JSON Schema object",
            ))
        }
    };
    let text = schema.to_string();
    if text.len() > protocol::limits::CONSTRAINT_BYTES_MAX {
        return Err(ApiError::bad(
            Some("response_format"),
            format!(
                "the schema is over {} KiB",
                protocol::limits::CONSTRAINT_BYTES_MAX >> 10
            ),
        ));
    }
    Ok(Constraint::JsonSchema(text))
}

/// An answer's text on its way out when it may hold tool calls: text that
/// could still be the start of a call is held back; the rest streams.
#[derive(Debug)]
pub(crate) struct Answer {
    style: ToolStyle,
    active: bool,
    /// Text held back (the answer so far, while it may be a call).
    held: String,
    /// Whether the answer is known to be text.
    text: bool,
}

impl Answer {
    pub(crate) fn new(style: ToolStyle, active: bool) -> Answer {
        Answer {
            style,
            active,
            held: String::new(),
            text: !active,
        }
    }

    /// Takes streamed text; gives the text to pass on now.
    pub(crate) fn push(&mut self, t: &str) -> String {
        if self.text {
            return t.to_string();
        }
        self.held += t;
        if self.style.may_be_call(&self.held) {
            return String::new();
        }
        self.text = true;
        std::mem::take(&mut self.held)
    }

    /// At the end: text not passed on yet, and the calls the answer made.
    pub(crate) fn finish(&mut self) -> (String, Vec<ToolCall>) {
        let held = std::mem::take(&mut self.held);
        if !self.active || self.text {
            return (held, Vec::new());
        }
        match self.style.parse(&held) {
            Some((rest, calls)) => (rest, calls),
            None => (held, Vec::new()),
        }
    }

    /// A whole answer: its text and calls.
    pub(crate) fn whole(style: ToolStyle, active: bool, text: &str) -> (String, Vec<ToolCall>) {
        if !active {
            return (text.to_string(), Vec::new());
        }
        style
            .parse(text)
            .unwrap_or_else(|| (text.to_string(), Vec::new()))
    }
}

/// A fresh call id, as OpenAI writes them.
pub(crate) fn call_id() -> String {
    format!("call_{:016x}", rand::random::<u64>())
}

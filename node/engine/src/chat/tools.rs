//! Tool (function) calling in the model's own format.
//!
//! Models that were trained for tools have a chat template that renders a
//! `tools` list and the calls in earlier turns, and write their own calls in
//! a fixed shape. Three shapes cover the GGUFs people run:
//! - Hermes (Qwen 2/2.5/3, Hermes, many fine-tunes): `<tool_call>\n{"name":
//!   ..., "arguments": {...}}\n</tool_call>`, answers in `tool` turns;
//! - Llama 3.1+: a bare JSON object `{"name": ..., "parameters": {...}}`;
//! - Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}]`.
//!
//! A template that knows none (SmolLM2's, Gemma's) gets the Hermes shape
//! generically: the tool list goes into the system turn as text, earlier
//! calls and results into assistant and user turns, so any template can
//! render them. `tool_choice` `required` or a named function is enforced by
//! a grammar over the call (see [`crate::grammar`]); `auto` lets the model
//! choose and the answer is parsed.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::Message;

/// A function the model may call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tool {
    /// Its name.
    pub name: String,
    /// What it does, for the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Its arguments' JSON Schema.
    #[serde(default = "empty_object")]
    pub parameters: Value,
}

fn empty_object() -> Value {
    json!({"type": "object", "properties": {}})
}

impl Tool {
    /// The OpenAI shape templates read (`{"type": "function", "function": …}`).
    pub fn as_json(&self) -> Value {
        json!({"type": "function", "function": self})
    }
}

/// A call the model made (or made in an earlier turn).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ToolCall {
    /// The function's name.
    pub name: String,
    /// Its arguments (a JSON object).
    pub arguments: Value,
}

/// How a model writes its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ToolFormat {
    /// `<tool_call>{...}</tool_call>` blocks.
    Hermes,
    /// One JSON object with `name` and `parameters`.
    Llama3,
    /// `[TOOL_CALLS]` and a JSON list.
    Mistral,
}

/// A model's tool format, and whether its template renders tools itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ToolStyle {
    /// The format of calls.
    pub format: ToolFormat,
    /// The template renders `tools`, calls and results itself.
    pub native: bool,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";

impl ToolStyle {
    /// The style of a model with this chat template source.
    pub fn of(template: Option<&str>) -> ToolStyle {
        let t = template.unwrap_or("");
        let native = t.contains("tools");
        let format = if t.contains(MISTRAL_OPEN) {
            ToolFormat::Mistral
        } else if t.contains(HERMES_OPEN) || !native {
            ToolFormat::Hermes
        } else if t.contains("<|python_tag|>") || t.contains("ipython") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        };
        ToolStyle { format, native }
    }

    /// A Lark grammar whose every sentence is one call of one of `tools`
    /// (or of `only`), arguments valid against its schema.
    pub fn grammar(&self, tools: &[Tool], only: Option<&str>) -> String {
        let args_key = match self.format {
            ToolFormat::Llama3 => "parameters",
            _ => "arguments",
        };
        let calls: Vec<Value> = tools
            .iter()
            .filter(|t| only.is_none_or(|o| o == t.name))
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": t.name}, args_key: t.parameters},
                    "required": ["name", args_key],
                    "additionalProperties": false,
                })
            })
            .collect();
        let mut call = json!({"anyOf": calls});
        crate::grammar::compact_json(&mut call);
        match self.format {
            ToolFormat::Hermes => {
                format!(
                    "start: \"{HERMES_OPEN}\\n\" call \"\\n{HERMES_CLOSE}\"\ncall: %json {call}"
                )
            }
            ToolFormat::Llama3 => format!("start: call\ncall: %json {call}"),
            ToolFormat::Mistral => {
                let mut list = json!({"type": "array", "items": call, "minItems": 1});
                crate::grammar::compact_json(&mut list);
                format!("start: list\nlist: %json {list}")
            }
        }
    }

    /// Whether text that starts an answer may still become a call (a
    /// streaming answer holds it back until it knows).
    pub fn may_be_call(&self, text: &str) -> bool {
        let t = text.trim_start();
        let opener = match self.format {
            ToolFormat::Hermes => HERMES_OPEN,
            ToolFormat::Llama3 => "{",
            ToolFormat::Mistral => {
                if t.starts_with('[') && !MISTRAL_OPEN.starts_with(t) {
                    return true;
                }
                MISTRAL_OPEN
            }
        };
        opener.starts_with(t) || t.starts_with(opener)
    }

    /// The calls in an answer, and the text around them; `None` when the
    /// answer holds no well-formed call.
    pub fn parse(&self, text: &str) -> Option<(String, Vec<ToolCall>)> {
        let calls: Vec<ToolCall>;
        let mut rest = String::new();
        match self.format {
            ToolFormat::Hermes => {
                let mut found = Vec::new();
                let mut s = text;
                while let Some(i) = s.find(HERMES_OPEN) {
                    rest += &s[..i];
                    let after = &s[i + HERMES_OPEN.len()..];
                    let (body, next) = match after.find(HERMES_CLOSE) {
                        Some(j) => (&after[..j], &after[j + HERMES_CLOSE.len()..]),
                        None => (after, ""),
                    };
                    found.push(call_of(serde_json::from_str(body.trim()).ok()?)?);
                    s = next;
                }
                rest += s;
                calls = found;
            }
            ToolFormat::Llama3 => {
                let t = text.trim().trim_start_matches("<|python_tag|>").trim();
                calls = vec![call_of(serde_json::from_str(t).ok()?)?];
            }
            ToolFormat::Mistral => {
                let t = text.trim().trim_start_matches(MISTRAL_OPEN).trim();
                let list: Vec<Value> = serde_json::from_str(t).ok()?;
                calls = list.into_iter().map(call_of).collect::<Option<_>>()?;
            }
        }
        (!calls.is_empty()).then(|| (rest.trim().to_string(), calls))
    }

    /// The conversation as the template renders it: for a template without
    /// tools, the tool list in the system turn and earlier calls and
    /// results as text; a native template gets them as they are.
    pub fn lower(&self, messages: &[Message], tools: &[Tool]) -> Vec<Message> {
        if self.native {
            return messages.to_vec();
        }
        let mut out: Vec<Message> = Vec::with_capacity(messages.len() + 1);
        if !tools.is_empty() {
            let list: Vec<String> = tools.iter().map(|t| t.as_json().to_string()).collect();
            let text = format!(
                "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n\
                 You are provided with function signatures within <tools></tools> XML tags:\n\
                 <tools>\n{}\n</tools>\n\n\
                 For each function call, return a json object with function name and arguments \
                 within <tool_call></tool_call> XML tags:\n\
                 <tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>",
                list.join("\n")
            );
            match messages.first() {
                Some(m) if m.role == "system" => {}
                _ => out.push(Message::new("system", text.clone())),
            }
            if let Some(m) = messages.first().filter(|m| m.role == "system") {
                out.push(Message::new("system", format!("{}\n\n{text}", m.content)));
            }
        }
        let skip =
            usize::from(!tools.is_empty() && messages.first().is_some_and(|m| m.role == "system"));
        for m in &messages[skip..] {
            let mut m = m.clone();
            if m.role == "tool" {
                m.role = "user".into();
                m.content = format!("<tool_response>\n{}\n</tool_response>", m.content);
            }
            for c in std::mem::take(&mut m.tool_calls) {
                let call = json!({"name": c.name, "arguments": c.arguments});
                if !m.content.is_empty() {
                    m.content.push('\n');
                }
                m.content += &format!("{HERMES_OPEN}\n{call}\n{HERMES_CLOSE}");
            }
            m.tool_call_id = None;
            out.push(m);
        }
        out
    }
}

/// A call from a parsed object: `name` and `arguments` (or `parameters`),
/// arguments as an object or as JSON text of one.
fn call_of(v: Value) -> Option<ToolCall> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v
        .get("arguments")
        .or_else(|| v.get("parameters"))
        .cloned()
        .unwrap_or(json!({}));
    let arguments = match args {
        Value::String(s) => serde_json::from_str(&s).ok()?,
        other => other,
    };
    arguments
        .is_object()
        .then_some(ToolCall { name, arguments })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Tool {
        Tool {
            name: "get_weather".into(),
            description: Some("Weather in a city".into()),
            parameters: json!({"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}),
        }
    }

    #[test]
    fn formats_follow_the_template() {
        assert_eq!(ToolStyle::of(None).format, ToolFormat::Hermes);
        assert!(!ToolStyle::of(Some("{{ messages }}")).native);
        let qwen = ToolStyle::of(Some("{% if tools %}<tool_call>{% endif %}"));
        assert_eq!((qwen.format, qwen.native), (ToolFormat::Hermes, true));
        let llama = ToolStyle::of(Some("{% if tools %}<|python_tag|>{% endif %}"));
        assert_eq!(llama.format, ToolFormat::Llama3);
        let mistral = ToolStyle::of(Some("{% if tools %}[TOOL_CALLS]{% endif %}"));
        assert_eq!(mistral.format, ToolFormat::Mistral);
    }

    #[test]
    fn calls_parse_in_each_format() {
        let h = ToolStyle::of(None);
        let (rest, calls) = h
            .parse("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>")
            .unwrap();
        assert_eq!(rest, "");
        assert_eq!(calls[0].arguments["city"], "Oslo");
        assert!(h.parse("It is sunny.").is_none());
        assert!(h.parse("<tool_call>{not json</tool_call>").is_none());
        let l = ToolStyle {
            format: ToolFormat::Llama3,
            native: true,
        };
        let (_, calls) = l
            .parse("{\"name\": \"f\", \"parameters\": {\"a\": 1}}")
            .unwrap();
        assert_eq!(calls[0].arguments["a"], 1);
        let m = ToolStyle {
            format: ToolFormat::Mistral,
            native: true,
        };
        let (_, calls) = m
            .parse("[TOOL_CALLS][{\"name\": \"f\", \"arguments\": \"{\\\"a\\\": 2}\"}]")
            .unwrap();
        assert_eq!(calls[0].arguments["a"], 2);
    }

    #[test]
    fn a_call_may_start_until_the_text_says_otherwise() {
        let h = ToolStyle::of(None);
        assert!(h.may_be_call(""));
        assert!(h.may_be_call("  <tool"));
        assert!(h.may_be_call("<tool_call>\n{\"na"));
        assert!(!h.may_be_call("Hello"));
    }

    #[test]
    fn generic_lowering_puts_tools_calls_and_results_in_text() {
        let h = ToolStyle::of(None);
        let mut asked = Message::new("assistant", "");
        asked.tool_calls = vec![ToolCall {
            name: "get_weather".into(),
            arguments: json!({"city": "Oslo"}),
        }];
        let mut answer = Message::new("tool", "{\"temp\": 3}");
        answer.tool_call_id = Some("call_1".into());
        let msgs = [
            Message::new("system", "Be brief."),
            Message::new("user", "Weather in Oslo?"),
            asked,
            answer,
        ];
        let out = h.lower(&msgs, &[weather()]);
        assert_eq!(out.len(), 4);
        assert!(out[0].content.starts_with("Be brief.\n\n# Tools"));
        assert!(out[0].content.contains("\"get_weather\""));
        assert!(out[2]
            .content
            .contains("<tool_call>\n{\"name\":\"get_weather\",\"arguments\":{\"city\":\"Oslo\"}}"));
        assert_eq!(out[3].role, "user");
        assert!(out[3].content.starts_with("<tool_response>"));
        assert!(out
            .iter()
            .all(|m| m.tool_calls.is_empty() && m.tool_call_id.is_none()));
    }
}

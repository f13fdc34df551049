//! Chat templates: turning a list of messages into the prompt text a model was trained on.
//!
//! Why: GGUF files carry the Hugging Face Jinja template (`tokenizer.chat_template`). It is
//! rendered here with minijinja configured like HF's `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks`, the variables `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token`, the functions `raise_exception` and `strftime_now`, Python string/dict methods
//! (`.strip()`, `.startswith()`, `.items()` … via minijinja-contrib's pycompat) and a `tojson`
//! that prints like Python's `json.dumps` (no HTML escaping). The template is compiled once.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::Value;
use minijinja::{Environment, Error, ErrorKind};

/// Largest template source accepted, in bytes.
pub const MAX_TEMPLATE_BYTES: usize = 1 << 20;

/// Name of the one template in the environment (shows in error messages).
const TEMPLATE_NAME: &str = "chat_template";

/// Deepest nesting `tojson` serializes (guards against self-referencing values).
const MAX_JSON_DEPTH: usize = 64;

/// One chat message.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// The message text.
    pub content: String,
    /// Calls an assistant turn made (see [`tools`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<tools::ToolCall>,
    /// The call a `tool` turn answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

pub mod tools;

/// Why a chat template could not be loaded or rendered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChatError {
    /// The template source does not compile.
    #[error("chat template does not compile: {0}")]
    Compile(String),
    /// Rendering failed (including `raise_exception` called by the template).
    #[error("chat template failed to render: {0}")]
    Render(String),
    /// The template source is larger than [`MAX_TEMPLATE_BYTES`].
    #[error("chat template of {len} bytes is larger than the {max} bytes accepted")]
    TooLarge {
        /// The source's length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `tokenizer.chat_template` is not a string.
    #[error("GGUF metadata key 'tokenizer.chat_template' is not a string")]
    NotAString,
}

/// A compiled chat template with its BOS/EOS token texts.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// How the model calls tools, read from the source.
    tool_style: tools::ToolStyle,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// The text of the special token llama.cpp would use for `key` (its default ids when the key
/// is absent: 1/2 for llama vocabs, 11 for gpt2), or `""`.
fn special_token_text(gguf: &sharding::GgufFile, key: &str, llama_default: u64) -> String {
    let Some(tokens) = gguf.get("tokenizer.ggml.tokens").and_then(|v| v.as_array()) else {
        return String::new();
    };
    let default = match gguf.get("tokenizer.ggml.model").and_then(|v| v.as_str()) {
        Some("llama") => Some(llama_default),
        Some("gpt2") => Some(11),
        _ => None,
    };
    let in_range = |id: &u64| usize::try_from(*id).is_ok_and(|i| i < tokens.len());
    let given = gguf.get(key).and_then(|v| v.as_u64()).filter(in_range);
    given
        .or(default.filter(in_range))
        .and_then(|id| tokens.get(usize::try_from(id).ok()?))
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_owned()
}

/// Gemma's chat format (Google's template, on one line): a system message
/// goes in front of the first user turn, the assistant is called "model".
const GEMMA_TEMPLATE: &str = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + (message['content'] | trim) + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// ChatML (Qwen's format).
const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Phi-3's format.
const PHI3_TEMPLATE: &str = "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}";

/// The format a model family was trained on, for GGUFs that carry no
/// template (some Gemma 3 conversions): what llama.cpp's built-in list
/// would pick for the architecture.
fn builtin_template(architecture: &str) -> Option<&'static str> {
    match architecture {
        "gemma3" => Some(GEMMA_TEMPLATE),
        "qwen2" | "qwen3" | "qwen3moe" => Some(CHATML_TEMPLATE),
        "phi3" => Some(PHI3_TEMPLATE),
        _ => None,
    }
}

impl ChatTemplate {
    /// The GGUF's template (`tokenizer.chat_template`), else the built-in
    /// one of its architecture, or `None` when there is neither.
    pub fn from_gguf(gguf: &sharding::GgufFile) -> Result<Option<Self>, ChatError> {
        let source = match gguf.get("tokenizer.chat_template") {
            Some(value) => value.as_str().ok_or(ChatError::NotAString)?.to_owned(),
            None => {
                let arch = gguf
                    .get("general.architecture")
                    .and_then(|v| v.as_str())
                    .unwrap_or("");
                match builtin_template(arch) {
                    Some(t) => t.to_owned(),
                    None => return Ok(None),
                }
            }
        };
        let bos = special_token_text(gguf, "tokenizer.ggml.bos_token_id", 1);
        let eos = special_token_text(gguf, "tokenizer.ggml.eos_token_id", 2);
        Self::new(source, bos, eos).map(Some)
    }

    /// Compiles `source`; `bos_token`/`eos_token` are the texts templates see under those names.
    pub fn new(source: String, bos_token: String, eos_token: String) -> Result<Self, ChatError> {
        if source.len() > MAX_TEMPLATE_BYTES {
            return Err(ChatError::TooLarge {
                len: source.len(),
                max: MAX_TEMPLATE_BYTES,
            });
        }
        let tool_style = tools::ToolStyle::of(Some(&source));
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| ChatError::Compile(e.to_string()))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // A template is code from the model file: bound the work it may do
        // (a chat template of a thousand messages takes ~10⁵ steps).
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        // minijinja prints a map or list by recursing into it, and a template
        // can make one contain itself (`{% set ns.x = ns %}{{ ns }}`): that
        // overflowed the stack and aborted the process (found by the fuzz
        // test). Values print as before unless nested past any real use.
        env.set_formatter(|out, state, value| {
            if !nested_within(value, MAX_JSON_DEPTH) {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "value nested too deeply (or containing itself) to print",
                ));
            }
            minijinja::escape_formatter(out, state, value)
        });
        // Compiling recurses with the template's nesting: on a stack of its own.
        let env = with_template_stack(move || {
            env.add_template_owned(TEMPLATE_NAME, source)
                .map_err(|e| ChatError::Compile(e.to_string()))
                .map(|()| env)
        })?;
        Ok(Self {
            env,
            tool_style,
            bos_token,
            eos_token,
        })
    }

    /// How this model writes tool calls, and whether the template renders
    /// tools itself.
    pub fn tool_style(&self) -> tools::ToolStyle {
        self.tool_style
    }

    /// The BOS text templates see (e.g. to strip it when the tokenizer adds BOS itself).
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS text templates see.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Renders the conversation; `add_generation_prompt` asks for the assistant turn's header.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        with_template_stack(|| self.render_here(messages, &[], add_generation_prompt))
    }

    /// [`ChatTemplate::render`] with a `tools` list in the template's
    /// context (OpenAI's shape), for templates that render tools.
    pub fn render_with_tools(
        &self,
        messages: &[Message],
        tools: &[tools::Tool],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        with_template_stack(|| self.render_here(messages, tools, add_generation_prompt))
    }

    fn render_here(
        &self,
        messages: &[Message],
        tools: &[tools::Tool],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let render_err = |e: Error| ChatError::Render(e.to_string());
        let template = self.env.get_template(TEMPLATE_NAME).map_err(render_err)?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                let mut pairs = vec![
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ];
                if !m.tool_calls.is_empty() {
                    let calls: Vec<serde_json::Value> = m
                        .tool_calls
                        .iter()
                        .map(|c| serde_json::json!({"type": "function", "function": c}))
                        .collect();
                    pairs.push(("tool_calls", json_value(&serde_json::Value::from(calls))));
                }
                if let Some(id) = &m.tool_call_id {
                    pairs.push(("tool_call_id", Value::from(id.as_str())));
                }
                Value::from_pairs(pairs)
            })
            .collect();
        let base = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let ctx = if tools.is_empty() {
            base
        } else {
            let list: Vec<serde_json::Value> = tools.iter().map(tools::Tool::as_json).collect();
            minijinja::context! { tools => json_value(&serde_json::Value::from(list)), ..base }
        };
        let mut out = CappedWriter(Vec::new());
        template
            .render_captured_to(ctx, &mut out)
            .map_err(|e| match e.kind() {
                ErrorKind::OutOfFuel => ChatError::Render(format!(
                    "the chat template ran out of its {TEMPLATE_FUEL} steps"
                )),
                ErrorKind::WriteFailure => ChatError::Render(format!(
                    "the chat template wrote more than {RENDERED_BYTES_MAX} bytes"
                )),
                _ => render_err(e),
            })
            .map(drop)?;
        String::from_utf8(out.0).map_err(|e| ChatError::Render(e.to_string()))
    }
}

/// A JSON value as a template value (tools, calls), keys in their order.
fn json_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::from(()),
        J::Bool(b) => Value::from(*b),
        J::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Value::from(i),
            (None, Some(f)) => Value::from(f),
            _ => Value::from(n.to_string()),
        },
        J::String(s) => Value::from(s.as_str()),
        J::Array(a) => Value::from(a.iter().map(json_value).collect::<Vec<_>>()),
        J::Object(o) => Value::from_pairs(o.iter().map(|(k, v)| (k.as_str(), json_value(v)))),
    }
}

/// Stack for compiling and rendering a template: minijinja recurses with
/// the template's nesting and its macro calls, and a hostile template
/// overflowed the 2 MiB of a worker thread (found by `tests/tests/fuzz.rs`:
/// a stack overflow aborts the whole process). Only the pages used are
/// ever committed.
const TEMPLATE_STACK_BYTES: usize = 64 << 20;

/// Runs `f` on a thread with [`TEMPLATE_STACK_BYTES`] of stack.
fn with_template_stack<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("shoal-template".into())
            .stack_size(TEMPLATE_STACK_BYTES)
            .spawn_scoped(s, f)
            .expect("spawn a template thread")
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Most steps a chat template may take for one conversation.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// Most bytes a rendered conversation may have: the messages' text (the
/// API caps it) and the template's own, with room to spare.
pub const RENDERED_BYTES_MAX: usize = 8 << 20;

/// A writer that refuses to grow past [`RENDERED_BYTES_MAX`].
struct CappedWriter(Vec<u8>);

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > RENDERED_BYTES_MAX {
            return Err(std::io::Error::other("rendered conversation too long"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

mod functions;
pub use functions::rfc3339;
use functions::{nested_within, raise_exception, strftime_now, tojson};

#[cfg(test)]
mod tests;

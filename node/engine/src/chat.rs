//! Chat templates: turning a list of messages into the prompt text a model was trained on.
//!
//! Why: GGUF files carry the Hugging Face Jinja template (`tokenizer.chat_template`). It is
//! rendered here with minijinja configured like HF's `apply_chat_template`: `trim_blocks` and
//! `lstrip_blocks`, the variables `messages`, `add_generation_prompt`, `bos_token`,
//! `eos_token`, the functions `raise_exception` and `strftime_now`, Python string/dict methods
//! (`.strip()`, `.startswith()`, `.items()` … via minijinja-contrib's pycompat) and a `tojson`
//! that prints like Python's `json.dumps` (no HTML escaping). The template is compiled once.

use std::fmt::Write as _;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value, ValueKind};
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
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

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
            bos_token,
            eos_token,
        })
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
        with_template_stack(|| self.render_here(messages, add_generation_prompt))
    }

    fn render_here(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let render_err = |e: Error| ChatError::Render(e.to_string());
        let template = self.env.get_template(TEMPLATE_NAME).map_err(render_err)?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from_pairs([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ])
            })
            .collect();
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
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

/// `raise_exception(msg)`: HF templates call it to reject a conversation.
fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

/// Days of a common year before each month.
const DAYS_BEFORE_MONTH: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];

/// (year, month 1-12, day 1-31) of a day count since 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, usize, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, usize::try_from(month).unwrap_or(1), day)
}

/// `secs` (UTC, since the epoch) and `millis` as RFC 3339: `2026-11-26T10:00:00.123Z`.
pub fn rfc3339(secs: i64, millis: u32) -> String {
    format!("{}.{millis:03}Z", format_time(secs, "%Y-%m-%dT%H:%M:%S"))
}

/// A small `strftime` over UTC seconds since the epoch: `%Y %y %m %d %e %B %b %A %a %H %I %M
/// %S %p %j %%`; other directives are kept as written.
fn format_time(secs: i64, fmt: &str) -> String {
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = usize::try_from((days + 4).rem_euclid(7)).unwrap_or(0);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let yday = DAYS_BEFORE_MONTH[(month + 11) % 12] + day + i64::from(leap && month > 2);
    let (hour, minute, second) = (sod / 3600, sod / 60 % 60, sod % 60);
    let month_name = MONTHS[(month + 11) % 12];
    let mut out = String::with_capacity(fmt.len() + 16);
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('B') => write!(out, "{month_name}"),
            Some('b') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{}", WEEKDAYS[weekday]),
            Some('a') => write!(out, "{}", &WEEKDAYS[weekday][..3]),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{:02}", (hour + 11) % 12 + 1),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('j') => write!(out, "{yday:03}"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// `strftime_now(fmt)`: the current UTC date/time (HF uses local time; servers run in UTC).
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(0));
    format_time(secs, &fmt)
}

/// `tojson(indent=None)` like Python's `json.dumps(x, ensure_ascii=False)`: `", "`/`": "`
/// separators, or one item per line with `indent`; other keyword arguments are accepted and
/// ignored.
fn tojson(value: &Value, indent: Option<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let indent = match indent {
        Some(v) => Some(v),
        None => kwargs.get::<Option<Value>>("indent")?,
    };
    let indent = indent.and_then(|v| v.as_usize());
    let mut out = String::new();
    write_json(&mut out, value, indent, 0)?;
    Ok(Value::from_safe_string(out))
}

/// Whether `v` nests at most `depth` maps and lists deep (a value that
/// contains itself does not).
fn nested_within(v: &Value, depth: usize) -> bool {
    match v.kind() {
        ValueKind::Map | ValueKind::Seq | ValueKind::Iterable => {
            if depth == 0 {
                return false;
            }
            let Ok(items) = v.try_iter() else {
                return true;
            };
            for (n, item) in items.enumerate() {
                if n >= 10_000 {
                    break;
                }
                let inner = if v.kind() == ValueKind::Map {
                    v.get_item(&item).unwrap_or_default()
                } else {
                    item
                };
                if !nested_within(&inner, depth - 1) {
                    return false;
                }
            }
            true
        }
        _ => true,
    }
}

fn write_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn write_json(
    out: &mut String,
    v: &Value,
    indent: Option<usize>,
    depth: usize,
) -> Result<(), Error> {
    if depth > MAX_JSON_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "tojson: value nested too deeply",
        ));
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            let _ = write!(out, "{v}");
        }
        ValueKind::String => write_json_str(out, v.as_str().unwrap_or("")),
        ValueKind::Map => {
            out.push('{');
            let keys: Vec<Value> = v.try_iter()?.collect();
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json_str(out, &key.to_string());
                out.push_str(": ");
                write_json(out, &v.get_item(key)?, indent, depth + 1)?;
            }
            if !keys.is_empty() {
                newline(out, depth);
            }
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            let items: Vec<Value> = v.try_iter()?.collect();
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(out, item, indent, depth + 1)?;
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(']');
        }
        _ => write_json_str(out, &v.to_string()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2's ChatML template, as in its GGUF.
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn chat() -> Vec<Message> {
        vec![Message::new("user", "Hi there")]
    }

    #[test]
    fn hostile_templates_stop_at_their_fuel_or_output_cap() {
        let t = |src: &str| ChatTemplate::new(src.into(), "".into(), "".into()).unwrap();
        let start = std::time::Instant::now();
        let spin =
            t("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
        let e = spin.render(&chat(), true).unwrap_err().to_string();
        assert!(e.contains("steps"), "{e}");
        let flood = format!(
            "{{% for i in range(60000) %}}{}{{% endfor %}}",
            "x".repeat(200)
        );
        let e = t(&flood).render(&chat(), true).unwrap_err().to_string();
        assert!(e.contains("bytes"), "{e}");
        assert!(start.elapsed() < std::time::Duration::from_secs(20));
    }

    #[test]
    fn a_template_value_that_contains_itself_is_an_error_not_a_crash() {
        let src = "{% set ns = namespace(x=0) %}{% set ns.x = ns %}{{ ns.x }}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let e = t.render(&chat(), true).unwrap_err().to_string();
        assert!(e.contains("nested too deeply"), "{e}");
        // Ordinary nested values print as minijinja prints them.
        let t = ChatTemplate::new(
            "{{ [[1, 2], {'a': [3]}] }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(t.render(&chat(), true).unwrap(), "[[1, 2], {'a': [3]}]");
    }

    #[test]
    fn builtin_gemma_template() {
        let t = ChatTemplate::new(
            builtin_template("gemma3").unwrap().into(),
            "<bos>".into(),
            "<eos>".into(),
        )
        .unwrap();
        let msgs = [
            Message::new("system", "Be brief."),
            Message::new("user", "Hi "),
            Message::new("assistant", "Hello."),
            Message::new("user", "Why?"),
        ];
        assert_eq!(
            t.render(&msgs, true).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n"
        );
        assert!(builtin_template("llama").is_none());
    }

    #[test]
    fn renders_chatml() {
        let t =
            ChatTemplate::new(CHATML.into(), "<|im_start|>".into(), "<|im_end|>".into()).unwrap();
        let out = t.render(&chat(), true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_prompt = t.render(&chat(), false).unwrap();
        assert!(no_prompt.ends_with("Hi there<|im_end|>\n"));
    }

    #[test]
    fn trim_and_lstrip_blocks() {
        let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\n[{{ m.content.strip() }}]\n  {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let out = t.render(&[Message::new("user", "  hi  ")], false).unwrap();
        assert_eq!(out, "[hi]\n");
    }

    #[test]
    fn python_methods_bos_and_exceptions() {
        let src = "{{ bos_token }}{% if not messages[0].content.startswith('ok') %}{{ raise_exception('bad start') }}{% endif %}{{ messages[0].content.upper() }}{{ eos_token }}";
        let t = ChatTemplate::new(src.into(), "<s>".into(), "</s>".into()).unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "ok go")], false).unwrap(),
            "<s>OK GO</s>"
        );
        let err = t.render(&[Message::new("user", "no")], false).unwrap_err();
        assert!(
            matches!(err, ChatError::Render(ref m) if m.contains("bad start")),
            "{err}"
        );
    }

    #[test]
    fn compile_errors_are_reported() {
        let err = ChatTemplate::new("{% if %}".into(), String::new(), String::new()).unwrap_err();
        assert!(matches!(err, ChatError::Compile(_)));
        let big = "x".repeat(MAX_TEMPLATE_BYTES + 1);
        assert!(matches!(
            ChatTemplate::new(big, String::new(), String::new()),
            Err(ChatError::TooLarge { .. })
        ));
    }

    #[test]
    fn tojson_like_python() {
        let src = "{{ messages[0] | tojson }}|{{ ['a<b', 1, none, true] | tojson }}|{{ [1] | tojson(indent=2) }}";
        let t = ChatTemplate::new(src.into(), String::new(), String::new()).unwrap();
        let out = t.render(&[Message::new("user", "q\"x")], false).unwrap();
        assert_eq!(
            out,
            "{\"content\": \"q\\\"x\", \"role\": \"user\"}|[\"a<b\", 1, null, true]|[\n  1\n]"
        );
    }

    #[test]
    fn strftime_formats() {
        // 2024-03-05 14:07:09 UTC was a Tuesday, day 65 of the year
        let secs = 1_709_647_629;
        assert_eq!(
            format_time(secs, "%Y-%m-%d %H:%M:%S"),
            "2024-03-05 14:07:09"
        );
        assert_eq!(
            format_time(secs, "%d %B %Y, %a %b %j %I%p %% %Q"),
            "05 March 2024, Tue Mar 065 02PM % %Q"
        );
        assert_eq!(format_time(0, "%A %e"), "Thursday  1");
        let t = ChatTemplate::new(
            "{{ strftime_now('%Y') }}".into(),
            String::new(),
            String::new(),
        )
        .unwrap();
        assert_eq!(t.render(&[], false).unwrap().len(), 4);
    }
}

//! Text in and out of a model: its tokenizer and chat template, built from
//! the GGUF metadata. Shared by the single-machine engine and the node that
//! originates a cluster request.

use std::sync::{Arc, OnceLock};

use sharding::GgufFile;

use crate::grammar::{GrammarError, Grammars};

use crate::chat::tools::{Tool, ToolStyle};
use crate::chat::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;
use crate::{LoadError, TextError};

/// A model's tokenizer and chat template.
pub struct TextModel {
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    /// The grammar compiler for the vocabulary, built on first use.
    grammars: OnceLock<Result<Arc<Grammars>, GrammarError>>,
}

impl TextModel {
    /// Builds both from the GGUF's metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<TextModel, LoadError> {
        Ok(TextModel {
            tokenizer: Arc::new(Tokenizer::from_gguf(gguf)?),
            template: ChatTemplate::from_gguf(gguf)?,
            grammars: OnceLock::new(),
        })
    }

    /// The grammar compiler for this vocabulary (structured output), built
    /// on first use: ~0.1–0.3 s, so call it off the async threads.
    pub fn grammars(&self) -> Result<Arc<Grammars>, GrammarError> {
        self.grammars
            .get_or_init(|| Grammars::new(self.tokenizer.clone()).map(Arc::new))
            .clone()
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The chat template, if the GGUF has one.
    pub fn template(&self) -> Option<&ChatTemplate> {
        self.template.as_ref()
    }

    /// Tokens of a chat conversation, rendered with the model's template and
    /// ready for the assistant's reply. Without a template, the messages'
    /// contents are joined and fed raw.
    pub fn chat_tokens(&self, messages: &[Message]) -> Result<Vec<u32>, TextError> {
        self.chat_tokens_with_tools(messages, &[])
    }

    /// How this model writes tool calls (Hermes-style without a template).
    pub fn tool_style(&self) -> ToolStyle {
        self.template
            .as_ref()
            .map_or(ToolStyle::of(None), ChatTemplate::tool_style)
    }

    /// [`TextModel::chat_tokens`] with functions the model may call: given
    /// to a template that renders tools, else written into the system turn
    /// (see [`crate::chat::tools`]).
    pub fn chat_tokens_with_tools(
        &self,
        messages: &[Message],
        tools: &[Tool],
    ) -> Result<Vec<u32>, TextError> {
        let style = self.tool_style();
        let lowered = style.lower(messages, tools);
        let messages = &lowered[..];
        match &self.template {
            Some(t) => {
                let text = if style.native {
                    t.render_with_tools(messages, tools, true)?
                } else {
                    t.render(messages, true)?
                };
                // The template writes BOS itself when the model wants one.
                // Its own special tokens count; those typed in a message
                // stay text (no forged `<|im_start|>system` turns).
                let literal = message_spans(&text, messages);
                Ok(self.tokenizer.encode_with_literal(&text, false, &literal)?)
            }
            None => {
                let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
                self.raw_tokens(&text.join("\n"))
            }
        }
    }

    /// Tokens of a fill-in-the-middle prompt in the prefix-suffix-middle
    /// order (llama.cpp's `/infill`): BOS if wanted, the FIM prefix token,
    /// `prefix`, the suffix token, `suffix`, the middle token. Models
    /// without FIM tokens (`<fim_prefix>`, `<|fim_prefix|>`, `<PRE>` and
    /// their kin) cannot do it.
    pub fn infill_tokens(&self, prefix: &str, suffix: &str) -> Result<Vec<u32>, TextError> {
        let t = &self.tokenizer;
        let find = |names: &[&str]| names.iter().find_map(|n| t.token_to_id(n));
        let (Some(pre), Some(suf), Some(mid)) = (
            find(&[
                "<|fim_prefix|>",
                "<fim_prefix>",
                "<fim-prefix>",
                "<PRE>",
                "<|fim▁begin|>",
            ]),
            find(&[
                "<|fim_suffix|>",
                "<fim_suffix>",
                "<fim-suffix>",
                "<SUF>",
                "<|fim▁hole|>",
            ]),
            find(&[
                "<|fim_middle|>",
                "<fim_middle>",
                "<fim-middle>",
                "<MID>",
                "<|fim▁end|>",
            ]),
        ) else {
            return Err(TextError::NoInfill);
        };
        let mut out = Vec::new();
        if t.adds_bos() {
            out.extend(t.bos());
        }
        out.push(pre);
        out.extend(t.encode(prefix, false, false)?);
        out.push(suf);
        out.extend(t.encode(suffix, false, false)?);
        out.push(mid);
        Ok(out)
    }

    /// Tokens of raw text (completion mode), with BOS if the model wants one.
    pub fn raw_tokens(&self, text: &str) -> Result<Vec<u32>, TextError> {
        Ok(self.tokenizer.encode(text, true, false)?)
    }
}

/// Where each message's content sits in the rendered conversation, found
/// in order (as written, or trimmed, as templates often do). A content the
/// template changed beyond that is not found: its text is parsed like the
/// template's.
fn message_spans(rendered: &str, messages: &[Message]) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::with_capacity(messages.len());
    let mut pos = 0;
    for m in messages {
        for content in [m.content.as_str(), m.content.trim()] {
            if content.is_empty() {
                continue;
            }
            if let Some(rel) = rendered[pos..].find(content) {
                let start = pos + rel;
                spans.push(start..start + content.len());
                pos = start + content.len();
                break;
            }
        }
    }
    spans
}

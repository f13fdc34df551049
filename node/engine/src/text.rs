//! Text in and out of a model: its tokenizer and chat template, built from
//! the GGUF metadata. Shared by the single-machine engine and the node that
//! originates a cluster request.

use sharding::GgufFile;

use crate::chat::{ChatTemplate, Message};
use crate::tokenizer::Tokenizer;
use crate::{LoadError, TextError};

/// A model's tokenizer and chat template.
pub struct TextModel {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
}

impl TextModel {
    /// Builds both from the GGUF's metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<TextModel, LoadError> {
        Ok(TextModel {
            tokenizer: Tokenizer::from_gguf(gguf)?,
            template: ChatTemplate::from_gguf(gguf)?,
        })
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
        match &self.template {
            Some(t) => {
                let text = t.render(messages, true)?;
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

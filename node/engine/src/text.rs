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
                Ok(self.tokenizer.encode(&text, false, true)?)
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

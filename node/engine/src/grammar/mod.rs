//! Constrained decoding: a grammar (a JSON Schema, or a Lark grammar for
//! tool calls) turned into a mask over the vocabulary before each token is
//! sampled, so the output always parses and validates.
//!
//! The grammar engine is `llguidance` (the one behind OpenAI-compatible
//! structured output in vLLM, SGLang and llama.cpp's `--grammar`
//! alternatives): it walks the tokenizer's token bytes in a trie and an
//! Earley parser, a few hundred microseconds per token on a 50k vocabulary.
//! Grammars come from clients and peers: the engine's own limits (lexer
//! fuel, Earley items, grammar size) bound their cost, and a grammar that
//! breaks them is an error of that request only.
//!
//! Control tokens (`<|im_end|>`, `<tool_call>` when the vocabulary makes it
//! a control token) never match text in a grammar; ending the output is
//! allowed exactly when the grammar is complete, and then any of the
//! model's end-of-generation tokens may be drawn.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use protocol::Constraint;

use crate::tokenizer::Tokenizer;

/// Why a grammar cannot be used, or cannot go on.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrammarError {
    /// The grammar (or schema) does not compile.
    #[error("invalid grammar: {0}")]
    Invalid(String),
    /// The output so far breaks the grammar, or its limits were reached.
    #[error("the grammar cannot continue: {0}")]
    Stuck(String),
    /// The vocabulary cannot be used for grammars.
    #[error("this model's vocabulary cannot be constrained: {0}")]
    Vocabulary(String),
}

/// The tokenizer as llguidance sees it: every token's bytes in a trie.
struct Env {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Used for the grammar's literal strings; control tokens' texts
        // stay text, as in the output.
        self.tokenizer
            .encode(&String::from_utf8_lossy(s), false, false)
            .unwrap_or_default()
    }
}

/// Compiles grammars for one model's vocabulary. Built once per model
/// (the trie and the lexer's token slices take ~100 ms), shared by the
/// requests.
pub struct Grammars {
    factory: ParserFactory,
    vocab: usize,
    eog: Vec<u32>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab", &self.vocab)
            .field("eog", &self.eog)
            .finish_non_exhaustive()
    }
}

impl Grammars {
    /// The grammar compiler for `tokenizer`'s vocabulary.
    pub fn new(tokenizer: Arc<Tokenizer>) -> Result<Grammars, GrammarError> {
        let vocab = tokenizer.vocab_size();
        let eog: Vec<u32> = tokenizer.eog_ids().collect();
        let Some(&eos) = tokenizer
            .eot()
            .as_ref()
            .or(tokenizer.eos().as_ref())
            .or(eog.first())
        else {
            return Err(GrammarError::Vocabulary(
                "it has no end-of-generation token".into(),
            ));
        };
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                let bytes = tokenizer.token_bytes(id);
                let special = tokenizer.token_bytes_special(id);
                if bytes.is_empty() || *bytes != *special {
                    // Control and unknown tokens: reachable by name only.
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    if special.is_empty() {
                        w.extend_from_slice(format!("<[{id}]>").as_bytes());
                    } else {
                        w.extend_from_slice(&special);
                    }
                    w
                } else {
                    bytes.into_owned()
                }
            })
            .collect();
        let mut info = TokRxInfo::new(vocab as u32, eos);
        info.tok_bos = tokenizer.bos();
        info.tok_end_of_turn = tokenizer.eot();
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eog);
        let env: TokEnv = Arc::new(Env { trie, tokenizer });
        let mut factory = ParserFactory::new(
            &env,
            llguidance::toktrie::InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| GrammarError::Vocabulary(e.to_string()))?;
        factory.quiet();
        Ok(Grammars {
            factory,
            vocab,
            eog,
        })
    }

    /// A fresh guide for one request's output.
    pub fn guide(&self, constraint: &Constraint) -> Result<Guide, GrammarError> {
        let grammar = match constraint {
            Constraint::JsonSchema(text) => {
                let mut schema: serde_json::Value = serde_json::from_str(text)
                    .map_err(|e| GrammarError::Invalid(format!("the schema is not JSON: {e}")))?;
                compact_json(&mut schema);
                TopLevelGrammar::from_json_schema(schema)
            }
            Constraint::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
            other => {
                return Err(GrammarError::Invalid(format!(
                    "unknown kind of grammar {other:?}"
                )))
            }
        };
        let parser = self
            .factory
            .create_parser(grammar)
            .map_err(|e| GrammarError::Invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GrammarError::Invalid(e));
        }
        Ok(Guide {
            matcher,
            vocab: self.vocab,
            eog: self.eog.clone(),
        })
    }
}

/// JSON the model writes on one line with the usual separators, unless the
/// schema's own `x-guidance` says otherwise: with free whitespace a small
/// model can spend its whole budget on newlines between two keys. (For a
/// schema inside a Lark grammar's `%json`, call it before embedding.)
pub fn compact_json(schema: &mut serde_json::Value) {
    if let Some(map) = schema.as_object_mut() {
        map.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
}

/// One request's grammar state: masks the logits before each draw and
/// follows the tokens drawn.
pub struct Guide {
    matcher: Matcher,
    vocab: usize,
    eog: Vec<u32>,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide").finish_non_exhaustive()
    }
}

impl Guide {
    /// Sets every token the grammar does not allow next to −∞ (logits past
    /// the vocabulary, from a padded output layer, too).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), GrammarError> {
        let allowed: SimpleVob = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| GrammarError::Stuck(e.to_string()))?;
        if allowed.is_zero() {
            return Err(GrammarError::Stuck("no token is allowed next".into()));
        }
        for (id, l) in logits.iter_mut().enumerate() {
            if id >= self.vocab || !allowed.is_allowed(id as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Follows a drawn token (one the last mask allowed).
    pub fn advance(&mut self, token: u32) -> Result<(), GrammarError> {
        if self.eog.contains(&token) && self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| GrammarError::Stuck(e.to_string()))
    }

    /// Follows tokens generated before (a replayed request).
    pub fn advance_all(&mut self, tokens: &[u32]) -> Result<(), GrammarError> {
        tokens.iter().try_for_each(|&t| self.advance(t))
    }
}

#[cfg(test)]
mod tests;

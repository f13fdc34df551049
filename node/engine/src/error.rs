//! What can go wrong, by operation: loading a model or stage
//! ([`LoadError`]), running a forward pass ([`PassError`]), turning text
//! into tokens ([`TextError`]); [`EngineError`] is any of them, for the
//! whole-model [`crate::Engine`] that does all three.

use std::ops::Range;

use crate::{chat, tokenizer};

/// Why a model or a stage could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The model file could not be read.
    #[error(transparent)]
    Gguf(#[from] sharding::GgufError),
    /// The file is not a model shoal can run.
    #[error(transparent)]
    Layout(#[from] sharding::LayoutError),
    /// The tokenizer metadata is unusable.
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    /// The chat template is unusable.
    #[error(transparent)]
    Chat(#[from] chat::ChatError),
    /// Building the weights' tensors failed (device or shape).
    #[error("loading weights: {0}")]
    Candle(#[from] candle_core::Error),
    /// The requested layers are not a non-empty range inside the model.
    #[error("layer range {range:?} is not inside the model's {n_layers} layers")]
    BadLayerRange {
        /// Requested range.
        range: Range<usize>,
        /// Layers in the model.
        n_layers: usize,
    },
}

/// Why a forward pass did not run. On error no cache has advanced.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PassError {
    /// The sequence would exceed its context window.
    #[error("context full: {needed} tokens needed, the context holds {max} (raise --ctx)")]
    ContextFull {
        /// Positions the step needs.
        needed: usize,
        /// The context size.
        max: usize,
    },
    /// A prompt or step with no tokens.
    #[error("empty input: nothing to run")]
    EmptyInput,
    /// Tokens were sent to a stage that does not hold the embedding.
    #[error("this stage does not start the model: it takes hidden states, not tokens")]
    NotFirstStage,
    /// Hidden states were sent to the first stage.
    #[error("the first stage takes tokens, not hidden states")]
    FirstStageNeedsTokens,
    /// Hidden states of the wrong shape or type.
    #[error("hidden states of shape {shape:?}, expected [tokens, {dim}] f32")]
    BadHidden {
        /// The shape received.
        shape: Vec<usize>,
        /// The model's hidden size.
        dim: usize,
    },
    /// NaN or infinity in the hidden states a stage received or in the
    /// logits it computed: a broken model file, an overflow, or a member
    /// sending garbage. The request fails; nothing is sampled from it.
    #[error("non-finite values (NaN or infinity) in the {what}")]
    NonFinite {
        /// "hidden states received" or "logits".
        what: &'static str,
    },
    /// A tensor operation failed (shape bug or device error).
    #[error("compute error: {0}")]
    Candle(#[from] candle_core::Error),
}

/// Why text could not become tokens.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    /// The text cannot be tokenized (too long, ...).
    #[error(transparent)]
    Tokenizer(#[from] tokenizer::TokenizerError),
    /// The chat template failed on these messages.
    #[error(transparent)]
    Chat(#[from] chat::ChatError),
    /// The answer's grammar does not compile or cannot go on.
    #[error(transparent)]
    Grammar(#[from] crate::grammar::GrammarError),
    /// A `suffix` was given to a model without fill-in-the-middle tokens.
    #[error("this model has no fill-in-the-middle tokens: 'suffix' cannot be used with it")]
    NoInfill,
}

/// Any engine error: loading, a pass, or text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// Loading failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A forward pass failed.
    #[error(transparent)]
    Pass(#[from] PassError),
    /// Text could not become tokens.
    #[error(transparent)]
    Text(#[from] TextError),
}

impl From<sharding::GgufError> for EngineError {
    fn from(e: sharding::GgufError) -> EngineError {
        EngineError::Load(e.into())
    }
}

impl From<sharding::LayoutError> for EngineError {
    fn from(e: sharding::LayoutError) -> EngineError {
        EngineError::Load(e.into())
    }
}

//! shoal's engine: a range of a llama-family model's layers run on
//! quantized GGUF weights, and the text around it (tokenizer, chat
//! template, sampling, stop sequences).
//!
//! # Layout
//! - [`model`]: the forward pass of a pipeline stage (layers `[start, end)`).
//! - [`kv_cache`]: per-sequence key/value cache of a stage.
//! - [`attention`]: CPU attention over the f16 cache, with llama.cpp's arithmetic.
//! - [`linear`]: projection weights and embeddings read from the mapped GGUF.
//! - [`quant`]: shoal's SIMD kernels for Q4_0/Q4_1/Q8_0 products.
//! - [`ggml_ops`]: norm, SwiGLU and RoPE angles with ggml's exact arithmetic.
//! - [`tokenizer`], [`chat`]: text in and out, built from the GGUF's metadata.
//! - [`sampling`]: choosing the next token (pure).
//! - [`stop`]: stop sequences over streamed text (pure).
//! - [`local`]: a whole model on one machine: load, prompt, generate, score.
//! - [`text`]: tokenizer and chat template together (text in, tokens out).
//!
//! Architecture Invariant: the engine knows nothing of networks: no tokio,
//! libp2p, quinn, axum or HTTP in its dependency tree (checked by the
//! `dependency_edges` test). It reads no sockets; weights come in as mapped
//! spans, activations as tensors.

pub mod attention;
pub mod chat;
pub mod ggml_ops;
pub mod kv_cache;
pub mod linear;
pub mod local;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod stop;
pub mod text;
pub mod tokenizer;

use std::ops::Range;

pub use kv_cache::KvCache;
pub use local::{Engine, GenerateEvent, GenerateOptions, GenerationStats, Session, StopReason};
pub use model::{BatchSeq, LoadOptions, LogitsFor, Stage, StageInput, StageOutput};
pub use sampling::{Sampler, SamplingParams};

/// Errors of loading a model or stage, or of running a forward pass.
/// Load errors (the file, its layout, tokenizer, template) and pass errors
/// (context, input shape, compute) are apart: [`EngineError::is_load`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
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
    /// A tensor operation failed (shape bug or device error).
    #[error("compute error: {0}")]
    Candle(#[from] candle_core::Error),
    /// The requested layers are not a non-empty range inside the model.
    #[error("layer range {range:?} is not inside the model's {n_layers} layers")]
    BadLayerRange {
        /// Requested range.
        range: Range<usize>,
        /// Layers in the model.
        n_layers: usize,
    },
    /// The sequence would exceed its context window.
    #[error("context full: {needed} tokens needed, the context holds {max} (raise --ctx)")]
    ContextFull {
        /// Positions the step needs.
        needed: usize,
        /// The context size.
        max: usize,
    },
    /// A prompt with no tokens.
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
}

impl EngineError {
    /// Whether this error comes from loading (file, layout, tokenizer,
    /// template, layer range) rather than from running a pass.
    pub fn is_load(&self) -> bool {
        matches!(
            self,
            EngineError::Gguf(_)
                | EngineError::Layout(_)
                | EngineError::Tokenizer(_)
                | EngineError::Chat(_)
                | EngineError::BadLayerRange { .. }
        )
    }
}

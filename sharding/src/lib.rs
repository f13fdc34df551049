//! shoal's model bookkeeping: what a GGUF file holds and how to split it.
//!
//! # Layout
//! - [`gguf`]: the GGUF container — header, metadata, tensor index, mapped spans.
//! - [`ggml`]: ggml element types and their block sizes.
//! - [`layout`]: a llama-family model described from its GGUF — hyperparameters
//!   and per-layer tensors with byte sizes, the input of the planner and loader.
//! - [`manifest`]: blake3 hashes of each layer's weights; one hash names a model.
//! - [`planner`]: the cost model and the partition planner (pure).
//!
//! Architecture Invariant: this crate does no compute and knows nothing of
//! candle; it reads headers and maps bytes, so the planner and the simulator
//! can use it without an engine.

pub mod describe;
pub mod ggml;
pub mod gguf;
pub mod layout;
pub mod manifest;
pub mod planner;

pub use ggml::GgmlType;
pub use gguf::{GgufError, GgufFile, TensorInfo, Value};
pub use layout::{
    Activation, Experts, LayoutError, ModelConfig, ModelLayout, RopeStyle, SlidingWindow,
};
pub use manifest::Manifest;
pub use planner::{
    evaluate, plan, LinkSpec, ModelSpec, NodeSpec, Plan, PlanError, PlanGoal, PlanInput,
    PlannedStage, BATCH_ROWS_KNEE,
};

#[cfg(test)]
mod tests;

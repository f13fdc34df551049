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
//! - [`grammar`]: constrained decoding (token masks from JSON schemas and Lark grammars).
//! - [`stop`]: stop sequences over streamed text (pure).
//! - [`local`]: a whole model on one machine: load, prompt, generate, score.
//! - [`text`]: tokenizer and chat template together (text in, tokens out).
//! - [`error`]: load errors apart from forward-pass and text errors.
//!
//! Architecture Invariant: the engine knows nothing of networks: no tokio,
//! libp2p, quinn, axum or HTTP in its dependency tree (checked by the
//! `dependency_edges` test). It reads no sockets; weights come in as mapped
//! spans, activations as tensors.

pub mod attention;
pub mod chat;
pub mod error;
pub mod ggml_ops;
pub mod grammar;
pub mod kv_cache;
pub mod linear;
pub mod local;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod stop;
pub mod text;
pub mod tokenizer;

pub use error::{EngineError, LoadError, PassError, TextError};
pub use kv_cache::KvCache;
pub use local::{Engine, GenerateEvent, GenerateOptions, GenerationStats, Session, StopReason};
pub use model::{log_prob, BatchSeq, LoadOptions, LogitsFor, Stage, StageInput, StageOutput};
pub use sampling::{Sampler, SamplingParams};

/// Process settings for running models; call once at the start of `main`,
/// before any other thread exists.
///
/// - candle's element-wise ops fan out on a pool of their own whose idle
///   workers spin for a while after each op; next to shoal's rayon workers
///   on a small machine they took a core's worth of time (two threads ran a
///   prompt barely faster than one). shoal's heavy work is on rayon, so
///   candle gets one thread unless `CANDLE_NUM_THREADS` says otherwise.
/// - Large freed buffers stay in the heap instead of being unmapped: a
///   forward pass allocates and frees megabytes per matmul, and with
///   glibc's defaults each became a fresh zeroed mapping (page faults were
///   ~8% of a long prompt's time). malloc maps nothing at all
///   (`M_MMAP_MAX` 0): glibc caps the mapping threshold at 32 MiB, and a
///   512-row pass of a 1.5B model has 36 MiB outputs, whose page faults
///   serialized the threads on the kernel's mm lock (~13% of pp512 at two
///   threads; without them 138 -> 164-180 tok/s on Qwen2.5-Coder-1.5B). The
///   heap's top is still returned above 128 MiB free.
pub fn init_process() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY (of the call's contract): documented to run first in main,
        // while the process has one thread.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 16 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        libc::mallopt(libc::M_MMAP_MAX, 0);
    }
}

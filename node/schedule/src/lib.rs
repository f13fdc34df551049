//! shoal's scheduling decisions, in one pure place that both a node's
//! stage worker and the cluster simulator call: what runs together in the
//! next forward pass, how many sequences a stage holds, how a prompt is cut
//! into chunks, how many sequences the first stage of a pipeline lets into
//! one micro-batch. (What a pass costs is the planner's cost model,
//! `sharding::NodeSpec::pass_us`.)
//!
//! # Layout
//! - [`batch`]: the [`Batcher`]: continuous batching of queued chunks.
//! - [`speculate`]: speculative decoding (prompt lookup, acceptance, adaptive length).
//! - [`flight`]: a request's trips as its origin runs them (proposals in
//!   flight, which draws stand).
//! - this file: the limits and the two small decisions the batcher's
//!   callers make (prompt chunks, micro-batch cap).
//!
//! Architecture Invariant: no I/O, no threads, no clock of its own (`now`
//! is passed in); nothing here depends on candle, tokio, libp2p, quinn or
//! axum (checked by the `dependency_edges` test).

pub mod batch;
pub mod flight;
pub mod speculate;

pub use batch::{Batcher, Next, Rows, Work};

/// Requests a stage holds caches for at once: bounds KV memory against a
/// flood of Begins (each origin also bounds its own requests).
pub const SEQUENCES_MAX: usize = 64;

/// Tokens fed to the model per forward call while reading a prompt, as
/// llama.cpp's default `n_batch`: bounds the attention scratch
/// (`heads x 512 x context` floats) however long the prompt is.
pub const PROMPT_CHUNK_TOKENS: usize = 512;

/// Query rows from which attention switches to its tiled f32 flash kernel
/// (ggml's `GGML_FA_TILE_Q`); below it, the f16-accumulating one-row
/// kernel. The batcher never cuts a chunk across this line, so batching
/// does not change the arithmetic.
pub const TILED_ROWS_MIN: usize = 64;

/// One piece of a prompt as the origin sends it to the first stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromptChunk {
    /// Position of its first token.
    pub start: usize,
    /// Tokens in it.
    pub rows: usize,
    /// Whether the last stage samples after it (the prompt's last chunk).
    pub sample: bool,
}

/// A prompt of `tokens` tokens cut into [`PROMPT_CHUNK_TOKENS`] pieces, in
/// order; the last one asks for a sample.
pub fn prompt_chunks(tokens: usize) -> impl Iterator<Item = PromptChunk> {
    let n = tokens.div_ceil(PROMPT_CHUNK_TOKENS);
    (0..n).map(move |c| {
        let start = c * PROMPT_CHUNK_TOKENS;
        PromptChunk {
            start,
            rows: (tokens - start).min(PROMPT_CHUNK_TOKENS),
            sample: c + 1 == n,
        }
    })
}

/// Sequences one pass of a stage may take. On the first stage of a
/// pipeline of `stages` stages, `⌈active / stages⌉` (at least one), so
/// there are as many groups in flight as stages and every stage has work;
/// elsewhere, everything queued ([`SEQUENCES_MAX`]).
pub fn micro_batch_cap(first: bool, stages: usize, active: usize) -> usize {
    if first && stages > 1 {
        active.div_ceil(stages).max(1)
    } else {
        SEQUENCES_MAX
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_chunks_cover_the_prompt_in_order() {
        for n in [1, 511, 512, 513, 1024, 1500] {
            let c: Vec<_> = prompt_chunks(n).collect();
            assert_eq!(c.iter().map(|c| c.rows).sum::<usize>(), n);
            assert!(c.iter().all(|c| c.rows <= PROMPT_CHUNK_TOKENS));
            assert!(c.windows(2).all(|w| w[0].start + w[0].rows == w[1].start));
            assert_eq!(c.iter().filter(|c| c.sample).count(), 1);
            assert!(c.last().unwrap().sample);
        }
        assert_eq!(prompt_chunks(0).count(), 0);
    }

    #[test]
    fn micro_batches_split_the_active_sequences_across_stages() {
        assert_eq!(micro_batch_cap(true, 1, 8), SEQUENCES_MAX);
        assert_eq!(micro_batch_cap(false, 3, 8), SEQUENCES_MAX);
        assert_eq!(micro_batch_cap(true, 2, 8), 4);
        assert_eq!(micro_batch_cap(true, 3, 8), 3);
        assert_eq!(micro_batch_cap(true, 3, 0), 1);
    }
}

//! A short speed measurement at start: how long this node takes to run one
//! layer of this model for one token, per MiB of weights (the planner
//! divides layers by it), and how long the output head adds to the last
//! stage (a tied Q8_0 head over a 49k vocabulary costs a SmolLM2 node as
//! much as ~15 of its Q4_1 layers: counting it by bytes misplaces the cut),
//! and what more rows in a pass add (a batch of 4 decoding sequences, a
//! 64-row prompt piece): the simulator's batching and prompt costs.

use std::time::Instant;

use candle_core::{Device, Tensor};
use sharding::{GgufFile, ModelLayout, BATCH_ROWS_KNEE};

use engine::model::{BatchSeq, LoadOptions, LogitsFor, Stage, StageInput};
use engine::{EngineError, PassError};

/// Passes timed per measurement (after one warm-up): enough for a stable
/// median; the four measurements take about a second on the default model
/// at one thread (longer on big layers: they are one layer each).
const STEPS: usize = 15;

/// What calibration found.
#[derive(Debug, Clone, Copy)]
pub struct Speed {
    /// Microseconds per MiB of layer weights for a one-token decode step.
    pub us_per_mib: f64,
    /// Microseconds the last stage spends per token beyond its layers
    /// (final norm, output head, logits).
    pub head_us: f64,
    /// Microseconds per MiB each extra row adds to a pass of up to
    /// [`BATCH_ROWS_KNEE`] rows.
    pub row_us_per_mib: f64,
    /// Microseconds per MiB each row past [`BATCH_ROWS_KNEE`] adds.
    pub prompt_row_us_per_mib: f64,
}

/// Rows of the long pass timed for the prompt cost: the attention kernel
/// long prompts use (`TILED_ROWS_MIN`).
const PROMPT_ROWS: usize = 64;

impl Speed {
    /// The head's work as layer bytes of the same duration (the planner's unit).
    pub fn head_compute_bytes(&self) -> u64 {
        (self.head_us / self.us_per_mib.max(1e-9) * 1024.0 * 1024.0) as u64
    }
}

/// Times a one-token decode step of one middle layer, and of the last
/// layer with the head (the difference is the head); then the middle layer
/// with 4 decoding sequences and with a 64-row prompt piece (what more rows
/// add). A model whose context cannot hold the prompt piece prices prompt
/// rows as batch rows.
pub fn measure(
    gguf: &GgufFile,
    layout: &ModelLayout,
    context: usize,
) -> Result<Speed, EngineError> {
    let n = layout.layers.len();
    // A middle layer: no embedding or head in the way.
    let layer = n / 2;
    let mib = |l: usize| layout.layers[l].bytes() as f64 / (1024.0 * 1024.0);
    let m = mib(layer).max(1e-6);
    let dim = layout.config.dim;
    // One load of the middle layer serves its three measurements.
    let middle = load(
        gguf,
        layout,
        layer..layer + 1,
        context.min(64).max(PROMPT_ROWS * 2),
    )?;
    let us_per_mib = time_passes(&middle, dim, 1, 1)? / m;
    let last = time_passes(&load(gguf, layout, n - 1..n, context.min(64))?, dim, 1, 1)?;
    // A batch as decoding makes it: that many sequences, one row each.
    let batch = time_passes(&middle, dim, BATCH_ROWS_KNEE, 1)? / m;
    let prompt = time_passes(&middle, dim, 1, PROMPT_ROWS).map_or(batch, |t| t / m);
    tracing::debug!(
        one = us_per_mib * m,
        batch = batch * m,
        prompt = prompt * m,
        "calibration passes: 1 row, {BATCH_ROWS_KNEE} sequences, a {PROMPT_ROWS}-row prompt, µs"
    );
    let row_us_per_mib = ((batch - us_per_mib) / (BATCH_ROWS_KNEE - 1) as f64).max(0.0);
    Ok(Speed {
        us_per_mib,
        head_us: (last - us_per_mib * mib(n - 1)).max(0.0),
        row_us_per_mib,
        prompt_row_us_per_mib: ((prompt - batch) / (PROMPT_ROWS - BATCH_ROWS_KNEE) as f64)
            .max(row_us_per_mib),
    })
}

/// `layers` ready to time: mapped and paged in.
fn load(
    gguf: &GgufFile,
    layout: &ModelLayout,
    layers: std::ops::Range<usize>,
    max_context: usize,
) -> Result<Stage, EngineError> {
    let opts = LoadOptions {
        max_context,
        ..LoadOptions::default()
    };
    let stage = Stage::load(gguf, layout, layers, &opts)?;
    stage.prefault(&mut |_, _| {});
    Ok(stage)
}

/// Microseconds of one pass of `seqs` sequences of `rows` rows each
/// through `stage` (after a warm-up): one-row steps decode on growing
/// caches; longer passes are prompt pieces, each on fresh caches.
fn time_passes(stage: &Stage, dim: usize, seqs: usize, rows: usize) -> Result<f64, EngineError> {
    let total = seqs * rows;
    let x: Vec<f32> = (0..dim * total)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let hidden = Tensor::from_vec(x, (total, dim), &Device::Cpu).map_err(PassError::from)?;
    let tokens = vec![0u32; total];
    let mut caches: Vec<engine::KvCache> = (0..seqs)
        .map(|_| stage.new_cache((STEPS + 1) * rows))
        .collect();
    let run = |caches: &mut Vec<engine::KvCache>| {
        let mut batch: Vec<BatchSeq<'_>> = caches
            .iter_mut()
            .map(|c| {
                if rows > 1 {
                    c.clear();
                }
                BatchSeq::new(c, rows, LogitsFor::Last)
            })
            .collect();
        let input = if stage.is_first() {
            StageInput::Tokens(&tokens)
        } else {
            StageInput::Hidden(hidden.clone())
        };
        stage.forward_batch(input, &mut batch)
    };
    run(&mut caches)?;
    // The median step: a scheduler hiccup in one step must not move the
    // split (the mean of 8 steps moved it by a few layers on a busy machine).
    let mut steps = Vec::with_capacity(STEPS);
    for _ in 0..STEPS {
        let t = Instant::now();
        run(&mut caches)?;
        steps.push(t.elapsed().as_secs_f64() * 1e6);
    }
    steps.sort_by(f64::total_cmp);
    Ok(steps[STEPS / 2])
}

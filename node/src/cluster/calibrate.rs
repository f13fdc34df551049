//! A short speed measurement at start: how long this node takes to run one
//! layer of this model for one token, per MiB of weights (the planner
//! divides layers by it), and how long the output head adds to the last
//! stage (a tied Q8_0 head over a 49k vocabulary costs a SmolLM2 node as
//! much as ~15 of its Q4_1 layers: counting it by bytes misplaces the cut).

use std::time::Instant;

use candle_core::{Device, Tensor};
use sharding::{GgufFile, ModelLayout};

use crate::model::{LoadOptions, LogitsFor, Stage, StageInput};
use crate::EngineError;

/// Decode steps timed (after one warm-up): enough for a stable median,
/// short enough to start in well under a second.
const STEPS: usize = 15;

/// What calibration found.
#[derive(Debug, Clone, Copy)]
pub struct Speed {
    /// Microseconds per MiB of layer weights for a one-token decode step.
    pub us_per_mib: f64,
    /// Microseconds the last stage spends per token beyond its layers
    /// (final norm, output head, logits).
    pub head_us: f64,
}

impl Speed {
    /// The head's work as layer bytes of the same duration (the planner's unit).
    pub fn head_compute_bytes(&self) -> u64 {
        (self.head_us / self.us_per_mib.max(1e-9) * 1024.0 * 1024.0) as u64
    }
}

/// Times a one-token decode step of one middle layer, and of the last
/// layer with the head; the difference is the head.
pub fn measure(
    gguf: &GgufFile,
    layout: &ModelLayout,
    context: usize,
) -> Result<Speed, EngineError> {
    let n = layout.layers.len();
    // A middle layer: no embedding or head in the way.
    let layer = n / 2;
    let mib = |l: usize| layout.layers[l].bytes() as f64 / (1024.0 * 1024.0);
    let us_per_mib = time_step(gguf, layout, layer..layer + 1, context)? / mib(layer).max(1e-6);
    let last = time_step(gguf, layout, n - 1..n, context)?;
    Ok(Speed {
        us_per_mib,
        head_us: (last - us_per_mib * mib(n - 1)).max(0.0),
    })
}

/// Microseconds of one decode step of `layers` (after a warm-up).
fn time_step(
    gguf: &GgufFile,
    layout: &ModelLayout,
    layers: std::ops::Range<usize>,
    context: usize,
) -> Result<f64, EngineError> {
    let opts = LoadOptions {
        max_context: context.min(64),
        ..LoadOptions::default()
    };
    let stage = Stage::load(gguf, layout, layers, &opts)?;
    stage.prefault(&mut |_, _| {});
    let dim = layout.config.dim;
    let x: Vec<f32> = (0..dim)
        .map(|i| ((i * 7919) % 97) as f32 / 97.0 - 0.5)
        .collect();
    let hidden = Tensor::from_vec(x, (1, dim), &Device::Cpu)?;
    let mut cache = stage.new_cache(STEPS + 1);
    let run = |cache: &mut crate::KvCache| {
        let input = if stage.is_first() {
            StageInput::Tokens(&[0])
        } else {
            StageInput::Hidden(hidden.clone())
        };
        stage.forward(input, cache, LogitsFor::Last)
    };
    run(&mut cache)?;
    // The median step: a scheduler hiccup in one step must not move the
    // split (the mean of 8 steps moved it by a few layers on a busy machine).
    let mut steps = Vec::with_capacity(STEPS);
    for _ in 0..STEPS {
        let t = Instant::now();
        run(&mut cache)?;
        steps.push(t.elapsed().as_secs_f64() * 1e6);
    }
    steps.sort_by(f64::total_cmp);
    Ok(steps[STEPS / 2])
}

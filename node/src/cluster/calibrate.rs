//! A short speed measurement at start: how long this node takes to run one
//! layer of this model for one token, per MiB of weights. The planner
//! divides layers by it.

use std::time::Instant;

use candle_core::{Device, Tensor};
use sharding::{GgufFile, ModelLayout};

use crate::model::{LoadOptions, LogitsFor, Stage, StageInput};
use crate::EngineError;

/// Decode steps timed (after one warm-up): enough to average out a
/// scheduler hiccup, short enough to start in well under a second.
const STEPS: usize = 8;

/// Measures microseconds per MiB of weights for a one-token decode step.
pub fn measure(gguf: &GgufFile, layout: &ModelLayout, context: usize) -> Result<f64, EngineError> {
    let n = layout.layers.len();
    // A middle layer: no embedding or head in the way.
    let layer = n / 2;
    let opts = LoadOptions {
        max_context: context.min(64),
        ..LoadOptions::default()
    };
    let stage = Stage::load(gguf, layout, layer..layer + 1, &opts)?;
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
    let t = Instant::now();
    for _ in 0..STEPS {
        run(&mut cache)?;
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / STEPS as f64;
    let mib = layout.layers[layer].bytes() as f64 / (1024.0 * 1024.0);
    Ok(us / mib.max(1e-6))
}

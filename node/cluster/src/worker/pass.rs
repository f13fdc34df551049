//! One forward pass of the worker's chosen sequences, and the activation
//! payloads that carry its hidden states to the next stage.

use candle_core::{Device, Tensor};
use engine::model::{BatchSeq, LogitsFor, Stage, StageInput, StageOutput};
use protocol::{Activations, DType, Message, SeqRows};
use schedule::{Rows, Work};

use super::Sequence;

/// One forward pass over the chunks of `ready` (each with its sequence).
pub(super) fn run_batch(
    stage: &Stage,
    ready: &mut [(Work, Sequence)],
) -> Result<StageOutput, engine::PassError> {
    let input_tokens: Vec<u32>;
    let input = if stage.is_first() {
        let mut all = Vec::new();
        for (w, _) in ready.iter() {
            match &w.rows {
                Rows::Tokens(t) => all.extend_from_slice(t),
                Rows::Hidden(_) => return Err(engine::PassError::FirstStageNeedsTokens),
            }
        }
        input_tokens = all;
        StageInput::Tokens(&input_tokens)
    } else {
        let mut all = Vec::new();
        for (w, _) in ready.iter() {
            match &w.rows {
                Rows::Hidden(h) => all.extend_from_slice(h),
                Rows::Tokens(_) => return Err(engine::PassError::NotFirstStage),
            }
        }
        let rows: usize = ready.iter().map(|(w, _)| w.seq.rows as usize).sum();
        let dim = all.len() / rows.max(1);
        StageInput::Hidden(Tensor::from_vec(all, (rows, dim), &Device::Cpu)?)
    };
    let mut seqs: Vec<BatchSeq<'_>> = ready
        .iter_mut()
        .map(|(w, s)| {
            // Proposals to verify want logits at each of their positions,
            // each the bits a one-token step would give.
            if w.seq.draft > 0 {
                BatchSeq::new(&mut s.cache, w.seq.rows as usize, LogitsFor::All).as_steps()
            } else {
                BatchSeq::new(&mut s.cache, w.seq.rows as usize, LogitsFor::Last)
            }
        })
        .collect();
    stage.forward_batch(input, &mut seqs)
}

/// The activations message for a pass's hidden states `h` (rows of
/// `batch` in order), and the requests left out of it because a row of
/// theirs is not finite in `dtype` (f16 overflows past 65504): the next
/// stage refuses such activations as a lie, so they never leave here.
pub(super) fn hidden_message(
    h: &Tensor,
    batch: Vec<SeqRows>,
    dtype: DType,
) -> candle_core::Result<(Option<Message>, Vec<u64>)> {
    let dim = h.dim(1)?;
    let values = h
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let fits = |v: &f32| match dtype {
        DType::F32 => v.is_finite(),
        DType::F16 => v.abs() <= f32::from(half::f16::MAX),
        DType::BF16 => v.abs() <= f32::from(half::bf16::MAX),
    };
    let mut unsendable = Vec::new();
    if !values.iter().all(fits) {
        let (mut kept, mut kept_batch, mut at) = (Vec::new(), Vec::new(), 0);
        for s in batch {
            let rows = &values[at..at + s.rows as usize * dim];
            at += rows.len();
            if rows.iter().all(fits) {
                kept.extend_from_slice(rows);
                kept_batch.push(s);
            } else {
                unsendable.push(s.request_id);
            }
        }
        if kept_batch.is_empty() {
            return Ok((None, unsendable));
        }
        return Ok((Some(activations(kept_batch, dim, &kept, dtype)), unsendable));
    }
    Ok((Some(activations(batch, dim, &values, dtype)), unsendable))
}

fn activations(batch: Vec<SeqRows>, dim: usize, values: &[f32], dtype: DType) -> Message {
    Message::Activations(Activations {
        batch,
        dim: dim as u32,
        dtype,
        payload: encode_payload(values, dtype),
        proposals: Vec::new(),
    })
}

/// Whether every element of an activations payload is finite.
pub(super) fn finite_payload(bytes: &[u8], dtype: DType) -> bool {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .all(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")).is_finite()),
        // Exponent bits all ones: infinity or NaN.
        DType::F16 => bytes
            .chunks_exact(2)
            .all(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7c00 != 0x7c00),
        DType::BF16 => bytes
            .chunks_exact(2)
            .all(|c| u16::from_le_bytes([c[0], c[1]]) & 0x7f80 != 0x7f80),
    }
}

/// Activations as little-endian bytes of `dtype`.
pub fn encode_payload(values: &[f32], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        DType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        DType::F16 => values
            .iter()
            .for_each(|v| out.extend(half::f16::from_f32(*v).to_le_bytes())),
        DType::BF16 => values
            .iter()
            .for_each(|v| out.extend(half::bf16::from_f32(*v).to_le_bytes())),
    }
    out
}

/// The inverse of [`encode_payload`]; `bytes` holds whole elements (checked
/// by the frame decoder).
pub fn decode_payload(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

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
        .map(|(w, s)| BatchSeq::new(&mut s.cache, w.seq.rows as usize, LogitsFor::Last))
        .collect();
    stage.forward_batch(input, &mut seqs)
}

pub(super) fn hidden_message(
    h: &Tensor,
    batch: Vec<SeqRows>,
    dtype: DType,
) -> candle_core::Result<Message> {
    let dim = h.dim(1)?;
    let values = h
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(Message::Activations(Activations {
        batch,
        dim: dim as u32,
        dtype,
        payload: encode_payload(&values, dtype),
    }))
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

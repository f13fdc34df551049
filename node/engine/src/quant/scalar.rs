//! Portable reference kernels: the definition the SIMD kernels must match,
//! and the path on CPUs without AVX2.

use super::{BlockQ8, NativeType, QK};
use half::f16;

#[inline]
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Dot product of one weight row (raw ggml blocks) with one quantized activation row.
pub(super) fn dot(ty: NativeType, w: &[u8], a: &[BlockQ8]) -> f32 {
    let bb = ty.block_bytes();
    let mut sum = 0f32;
    for (i, act) in a.iter().enumerate() {
        let b = &w[i * bb..(i + 1) * bb];
        sum += match ty {
            NativeType::Q8_0 => {
                let q: i32 = (0..QK)
                    .map(|j| b[2 + j] as i8 as i32 * act.qs[j] as i32)
                    .sum();
                f16_at(b, 0) * act.d * q as f32
            }
            NativeType::Q4_0 => {
                let q: i32 = (0..QK / 2)
                    .map(|j| {
                        let lo = (b[2 + j] & 0x0F) as i32 - 8;
                        let hi = (b[2 + j] >> 4) as i32 - 8;
                        lo * act.qs[j] as i32 + hi * act.qs[j + QK / 2] as i32
                    })
                    .sum();
                f16_at(b, 0) * act.d * q as f32
            }
            NativeType::Q4_1 => {
                let q: i32 = (0..QK / 2)
                    .map(|j| {
                        let lo = (b[4 + j] & 0x0F) as i32;
                        let hi = (b[4 + j] >> 4) as i32;
                        lo * act.qs[j] as i32 + hi * act.qs[j + QK / 2] as i32
                    })
                    .sum();
                f16_at(b, 2).mul_add(act.s, f16_at(b, 0) * act.d * q as f32)
            }
        };
    }
    sum
}

/// Dequantizes one row of raw ggml blocks into `out`.
pub(super) fn dequantize_row(ty: NativeType, w: &[u8], out: &mut [f32]) {
    let bb = ty.block_bytes();
    for (i, chunk) in out.chunks_exact_mut(QK).enumerate() {
        let b = &w[i * bb..(i + 1) * bb];
        let d = f16_at(b, 0);
        match ty {
            NativeType::Q8_0 => {
                for (j, o) in chunk.iter_mut().enumerate() {
                    *o = d * b[2 + j] as i8 as f32;
                }
            }
            NativeType::Q4_0 => {
                for j in 0..QK / 2 {
                    chunk[j] = d * ((b[2 + j] & 0x0F) as i32 - 8) as f32;
                    chunk[j + QK / 2] = d * ((b[2 + j] >> 4) as i32 - 8) as f32;
                }
            }
            NativeType::Q4_1 => {
                let m = f16_at(b, 2);
                for j in 0..QK / 2 {
                    chunk[j] = d * (b[4 + j] & 0x0F) as f32 + m;
                    chunk[j + QK / 2] = d * (b[4 + j] >> 4) as f32 + m;
                }
            }
        }
    }
}

/// Quantizes one row of activations to 8-bit blocks, as ggml's
/// `quantize_row_q8_1`: scale = max|x| / 127, round to nearest even, the
/// scale and the scaled sum stored at f16 precision.
pub(super) fn quantize_row(x: &[f32], out: &mut [BlockQ8]) {
    for (chunk, block) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in block.qs.iter_mut().zip(chunk) {
            let r = (v * id).round_ties_even() as i32;
            *q = r as i8;
            sum += r;
        }
        block.d = f16::from_f32(d).to_f32();
        block.s = f16::from_f32(d * sum as f32).to_f32();
    }
}

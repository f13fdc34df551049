//! Portable kernels for the 32-element block types: the definition the
//! SIMD kernels must match bit for bit, and the path on CPUs without AVX2.
//!
//! ggml's x86 kernels sum each block's integer products in eight 32-bit
//! lanes (lane `L` holds elements `4L..4L+4`), scale every lane with one
//! FMA per block, and add the lanes in a fixed tree at the end. Float
//! addition is not associative, so this code keeps the same lanes and the
//! same tree ([`Lanes`]): a machine without AVX2 computes the same bits as
//! one with it, and both the same bits as llama.cpp.

use super::{BlockQ8, NativeType, QK};
use half::f16;

#[inline]
pub(super) fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// Eight f32 accumulators, as one AVX register.
#[derive(Clone, Copy, Default)]
pub(super) struct Lanes(pub [f32; 8]);

impl Lanes {
    /// `lane += scale * ints[lane]`, one FMA per lane.
    #[inline]
    pub fn fma(&mut self, scale: f32, ints: &[i32; 8]) {
        for (a, &v) in self.0.iter_mut().zip(ints) {
            *a = scale.mul_add(v as f32, *a);
        }
    }

    /// ggml's `hsum_float_8`: high half onto low half, then pairs.
    #[inline]
    pub fn sum(&self) -> f32 {
        let a = &self.0;
        let s = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
        (s[0] + s[2]) + (s[1] + s[3])
    }
}

/// Per-lane integer sums of `w[e] * a[e]` over one 32-element block.
#[inline]
pub(super) fn lane_dot(w: &[i32; QK], a: &[i8; QK]) -> [i32; 8] {
    let mut lanes = [0i32; 8];
    for (e, (&wv, &av)) in w.iter().zip(a).enumerate() {
        lanes[e / 4] += wv * av as i32;
    }
    lanes
}

/// The 32 integer weights of one block (before its scale and min), in
/// element order.
fn block_ints(ty: NativeType, b: &[u8]) -> [i32; QK] {
    let mut q = [0i32; QK];
    match ty {
        NativeType::Q8_0 => {
            for (j, v) in q.iter_mut().enumerate() {
                *v = b[2 + j] as i8 as i32;
            }
        }
        NativeType::Q4_0 | NativeType::Q4_1 => {
            let (qs, off) = if ty == NativeType::Q4_0 {
                (&b[2..18], 8)
            } else {
                (&b[4..20], 0)
            };
            for j in 0..QK / 2 {
                q[j] = (qs[j] & 0x0F) as i32 - off;
                q[j + QK / 2] = (qs[j] >> 4) as i32 - off;
            }
        }
        NativeType::Q5_0 | NativeType::Q5_1 => {
            let (h_at, off) = if ty == NativeType::Q5_0 {
                (2, 16)
            } else {
                (4, 0)
            };
            let qh = u32::from_le_bytes([b[h_at], b[h_at + 1], b[h_at + 2], b[h_at + 3]]);
            let qs = &b[h_at + 4..h_at + 20];
            for j in 0..QK / 2 {
                let hi_lo = ((qh >> j) & 1) as i32 * 16;
                let hi_hi = ((qh >> (j + 16)) & 1) as i32 * 16;
                q[j] = (qs[j] & 0x0F) as i32 + hi_lo - off;
                q[j + QK / 2] = (qs[j] >> 4) as i32 + hi_hi - off;
            }
        }
        _ => unreachable!("{ty:?} is not a 32-element type"),
    }
    q
}

/// Dot product of one weight row (raw ggml blocks) with one quantized
/// activation row, as ggml's AVX2 `ggml_vec_dot_*` computes it; or, with
/// `chain`, as llama.cpp's repacked Q4_0 kernels do (each block's exact
/// integer dot times `d_w · d_a`, one FMA per block into one sum).
pub(super) fn dot(ty: NativeType, w: &[u8], a: &[BlockQ8], chain: bool) -> f32 {
    let bb = ty.block_bytes();
    if chain {
        let mut sum = 0f32;
        for (i, act) in a.iter().enumerate() {
            let b = &w[i * bb..(i + 1) * bb];
            let q: i32 = lane_dot(&block_ints(ty, b), &act.qs).iter().sum();
            sum = (q as f32).mul_add(f16_at(b, 0) * act.d, sum);
        }
        return sum;
    }
    let mut acc = Lanes::default();
    // The min term of Q4_1/Q5_1, a scalar FMA chain in ggml.
    let mut summs = 0f32;
    for (i, act) in a.iter().enumerate() {
        let b = &w[i * bb..(i + 1) * bb];
        let lanes = lane_dot(&block_ints(ty, b), &act.qs);
        acc.fma(f16_at(b, 0) * act.d, &lanes);
        if matches!(ty, NativeType::Q4_1 | NativeType::Q5_1) {
            summs = f16_at(b, 2).mul_add(act.s, summs);
        }
    }
    acc.sum() + summs
}

/// Dequantizes one row of raw ggml blocks into `out`.
pub(super) fn dequantize_row(ty: NativeType, w: &[u8], out: &mut [f32]) {
    let bb = ty.block_bytes();
    for (i, chunk) in out.chunks_exact_mut(QK).enumerate() {
        let b = &w[i * bb..(i + 1) * bb];
        let d = f16_at(b, 0);
        let q = block_ints(ty, b);
        match ty {
            NativeType::Q4_1 | NativeType::Q5_1 => {
                let m = f16_at(b, 2);
                for (o, &v) in chunk.iter_mut().zip(&q) {
                    *o = d * v as f32 + m;
                }
            }
            _ => {
                for (o, &v) in chunk.iter_mut().zip(&q) {
                    *o = d * v as f32;
                }
            }
        }
    }
}

/// Round to nearest, ties to even, for |x| < 2^22: ggml's `nearest_int`
/// trick (adding 1.5·2^23 leaves the rounded integer in the low mantissa
/// bits). The same result as `round_ties_even`, which on baseline x86-64
/// (no SSE4.1 `roundss`) is a libm call per element.
#[inline(always)]
pub(super) fn nearest_int(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
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
            let r = nearest_int(v * id);
            *q = r as i8;
            sum += r;
        }
        block.d = f16::from_f32(d).to_f32();
        block.s = f16::from_f32(d * sum as f32).to_f32();
        for (l, four) in block.qs.chunks_exact(4).enumerate() {
            block.neg16_sums[l] = -16 * four.iter().map(|&q| q as i32).sum::<i32>();
        }
    }
}

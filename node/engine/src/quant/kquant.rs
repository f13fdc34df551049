//! The 256-element "K" block types (Q2_K to Q6_K): activation
//! quantization to ggml's `block_q8_K` and the portable kernels, which are
//! the definition [`super::kavx2`] matches bit for bit.
//!
//! llama.cpp sums a K product in one of four shapes on x86 ([`KShape`]),
//! chosen by the matrix and the batch; shoal picks the same one:
//! - Q4_K matrices whose row count is a multiple of 8 are repacked
//!   (`block_q4_Kx8`), and the repacked kernels keep one float accumulator
//!   per output: the exact integer dot of each super-block (`gemv`, the
//!   last `t % 4` rows of a batch) or of each pair of sub-blocks (`gemm`,
//!   the rows before) is scaled with one FMA, the mins in a second
//!   accumulator subtracted at the end.
//! - Otherwise a batch of 8 rows or more goes through ggml's tiled K-quant
//!   kernel (`ggml-cpu/tiled`): per super-block the exact integer sums,
//!   scaled by the weight's `d` (minus `dmin` times the min sums, fused),
//!   then one FMA with the activation's `d` into the output.
//! - Smaller batches run `ggml_vec_dot_q*_K_q8_K`: integer products in
//!   eight lanes per super-block, one FMA per lane and super-block, the
//!   lanes summed at the end ([`Lanes`]).

use super::scalar::{f16_at, Lanes};
use super::NativeType;

/// Elements per K block.
pub const QK_K: usize = 256;

/// One super-block of 8-bit activations: ggml's `block_q8_K`.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct BlockQ8K {
    /// Scale (full f32, unlike the 32-element blocks).
    pub d: f32,
    /// Quantized values.
    pub qs: [i8; QK_K],
    /// Sums of each 16 consecutive `qs`.
    pub bsums: [i16; QK_K / 16],
}

impl Default for BlockQ8K {
    fn default() -> Self {
        BlockQ8K {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        }
    }
}

impl BlockQ8K {
    /// Sum of the 32 values of sub-block `j` (ggml's `hadd` of two bsums).
    #[inline]
    pub fn bsum32(&self, j: usize) -> i32 {
        self.bsums[2 * j] as i32 + self.bsums[2 * j + 1] as i32
    }
}

/// ggml's `quantize_row_q8_K_ref`: the scale comes from the element of
/// largest magnitude *with its sign* (the first one on ties), `-127 / max`,
/// rounded to nearest even and clamped to 127.
pub(super) fn quantize_row_k(x: &[f32], out: &mut [BlockQ8K]) {
    for (chunk, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let (mut amax, mut max) = (0f32, 0f32);
        for &v in chunk {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *block = BlockQ8K::default();
            continue;
        }
        let iscale = -127.0 / max;
        for (q, &v) in block.qs.iter_mut().zip(chunk) {
            *q = super::scalar::nearest_int(iscale * v).min(127) as i8;
        }
        for (s, sixteen) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *s = sixteen.iter().map(|&q| q as i16).sum();
        }
        block.d = 1.0 / iscale;
    }
}

/// The 6-bit scales and mins of a Q4_K/Q5_K super-block (ggml's
/// `get_scale_min_k4` for all eight sub-blocks).
#[inline]
pub(super) fn scales_mins(s: &[u8]) -> ([i32; 8], [i32; 8]) {
    let (mut sc, mut mn) = ([0i32; 8], [0i32; 8]);
    for j in 0..8 {
        if j < 4 {
            sc[j] = (s[j] & 63) as i32;
            mn[j] = (s[j + 4] & 63) as i32;
        } else {
            sc[j] = ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4)) as i32;
            mn[j] = ((s[j + 4] >> 4) | ((s[j] >> 6) << 4)) as i32;
        }
    }
    (sc, mn)
}

/// The 256 unsigned weights of a Q4_K/Q5_K/Q6_K super-block in element
/// order (Q6_K's before its -32 offset).
pub(super) fn super_block_ints(ty: NativeType, b: &[u8]) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    match ty {
        NativeType::Q4_K | NativeType::Q5_K => {
            let (qh, qs) = if ty == NativeType::Q4_K {
                (None, &b[16..144])
            } else {
                (Some(&b[16..48]), &b[48..176])
            };
            for j in 0..4 {
                for l in 0..32 {
                    let byte = qs[32 * j + l];
                    let (mut lo, mut hi) = (byte & 0xF, byte >> 4);
                    if let Some(qh) = qh {
                        lo |= ((qh[l] >> (2 * j)) & 1) << 4;
                        hi |= ((qh[l] >> (2 * j + 1)) & 1) << 4;
                    }
                    q[64 * j + l] = lo;
                    q[64 * j + 32 + l] = hi;
                }
            }
        }
        NativeType::Q2_K => {
            let qs = &b[16..80];
            for j in 0..2 {
                for c in 0..4 {
                    for l in 0..32 {
                        q[128 * j + 32 * c + l] = (qs[32 * j + l] >> (2 * c)) & 3;
                    }
                }
            }
        }
        NativeType::Q3_K => {
            // Codes q + 4 (0..7): two low bits from `qs`, the third set
            // where the high-bit mask is (ggml subtracts 4 where it is not).
            let (hmask, qs) = (&b[0..32], &b[32..96]);
            for j in 0..2 {
                for c in 0..4 {
                    for l in 0..32 {
                        let low = (qs[32 * j + l] >> (2 * c)) & 3;
                        let high = (hmask[l] >> (4 * j + c)) & 1;
                        q[128 * j + 32 * c + l] = low | (high << 2);
                    }
                }
            }
        }
        NativeType::Q6_K => {
            for j in 0..2 {
                let ql = &b[64 * j..64 * j + 64];
                let qh = &b[128 + 32 * j..128 + 32 * j + 32];
                for l in 0..32 {
                    let o = 128 * j + l;
                    q[o] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                    q[o + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                    q[o + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    q[o + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
        }
        _ => unreachable!("{ty:?} is not a K type"),
    }
    q
}

/// Q6_K's sixteen signed 8-bit scales.
#[inline]
pub(super) fn q6_scales(b: &[u8]) -> [i32; 16] {
    std::array::from_fn(|i| b[192 + i] as i8 as i32)
}

/// Q3_K's sixteen 6-bit scales, minus 32 (ggml's `kmask` unpacking).
#[inline]
pub(super) fn q3_scales(b: &[u8]) -> [i32; 16] {
    let s = &b[96..108];
    std::array::from_fn(|i| {
        let low = if i < 8 { s[i] & 0xF } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        (low | (high << 4)) as i32 - 32
    })
}

/// Q2_K's sixteen 4-bit scales and mins.
#[inline]
pub(super) fn q2_scales_mins(b: &[u8]) -> ([i32; 16], [i32; 16]) {
    (
        std::array::from_fn(|i| (b[i] & 0xF) as i32),
        std::array::from_fn(|i| (b[i] >> 4) as i32),
    )
}

/// The sixteen-scale types (Q3_K, Q6_K): scales, code offset, `d` offset.
#[inline]
pub(super) fn sixteen(ty: NativeType, b: &[u8]) -> ([i32; 16], i32, f32) {
    if ty == NativeType::Q3_K {
        (q3_scales(b), 4, f16_at(b, 108))
    } else {
        (q6_scales(b), 32, f16_at(b, 208))
    }
}

/// How a K product sums its super-blocks (see the module notes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KShape {
    /// `ggml_vec_dot_q*_K_q8_K`: eight lanes.
    Lanes,
    /// The tiled kernel: one scalar chain per output.
    Tiled,
    /// Repacked Q4_K or Q2_K `gemv`: one FMA per super-block.
    PerBlock,
    /// Repacked Q4_K `gemm`: one FMA per pair of sub-blocks (for Q2_K, per
    /// half super-block).
    PerPair,
}

impl KShape {
    /// The shape llama.cpp uses for a `ty` matrix of `rows` rows, batch
    /// row `r` of `t`.
    ///
    /// (Q4_0 is repacked too, and its 32-element blocks are summed one FMA
    /// per block: [`KShape::PerBlock`] for every row.)
    pub fn of(ty: NativeType, rows: usize, t: usize, r: usize) -> KShape {
        let repacked = rows.is_multiple_of(8);
        // llama.cpp repacks Q2_K only on CPUs with AVX-512.
        let q2_repacked =
            ty == NativeType::Q2_K && repacked && super::kernels() == super::Kernels::Avx512;
        if (ty == NativeType::Q4_K && repacked) || q2_repacked {
            if r < t - t % 4 {
                KShape::PerPair
            } else {
                KShape::PerBlock
            }
        } else if ty == NativeType::Q4_0 && repacked {
            KShape::PerBlock
        } else if !ty.is_k() {
            KShape::Lanes
        } else if t >= TILED_BATCH_MIN {
            KShape::Tiled
        } else {
            KShape::Lanes
        }
    }
}

/// Batch rows from which llama.cpp takes its tiled K-quant kernel
/// (`ggml_tiled_min_batch`).
pub const TILED_BATCH_MIN: usize = 8;

/// The tiled kernel's float steps for one super-block: `s1` (scaled
/// integer dot) times the weight scale, minus `dmin * s2` (fused), then
/// fused into the running sum with the activation scale.
#[inline]
pub(super) fn tiled_step(sum: f32, s1: i32, s2: i32, wd: f32, wmin: Option<f32>, ad: f32) -> f32 {
    let mut r = s1 as f32 * wd;
    if let Some(m) = wmin {
        r = (-m).mul_add(s2 as f32, r);
    }
    r.mul_add(ad, sum)
}

/// One weight row dotted with one activation row, as ggml computes it.
pub(super) fn dot(ty: NativeType, w: &[u8], a: &[BlockQ8K], shape: KShape) -> f32 {
    match (ty, shape) {
        (NativeType::Q2_K | NativeType::Q4_K, KShape::PerBlock | KShape::PerPair) => {
            dot_repacked(ty, w, a, shape == KShape::PerPair)
        }
        (_, KShape::Tiled) => dot_tiled(ty, w, a),
        (_, KShape::PerBlock | KShape::PerPair) => unreachable!("{ty:?} is never repacked"),
        _ => dot_lanes(ty, w, a),
    }
}

/// The exact integer sums of one super-block: `Σ scale·(q·a)` over its
/// sub-blocks (Q6_K's -32 offset included) and `Σ min·bsum` (0 for Q6_K).
fn super_block_sums(ty: NativeType, b: &[u8], y: &BlockQ8K) -> (i32, i32) {
    let q = super_block_ints(ty, b);
    let dot = |e: std::ops::Range<usize>| -> i32 { e.map(|i| q[i] as i32 * y.qs[i] as i32).sum() };
    if ty == NativeType::Q2_K {
        let (sc, mn) = q2_scales_mins(b);
        let s1 = (0..16).map(|s| sc[s] * dot(16 * s..16 * s + 16)).sum();
        let s2 = (0..16).map(|s| mn[s] * y.bsums[s] as i32).sum();
        return (s1, s2);
    }
    if matches!(ty, NativeType::Q6_K | NativeType::Q3_K) {
        let (sc, offset, _) = sixteen(ty, b);
        let s1 = (0..16)
            .map(|s| sc[s] * (dot(16 * s..16 * s + 16) - offset * y.bsums[s] as i32))
            .sum();
        (s1, 0)
    } else {
        let (sc, mn) = scales_mins(&b[4..16]);
        let s1 = (0..8).map(|s| sc[s] * dot(32 * s..32 * s + 32)).sum();
        let s2 = (0..8).map(|s| mn[s] * y.bsum32(s)).sum();
        (s1, s2)
    }
}

/// A K row the way ggml's tiled kernel sums it.
fn dot_tiled(ty: NativeType, w: &[u8], a: &[BlockQ8K]) -> f32 {
    let bb = ty.block_bytes();
    let mut sum = 0f32;
    for (i, y) in a.iter().enumerate() {
        let b = &w[i * bb..(i + 1) * bb];
        let (s1, s2) = super_block_sums(ty, b, y);
        let (wd, wmin) = if matches!(ty, NativeType::Q6_K | NativeType::Q3_K) {
            (sixteen(ty, b).2, None)
        } else if ty == NativeType::Q2_K {
            (f16_at(b, 80), Some(f16_at(b, 82)))
        } else {
            (f16_at(b, 0), Some(f16_at(b, 2)))
        };
        sum = tiled_step(sum, s1, s2, wd, wmin, y.d);
    }
    sum
}

/// A K row as `ggml_vec_dot_q*_K_q8_K` (AVX2) sums it.
fn dot_lanes(ty: NativeType, w: &[u8], a: &[BlockQ8K]) -> f32 {
    let bb = ty.block_bytes();
    match ty {
        NativeType::Q4_K | NativeType::Q5_K => {
            let mut acc = Lanes::default();
            // Q4_K keeps its mins in four float lanes, Q5_K in one scalar.
            let mut mins4 = [0f32; 4];
            let mut summs = 0f32;
            for (i, y) in a.iter().enumerate() {
                let b = &w[i * bb..(i + 1) * bb];
                let d = y.d * f16_at(b, 0);
                let dmin = -y.d * f16_at(b, 2);
                let (sc, mn) = scales_mins(&b[4..16]);
                let prod: [i32; 4] = std::array::from_fn(|k| {
                    mn[2 * k] * y.bsum32(2 * k) + mn[2 * k + 1] * y.bsum32(2 * k + 1)
                });
                if ty == NativeType::Q4_K {
                    for (m, &p) in mins4.iter_mut().zip(&prod) {
                        *m = dmin.mul_add(p as f32, *m);
                    }
                } else {
                    let total = (prod[0] + prod[1]) + (prod[2] + prod[3]);
                    summs = dmin.mul_add(total as f32, summs);
                }
                let q = super_block_ints(ty, b);
                let mut lanes = [0i32; 8];
                for (e, (&qv, &av)) in q.iter().zip(&y.qs).enumerate() {
                    lanes[(e % 32) / 4] += sc[e / 32] * qv as i32 * av as i32;
                }
                acc.fma(d, &lanes);
            }
            if ty == NativeType::Q4_K {
                summs = (mins4[0] + mins4[2]) + (mins4[1] + mins4[3]);
            }
            acc.sum() + summs
        }
        NativeType::Q2_K => {
            let mut acc = Lanes::default();
            for (i, y) in a.iter().enumerate() {
                let b = &w[i * bb..(i + 1) * bb];
                let (sc, mn) = q2_scales_mins(b);
                let d = y.d * f16_at(b, 80);
                let dmin = -y.d * f16_at(b, 82);
                // ggml: the mins first (lane l: sub-blocks 2l, 2l+1), then
                // the scaled quants, one FMA each per lane.
                let mins: [i32; 8] = std::array::from_fn(|l| {
                    mn[2 * l] * y.bsums[2 * l] as i32 + mn[2 * l + 1] * y.bsums[2 * l + 1] as i32
                });
                acc.fma(dmin, &mins);
                let q = super_block_ints(ty, b);
                let mut lanes = [0i32; 8];
                for (e, (&qv, &av)) in q.iter().zip(&y.qs).enumerate() {
                    lanes[(e % 32) / 4] += sc[e / 16] * qv as i32 * av as i32;
                }
                acc.fma(d, &lanes);
            }
            acc.sum()
        }
        NativeType::Q6_K | NativeType::Q3_K => {
            let mut acc = Lanes::default();
            for (i, y) in a.iter().enumerate() {
                let b = &w[i * bb..(i + 1) * bb];
                let (sc, offset, wd) = sixteen(ty, b);
                let d = y.d * wd;
                let q = super_block_ints(ty, b);
                let mut lanes = [0i32; 8];
                // Q3_K's offset goes element by element, in each element's
                // lane (ggml subtracts 4·a where the high bit is clear) ...
                let inline = if ty == NativeType::Q3_K { offset } else { 0 };
                for (e, (&qv, &av)) in q.iter().zip(&y.qs).enumerate() {
                    lanes[(e % 32) / 4] += sc[e / 16] * (qv as i32 - inline) * av as i32;
                }
                // ... Q6_K's through the activation sums: lane l takes
                // sub-blocks 2l and 2l+1 (ggml's q8sclsub).
                if ty == NativeType::Q6_K {
                    for (l, lane) in lanes.iter_mut().enumerate() {
                        let m = y.bsums[2 * l] as i32 * sc[2 * l]
                            + y.bsums[2 * l + 1] as i32 * sc[2 * l + 1];
                        *lane -= m * offset;
                    }
                }
                acc.fma(d, &lanes);
            }
            acc.sum()
        }
        _ => unreachable!("{ty:?} is not a K type"),
    }
}

/// Q4_K or Q2_K the way llama.cpp's repacked kernels sum them (Q4_K on
/// AVX2 CPUs, Q2_K's `q2_K_8x8` on AVX-512 ones): the exact integer sums of
/// quants and of mins per super-block (gemv) or per group (gemm: a pair of
/// Q4_K's 32-element sub-blocks, half of Q2_K's sixteen), one FMA each,
/// the mins' sum subtracted at the end.
fn dot_repacked(ty: NativeType, w: &[u8], a: &[BlockQ8K], per_group: bool) -> f32 {
    // Sub-block length, sub-blocks per gemm group, offset of d (dmin after).
    let (sub_len, group, d_at) = match ty {
        NativeType::Q4_K => (32, 2, 0),
        NativeType::Q2_K => (16, 8, 80),
        _ => unreachable!("{ty:?} is never repacked"),
    };
    let bb = ty.block_bytes();
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (i, y) in a.iter().enumerate() {
        let b = &w[i * bb..(i + 1) * bb];
        let ds = f16_at(b, d_at) * y.d;
        let dm = f16_at(b, d_at + 2) * y.d;
        // Scales and mins per sub-block (Q4_K's eight in the first half).
        let (sc, mn) = if ty == NativeType::Q4_K {
            let (sc, mn) = scales_mins(&b[4..16]);
            let widen = |v: [i32; 8]| -> [i32; 16] { std::array::from_fn(|k| v[k % 8]) };
            (widen(sc), widen(mn))
        } else {
            q2_scales_mins(b)
        };
        let q = super_block_ints(ty, b);
        let (mut s_block, mut m_block) = (0i32, 0i32);
        for g in 0..QK_K / sub_len / group {
            let (mut s, mut m) = (0i32, 0i32);
            for sub in g * group..(g + 1) * group {
                let elems = sub * sub_len..(sub + 1) * sub_len;
                let dot: i32 = elems.map(|e| q[e] as i32 * y.qs[e] as i32).sum();
                s += sc[sub] * dot;
                let bsum: i32 = y.bsums[sub * sub_len / 16..(sub + 1) * sub_len / 16]
                    .iter()
                    .map(|&x| x as i32)
                    .sum();
                m += mn[sub] * bsum;
            }
            if per_group {
                acc = (s as f32).mul_add(ds, acc);
                acc_min = (m as f32).mul_add(dm, acc_min);
            } else {
                s_block += s;
                m_block += m;
            }
        }
        if !per_group {
            acc = (s_block as f32).mul_add(ds, acc);
            acc_min = (m_block as f32).mul_add(dm, acc_min);
        }
    }
    acc - acc_min
}

/// Dequantizes one row of K blocks (ggml's `dequantize_row_q*_K`).
pub(super) fn dequantize_row(ty: NativeType, w: &[u8], out: &mut [f32]) {
    let bb = ty.block_bytes();
    for (i, chunk) in out.chunks_exact_mut(QK_K).enumerate() {
        let b = &w[i * bb..(i + 1) * bb];
        let q = super_block_ints(ty, b);
        if matches!(ty, NativeType::Q6_K | NativeType::Q3_K) {
            let (sc, offset, d) = sixteen(ty, b);
            for (e, o) in chunk.iter_mut().enumerate() {
                *o = d * sc[e / 16] as f32 * (q[e] as i32 - offset) as f32;
            }
        } else if ty == NativeType::Q2_K {
            let (sc, mn) = q2_scales_mins(b);
            let (d, min) = (f16_at(b, 80), f16_at(b, 82));
            for (e, o) in chunk.iter_mut().enumerate() {
                *o = d * sc[e / 16] as f32 * q[e] as f32 - min * mn[e / 16] as f32;
            }
        } else {
            let (d, min) = (f16_at(b, 0), f16_at(b, 2));
            let (sc, mn) = scales_mins(&b[4..16]);
            for (e, o) in chunk.iter_mut().enumerate() {
                let (d1, m1) = (d * sc[e / 32] as f32, min * mn[e / 32] as f32);
                *o = d1 * q[e] as f32 - m1;
            }
        }
    }
}

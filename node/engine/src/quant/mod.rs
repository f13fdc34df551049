//! Quantized matrix products on the CPU, straight from GGUF bytes.
//!
//! candle 0.11 runs Q4_1 (the quant of shoal's test model) with scalar code
//! on x86, about 4x slower than llama.cpp. This module holds shoal's own
//! kernels for the 32-element block types (Q4_0, Q4_1, Q8_0): activations
//! are quantized once per product to 8-bit blocks (ggml's Q8_1 layout), and
//! each weight row is dotted against them with AVX2 where the CPU has it.
//! Weights are read in place from the memory-mapped file: no copy, no
//! repacking, so resident memory is the file's pages this stage touches.
//!
//! Types without a kernel here (K-quants, Q5_*, F16...) go through candle's
//! own CPU kernels; see [`crate::linear`].
//!
//! # Layout
//! - `scalar`: the reference kernels (and the non-x86 path).
//! - `avx2`: the x86 kernels, selected at run time.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod scalar;

use rayon::prelude::*;
use sharding::GgmlType;

/// Elements per block in every type this module runs.
pub const QK: usize = 32;

/// One block of 8-bit activations: ggml's `block_q8_1` with the two halves
/// widened to f32 (they hold f16-rounded values, so products match ggml's).
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct BlockQ8 {
    /// Scale: the block's max |x| / 127.
    pub d: f32,
    /// `d` times the sum of `qs`: lets Q4_1's min be applied per block.
    pub s: f32,
    /// Quantized values.
    pub qs: [i8; QK],
}

/// Weight types with a kernel in this module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum NativeType {
    /// 4-bit, scale only.
    Q4_0,
    /// 4-bit, scale and min.
    Q4_1,
    /// 8-bit.
    Q8_0,
}

impl NativeType {
    /// The native kernel type for a ggml type, if there is one.
    pub fn from_ggml(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::Q4_0 => Some(Self::Q4_0),
            GgmlType::Q4_1 => Some(Self::Q4_1),
            GgmlType::Q8_0 => Some(Self::Q8_0),
            _ => None,
        }
    }

    /// Bytes per 32-element block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// Quantizes `x` (rows of `k` values, `k` a multiple of [`QK`]) to 8-bit blocks.
pub fn quantize_activations(x: &[f32], k: usize) -> Vec<BlockQ8> {
    assert!(
        k.is_multiple_of(QK) && x.len().is_multiple_of(k),
        "bad activation shape"
    );
    let mut out = vec![BlockQ8::default(); x.len() / QK];
    let blocks_per_row = k / QK;
    if x.len() / k >= 4 {
        out.par_chunks_mut(blocks_per_row)
            .zip(x.par_chunks(k))
            .for_each(|(o, row)| scalar::quantize_row(row, o));
    } else {
        scalar::quantize_row(x, &mut out);
    }
    out
}

/// Dequantizes row `row` of a `[rows, k]` weight matrix.
pub fn dequantize_row(ty: NativeType, w: &[u8], k: usize, row: usize, out: &mut [f32]) {
    let row_bytes = k / QK * ty.block_bytes();
    scalar::dequantize_row(ty, &w[row * row_bytes..(row + 1) * row_bytes], out);
}

/// A weight matrix in ggml layout: `n` rows of `k` values, row-major,
/// i.e. GGUF dims `[k, n]`.
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    /// Block type.
    pub ty: NativeType,
    /// The raw blocks, `n * k / 32 * block_bytes` long.
    pub bytes: &'a [u8],
    /// Output features (rows).
    pub n: usize,
    /// Input features (columns).
    pub k: usize,
}

/// Where one product writes: columns `[col, col + n)` of a row-major
/// `[t, stride]` output.
struct OutPtr {
    ptr: *mut f32,
    stride: usize,
    col: usize,
}
// SAFETY: tasks write disjoint columns of the output (see `matmul`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Rows of the weight matrix per parallel task. Small enough that the
/// ~1-2k-row projections of a small model split over a few threads, large
/// enough that rayon's per-task cost (~1 µs) stays under 5% of a task.
const ROWS_PER_TASK: usize = 32;
/// Activation rows sharing one unpacked weight block in the kernel.
const ACT_ROWS_PER_PASS: usize = 4;

/// `out[t, col + j] = Σ_i acts[t, i] · w[j, i]` for each activation row `t`.
///
/// `acts` holds `t` rows of `w.k / 32` blocks; `out` is `[t, out_stride]`.
pub fn matmul(w: WeightView<'_>, acts: &[BlockQ8], out: &mut [f32], out_stride: usize, col: usize) {
    let bpr = w.k / QK;
    let row_bytes = bpr * w.ty.block_bytes();
    assert!(
        w.k.is_multiple_of(QK) && w.bytes.len() == w.n * row_bytes,
        "weight shape"
    );
    assert!(acts.len().is_multiple_of(bpr), "activation shape");
    let t = acts.len() / bpr;
    assert!(
        col + w.n <= out_stride && out.len() >= t * out_stride,
        "output shape"
    );
    let rows: Vec<&[BlockQ8]> = acts.chunks_exact(bpr).collect();
    let dst = OutPtr {
        ptr: out.as_mut_ptr(),
        stride: out_stride,
        col,
    };
    let use_avx2 = simd_available();
    let n_tasks = w.n.div_ceil(ROWS_PER_TASK);
    (0..n_tasks).into_par_iter().for_each(|task| {
        let dst = &dst;
        let weight_rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(w.n);
        // Activation rows outside, weight rows inside: the task's weight rows
        // (~10 KB) and one group of activation rows stay in L1 while every
        // pair is computed. The other order streams all activations from L2
        // once per weight row, which made prompt processing bandwidth-bound.
        let mut r = 0;
        while r < t {
            // Four rows at a time, then two, then one: a batch of two
            // decoding sequences (a pipeline's micro-batch) still shares
            // each unpacked weight block.
            let take = match t - r {
                n if n >= ACT_ROWS_PER_PASS => ACT_ROWS_PER_PASS,
                n if n >= 2 => 2,
                _ => 1,
            };
            for j in weight_rows.clone() {
                let wrow = &w.bytes[j * row_bytes..(j + 1) * row_bytes];
                let mut vals = [0f32; ACT_ROWS_PER_PASS];
                match take {
                    ACT_ROWS_PER_PASS => {
                        let a = [rows[r], rows[r + 1], rows[r + 2], rows[r + 3]];
                        dot_rows(use_avx2, w.ty, wrow, &a, &mut vals);
                    }
                    2 => {
                        let mut two = [0f32; 2];
                        dot_rows(use_avx2, w.ty, wrow, &[rows[r], rows[r + 1]], &mut two);
                        vals[..2].copy_from_slice(&two);
                    }
                    _ => {
                        let mut one = [0f32; 1];
                        dot_rows(use_avx2, w.ty, wrow, &[rows[r]], &mut one);
                        vals[0] = one[0];
                    }
                }
                for (i, v) in vals.iter().take(take).enumerate() {
                    // SAFETY: row `r + i` < t and column `col + j` < stride,
                    // asserted above; each (row, column) is written by the one
                    // task that owns weight row `j`.
                    unsafe { *dst.ptr.add((r + i) * dst.stride + dst.col + j) = *v };
                }
            }
            r += take;
        }
    });
}

#[inline]
fn dot_rows<const R: usize>(
    use_avx2: bool,
    ty: NativeType,
    w: &[u8],
    acts: &[&[BlockQ8]; R],
    out: &mut [f32; R],
) {
    #[cfg(target_arch = "x86_64")]
    if use_avx2 {
        // SAFETY: `use_avx2` comes from `avx2::available()`; shapes were
        // checked by `matmul`.
        unsafe { avx2::dot_rows(ty, w, acts, out) };
        return;
    }
    let _ = use_avx2;
    for (o, a) in out.iter_mut().zip(acts) {
        *o = scalar::dot(ty, w, a);
    }
}

/// Whether the SIMD kernels run on this CPU.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(avx2::available)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn quantize_weights(ty: NativeType, w: &[f32], k: usize) -> Vec<u8> {
        use candle_core::quantized::{GgmlDType, QTensor};
        let dtype = match ty {
            NativeType::Q4_0 => GgmlDType::Q4_0,
            NativeType::Q4_1 => GgmlDType::Q4_1,
            NativeType::Q8_0 => GgmlDType::Q8_0,
        };
        let t = candle_core::Tensor::from_slice(w, (w.len() / k, k), &candle_core::Device::Cpu)
            .unwrap();
        QTensor::quantize(&t, dtype)
            .unwrap()
            .data()
            .unwrap()
            .into_owned()
    }

    fn check(ty: NativeType, n: usize, k: usize, t: usize) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x: Vec<f32> = (0..t * k).map(|_| rng.random_range(-2.0..2.0)).collect();
        let bytes = quantize_weights(ty, &w, k);
        let view = WeightView {
            ty,
            bytes: &bytes,
            n,
            k,
        };
        let acts = quantize_activations(&x, k);
        let mut out = vec![0f32; t * (n + 3)];
        matmul(view, &acts, &mut out, n + 3, 3);
        // Reference: dequantized weights, quantized activations, scalar dot.
        let mut wrow = vec![0f32; k];
        for j in 0..n {
            dequantize_row(ty, &bytes, k, j, &mut wrow);
            for r in 0..t {
                let exact: f32 = (0..k).map(|i| wrow[i] * x[r * k + i]).sum();
                let scalar = scalar::dot(
                    ty,
                    &bytes[j * k / QK * ty.block_bytes()..],
                    &acts[r * k / QK..(r + 1) * k / QK],
                );
                let got = out[r * (n + 3) + 3 + j];
                assert!(
                    (got - scalar).abs() <= 1e-3 * (1.0 + scalar.abs()),
                    "{ty:?} simd {got} vs scalar {scalar}"
                );
                // 8-bit activations cost ~1% relative error on sums of this size.
                assert!(
                    (got - exact).abs() <= 0.05 * (1.0 + exact.abs()) + 0.02 * (k as f32).sqrt(),
                    "{ty:?} {got} vs exact {exact}"
                );
            }
        }
    }

    #[test]
    fn kernels_match_reference() {
        for ty in [NativeType::Q4_0, NativeType::Q4_1, NativeType::Q8_0] {
            for (n, k, t) in [(1, 32, 1), (37, 64, 1), (70, 96, 5), (33, 256, 9)] {
                check(ty, n, k, t);
            }
        }
    }

    #[test]
    fn activation_quantization_matches_ggml_definition() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 10.0).collect();
        let q = quantize_activations(&x, 32);
        assert_eq!(q[0].qs[31], 127);
        assert_eq!(
            q[0].qs[0],
            (-10.0f32 * 127.0 / 21.0).round_ties_even() as i8
        );
        let zero = quantize_activations(&[0.0; 32], 32);
        assert_eq!((zero[0].d, zero[0].s), (0.0, 0.0));
    }
}

//! Quantized matrix products on the CPU, straight from GGUF bytes.
//!
//! shoal's own kernels for the block types people download (Q4_0, Q4_1,
//! Q5_0, Q5_1, Q8_0 and the K types Q4_K, Q5_K, Q6_K): activations are
//! quantized once per product to 8-bit blocks (ggml's Q8_1 layout for the
//! 32-element types, Q8_K for the K types), and each weight row is dotted
//! against them. The arithmetic, down to the order of float additions, is
//! llama.cpp's on x86, so greedy output is the same token for token.
//! Weights are read in place from the memory-mapped file: no copy, no
//! repacking, so resident memory is the file's pages this stage touches.
//!
//! Types without a kernel here (Q2_K, Q3_K, F16...) go through candle's
//! own CPU kernels; see [`crate::linear`].
//!
//! # Layout
//! - `scalar`, `kquant`: the portable kernels, the definition of the bits
//!   (and the path on CPUs without AVX2 and on other architectures).
//! - `avx2`, `kavx2`: the x86 kernels, selected at run time; `krows8`
//!   the K kernels' eight-rows-side-by-side forms; `gemv512` the decode
//!   shapes of Q4_K and Q6_K with AVX-512 VNNI, `gemm512` their prompt
//!   shapes (activations interleaved sixteen rows to a vector).
//! - `family`: which arithmetic family runs (from the CPU, or forced).
//! - `rows`: which float order each row of a K product takes (its own
//!   sequence's, not the batch's), and the products grouped by it.

#[cfg(target_arch = "x86_64")]
mod avx2;
mod family;
#[cfg(target_arch = "x86_64")]
mod gemm512;
#[cfg(target_arch = "x86_64")]
mod gemv512;
#[cfg(target_arch = "x86_64")]
mod kavx2;
mod kquant;
#[cfg(target_arch = "x86_64")]
mod krows8;
mod rows;
mod scalar;

pub use family::{avx512_cpu, force_arithmetic, kernels, simd_available, Kernels};
pub use rows::with_sequence_rows;

pub use kquant::{BlockQ8K, KShape, QK_K};
use rayon::prelude::*;
use sharding::GgmlType;

/// Elements per block of the 32-element types.
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
    /// `-16 ×` the sum of each four consecutive `qs` (the eight lanes of a
    /// 32-byte dot): with VNNI, Q5_0's weights go in unsigned (`q + 16`)
    /// and this starts the sum, so the sign trick's extra step per block
    /// pair is not needed. The integers are the same.
    pub neg16_sums: [i32; 8],
}

/// The scales of eight activation rows for one block, side by side, so the
/// eight-row kernels scale them with one vector op per weight block.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct Scales8 {
    /// Each row's `d`.
    pub d: [f32; 8],
    /// Each row's `s` (`d` times the sum of its quantized values).
    pub s: [f32; 8],
}

/// What the eight-row kernels of the 32-element types take precomputed
/// for one weight row: per block, `d_w · d_a` of each row (read by each
/// row's FMA as a broadcast operand: a multiply per row and block was a
/// fifth of prompt time), and each row's finished `Σ m_w · s_a` (types
/// with a min). The same float operations as per row, in the same order.
pub struct Products8<'a> {
    /// Per block, lane `r` = `d_w · d_a` of row `r`.
    pub prod: &'a [[f32; 8]],
    /// Lane `r` = row `r`'s `Σ m_w · s_a` (zeros for symmetric types).
    pub mins: [f32; 8],
}

/// Weight types with a kernel in this module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)]
pub enum NativeType {
    /// 4-bit, scale only.
    Q4_0,
    /// 4-bit, scale and min.
    Q4_1,
    /// 5-bit, scale only.
    Q5_0,
    /// 5-bit, scale and min.
    Q5_1,
    /// 8-bit.
    Q8_0,
    /// 4-bit super-blocks of 256 with 6-bit sub-block scales and mins.
    Q4_K,
    /// 5-bit super-blocks, Q4_K's scales.
    Q5_K,
    /// 6-bit super-blocks with 8-bit sub-block scales.
    Q6_K,
    /// 3-bit super-blocks (2 bits + a high-bit mask) with 6-bit scales.
    Q3_K,
    /// 2-bit super-blocks with 4-bit scales and mins.
    Q2_K,
}

impl NativeType {
    /// The native kernel type for a ggml type, if there is one.
    pub fn from_ggml(ty: GgmlType) -> Option<Self> {
        match ty {
            GgmlType::Q4_0 => Some(Self::Q4_0),
            GgmlType::Q4_1 => Some(Self::Q4_1),
            GgmlType::Q5_0 => Some(Self::Q5_0),
            GgmlType::Q5_1 => Some(Self::Q5_1),
            GgmlType::Q8_0 => Some(Self::Q8_0),
            GgmlType::Q4_K => Some(Self::Q4_K),
            GgmlType::Q5_K => Some(Self::Q5_K),
            GgmlType::Q6_K => Some(Self::Q6_K),
            GgmlType::Q3_K => Some(Self::Q3_K),
            GgmlType::Q2_K => Some(Self::Q2_K),
            _ => None,
        }
    }

    /// Whether this is a 256-element K type (activations in Q8_K).
    pub fn is_k(self) -> bool {
        matches!(
            self,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K
        )
    }

    /// Elements per block.
    pub fn block_elems(self) -> usize {
        if self.is_k() {
            QK_K
        } else {
            QK
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
            Self::Q3_K => 110,
            Self::Q2_K => 84,
        }
    }
}

/// Activation rows quantized for the weight types of one product.
#[derive(Debug, Default)]
pub struct Activations {
    /// 32-element blocks (empty when no 32-element type needs them).
    pub q8: Vec<BlockQ8>,
    /// 256-element blocks (empty when no K type needs them).
    pub q8k: Vec<BlockQ8K>,
}

impl Activations {
    /// Quantizes `x` (rows of `k` values) to the block kinds asked for.
    pub fn new(x: &[f32], k: usize, q8: bool, q8k: bool) -> Self {
        Activations {
            q8: if q8 {
                quantize_activations(x, k)
            } else {
                Vec::new()
            },
            q8k: if q8k {
                quantize_activations_k(x, k)
            } else {
                Vec::new()
            },
        }
    }
}

/// Quantizes `x` (rows of `k` values, `k` a multiple of [`QK_K`]) to Q8_K blocks.
pub fn quantize_activations_k(x: &[f32], k: usize) -> Vec<BlockQ8K> {
    assert!(
        k.is_multiple_of(QK_K) && x.len().is_multiple_of(k),
        "bad activation shape"
    );
    let mut out = vec![BlockQ8K::default(); x.len() / QK_K];
    if x.len() / k >= 4 {
        out.par_chunks_mut(k / QK_K)
            .zip(x.par_chunks(k))
            .for_each(|(o, row)| kquant::quantize_row_k(row, o));
    } else {
        kquant::quantize_row_k(x, &mut out);
    }
    out
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
    let row_bytes = k / ty.block_elems() * ty.block_bytes();
    let raw = &w[row * row_bytes..(row + 1) * row_bytes];
    if ty.is_k() {
        kquant::dequantize_row(ty, raw, out);
    } else {
        scalar::dequantize_row(ty, raw, out);
    }
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
/// Activation rows sharing one unpacked weight block in the kernel (then
/// four, two, one: groups start at multiples of four, which repacked
/// Q4_K's shape needs).
const ACT_ROWS_PER_PASS: usize = 8;

/// `out[t, col + j] = Σ_i acts[t, i] · w[j, i]` for each activation row `t`.
///
/// `acts` holds `t` rows quantized for `w.ty` (Q8_K blocks for a K type,
/// Q8_1 blocks otherwise); `out` is `[t, out_stride]`.
pub fn matmul(
    w: WeightView<'_>,
    acts: &Activations,
    out: &mut [f32],
    out_stride: usize,
    col: usize,
) {
    if w.ty.is_k() {
        rows::matmul_k(w, &acts.q8k, out, out_stride, col)
    } else {
        matmul_blocks(w, &acts.q8, out, out_stride, col, None)
    }
}

/// An activation block kind and the kernels that take it.
trait ActBlock: Sized + Sync {
    /// Per block, the scales of eight rows side by side (empty where the
    /// kernels do not use them).
    fn scales8(_rows: &[&[Self]]) -> Vec<Scales8> {
        Vec::new()
    }

    /// [`Products8`] of weight row `w` into `prod` (`None` where the kernels
    /// do not use them).
    fn products8<'a>(
        _ty: NativeType,
        _w: &[u8],
        _scales: &[Scales8],
        _prod: &'a mut [[f32; 8]],
    ) -> Option<Products8<'a>> {
        None
    }

    /// Weight rows `0..8` of `w8` (rows of `row_bytes`) against `R`
    /// activation rows at once, where a kernel does that for `ty` in
    /// `shape`; `false` if none does (the caller goes row by row).
    fn dot_rows8<const R: usize>(
        _ty: NativeType,
        _w8: &[u8],
        _row_bytes: usize,
        _acts: &[&[Self]; R],
        _out: &mut [[f32; 8]; R],
        _shape: KShape,
    ) -> bool {
        false
    }

    #[allow(clippy::too_many_arguments)]
    fn dot_rows<const R: usize>(
        use_avx2: bool,
        ty: NativeType,
        w: &[u8],
        acts: &[&[Self]; R],
        out: &mut [f32; R],
        shape: KShape,
        pre: Option<&Products8<'_>>,
    );
}

impl ActBlock for BlockQ8 {
    fn scales8(rows: &[&[Self]]) -> Vec<Scales8> {
        (0..rows[0].len())
            .map(|i| Scales8 {
                d: std::array::from_fn(|r| rows[r][i].d),
                s: std::array::from_fn(|r| rows[r][i].s),
            })
            .collect()
    }

    fn products8<'a>(
        ty: NativeType,
        w: &[u8],
        scales: &[Scales8],
        prod: &'a mut [[f32; 8]],
    ) -> Option<Products8<'a>> {
        // Q5_0 with VNNI loads a correction per row and block already: a
        // third load per pair made it slower (measured), so it multiplies.
        #[cfg(target_arch = "x86_64")]
        if !(scales.is_empty() || ty == NativeType::Q5_0 && avx2::vnni()) {
            // SAFETY: `scales` is only filled where the SIMD kernels run
            // (`matmul_blocks`); `w` holds `scales.len()` blocks.
            let mins = unsafe { avx2::products8(ty, w, scales, prod) };
            return Some(Products8 {
                prod: &prod[..scales.len()],
                mins,
            });
        }
        let _ = (ty, w, scales, prod);
        None
    }

    #[inline]
    fn dot_rows<const R: usize>(
        use_avx2: bool,
        ty: NativeType,
        w: &[u8],
        acts: &[&[Self]; R],
        out: &mut [f32; R],
        shape: KShape,
        pre: Option<&Products8<'_>>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if use_avx2 {
            // SAFETY: `use_avx2` comes from `avx2::available()`; shapes were
            // checked by `matmul_blocks`, `pre` made for this row by `products8`.
            unsafe { avx2::dot_rows(ty, w, acts, out, shape == KShape::PerBlock, pre) };
            return;
        }
        let _ = (use_avx2, pre);
        for (o, a) in out.iter_mut().zip(acts) {
            *o = scalar::dot(ty, w, a, shape == KShape::PerBlock);
        }
    }
}

impl ActBlock for BlockQ8K {
    #[inline]
    fn dot_rows8<const R: usize>(
        ty: NativeType,
        w8: &[u8],
        row_bytes: usize,
        acts: &[&[Self]; R],
        out: &mut [[f32; 8]; R],
        shape: KShape,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        if ty == NativeType::Q4_K && shape == KShape::PerBlock && gemv512::available() {
            // SAFETY: checked by `available`; `w8` holds eight rows of
            // `acts[r].len()` blocks (`matmul_blocks`).
            unsafe { gemv512::q4k_rows8(w8, row_bytes, acts, out) };
            return true;
        }
        let _ = (ty, w8, row_bytes, acts, out, shape);
        false
    }

    #[inline]
    fn dot_rows<const R: usize>(
        use_avx2: bool,
        ty: NativeType,
        w: &[u8],
        acts: &[&[Self]; R],
        out: &mut [f32; R],
        shape: KShape,
        _pre: Option<&Products8<'_>>,
    ) {
        #[cfg(target_arch = "x86_64")]
        if use_avx2 {
            // SAFETY: as above.
            unsafe { kavx2::dot_rows(ty, w, acts, out, shape) };
            return;
        }
        let _ = use_avx2;
        for (o, a) in out.iter_mut().zip(acts) {
            *o = kquant::dot(ty, w, a, shape);
        }
    }
}

/// `shape`: every row's (K types, from [`rows::matmul_k`]); `None`: each
/// row's from its place in the batch.
fn matmul_blocks<B: ActBlock>(
    w: WeightView<'_>,
    acts: &[B],
    out: &mut [f32],
    out_stride: usize,
    col: usize,
    shape: Option<KShape>,
) {
    let bpr = w.k / w.ty.block_elems();
    let row_bytes = bpr * w.ty.block_bytes();
    assert!(
        w.k.is_multiple_of(w.ty.block_elems()) && w.bytes.len() == w.n * row_bytes,
        "weight shape"
    );
    assert!(
        bpr > 0 && acts.len().is_multiple_of(bpr),
        "activation shape"
    );
    let t = acts.len() / bpr;
    assert!(
        col + w.n <= out_stride && out.len() >= t * out_stride,
        "output shape"
    );
    let rows: Vec<&[B]> = acts.chunks_exact(bpr).collect();
    let dst = OutPtr {
        ptr: out.as_mut_ptr(),
        stride: out_stride,
        col,
    };
    let use_avx2 = simd_available();
    // Each full group of eight rows' scales side by side, once for all
    // tasks: for the 32-element types (the K kernels take their scales per
    // super-block), except the symmetric Q4_0 of repacked shape, which has
    // its own order.
    let side_by_side = !w.ty.is_k() && KShape::of(w.ty, w.n, t, 0) != KShape::PerBlock;
    let groups: Vec<Vec<Scales8>> = if use_avx2 && side_by_side {
        rows.chunks_exact(ACT_ROWS_PER_PASS)
            .map(B::scales8)
            .collect()
    } else {
        Vec::new()
    };
    // The K types' float order depends on the matrix and the batch (see
    // `kquant`); for repacked Q4_K on the row's place in the batch, which
    // the grouping below (fours first, then the rest) follows.
    let n_tasks = w.n.div_ceil(ROWS_PER_TASK);
    (0..n_tasks).into_par_iter().for_each(|task| {
        let dst = &dst;
        let mut prod = vec![[0f32; 8]; if groups.is_empty() { 0 } else { bpr }];
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
                n if n >= 4 => 4,
                n if n >= 2 => 2,
                _ => 1,
            };
            let shape = shape.unwrap_or_else(|| KShape::of(w.ty, w.n, t, r));
            // Decode (one to three rows): eight weight rows at a time
            // where a kernel takes them so.
            let first = if take < 4 && use_avx2 {
                rows::decode_rows8(
                    w,
                    row_bytes,
                    &rows[r..r + take],
                    weight_rows.clone(),
                    shape,
                    dst,
                    r,
                )
            } else {
                weight_rows.start
            };
            for j in first..weight_rows.end {
                let wrow = &w.bytes[j * row_bytes..(j + 1) * row_bytes];
                let mut vals = [0f32; ACT_ROWS_PER_PASS];
                match take {
                    8 => {
                        let a: [&[B]; 8] = std::array::from_fn(|i| rows[r + i]);
                        let sc = groups.get(r / ACT_ROWS_PER_PASS).map_or(&[][..], |g| g);
                        let pre = B::products8(w.ty, wrow, sc, &mut prod);
                        B::dot_rows(use_avx2, w.ty, wrow, &a, &mut vals, shape, pre.as_ref());
                    }
                    4 => {
                        let mut four = [0f32; 4];
                        let a = [rows[r], rows[r + 1], rows[r + 2], rows[r + 3]];
                        B::dot_rows(use_avx2, w.ty, wrow, &a, &mut four, shape, None);
                        vals[..4].copy_from_slice(&four);
                    }
                    2 => {
                        let mut two = [0f32; 2];
                        let a = [rows[r], rows[r + 1]];
                        B::dot_rows(use_avx2, w.ty, wrow, &a, &mut two, shape, None);
                        vals[..2].copy_from_slice(&two);
                    }
                    _ => {
                        let mut one = [0f32; 1];
                        B::dot_rows(use_avx2, w.ty, wrow, &[rows[r]], &mut one, shape, None);
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

#[cfg(test)]
mod tests;

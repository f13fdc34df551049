//! Prompt-shaped K products (many activation rows) with AVX-512 VNNI:
//! Q4_K (llama.cpp's repacked gemm order, [`KShape::PerPair`]) and Q6_K
//! (its tiled order, [`KShape::Tiled`]), from the file's layout.
//!
//! The weights stay as the file has them; the *activations* are
//! interleaved instead (they are quantized for each product anyway): for
//! sixteen rows, each four consecutive bytes of every row side by side, so
//! one `vpdpbusd` multiplies four weights (broadcast) by the same four
//! positions of sixteen rows and lane `r` is row `r`'s running sum. No
//! horizontal reduction is left, and each sub-block's float steps are one
//! vector operation for sixteen rows. The integer sums are exact and each
//! lane takes its row's float steps in the definition's order, so the
//! output is bit for bit [`super::kquant`]'s.
//!
//! [`KShape::PerPair`]: super::KShape::PerPair
//! [`KShape::Tiled`]: super::KShape::Tiled

use std::arch::x86_64::*;

use rayon::prelude::*;

use super::avx2::half_at;
use super::kquant::{BlockQ8K, KShape, QK_K, TILED_BATCH_MIN};
use super::{NativeType, OutPtr, WeightView};

/// Activation rows per interleaved group (the lanes of a 512-bit vector).
const LANES: usize = 16;

/// Weight rows per kernel call: each activation vector loaded serves four
/// `vpdpbusd`s (one row at a time: 92 tok/s on Qwen2.5-1.5B's pp128,
/// four: 102).
const WEIGHT_ROWS: usize = 4;

/// Weight rows per parallel task: enough work per task (each row meets
/// every group) that rayon's cost vanishes, few enough that a 1536-row
/// projection still splits over the cores.
const ROWS_PER_TASK: usize = 16;

/// One super-block of sixteen activation rows, interleaved.
#[repr(C, align(64))]
struct Group {
    /// `qs[q]`: bytes `4q..4q+4` of row 0, then of row 1, … row 15.
    qs: [[i8; 64]; QK_K / 4],
    /// Each row's scale (0 for rows past the batch).
    d: [f32; LANES],
    /// Q4_K: per pair of sub-blocks `p`, each row's two 32-element sums
    /// side by side (`[row][2]` as i16).
    bsum32: [[i16; 2 * LANES]; 4],
    /// Q6_K: each row's `Σ_s scale_s · bsum16_s` is not known without the
    /// weights, so the sixteen 16-element sums, `[s][row]` as i32.
    bsum16: [[i32; LANES]; 16],
}

/// Interleaves activation rows (`bpr` super-blocks each) in groups of
/// sixteen: `[group][super-block]`, built in parallel (a prompt's
/// activations are megabytes: built on one thread they were the serial
/// part of each product).
fn interleave(rows: &[&[BlockQ8K]], bpr: usize) -> Vec<Group> {
    let n_groups = rows.len().div_ceil(LANES);
    (0..n_groups * bpr)
        .into_par_iter()
        .map(|at| {
            let (g, i) = (at / bpr, at % bpr);
            let members = &rows[g * LANES..((g + 1) * LANES).min(rows.len())];
            let mut grp = Group {
                qs: [[0; 64]; QK_K / 4],
                d: [0.0; LANES],
                bsum32: [[0; 2 * LANES]; 4],
                bsum16: [[0; LANES]; 16],
            };
            for (r, row) in members.iter().enumerate() {
                let y = &row[i];
                for (q, quad) in grp.qs.iter_mut().enumerate() {
                    quad[4 * r..4 * r + 4].copy_from_slice(&y.qs[4 * q..4 * q + 4]);
                }
                grp.d[r] = y.d;
                for p in 0..4 {
                    grp.bsum32[p][2 * r] = (y.bsum32(2 * p)) as i16;
                    grp.bsum32[p][2 * r + 1] = (y.bsum32(2 * p + 1)) as i16;
                }
                for s in 0..16 {
                    grp.bsum16[s][r] = y.bsums[s] as i32;
                }
            }
            grp
        })
        .collect()
}

/// Whether this module's kernels take `n_rows` rows of shape `shape` of a
/// product of `w` on this CPU.
pub(super) fn takes(w: WeightView<'_>, shape: KShape, n_rows: usize) -> bool {
    let fits = match (w.ty, shape) {
        (NativeType::Q4_K, KShape::PerPair) => true,
        // Tiled rows come eight or more at a time; fewer go row by row.
        (NativeType::Q6_K, KShape::Tiled) => n_rows >= TILED_BATCH_MIN,
        _ => false,
    };
    fits && super::gemv512::available() && super::simd_available()
}

/// Rows `rows` of `acts` (`w.k / 256` blocks each) times `w`, into the
/// same rows of `out` (see [`takes`]).
pub(super) fn matmul_rows(
    w: WeightView<'_>,
    acts: &[BlockQ8K],
    rows: &[usize],
    out: &mut [f32],
    out_stride: usize,
    col: usize,
) {
    let bpr = w.k / QK_K;
    let row_bytes = bpr * w.ty.block_bytes();
    let picked: Vec<&[BlockQ8K]> = rows
        .iter()
        .map(|&r| &acts[r * bpr..(r + 1) * bpr])
        .collect();
    let take = picked.len();
    let groups = interleave(&picked, bpr);
    let dst = OutPtr {
        ptr: out.as_mut_ptr(),
        stride: out_stride,
        col,
    };
    assert!(
        rows.iter().all(|&r| (r + 1) * out_stride <= out.len()) && col + w.n <= out_stride,
        "output shape"
    );
    let q6 = w.ty == NativeType::Q6_K;
    (0..w.n.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .for_each(|task| {
            let dst = &dst;
            let mut lanes = [[0f32; LANES]; WEIGHT_ROWS];
            let task_rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(w.n);
            for (g, group) in groups.chunks_exact(bpr).enumerate() {
                let live = (take - g * LANES).min(LANES);
                let mut j = task_rows.start;
                while j < task_rows.end {
                    // Four weight rows per pass where four are left.
                    let n = if j + WEIGHT_ROWS <= task_rows.end {
                        WEIGHT_ROWS
                    } else {
                        1
                    };
                    let wrows = &w.bytes[j * row_bytes..(j + n) * row_bytes];
                    // SAFETY: `takes` checked the CPU; `wrows` holds `n`
                    // rows of `bpr` blocks, `group` `bpr` super-blocks.
                    unsafe {
                        let mut one = [[0f32; LANES]; 1];
                        match (q6, n == WEIGHT_ROWS) {
                            (true, true) => q6k_tiled(wrows, row_bytes, group, &mut lanes),
                            (true, false) => q6k_tiled(wrows, row_bytes, group, &mut one),
                            (false, true) => q4k_pairs(wrows, row_bytes, group, &mut lanes),
                            (false, false) => q4k_pairs(wrows, row_bytes, group, &mut one),
                        }
                        if n == 1 {
                            lanes[0] = one[0];
                        }
                    }
                    for (v, row) in lanes.iter().take(n).enumerate() {
                        for (r, x) in row.iter().take(live).enumerate() {
                            // SAFETY: output row `rows[g·16 + r]` and column
                            // `col + j + v` are inside `out` (asserted
                            // above); each column is written by the one
                            // task that owns it.
                            let at = rows[g * LANES + r] * dst.stride + dst.col + j + v;
                            unsafe { *dst.ptr.add(at) = *x };
                        }
                    }
                    j += n;
                }
            }
        });
}

/// `Σ` over the 4-byte quads `first..first + n` of each of `W` rows'
/// `codes` (unsigned, 0..63) times the group's activations, per row lane:
/// each activation vector loaded once for the `W` weight rows.
#[inline(always)]
unsafe fn quads<const W: usize>(
    codes: &[[u8; QK_K]; W],
    grp: &Group,
    first: usize,
    n: usize,
) -> [__m512i; W] {
    let mut acc = [_mm512_setzero_si512(); W];
    for q in first..first + n {
        let a = _mm512_load_si512(grp.qs[q].as_ptr() as *const _);
        for (acc, c) in acc.iter_mut().zip(codes) {
            let wq = _mm512_set1_epi32((c.as_ptr().add(4 * q) as *const i32).read_unaligned());
            *acc = _mm512_dpbusd_epi32(*acc, wq, a);
        }
    }
    acc
}

/// Repacked Q4_K's gemm order for sixteen rows: per pair of sub-blocks,
/// the exact sums, one FMA with `d·d_a` and one with `dmin·d_a`; `W`
/// weight rows (`row_bytes` apart) at once.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_pairs<const W: usize>(
    w: &[u8],
    row_bytes: usize,
    groups: &[Group],
    out: &mut [[f32; LANES]; W],
) {
    let m4 = _mm256_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); W];
    let mut acc_min = [_mm512_setzero_ps(); W];
    let mut codes = [[0u8; QK_K]; W];
    for (i, grp) in groups.iter().enumerate() {
        let yd = _mm512_load_ps(grp.d.as_ptr());
        let mut sc = [[0i32; 8]; W];
        let mut mn = [[0i32; 8]; W];
        let mut wdyd = [_mm512_setzero_ps(); W];
        let mut wmyd = [_mm512_setzero_ps(); W];
        for v in 0..W {
            let at = v * row_bytes + i * 144;
            let blk = w.as_ptr().add(at);
            (sc[v], mn[v]) = super::kquant::scales_mins(&w[at + 4..at + 16]);
            wdyd[v] = _mm512_mul_ps(_mm512_set1_ps(half_at(blk)), yd);
            wmyd[v] = _mm512_mul_ps(_mm512_set1_ps(half_at(blk.add(2))), yd);
            for p in 0..4 {
                let raw = _mm256_loadu_si256(blk.add(16 + 32 * p) as *const _);
                let c = codes[v].as_mut_ptr().add(64 * p);
                _mm256_storeu_si256(c as *mut _, _mm256_and_si256(raw, m4));
                _mm256_storeu_si256(
                    c.add(32) as *mut _,
                    _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4),
                );
            }
        }
        for p in 0..4 {
            let lo = quads::<W>(&codes, grp, 16 * p, 8);
            let hi = quads::<W>(&codes, grp, 16 * p + 8, 8);
            let bsum = _mm512_load_si512(grp.bsum32[p].as_ptr() as *const _);
            for v in 0..W {
                let s = _mm512_add_epi32(
                    _mm512_mullo_epi32(lo[v], _mm512_set1_epi32(sc[v][2 * p])),
                    _mm512_mullo_epi32(hi[v], _mm512_set1_epi32(sc[v][2 * p + 1])),
                );
                let pair_mins = (mn[v][2 * p] & 0xFFFF) | (mn[v][2 * p + 1] << 16);
                let m = _mm512_madd_epi16(bsum, _mm512_set1_epi32(pair_mins));
                acc[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), wdyd[v], acc[v]);
                acc_min[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(m), wmyd[v], acc_min[v]);
            }
        }
    }
    for v in 0..W {
        _mm512_storeu_ps(out[v].as_mut_ptr(), _mm512_sub_ps(acc[v], acc_min[v]));
    }
}

/// Q6_K in ggml's tiled order for sixteen rows: per super-block the exact
/// `Σ scale·(q − 32)·a`, times `d`, then one FMA with `d_a`; `W` weight
/// rows (`row_bytes` apart) at once.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k_tiled<const W: usize>(
    w: &[u8],
    row_bytes: usize,
    groups: &[Group],
    out: &mut [[f32; LANES]; W],
) {
    let m4 = _mm256_set1_epi8(0x0F);
    let m2 = _mm256_set1_epi8(0x30);
    let mut sum = [_mm512_setzero_ps(); W];
    let mut codes = [[0u8; QK_K]; W];
    for (i, grp) in groups.iter().enumerate() {
        for (v, codes) in codes.iter_mut().enumerate() {
            let p = w.as_ptr().add(v * row_bytes + i * 210);
            q6k_codes(p, codes, m4, m2);
        }
        let mut s = [_mm512_setzero_si512(); W];
        for sub in 0..16 {
            let dot = quads::<W>(&codes, grp, 4 * sub, 4);
            let bsum = _mm512_load_si512(grp.bsum16[sub].as_ptr() as *const _);
            let offset = _mm512_slli_epi32(bsum, 5);
            for v in 0..W {
                let scale = *w.as_ptr().add(v * row_bytes + i * 210 + 192 + sub) as i8 as i32;
                let centred = _mm512_sub_epi32(dot[v], offset);
                s[v] =
                    _mm512_add_epi32(s[v], _mm512_mullo_epi32(centred, _mm512_set1_epi32(scale)));
            }
        }
        let yd = _mm512_load_ps(grp.d.as_ptr());
        for v in 0..W {
            let wd = half_at(w.as_ptr().add(v * row_bytes + i * 210 + 208));
            let r = _mm512_mul_ps(_mm512_cvtepi32_ps(s[v]), _mm512_set1_ps(wd));
            sum[v] = _mm512_fmadd_ps(r, yd, sum[v]);
        }
    }
    for v in 0..W {
        _mm512_storeu_ps(out[v].as_mut_ptr(), sum[v]);
    }
}

/// The 256 six-bit codes of the Q6_K block at `p`, in element order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_codes(p: *const u8, codes: &mut [u8; QK_K], m4: __m256i, m2: __m256i) {
    for j in 0..2 {
        let ql1 = _mm256_loadu_si256(p.add(64 * j) as *const _);
        let ql2 = _mm256_loadu_si256(p.add(64 * j + 32) as *const _);
        let qh = _mm256_loadu_si256(p.add(128 + 32 * j) as *const _);
        let c = codes.as_mut_ptr().add(128 * j);
        let parts = [
            (_mm256_and_si256(ql1, m4), _mm256_slli_epi16(qh, 4)),
            (_mm256_and_si256(ql2, m4), _mm256_slli_epi16(qh, 2)),
            (_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4), qh),
            (
                _mm256_and_si256(_mm256_srli_epi16(ql2, 4), m4),
                _mm256_srli_epi16(qh, 2),
            ),
        ];
        for (k, (low, high)) in parts.into_iter().enumerate() {
            let v = _mm256_or_si256(low, _mm256_and_si256(high, m2));
            _mm256_storeu_si256(c.add(32 * k) as *mut _, v);
        }
    }
}

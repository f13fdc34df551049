//! Decode-shaped K products (one to three activation rows) with AVX-512
//! BW/VNNI: the two weight types of a Q4_K_M file, Q4_K and Q6_K, from the
//! file's own layout (no repacked copy).
//!
//! At one activation row the AVX2 kernels spent more time around the
//! integer dot than in it: unpacking scales into arrays, reducing each
//! row's eight lanes, broadcasting scalars (perf on Qwen2.5-1.5B: 81 % of a
//! token in the two K kernels). Here a 512-bit vector covers 64 weights
//! (two Q4_K sub-blocks, four Q6_K ones), so a super-block is four
//! `maddubs` + `vpdpwssd` pairs per activation row; Q4_K takes eight weight
//! rows at a time so its reductions, mins and float steps are one vector
//! operation for all eight, and the activation super-block stays in
//! registers across them.
//!
//! The integer sums are exact, so only the float steps fix the bits: they
//! are those of [`super::kquant`]'s definition for the shape llama.cpp
//! uses at these batch sizes ([`KShape::PerBlock`] for repacked Q4_K, one
//! FMA per super-block; [`KShape::Lanes`] for Q6_K, eight lanes summed at
//! the end), so the output is the same to the bit.
//!
//! [`KShape::PerBlock`]: super::KShape::PerBlock
//! [`KShape::Lanes`]: super::KShape::Lanes

use std::arch::x86_64::*;

use super::avx2::{half_at, hsum, hsum8_i32};
use super::kquant::BlockQ8K;
use super::krows8::transpose_8x4;

/// Whether these kernels run on this CPU (AVX-512 F/BW/VL and VNNI, plus
/// the AVX2/FMA/F16C the float steps use).
pub(super) fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| {
        super::avx2::available()
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// How far ahead Q6_K's row walk prefetches.
const Q6K_PREFETCH_BYTES: usize = 2048;

/// Byte offset of `qs` in a [`BlockQ8K`] (after the f32 scale).
const Q8K_QS: usize = 4;

#[inline(always)]
unsafe fn act_qs(y: &BlockQ8K) -> *const u8 {
    (y as *const BlockQ8K as *const u8).add(Q8K_QS)
}

/// Q4_K's eight 6-bit scales and eight mins of the super-block at `p`, as
/// two u64 of bytes (ggml's `kmask` unpacking: the same numbers as
/// [`super::kquant::scales_mins`]).
#[inline(always)]
unsafe fn q4k_scales_mins(p: *const u8) -> (u64, u64) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let s = p.add(4);
    let u0 = (s as *const u32).read_unaligned();
    let u1 = (s.add(4) as *const u32).read_unaligned();
    let u2 = (s.add(8) as *const u32).read_unaligned();
    let sc_lo = u0 & KMASK1;
    let sc_hi = (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4);
    let mn_lo = u1 & KMASK1;
    let mn_hi = ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4);
    (
        sc_lo as u64 | (sc_hi as u64) << 32,
        mn_lo as u64 | (mn_hi as u64) << 32,
    )
}

/// Q4_K, [`super::KShape::PerBlock`]: weight rows `0..8` of `w` (rows of
/// `row_bytes`, `nb` super-blocks each) against `R` activation rows;
/// `out[r][j]` = row `j` dotted with activation row `r`.
///
/// # Safety
/// [`available`] must hold; `w` must hold eight rows of `nb` Q4_K blocks
/// and each `acts[r]` `nb` blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q4k_rows8<const R: usize>(
    w: &[u8],
    row_bytes: usize,
    acts: &[&[BlockQ8K]; R],
    out: &mut [[f32; 8]; R],
) {
    let nb = acts[0].len();
    debug_assert!(w.len() >= 7 * row_bytes + nb * 144);
    let m4 = _mm512_set1_epi8(0x0F);
    // Low half of a pair's vector: low nibbles (its first sub-block);
    // high half: high nibbles (its second).
    let nibble_shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    // Per pair p, the i16 lanes' scale: sub-block 2p (lanes 0..16) and
    // 2p+1 (16..32), picked from the eight scales widened to i16 and
    // repeated in each 128-bit lane.
    let mut pick = [_mm512_setzero_si512(); 4];
    for (p, v) in pick.iter_mut().enumerate() {
        // Bytes of the i16 scale of sub-block 2p (first 32 bytes) and 2p+1.
        let idx: [u8; 64] = std::array::from_fn(|b| (4 * p + 2 * (b / 32) + b % 2) as u8);
        *v = _mm512_loadu_si512(idx.as_ptr() as *const _);
    }
    let offsets = _mm256_setr_epi32(
        0,
        row_bytes as i32,
        2 * row_bytes as i32,
        3 * row_bytes as i32,
        4 * row_bytes as i32,
        5 * row_bytes as i32,
        6 * row_bytes as i32,
        7 * row_bytes as i32,
    );
    let mut acc = [_mm256_setzero_ps(); R];
    let mut acc_min = [_mm256_setzero_ps(); R];
    for i in 0..nb {
        let base = w.as_ptr().add(i * 144);
        // The activation super-block(s), in registers for all eight rows,
        // and each one's sums of its eight 32-element sub-blocks. (Loops,
        // not `array::from_fn`: closures do not inherit target features,
        // and intrinsics outside them are calls.)
        let mut a = [[_mm512_setzero_si512(); 4]; R];
        let mut bsum32 = [_mm_setzero_si128(); R];
        for r in 0..R {
            let y = acts[r].get_unchecked(i);
            let q = act_qs(y);
            for (p, v) in a[r].iter_mut().enumerate() {
                *v = _mm512_loadu_si512(q.add(64 * p) as *const _);
            }
            let b = y.bsums.as_ptr() as *const __m128i;
            bsum32[r] = _mm_hadd_epi16(_mm_loadu_si128(b), _mm_loadu_si128(b.add(1)));
        }
        let mut sums = [[_mm256_setzero_si256(); 8]; R];
        let mut mins = [[_mm_setzero_si128(); 8]; R];
        for j in 0..8 {
            let blk = base.add(j * row_bytes);
            // The same block of the next eight rows: this visits eight
            // rows' blocks in turn, an order the hardware prefetchers do
            // not follow (without it the loads stalled half the time).
            let ahead = blk.wrapping_add(16 * row_bytes);
            _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(143) as *const i8);
            let (sc, mn) = q4k_scales_mins(blk);
            let sc16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64));
            let sc_all = _mm512_broadcast_i32x4(sc16);
            let mn16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64));
            let qs = blk.add(16);
            let mut s = [_mm512_setzero_si512(); R];
            for p in 0..4 {
                let raw = _mm512_broadcast_i64x4(_mm256_loadu_si256(qs.add(32 * p) as *const _));
                let q = _mm512_and_si512(_mm512_srlv_epi16(raw, nibble_shift), m4);
                let scale = _mm512_shuffle_epi8(sc_all, pick[p]);
                for r in 0..R {
                    let prod = _mm512_maddubs_epi16(q, a[r][p]);
                    s[r] = _mm512_dpwssd_epi32(s[r], prod, scale);
                }
            }
            for r in 0..R {
                sums[r][j] = _mm256_add_epi32(
                    _mm512_castsi512_si256(s[r]),
                    _mm512_extracti64x4_epi64(s[r], 1),
                );
                mins[r][j] = _mm_madd_epi16(mn16, bsum32[r]);
            }
        }
        // The eight rows' d and dmin (f16 pairs at the block's start).
        let dm = _mm256_i32gather_epi32::<1>(base as *const i32, offsets);
        let wd = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(dm));
        let wmin = _mm256_cvtph_ps(_mm256_cvtepi32_epi16(_mm256_srli_epi32(dm, 16)));
        for r in 0..R {
            let yd = _mm256_set1_ps(acts[r].get_unchecked(i).d);
            let s8 = hsum8_i32(&sums[r]);
            let m = transpose_8x4(&mins[r]);
            let m8 = _mm256_add_epi32(_mm256_add_epi32(m[0], m[1]), _mm256_add_epi32(m[2], m[3]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s8), _mm256_mul_ps(wd, yd), acc[r]);
            acc_min[r] =
                _mm256_fmadd_ps(_mm256_cvtepi32_ps(m8), _mm256_mul_ps(wmin, yd), acc_min[r]);
        }
    }
    for r in 0..R {
        _mm256_storeu_ps(out[r].as_mut_ptr(), _mm256_sub_ps(acc[r], acc_min[r]));
    }
}

/// Q6_K, [`super::KShape::Lanes`]: one weight row against `R` activation
/// rows (ggml's `ggml_vec_dot_q6_K_q8_K` lanes and float order).
///
/// # Safety
/// [`available`] must hold; `w` must hold `acts[r].len()` Q6_K blocks.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn q6k_row<const R: usize>(
    w: &[u8],
    acts: &[&[BlockQ8K]; R],
    out: &mut [f32; R],
) {
    let nb = acts[0].len();
    debug_assert!(w.len() >= nb * 210);
    let m4 = _mm512_set1_epi8(0x0F);
    let m2lo = _mm512_set1_epi8(0x30);
    // Per 64-code vector c, its four 16-element sub-blocks' scales, each
    // over eight i16 lanes.
    let mut pick = [_mm512_setzero_si512(); 4];
    for (c, v) in pick.iter_mut().enumerate() {
        let idx: [i16; 32] = std::array::from_fn(|l| (4 * c + l / 8) as i16);
        *v = _mm512_loadu_si512(idx.as_ptr() as *const _);
    }
    // The high bits: shifted by 0 (low half) / 2 (high half) of each vector.
    let qh_shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    let mut acc = [_mm256_setzero_ps(); R];
    for i in 0..nb {
        let p = w.as_ptr().add(i * 210);
        let ahead = p.wrapping_add(Q6K_PREFETCH_BYTES);
        for line in [0, 64, 128, 192] {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line) as *const i8);
        }
        let wd = half_at(p.add(208));
        let scales16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(192) as *const _));
        let scales_all = _mm512_castsi256_si512(scales16);
        let mut s = [_mm512_setzero_si512(); R];
        for j in 0..2 {
            let ql = _mm512_loadu_si512(p.add(64 * j) as *const _);
            let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(128 + 32 * j) as *const _));
            let t = _mm512_srlv_epi16(qh, qh_shift);
            // Elements 128j + 0..64: low nibbles, high bits 0-1 / 2-3.
            let lo = _mm512_or_si512(
                _mm512_and_si512(ql, m4),
                _mm512_and_si512(_mm512_slli_epi16(t, 4), m2lo),
            );
            // Elements 128j + 64..128: high nibbles, high bits 4-5 / 6-7.
            let hi = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                _mm512_and_si512(t, m2lo),
            );
            for (c, q) in [(2 * j, lo), (2 * j + 1, hi)] {
                let scale = _mm512_permutexvar_epi16(pick[c], scales_all);
                for r in 0..R {
                    let a = _mm512_loadu_si512(
                        act_qs(acts[r].get_unchecked(i)).add(64 * c) as *const _
                    );
                    s[r] = _mm512_dpwssd_epi32(s[r], _mm512_maddubs_epi16(q, a), scale);
                }
            }
        }
        for r in 0..R {
            let y = acts[r].get_unchecked(i);
            // Lane l: elements with (e % 32) / 4 == l, as ggml's eight lanes.
            let lanes = _mm256_add_epi32(
                _mm512_castsi512_si256(s[r]),
                _mm512_extracti64x4_epi64(s[r], 1),
            );
            let bsums = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
            let sub = _mm256_slli_epi32(_mm256_madd_epi16(bsums, scales16), 5);
            let sumi = _mm256_sub_epi32(lanes, sub);
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(y.d * wd), _mm256_cvtepi32_ps(sumi), acc[r]);
        }
    }
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
}

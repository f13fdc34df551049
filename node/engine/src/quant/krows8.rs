//! The K kernels' eight-row forms: eight activation rows side by side in
//! one vector (lane `r` = row `r`), so the per-row reductions and the
//! per-row float steps of one super-block are one operation for all
//! eight. Each lane does what the row's scalar code does, in the same
//! order: the same bits.

use std::arch::x86_64::*;

use super::avx2::hsum8_i32;
use super::kavx2::{acc_scaled, nibbles};
use super::kquant::{scales_mins, BlockQ8K};
use super::scalar::f16_at;

/// Lane `r` = row `r`'s super-block scale `d` (eight rows side by side).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn d8<const R: usize>(acts: &[&[BlockQ8K]; R], i: usize) -> __m256 {
    let d: [f32; 8] = std::array::from_fn(|r| acts[r % R].get_unchecked(i).d);
    _mm256_loadu_ps(d.as_ptr())
}

/// The eight per-row `sumi` (i32 lanes) as one vector of their sums.
#[inline(always)]
pub(super) unsafe fn sums8<const R: usize>(sumi: &[__m256i; R]) -> __m256i {
    hsum8_i32(&std::array::from_fn(|r| sumi[r % R]))
}

/// Q4_K/Q5_K's `Σ_s min_s · bsum32_s` per pair of sub-blocks of one row:
/// `[pair 0, 1, 2, 3]` (exact integers).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn pair_mins(y: &BlockQ8K, mn16: __m256i) -> __m128i {
    let bsums = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
    let per32 = _mm256_madd_epi16(bsums, mn16);
    let pairs = _mm256_hadd_epi32(per32, per32);
    _mm256_castsi256_si128(_mm256_permute4x64_epi64(pairs, 0b1000))
}

/// Each sub-block's 6-bit min for each of its 16-element halves, as i16.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn mins16(mn: &[i32; 8]) -> __m256i {
    let m: [i16; 16] = std::array::from_fn(|s| mn[s / 2] as i16);
    _mm256_loadu_si256(m.as_ptr() as *const __m256i)
}

/// `[rows 0..8][pairs 0..4]` → `[pairs][rows]`: lane `r` of vector `p` is
/// row `r`'s pair `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn transpose_8x4(m: &[__m128i; 8]) -> [__m256i; 4] {
    let x: [__m256i; 4] = std::array::from_fn(|r| _mm256_set_m128i(m[r + 4], m[r]));
    let t0 = _mm256_unpacklo_epi32(x[0], x[1]);
    let t1 = _mm256_unpackhi_epi32(x[0], x[1]);
    let t2 = _mm256_unpacklo_epi32(x[2], x[3]);
    let t3 = _mm256_unpackhi_epi32(x[2], x[3]);
    [
        _mm256_unpacklo_epi64(t0, t2),
        _mm256_unpackhi_epi64(t0, t2),
        _mm256_unpacklo_epi64(t1, t3),
        _mm256_unpackhi_epi64(t1, t3),
    ]
}

/// Lane `r` of `v` to `out[r]` (`R` is 8 where this is called).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn store8<const R: usize>(v: __m256, out: &mut [f32; R]) {
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), v);
    out.copy_from_slice(&lanes[..R]);
}

/// [`super::kquant::tiled_step`] for eight rows side by side (the same operations per lane).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tiled_step8(
    sum: __m256,
    s1: __m256i,
    s2: Option<__m256i>,
    wd: f32,
    wmin: f32,
    yd: __m256,
) -> __m256 {
    let mut r = _mm256_mul_ps(_mm256_cvtepi32_ps(s1), _mm256_set1_ps(wd));
    if let Some(s2) = s2 {
        r = _mm256_fmadd_ps(_mm256_set1_ps(-wmin), _mm256_cvtepi32_ps(s2), r);
    }
    _mm256_fmadd_ps(r, yd, sum)
}

/// Repacked Q4_K's gemm for eight rows side by side: the per-pair sums
/// reduced together and the per-row FMAs as one vector FMA (lane `r` is
/// row `r`'s scalar FMA, in the same order).
#[inline(always)]
pub(super) unsafe fn q4k_pairs8<const R: usize, const VNNI: bool>(
    w: &[u8],
    acts: &[&[BlockQ8K]; R],
    out: &mut [f32; R],
) {
    let mut acc = _mm256_setzero_ps();
    let mut acc_min = _mm256_setzero_ps();
    for i in 0..acts[0].len() {
        let blk = &w[i * 144..(i + 1) * 144];
        let (sc, mn) = scales_mins(&blk[4..16]);
        let (wd, wmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let yd = d8(acts, i);
        let (wdyd, wmyd) = (
            _mm256_mul_ps(_mm256_set1_ps(wd), yd),
            _mm256_mul_ps(_mm256_set1_ps(wmin), yd),
        );
        let mn16 = mins16(&mn);
        let rows_m: [__m128i; 8] =
            std::array::from_fn(|r| pair_mins(acts[r % R].get_unchecked(i), mn16));
        let m = transpose_8x4(&rows_m);
        let qs = blk.as_ptr().add(16);
        for pair in 0..4 {
            let (lo, hi) = nibbles(qs.add(32 * pair), _mm256_setzero_si256(), None);
            let (s_lo, s_hi) = (
                _mm256_set1_epi16(sc[2 * pair] as i16),
                _mm256_set1_epi16(sc[2 * pair + 1] as i16),
            );
            let p: [__m256i; R] = std::array::from_fn(|r| {
                let a = acts[r].get_unchecked(i).qs.as_ptr().add(64 * pair);
                let p = acc_scaled::<VNNI>(_mm256_setzero_si256(), lo, a, s_lo);
                acc_scaled::<VNNI>(p, hi, a.add(32), s_hi)
            });
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums8(&p)), wdyd, acc);
            acc_min = _mm256_fmadd_ps(_mm256_cvtepi32_ps(m[pair]), wmyd, acc_min);
        }
    }
    store8(_mm256_sub_ps(acc, acc_min), out);
}

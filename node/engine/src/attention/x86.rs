//! The AVX2/F16C (and AVX-512) versions of attention's f16 vector loops:
//! the same operations in the same order per element, so the same bits.

use half::f16;
use half::slice::HalfFloatSliceExt;
use std::arch::x86_64::*;

use super::KV_TILE;

/// Rows of one head through [`super::attend_row_tiled`]'s arithmetic;
/// row `i` of `qs` sees the first `first_keys + i + 1` keys.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn tiled_block(
    qs: &[f32],
    k: &[f16],
    v: &[f16],
    hd: usize,
    first: usize,
    scale: f32,
    out: &mut [f32],
) {
    let rows = qs.len() / hd;
    let keys = k.len() / hd;
    let mut kt = vec![0f32; hd * KV_TILE]; // [d][key]
    let mut vt = vec![0f32; KV_TILE * hd]; // [key][d]
    let mut row_k = vec![0f32; KV_TILE * hd];
    let mut max = vec![f32::NEG_INFINITY; rows];
    let mut sum = vec![0f32; rows];
    out.fill(0.0);
    let mut start = 0;
    while start < keys {
        let n_tile = (keys - start).min(KV_TILE);
        k[start * hd..(start + n_tile) * hd].convert_to_f32_slice(&mut row_k[..n_tile * hd]);
        v[start * hd..(start + n_tile) * hd].convert_to_f32_slice(&mut vt[..n_tile * hd]);
        for j in 0..n_tile {
            for d in 0..hd {
                kt[d * KV_TILE + j] = row_k[j * hd + d];
            }
        }
        for i in 0..rows {
            let seen = first + i + 1;
            if seen <= start {
                continue;
            }
            let n = (seen - start).min(n_tile);
            let q = &qs[i * hd..(i + 1) * hd];
            let mut scores = [0f32; KV_TILE];
            for (d, &x) in q.iter().enumerate() {
                let col = &kt[d * KV_TILE..d * KV_TILE + KV_TILE];
                for j in 0..KV_TILE {
                    scores[j] = x.mul_add(col[j], scores[j]);
                }
            }
            for sc in &mut scores[..n] {
                *sc *= scale;
            }
            let tile_max = scores[..n]
                .iter()
                .cloned()
                .fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[i].max(tile_max);
            let acc = &mut out[i * hd..(i + 1) * hd];
            if new_max > max[i] {
                let ms = (max[i] - new_max).exp();
                acc.iter_mut().for_each(|a| *a *= ms);
                sum[i] *= ms;
            }
            max[i] = new_max;
            let mut tile_sum = 0f64;
            for sc in scores[..n].iter_mut() {
                *sc = (*sc - new_max).exp();
                tile_sum += *sc as f64;
            }
            sum[i] += tile_sum as f32;
            for (p, vrow) in scores[..n].iter().zip(vt.chunks_exact(hd)) {
                for (a, &x) in acc.iter_mut().zip(vrow) {
                    *a = p.mul_add(x, *a);
                }
            }
        }
        start += n_tile;
    }
    for i in 0..rows {
        let inv = if sum[i] == 0.0 { 0.0 } else { 1.0 / sum[i] };
        out[i * hd..(i + 1) * hd].iter_mut().for_each(|a| *a *= inv);
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load(p: &[f16], i: usize) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.as_ptr().add(i) as *const __m128i))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store(p: &mut [f16], i: usize, v: __m256) {
    let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
    _mm_storeu_si128(p.as_mut_ptr().add(i) as *mut __m128i, h);
}

/// ggml's `ggml_vec_dot_f16` as built for AVX-512 (without FP16): four
/// 16-lane accumulators, reduced pairwise, then GCC's
/// `_mm512_reduce_add_ps` tree; the tail in f64.
#[target_feature(enable = "avx512f,avx512dq,avx2,fma,f16c")]
pub(super) unsafe fn dot_f16_avx512(a: &[f16], b: &[f16]) -> f32 {
    let n = a.len().min(b.len());
    let load16 = |p: &[f16], i: usize| {
        _mm512_cvtph_ps(_mm256_loadu_si256(p.as_ptr().add(i) as *const __m256i))
    };
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (j, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_fmadd_ps(load16(a, i + j * 16), load16(b, i + j * 16), *acc);
        }
        i += 64;
    }
    let x0 = _mm512_add_ps(acc[0], acc[2]);
    let x1 = _mm512_add_ps(acc[1], acc[3]);
    let x = _mm512_add_ps(x0, x1);
    let t3 = _mm256_add_ps(_mm512_extractf32x8_ps::<1>(x), _mm512_castps512_ps256(x));
    let t6 = _mm_add_ps(_mm256_extractf128_ps::<1>(t3), _mm256_castps256_ps128(t3));
    let t8 = _mm_add_ps(t6, _mm_shuffle_ps::<0b01_00_11_10>(t6, t6));
    let mut lanes = [0f32; 4];
    _mm_storeu_ps(lanes.as_mut_ptr(), t8);
    let mut total = (lanes[0] + lanes[1]) as f64;
    for j in i..n {
        total += (a[j].to_f32() * b[j].to_f32()) as f64;
    }
    total as f32
}

/// Lanes of `(acc0 + acc2) + (acc1 + acc3)` over `a.len()` (a multiple of 32).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn dot_f16_lanes(a: &[f16], b: &[f16]) -> [f32; 8] {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= a.len() {
        for (j, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_fmadd_ps(load(a, i + j * 8), load(b, i + j * 8), *acc);
        }
        i += 32;
    }
    let r = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), r);
    out
}

/// The 8-aligned prefix of [`super::scale_f16`]; returns its length.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn scale_f16(acc: &mut [f16], s: f32) -> usize {
    let sv = _mm256_set1_ps(s);
    let mut i = 0;
    while i + 8 <= acc.len() {
        store(acc, i, _mm256_mul_ps(load(acc, i), sv));
        i += 8;
    }
    i
}

/// The 8-aligned prefix of [`super::mad_f16`]; returns its length.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn mad_f16(acc: &mut [f16], v: &[f16], s: f32) -> usize {
    let sv = _mm256_set1_ps(s);
    let mut i = 0;
    while i + 8 <= acc.len() && i + 8 <= v.len() {
        store(acc, i, _mm256_fmadd_ps(load(v, i), sv, load(acc, i)));
        i += 8;
    }
    i
}

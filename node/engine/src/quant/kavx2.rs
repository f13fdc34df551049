//! AVX2 kernels for the K types: the arithmetic of [`super::kquant`]'s
//! portable kernels (ggml's), with each weight super-block unpacked once
//! and used for `R` activation rows.

use std::arch::x86_64::*;

use super::avx2::{hsum, hsum_i32};
use super::kquant::{q2_scales_mins, scales_mins, sixteen, tiled_step, BlockQ8K, KShape};
use super::krows8::{d8, mins16, pair_mins, q4k_pairs8, store8, sums8, tiled_step8, transpose_8x4};
use super::scalar::f16_at;
use super::NativeType;

/// `out[r] = dot(w, acts[r])` for one weight row of K blocks.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` must hold `acts[r].len()`
/// blocks of `ty` for every `r`.
#[inline]
pub(super) unsafe fn dot_rows<const R: usize>(
    ty: NativeType,
    w: &[u8],
    acts: &[&[BlockQ8K]; R],
    out: &mut [f32; R],
    shape: KShape,
) {
    for a in acts {
        debug_assert!(w.len() >= a.len() * ty.block_bytes());
    }
    let tiled = shape == KShape::Tiled;
    match (ty, shape) {
        (NativeType::Q2_K, _) => q2k(w, acts, out, shape),
        (NativeType::Q4_K, KShape::PerBlock | KShape::PerPair) => {
            q4k_repacked(w, acts, out, shape == KShape::PerPair)
        }
        (_, KShape::PerBlock | KShape::PerPair) => unreachable!("{ty:?} is never repacked"),
        (NativeType::Q4_K | NativeType::Q5_K, _) => q45k(ty, w, acts, out, tiled),
        (NativeType::Q6_K, KShape::Lanes) if super::gemv512::available() => {
            super::gemv512::q6k_row(w, acts, out)
        }
        (NativeType::Q6_K | NativeType::Q3_K, _) => q36k(ty, w, acts, out, tiled),
        _ => unreachable!("{ty:?} is not a K type"),
    }
}

/// The three entries of a K kernel: its body compiled for AVX2 and for
/// AVX-512 VNNI (`vpdpwssd`, the same integers), and the dispatch between
/// them by the CPU.
macro_rules! kernel_entry {
    ($name:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        /// With VNNI where the CPU has it (the same integers).
        #[inline]
        unsafe fn $name<const R: usize>($($arg: $ty),*) {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2<const R: usize>($($arg: $ty),*) {
                $body::<R, false>($($arg),*)
            }
            #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
            unsafe fn vnni<const R: usize>($($arg: $ty),*) {
                $body::<R, true>($($arg),*)
            }
            if super::avx2::vnni() {
                vnni::<R>($($arg),*)
            } else {
                avx2::<R>($($arg),*)
            }
        }
    };
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p as *const __m256i)
}

/// `acc + Σ pairs · scale` per i32 lane: one `vpdpwssd` with VNNI, else
/// `vpmaddwd` and an add. Exact integers either way, so the same lanes.
#[inline(always)]
unsafe fn acc_pairs<const VNNI: bool>(acc: __m256i, pairs: __m256i, scale: __m256i) -> __m256i {
    if VNNI {
        dpwssd(acc, pairs, scale)
    } else {
        _mm256_add_epi32(acc, madd(pairs, scale))
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn dpwssd(acc: __m256i, pairs: __m256i, scale: __m256i) -> __m256i {
    _mm256_dpwssd_epi32(acc, pairs, scale)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn madd(pairs: __m256i, scale: __m256i) -> __m256i {
    _mm256_madd_epi16(pairs, scale)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn maddubs(q: __m256i, a: *const i8) -> __m256i {
    _mm256_maddubs_epi16(q, load(a as *const u8))
}

/// `acc +` unsigned weights `q` times the signed activations at `a`,
/// pairs summed to i16, times a 16-bit scale, summed into i32 lanes.
#[inline(always)]
pub(super) unsafe fn acc_scaled<const VNNI: bool>(
    acc: __m256i,
    q: __m256i,
    a: *const i8,
    scale: __m256i,
) -> __m256i {
    acc_pairs::<VNNI>(acc, maddubs(q, a), scale)
}

/// The low and high nibbles of 32 bytes, plus for Q5_K the fifth bits
/// `bit` and `bit + 1` of `qh`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn nibbles(p: *const u8, qh: __m256i, bit: Option<i32>) -> (__m256i, __m256i) {
    let m4 = _mm256_set1_epi8(0x0F);
    let bits = load(p);
    let mut lo = _mm256_and_si256(bits, m4);
    let mut hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
    if let Some(bit) = bit {
        lo = _mm256_or_si256(lo, high_bits(qh, bit, 1));
        hi = _mm256_or_si256(hi, high_bits(qh, bit + 1, 1));
    }
    (lo, hi)
}

/// Bits `shift..` of each byte of `qh` under `mask`, moved to bit 4 and up.
/// (A function, not a closure: closures do not inherit target features.)
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn high_bits(qh: __m256i, shift: i32, mask: i8) -> __m256i {
    let shifted = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(shift));
    _mm256_slli_epi16(_mm256_and_si256(shifted, _mm256_set1_epi8(mask)), 4)
}

kernel_entry!(q45k, q45k_body, (ty: NativeType, w: &[u8], acts: &[&[BlockQ8K]; R], out: &mut [f32; R], tiled: bool));

#[inline(always)]
unsafe fn q45k_body<const R: usize, const VNNI: bool>(
    ty: NativeType,
    w: &[u8],
    acts: &[&[BlockQ8K]; R],
    out: &mut [f32; R],
    tiled: bool,
) {
    let bb = ty.block_bytes();
    let q5 = ty == NativeType::Q5_K;
    let mut acc = [_mm256_setzero_ps(); R];
    let mut mins4 = [[0f32; 4]; R];
    let mut summs = [0f32; R];
    // Tiled with eight rows: their running sums side by side.
    let mut sum8 = _mm256_setzero_ps();
    for i in 0..acts[0].len() {
        let blk = &w[i * bb..(i + 1) * bb];
        let (sc, mn) = scales_mins(&blk[4..16]);
        let (wd, wmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let qs = blk.as_ptr().add(if q5 { 48 } else { 16 });
        let qh = if q5 {
            load(blk.as_ptr().add(16))
        } else {
            _mm256_setzero_si256()
        };
        let mut sumi = [_mm256_setzero_si256(); R];
        for j in 0..4 {
            let bit = q5.then_some(2 * j as i32);
            let (lo, hi) = nibbles(qs.add(32 * j), qh, bit);
            let (s_lo, s_hi) = (
                _mm256_set1_epi16(sc[2 * j] as i16),
                _mm256_set1_epi16(sc[2 * j + 1] as i16),
            );
            for r in 0..R {
                let a = acts[r].get_unchecked(i).qs.as_ptr().add(64 * j);
                let p = acc_scaled::<VNNI>(sumi[r], lo, a, s_lo);
                sumi[r] = acc_scaled::<VNNI>(p, hi, a.add(32), s_hi);
            }
        }
        if tiled && R == 8 {
            let mn16 = mins16(&mn);
            let rows_m: [__m128i; 8] =
                std::array::from_fn(|r| pair_mins(acts[r % R].get_unchecked(i), mn16));
            let m = transpose_8x4(&rows_m);
            let s2 = _mm256_add_epi32(_mm256_add_epi32(m[0], m[1]), _mm256_add_epi32(m[2], m[3]));
            sum8 = tiled_step8(sum8, sums8(&sumi), Some(s2), wd, wmin, d8(acts, i));
            continue;
        }
        for r in 0..R {
            let y = acts[r].get_unchecked(i);
            let d = y.d * wd;
            let dmin = -y.d * wmin;
            let prod: [i32; 4] = std::array::from_fn(|k| {
                mn[2 * k] * y.bsum32(2 * k) + mn[2 * k + 1] * y.bsum32(2 * k + 1)
            });
            if tiled {
                let s2 = prod.iter().sum();
                summs[r] = tiled_step(summs[r], hsum_i32(sumi[r]), s2, wd, Some(wmin), y.d);
                continue;
            }
            if q5 {
                let total = (prod[0] + prod[1]) + (prod[2] + prod[3]);
                summs[r] = dmin.mul_add(total as f32, summs[r]);
            } else {
                for (m, &p) in mins4[r].iter_mut().zip(&prod) {
                    *m = dmin.mul_add(p as f32, *m);
                }
            }
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
        }
    }
    if tiled && R == 8 {
        return store8(sum8, out);
    }
    for r in 0..R {
        let m = &mins4[r];
        if tiled {
            out[r] = summs[r];
            continue;
        }
        let tail = if q5 {
            summs[r]
        } else {
            (m[0] + m[2]) + (m[1] + m[3])
        };
        out[r] = hsum(acc[r]) + tail;
    }
}

kernel_entry!(q4k_repacked, q4k_repacked_body, (w: &[u8], acts: &[&[BlockQ8K]; R], out: &mut [f32; R], per_pair: bool));

#[inline(always)]
unsafe fn q4k_repacked_body<const R: usize, const VNNI: bool>(
    w: &[u8],
    acts: &[&[BlockQ8K]; R],
    out: &mut [f32; R],
    per_pair: bool,
) {
    if R == 8 && per_pair {
        return q4k_pairs8::<R, VNNI>(w, acts, out);
    }
    let mut acc = [0f32; R];
    let mut acc_min = [0f32; R];
    for i in 0..acts[0].len() {
        let blk = &w[i * 144..(i + 1) * 144];
        let (sc, mn) = scales_mins(&blk[4..16]);
        let (wd, wmin) = (f16_at(blk, 0), f16_at(blk, 2));
        let qs = blk.as_ptr().add(16);
        let mut sumi = [_mm256_setzero_si256(); R];
        let mut m_block = [0i32; R];
        for pair in 0..4 {
            let (lo, hi) = nibbles(qs.add(32 * pair), _mm256_setzero_si256(), None);
            let (s_lo, s_hi) = (
                _mm256_set1_epi16(sc[2 * pair] as i16),
                _mm256_set1_epi16(sc[2 * pair + 1] as i16),
            );
            for r in 0..R {
                let y = acts[r].get_unchecked(i);
                let a = y.qs.as_ptr().add(64 * pair);
                let p = acc_scaled::<VNNI>(_mm256_setzero_si256(), lo, a, s_lo);
                let p = acc_scaled::<VNNI>(p, hi, a.add(32), s_hi);
                let m =
                    mn[2 * pair] * y.bsum32(2 * pair) + mn[2 * pair + 1] * y.bsum32(2 * pair + 1);
                if per_pair {
                    acc[r] = (hsum_i32(p) as f32).mul_add(wd * y.d, acc[r]);
                    acc_min[r] = (m as f32).mul_add(wmin * y.d, acc_min[r]);
                } else {
                    sumi[r] = _mm256_add_epi32(sumi[r], p);
                    m_block[r] += m;
                }
            }
        }
        if !per_pair {
            for r in 0..R {
                let yd = acts[r].get_unchecked(i).d;
                acc[r] = (hsum_i32(sumi[r]) as f32).mul_add(wd * yd, acc[r]);
                acc_min[r] = (m_block[r] as f32).mul_add(wmin * yd, acc_min[r]);
            }
        }
    }
    for r in 0..R {
        out[r] = acc[r] - acc_min[r];
    }
}

kernel_entry!(q36k, q36k_body, (ty: NativeType, w: &[u8], acts: &[&[BlockQ8K]; R], out: &mut [f32; R], tiled: bool));

#[inline(always)]
unsafe fn q36k_body<const R: usize, const VNNI: bool>(
    ty: NativeType,
    w: &[u8],
    acts: &[&[BlockQ8K]; R],
    out: &mut [f32; R],
    tiled: bool,
) {
    // Tiled: the running sum per row (the lane accumulators stay unused),
    // side by side with eight rows.
    let mut sum = [0f32; R];
    let mut sum8 = _mm256_setzero_ps();
    let m15 = _mm256_set1_epi8(15);
    let q3 = ty == NativeType::Q3_K;
    let four = _mm256_set1_epi8(4);
    let bb = ty.block_bytes();
    let mut acc = [_mm256_setzero_ps(); R];
    for i in 0..acts[0].len() {
        let blk = &w[i * bb..(i + 1) * bb];
        let p = blk.as_ptr();
        let (sc, _, wd) = sixteen(ty, blk);
        let sc16: [i16; 16] = std::array::from_fn(|s| sc[s] as i16);
        let scales16 = _mm256_loadu_si256(sc16.as_ptr() as *const __m256i);
        let mut sumi = [_mm256_setzero_si256(); R];
        for j in 0..2 {
            let q = if q3 {
                // Codes q + 4: bits 2c..2c+1 of qs, bit 4j + c of hmask.
                let qs = load(p.add(32 + 32 * j));
                let hm = load(p);
                let j = j as i32;
                [
                    q3_code(qs, hm, 0, j),
                    q3_code(qs, hm, 1, j),
                    q3_code(qs, hm, 2, j),
                    q3_code(qs, hm, 3, j),
                ]
            } else {
                q6_codes(p, j, m15)
            };
            for (c, &qc) in q.iter().enumerate() {
                let s = 8 * j + 2 * c;
                let scale = _mm256_set_m128i(
                    _mm_set1_epi16(sc[s + 1] as i16),
                    _mm_set1_epi16(sc[s] as i16),
                );
                for r in 0..R {
                    let a = acts[r].get_unchecked(i).qs.as_ptr().add(128 * j + 32 * c);
                    sumi[r] = if q3 {
                        // ggml's Q3_K: the offset 4 subtracted in each
                        // element's own pair, before the scale.
                        let pairs = _mm256_sub_epi16(maddubs(qc, a), maddubs(four, a));
                        acc_pairs::<VNNI>(sumi[r], pairs, scale)
                    } else {
                        acc_scaled::<VNNI>(sumi[r], qc, a, scale)
                    };
                }
            }
        }
        if !q3 {
            for r in 0..R {
                let y = acts[r].get_unchecked(i);
                let bsums = _mm256_loadu_si256(y.bsums.as_ptr() as *const __m256i);
                let sub = _mm256_slli_epi32(_mm256_madd_epi16(bsums, scales16), 5);
                sumi[r] = _mm256_sub_epi32(sumi[r], sub);
            }
        }
        if tiled && R == 8 {
            sum8 = tiled_step8(sum8, sums8(&sumi), None, wd, 0.0, d8(acts, i));
            continue;
        }
        for r in 0..R {
            let y = acts[r].get_unchecked(i);
            let s = sumi[r];
            if tiled {
                sum[r] = tiled_step(sum[r], hsum_i32(s), 0, wd, None, y.d);
            } else {
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(y.d * wd), _mm256_cvtepi32_ps(s), acc[r]);
            }
        }
    }
    if tiled && R == 8 {
        return store8(sum8, out);
    }
    for r in 0..R {
        out[r] = if tiled { sum[r] } else { hsum(acc[r]) };
    }
}

/// Q3_K's codes (q + 4) of chunk `c` of half `j`: bits `2c..2c+1` of the
/// 2-bit quants, bit `4j + c` of the high-bit mask as the third.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q3_code(qs: __m256i, hm: __m256i, c: i32, j: i32) -> __m256i {
    let low = _mm256_and_si256(
        _mm256_srl_epi16(qs, _mm_cvtsi32_si128(2 * c)),
        _mm256_set1_epi8(3),
    );
    let high = _mm256_and_si256(
        _mm256_srl_epi16(hm, _mm_cvtsi32_si128(4 * j + c)),
        _mm256_set1_epi8(1),
    );
    _mm256_or_si256(low, _mm256_slli_epi16(high, 2))
}

/// Q6_K's four 32-byte code vectors of half `j` (six bits each).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_codes(p: *const u8, j: usize, m15: __m256i) -> [__m256i; 4] {
    let ql1 = load(p.add(64 * j));
    let ql2 = load(p.add(64 * j + 32));
    let qh = load(p.add(128 + 32 * j));
    [
        _mm256_or_si256(_mm256_and_si256(ql1, m15), high_bits(qh, 0, 3)),
        _mm256_or_si256(_mm256_and_si256(ql2, m15), high_bits(qh, 2, 3)),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m15),
            high_bits(qh, 4, 3),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(ql2, 4), m15),
            high_bits(qh, 6, 3),
        ),
    ]
}

kernel_entry!(q2k, q2k_body, (w: &[u8], acts: &[&[BlockQ8K]; R], out: &mut [f32; R], shape: KShape));

/// Q2_K in every shape: lanes (`ggml_vec_dot_q2_K_q8_K`: the mins' FMA,
/// then the quants', per lane and super-block), tiled, and llama.cpp's
/// repacked gemv (per super-block) and gemm (per half super-block).
#[inline(always)]
unsafe fn q2k_body<const R: usize, const VNNI: bool>(
    w: &[u8],
    acts: &[&[BlockQ8K]; R],
    out: &mut [f32; R],
    shape: KShape,
) {
    let m3 = _mm256_set1_epi8(3);
    let mut acc = [_mm256_setzero_ps(); R];
    let (mut sum, mut sum_min) = ([0f32; R], [0f32; R]);
    for i in 0..acts[0].len() {
        let blk = &w[i * 84..(i + 1) * 84];
        let p = blk.as_ptr();
        let (sc, mn) = q2_scales_mins(blk);
        let (wd, wmin) = (f16_at(blk, 80), f16_at(blk, 82));
        let mut sumi = [_mm256_setzero_si256(); R];
        for j in 0..2 {
            let qs = load(p.add(16 + 32 * j));
            let mut part = [_mm256_setzero_si256(); R];
            for c in 0..4 {
                let code = _mm256_and_si256(_mm256_srl_epi16(qs, _mm_cvtsi32_si128(2 * c)), m3);
                let s = 8 * j + 2 * c as usize;
                let scale = _mm256_set_m128i(
                    _mm_set1_epi16(sc[s + 1] as i16),
                    _mm_set1_epi16(sc[s] as i16),
                );
                for r in 0..R {
                    let a = acts[r]
                        .get_unchecked(i)
                        .qs
                        .as_ptr()
                        .add(128 * j + 32 * c as usize);
                    part[r] = acc_scaled::<VNNI>(part[r], code, a, scale);
                }
            }
            for r in 0..R {
                if shape == KShape::PerPair {
                    let y = acts[r].get_unchecked(i);
                    let m: i32 = (8 * j..8 * j + 8).map(|s| mn[s] * y.bsums[s] as i32).sum();
                    sum[r] = (hsum_i32(part[r]) as f32).mul_add(wd * y.d, sum[r]);
                    sum_min[r] = (m as f32).mul_add(wmin * y.d, sum_min[r]);
                } else {
                    sumi[r] = _mm256_add_epi32(sumi[r], part[r]);
                }
            }
        }
        for r in 0..R {
            let y = acts[r].get_unchecked(i);
            let m_total = || -> i32 { (0..16).map(|s| mn[s] * y.bsums[s] as i32).sum() };
            match shape {
                KShape::Lanes => {
                    let mins: [i32; 8] = std::array::from_fn(|l| {
                        mn[2 * l] * y.bsums[2 * l] as i32
                            + mn[2 * l + 1] * y.bsums[2 * l + 1] as i32
                    });
                    let mins = _mm256_loadu_si256(mins.as_ptr() as *const __m256i);
                    let dmin = -y.d * wmin;
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_set1_ps(dmin), _mm256_cvtepi32_ps(mins), acc[r]);
                    let d = y.d * wd;
                    acc[r] =
                        _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[r]), acc[r]);
                }
                KShape::Tiled => {
                    sum[r] = tiled_step(sum[r], hsum_i32(sumi[r]), m_total(), wd, Some(wmin), y.d);
                }
                KShape::PerBlock => {
                    sum[r] = (hsum_i32(sumi[r]) as f32).mul_add(wd * y.d, sum[r]);
                    sum_min[r] = (m_total() as f32).mul_add(wmin * y.d, sum_min[r]);
                }
                KShape::PerPair => {}
            }
        }
    }
    for r in 0..R {
        out[r] = match shape {
            KShape::Lanes => hsum(acc[r]),
            KShape::Tiled => sum[r],
            KShape::PerBlock | KShape::PerPair => sum[r] - sum_min[r],
        };
    }
}

//! AVX2 kernels for the 32-element block types (Q4_0, Q4_1, Q5_0, Q5_1,
//! Q8_0).
//!
//! Each kernel computes one weight row against `R` activation rows at once:
//! the weight block is unpacked once and reused `R` times, which is what
//! makes prompt processing faster than `R` separate dot products.
//! The arithmetic is ggml's: 8-bit activations, integer dot per 32-element
//! block, scaled in f32 — so results match llama.cpp's to rounding order.

use std::arch::x86_64::*;

use half::f16;

use super::{BlockQ8, NativeType, Products8, Scales8};

/// Whether this CPU can run these kernels (checked once per process by std).
pub(super) fn available() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// `out[r] = dot(w, acts[r])` for one weight row of `ty` blocks.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C ([`available`]); `w` must hold
/// `acts[r].len()` blocks of `ty` for every `r`.
#[inline]
pub(super) unsafe fn dot_rows<const R: usize>(
    ty: NativeType,
    w: &[u8],
    acts: &[&[BlockQ8]; R],
    out: &mut [f32; R],
    chain: bool,
    pre: Option<&Products8<'_>>,
) {
    debug_assert!(pre.is_none_or(|p| R == 8 && p.prod.len() == acts[0].len()));
    for a in acts {
        debug_assert!(w.len() >= a.len() * ty.block_bytes());
    }
    let vnni = vnni();
    if chain {
        debug_assert_eq!(ty, NativeType::Q4_0);
        return dot_q4_0_chain(w, acts, out);
    }
    match ty {
        NativeType::Q4_1 | NativeType::Q5_1 if vnni => dot_q4_1_vnni(ty, w, acts, out, pre),
        NativeType::Q4_1 | NativeType::Q5_1 => dot_q4_1_avx2(ty, w, acts, out, pre),
        NativeType::Q4_0 | NativeType::Q5_0 | NativeType::Q8_0 if vnni => {
            dot_sym_vnni(ty, w, acts, out, pre)
        }
        NativeType::Q4_0 | NativeType::Q5_0 | NativeType::Q8_0 => {
            dot_sym_avx2(ty, w, acts, out, pre)
        }
        _ => unreachable!("{ty:?} is not a 32-element type"),
    }
}

/// Q4_0 as llama.cpp's repacked kernels sum it: per block the exact
/// integer dot (horizontally summed), times `d_w · d_a`, one scalar FMA.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_0_chain<const R: usize>(w: &[u8], acts: &[&[BlockQ8]; R], out: &mut [f32; R]) {
    let eight = _mm256_set1_epi8(8);
    let mut sum = [0f32; R];
    if R == 8 {
        // Eight rows at once: their lane sums reduced together (a transposed
        // add tree), then one vector FMA whose lane r is row r's scalar FMA.
        let mut acc = _mm256_setzero_ps();
        for i in 0..acts[0].len() {
            let b = w.as_ptr().add(i * 18);
            let wq = _mm256_sub_epi8(unpack_nibbles(b.add(2)), eight);
            let wabs = _mm256_sign_epi8(wq, wq);
            let lanes: [__m256i; 8] = std::array::from_fn(|r| {
                let a = acts[r].get_unchecked(i);
                let p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(load_act(a), wq));
                _mm256_madd_epi16(p16, _mm256_set1_epi16(1))
            });
            let s = hsum8_i32(&lanes);
            let da: [f32; 8] = std::array::from_fn(|r| acts[r].get_unchecked(i).d);
            let dw = half8_at(b);
            let scale = _mm256_mul_ps(dw, _mm256_loadu_ps(da.as_ptr()));
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc);
        }
        _mm256_storeu_ps(sum.as_mut_ptr(), acc);
        *out = sum;
        return;
    }
    for i in 0..acts[0].len() {
        let b = w.as_ptr().add(i * 18);
        let wq = _mm256_sub_epi8(unpack_nibbles(b.add(2)), eight);
        let wabs = _mm256_sign_epi8(wq, wq);
        let dw = f16::from_le_bytes([*b, *b.add(1)]).to_f32();
        for r in 0..R {
            let a = acts[r].get_unchecked(i);
            let p16 = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(load_act(a), wq));
            let lanes = _mm256_madd_epi16(p16, _mm256_set1_epi16(1));
            sum[r] = (hsum_i32(lanes) as f32).mul_add(dw * a.d, sum[r]);
        }
    }
    *out = sum;
}

/// [`Products8`] of one weight row: per block `d_w · d_a` for eight rows,
/// and each row's `Σ m_w · s_a` (one FMA per block, as per row).
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` must hold `scales.len()`
/// blocks of `ty`, `prod` at least as many entries.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn products8(
    ty: NativeType,
    w: &[u8],
    scales: &[Scales8],
    prod: &mut [[f32; 8]],
) -> [f32; 8] {
    assert!(prod.len() >= scales.len() && w.len() >= scales.len() * ty.block_bytes());
    let bb = ty.block_bytes();
    let with_min = matches!(ty, NativeType::Q4_1 | NativeType::Q5_1);
    let mut mins = _mm256_setzero_ps();
    for (i, (sc, out)) in scales.iter().zip(prod.iter_mut()).enumerate() {
        let b = w.as_ptr().add(i * bb);
        let d = _mm256_mul_ps(half8_at(b), _mm256_loadu_ps(sc.d.as_ptr()));
        _mm256_storeu_ps(out.as_mut_ptr(), d);
        if with_min {
            mins = _mm256_fmadd_ps(half8_at(b.add(2)), _mm256_loadu_ps(sc.s.as_ptr()), mins);
        }
    }
    let mut m = [0f32; 8];
    _mm256_storeu_ps(m.as_mut_ptr(), mins);
    m
}

/// Whether the CPU has AVX-512 VNNI (with VL): one `vpdpbusd` instead of
/// `vpmaddubsw` + `vpmaddwd`. The integers are the same (no pair of these
/// products reaches the 16-bit saturation), so are the bits.
pub(super) fn vnni() -> bool {
    static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *VNNI.get_or_init(|| {
        is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl")
    })
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_1_avx2<const R: usize>(
    ty: NativeType,
    w: &[u8],
    acts: &[&[BlockQ8]; R],
    out: &mut [f32; R],
    pre: Option<&Products8<'_>>,
) {
    match pre {
        Some(p) => dot_q4_1::<R, false, true>(ty, w, acts, out, p.prod, &p.mins),
        None => dot_q4_1::<R, false, false>(ty, w, acts, out, &[], &[0.0; 8]),
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn dot_q4_1_vnni<const R: usize>(
    ty: NativeType,
    w: &[u8],
    acts: &[&[BlockQ8]; R],
    out: &mut [f32; R],
    pre: Option<&Products8<'_>>,
) {
    match pre {
        Some(p) => dot_q4_1::<R, true, true>(ty, w, acts, out, p.prod, &p.mins),
        None => dot_q4_1::<R, true, false>(ty, w, acts, out, &[], &[0.0; 8]),
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_sym_avx2<const R: usize>(
    ty: NativeType,
    w: &[u8],
    acts: &[&[BlockQ8]; R],
    out: &mut [f32; R],
    pre: Option<&Products8<'_>>,
) {
    match pre {
        Some(p) => dot_sym::<R, false, true>(ty, w, acts, out, p.prod, &p.mins),
        None => dot_sym::<R, false, false>(ty, w, acts, out, &[], &[0.0; 8]),
    }
}

#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn dot_sym_vnni<const R: usize>(
    ty: NativeType,
    w: &[u8],
    acts: &[&[BlockQ8]; R],
    out: &mut [f32; R],
    pre: Option<&Products8<'_>>,
) {
    match pre {
        Some(p) => dot_sym::<R, true, true>(ty, w, acts, out, p.prod, &p.mins),
        None => dot_sym::<R, true, false>(ty, w, acts, out, &[], &[0.0; 8]),
    }
}

/// The f16 at `p` as f32 (one F16C conversion; `movd` writes the whole
/// register, so no false dependency either).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn half_at(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// An f16 at `p`, widened into all eight lanes. Broadcasting the bits
/// before converting writes the whole register: a scalar insert would make
/// every block's scale wait on whatever last used that register (a false
/// dependency that halved the decode speed).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half8_at(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_set1_epi16(i16::from_le_bytes([*p, *p.add(1)])))
}

/// Two adjacent f16s at `p` (a Q4_1 block's d and m) as `[d, m, d, m]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn half_pair_at(p: *const u8) -> __m128 {
    _mm_cvtph_ps(_mm_set1_epi32(i32::from_le_bytes([
        *p,
        *p.add(1),
        *p.add(2),
        *p.add(3),
    ])))
}

/// An activation block's `[d, s, 0, 0]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn act_scales(a: &BlockQ8) -> __m128 {
    _mm_castpd_ps(_mm_load_sd(&a.d as *const f32 as *const f64))
}

/// The sum of eight i32 lanes (exact: the order does not matter).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
    _mm_cvtsi128_si32(s)
}

/// Lane `r` = the sum of `v[r]`'s eight i32 lanes: eight rows reduced
/// together by a transposed add tree (exact, so any tree gives the same).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum8_i32(v: &[__m256i; 8]) -> __m256i {
    let h01 = _mm256_hadd_epi32(v[0], v[1]);
    let h23 = _mm256_hadd_epi32(v[2], v[3]);
    let h45 = _mm256_hadd_epi32(v[4], v[5]);
    let h67 = _mm256_hadd_epi32(v[6], v[7]);
    let h0123 = _mm256_hadd_epi32(h01, h23);
    let h4567 = _mm256_hadd_epi32(h45, h67);
    _mm256_add_epi32(
        _mm256_permute2x128_si256(h0123, h4567, 0x20),
        _mm256_permute2x128_si256(h0123, h4567, 0x31),
    )
}

/// ggml's `hsum_float_8`: high half onto low half, then pairs (the K
/// kernels use it too).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// 16 bytes of packed nibbles → 32 bytes: low nibbles (elements 0..16) in
/// the lower lane, high nibbles (elements 16..32) in the upper one.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_nibbles(p: *const u8) -> __m256i {
    let qs = _mm_loadu_si128(p as *const __m128i);
    let mask = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(qs, mask);
    let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
    _mm256_set_m128i(hi, lo)
}

/// ggml's `bytes_from_bits_32`: bit `i` of the 32 bits at `p` becomes
/// byte `i`, 0xFF where set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bytes_from_bits(p: *const u8) -> __m256i {
    let bits = i32::from_le_bytes([*p, *p.add(1), *p.add(2), *p.add(3)]);
    let shuf = _mm256_set_epi64x(
        0x0303030303030303,
        0x0202020202020202,
        0x0101010101010101,
        0,
    );
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits), shuf);
    let bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1))
}

/// Integer dot of unsigned weights `wu` (0..=15 or |q|) with signed
/// activations, summed into eight i32 lanes and converted to f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_u8_i8(wu: __m256i, a: __m256i) -> __m256 {
    let p16 = _mm256_maddubs_epi16(wu, a);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn dot_u8_i8_vnni(wu: __m256i, a: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), wu, a))
}

/// `start + Σ wu·a` per 4-byte lane (VNNI).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
unsafe fn dpbusd_from(start: __m256i, wu: __m256i, a: __m256i) -> __m256i {
    _mm256_dpbusd_epi32(start, wu, a)
}

/// [`dot_u8_i8`], with VNNI when the caller was compiled for it.
#[inline(always)]
unsafe fn idot<const VNNI: bool>(wu: __m256i, a: __m256i) -> __m256 {
    if VNNI {
        dot_u8_i8_vnni(wu, a)
    } else {
        dot_u8_i8(wu, a)
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_act(a: &BlockQ8) -> __m256i {
    _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i)
}

// The kernels below keep one accumulator per activation row and walk the
// blocks in order, exactly as ggml's `ggml_vec_dot_*` do. Two accumulators
// (even/odd blocks) decode ~5% faster but sum in another order, and SmolLM-
// style models carry activations in the thousands: a last-bit difference
// flips an 8-bit rounding a few layers later and greedy outputs part from
// llama.cpp's within a dozen tokens. Same order, same bits.

#[inline(always)]
unsafe fn q4_1_block<const R: usize, const VNNI: bool>(
    dm: __m128,
    wq: __m256i,
    acts: &[&[BlockQ8]; R],
    i: usize,
    acc: &mut [__m256; R],
    mins: &mut [__m128; R],
) {
    for r in 0..R {
        let a = acts[r].get_unchecked(i);
        let act = act_scales(a);
        let scales = _mm_mul_ps(dm, act);
        // ggml's `summs += m * s` is compiled to one FMA: do the same.
        mins[r] = _mm_fmadd_ps(dm, act, mins[r]);
        let dot = idot::<VNNI>(wq, load_act(a));
        acc[r] = _mm256_fmadd_ps(_mm256_broadcastss_ps(scales), dot, acc[r]);
    }
}

#[inline(always)]
unsafe fn dot_q4_1<const R: usize, const VNNI: bool, const PRE: bool>(
    ty: NativeType,
    w: &[u8],
    acts: &[&[BlockQ8]; R],
    out: &mut [f32; R],
    prod: &[[f32; 8]],
    pre_mins: &[f32; 8],
) {
    let nb = acts[0].len();
    let mut acc = [_mm256_setzero_ps(); R];
    // Lane 1 collects m * s (the blocks' min times the activation sum).
    let mut mins = [_mm_setzero_ps(); R];
    let p = w.as_ptr();
    let bb = ty.block_bytes();
    let fifth = _mm256_set1_epi8(0x10);
    for i in 0..nb {
        let b = p.add(i * bb);
        let wq = if ty == NativeType::Q4_1 {
            unpack_nibbles(b.add(4))
        } else {
            let hi = _mm256_and_si256(bytes_from_bits(b.add(4)), fifth);
            _mm256_or_si256(unpack_nibbles(b.add(8)), hi)
        };
        if PRE {
            let pr = prod.get_unchecked(i);
            for r in 0..R {
                let dot = idot::<VNNI>(wq, load_act(acts[r].get_unchecked(i)));
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(*pr.get_unchecked(r)), dot, acc[r]);
            }
        } else {
            q4_1_block::<R, VNNI>(half_pair_at(b), wq, acts, i, &mut acc, &mut mins);
        }
    }
    for r in 0..R {
        let m = if PRE {
            pre_mins[r]
        } else {
            _mm_cvtss_f32(_mm_movehdup_ps(mins[r]))
        };
        out[r] = hsum(acc[r]) + m;
    }
}

/// Row `r`'s `d_w · d_a` for block `i`, in every lane: precomputed
/// ([`Products8`]) or one multiply.
#[inline(always)]
unsafe fn row_scale<const PRE: bool>(
    prod: &[[f32; 8]],
    i: usize,
    r: usize,
    d: __m256,
    a: &BlockQ8,
) -> __m256 {
    if PRE {
        _mm256_set1_ps(*prod.get_unchecked(i).get_unchecked(r))
    } else {
        // d · d_act in every lane: the activation's scale broadcast
        // straight from memory (a load, not a shuffle).
        _mm256_mul_ps(d, _mm256_broadcast_ss(&a.d))
    }
}

/// One block of a symmetric type (Q4_0, Q8_0) given its scale and signed weights.
#[inline(always)]
unsafe fn sym_block<const R: usize, const VNNI: bool, const PRE: bool>(
    d: __m256,
    prod: &[[f32; 8]],
    wq: __m256i,
    acts: &[&[BlockQ8]; R],
    i: usize,
    acc: &mut [__m256; R],
) {
    let wabs = _mm256_sign_epi8(wq, wq);
    for r in 0..R {
        let a = acts[r].get_unchecked(i);
        let scale = row_scale::<PRE>(prod, i, r, d, a);
        let dot = idot::<VNNI>(wabs, _mm256_sign_epi8(load_act(a), wq));
        acc[r] = _mm256_fmadd_ps(scale, dot, acc[r]);
    }
}

#[inline(always)]
unsafe fn dot_sym<const R: usize, const VNNI: bool, const PRE: bool>(
    ty: NativeType,
    w: &[u8],
    acts: &[&[BlockQ8]; R],
    out: &mut [f32; R],
    prod: &[[f32; 8]],
    _mins: &[f32; 8],
) {
    let nb = acts[0].len();
    let bb = ty.block_bytes();
    let p = w.as_ptr();
    let mut acc = [_mm256_setzero_ps(); R];
    // One loop per type rather than a per-block match (or a closure, which would
    // not inherit this function's target features).
    if ty == NativeType::Q8_0 {
        for i in 0..nb {
            let b = p.add(i * bb);
            let wq = _mm256_loadu_si256(b.add(2) as *const __m256i);
            sym_block::<R, VNNI, PRE>(half8_at(b), prod, wq, acts, i, &mut acc);
        }
    } else if ty == NativeType::Q5_0 && VNNI {
        // Unsigned weights q + 16 (the fifth bit as is), the -16·Σa
        // correction loaded as the dot's starting value.
        let fifth = _mm256_set1_epi8(0x10);
        for i in 0..nb {
            let b = p.add(i * bb);
            let hi = _mm256_and_si256(bytes_from_bits(b.add(2)), fifth);
            let wu = _mm256_or_si256(unpack_nibbles(b.add(6)), hi);
            let d = half8_at(b);
            for r in 0..R {
                let a = acts[r].get_unchecked(i);
                let scale = row_scale::<PRE>(prod, i, r, d, a);
                let start = _mm256_loadu_si256(a.neg16_sums.as_ptr() as *const __m256i);
                let dot = _mm256_cvtepi32_ps(dpbusd_from(start, wu, load_act(a)));
                acc[r] = _mm256_fmadd_ps(scale, dot, acc[r]);
            }
        }
    } else if ty == NativeType::Q5_0 {
        let minus16 = _mm256_set1_epi8(0xF0u8 as i8);
        for i in 0..nb {
            let b = p.add(i * bb);
            let hi = _mm256_andnot_si256(bytes_from_bits(b.add(2)), minus16);
            let wq = _mm256_or_si256(unpack_nibbles(b.add(6)), hi);
            sym_block::<R, VNNI, PRE>(half8_at(b), prod, wq, acts, i, &mut acc);
        }
    } else {
        let eight = _mm256_set1_epi8(8);
        for i in 0..nb {
            let b = p.add(i * bb);
            let wq = _mm256_sub_epi8(unpack_nibbles(b.add(2)), eight);
            sym_block::<R, VNNI, PRE>(half8_at(b), prod, wq, acts, i, &mut acc);
        }
    }
    for r in 0..R {
        out[r] = hsum(acc[r]);
    }
}

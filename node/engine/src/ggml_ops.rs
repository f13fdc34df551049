//! The element-wise parts of a llama layer with ggml's exact arithmetic (CPU).
//!
//! Models like SmolLM carry activations in the thousands; the 8-bit
//! quantization of activations before every matmul then turns a last-bit
//! difference into a different rounding, and greedy outputs drift apart from
//! llama.cpp's within a few tokens. So on the CPU shoal computes RMSNorm,
//! SwiGLU and the RoPE angles in the same order and with the same
//! approximations as ggml's x86 code (`ggml_compute_forward_rms_norm_f32`,
//! `ggml_vec_swiglu_f32` with `ggml_v_expf`, `ggml_rope_cache_init`).

/// `y = (x * 1/sqrt(mean(x²) + eps)) * w` per row of `x` (`[rows, w.len()]`),
/// the sum of squares accumulated in f64 in order, as ggml does.
pub fn rms_norm_mul(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(n) {
        let sum: f64 = row.iter().fold(0f64, |s, &v| s + (v * v) as f64);
        let mean = (sum / n as f64) as f32;
        let scale = 1.0f32 / (mean + eps).sqrt();
        y.extend(row.iter().zip(w).map(|(&v, &g)| (v * scale) * g));
    }
    y
}

/// `silu(gate) * up`, element-wise, as `ggml_vec_swiglu_f32`: 8-wide SIMD
/// with ggml's `expf` approximation, the tail with libm's `expf`.
pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    assert_eq!(gate.len(), up.len());
    let mut y = vec![0f32; gate.len()];
    // Set by the x86 kernels; stays 0 on other architectures.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut i = 0;
    use crate::quant::{kernels, Kernels};
    match kernels() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512 F/DQ checked at run time; bounds by the loop.
        Kernels::Avx512 if crate::quant::avx512_cpu() => unsafe {
            i = x86::swiglu_avx512(gate, up, &mut y)
        },
        Kernels::Avx512 => {
            // The AVX-512 arithmetic without the instructions.
            while i + 15 < gate.len() {
                for j in i..i + 16 {
                    y[j] = gate[j] / (1.0 + expf512(-gate[j])) * up[j];
                }
                i += 16;
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX2/FMA checked at run time; bounds by the loop.
        Kernels::Avx2 if crate::quant::simd_available() => unsafe {
            i = x86::swiglu(gate, up, &mut y)
        },
        _ => {}
    }
    for j in i..gate.len() {
        y[j] = gate[j] / (1.0 + (-gate[j]).exp()) * up[j];
    }
    y
}

/// ggml's AVX-512 `ggml_v_expf` for one value, in portable code: the same
/// FMAs, and `scalef` (j·2ⁿ, one rounding) through f64, where it is exact.
fn expf512(x: f32) -> f32 {
    let c = f32::from_bits;
    let r = c(0x4B40_0000);
    let z = x.mul_add(c(0x3FB8_AA3B), r);
    let n = z - r;
    let b = (-n).mul_add(c(0x35BF_BE8E), (-n).mul_add(c(0x3F31_7200), x));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    let u = b * b;
    let j = c(0x3C07_2010)
        .mul_add(b, c(0x3D2B_9F17))
        .mul_add(u, c(0x3E2A_AF33).mul_add(b, c(0x3EFF_FEDB)))
        .mul_add(u, c(0x3F7F_FFF6).mul_add(b, 1.0));
    (j as f64 * 2f64.powi(n as i32)) as f32
}

/// ggml's tanh-approximated GELU in f32 (`ggml_gelu_f32`); GCC contracts
/// `1 + a·x·x` into one FMA, and so does this.
fn gelu_f32(x: f32) -> f32 {
    const COEF_A: f32 = 0.044715;
    // sqrt(2/pi) rounded to f32, as ggml's float constant.
    let sqrt_2_over_pi = f32::from_bits(0x3f4c_422a);
    let inner = (COEF_A * x).mul_add(x, 1.0);
    0.5 * x * (1.0 + (sqrt_2_over_pi * x * inner).tanh())
}

/// `gelu(gate) * up`, element-wise, as `ggml_vec_geglu_f32`: GELU looked
/// up in a table of every f16 input (ggml's `GGML_GELU_FP16`), 0 below
/// -10 and the identity above 10.
pub fn geglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    use half::f16;
    static TABLE: std::sync::OnceLock<Vec<f16>> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|b| f16::from_f32(gelu_f32(f16::from_bits(b).to_f32())))
            .collect()
    });
    assert_eq!(gate.len(), up.len());
    gate.iter()
        .zip(up)
        .map(|(&x, &g)| {
            if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x * g
            } else {
                table[f16::from_f32(x).to_bits() as usize].to_f32() * g
            }
        })
        .collect()
}

/// `x * s` for every element (ggml's `ggml_scale`).
pub fn scale(x: &mut [f32], s: f32) {
    x.iter_mut().for_each(|v| *v *= s);
}

/// RoPE angle table `[positions, half]`: theta_i = pos * scale^i accumulated
/// by repeated multiplication (ggml's `ggml_rope_cache_init`), with
/// `scale = base^(-2/dims)`, frequency factors dividing, positions scaled.
pub fn rope_angles(
    positions: usize,
    half: usize,
    base: f32,
    freq_scale: f32,
    factors: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let theta_scale = base.powf(-2.0 / (2 * half) as f32);
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        let mut theta = p as f32;
        for i in 0..half {
            let ff = factors.map_or(1.0, |f| f[i]);
            let t = freq_scale * (theta / ff);
            cos.push(t.cos());
            sin.push(t.sin());
            theta *= theta_scale;
        }
    }
    (cos, sin)
}

/// Rotates `x` (`[heads, t, head_dim]`, rows at positions `pos..pos + t`)
/// in place with angle tables from [`rope_angles`]. `neox` pairs `i` with
/// `i + head_dim/2`; otherwise adjacent elements pair up. Each output is one
/// fused multiply-add on top of a rounded product, as GCC compiles ggml's
/// `rotate_pairs`: the first product of each sum is fused, `x0*cos - x1*sin`
/// becomes `fma(x0, cos, -(x1*sin))` and `x0*sin + x1*cos` `fma(x0, sin, x1*cos)`.
pub fn rope_in_place(
    x: &mut [f32],
    t: usize,
    hd: usize,
    pos: usize,
    cos: &[f32],
    sin: &[f32],
    neox: bool,
) {
    let half = hd / 2;
    for (row_idx, row) in x.chunks_exact_mut(hd).enumerate() {
        let p = pos + row_idx % t;
        let (c, s) = (
            &cos[p * half..(p + 1) * half],
            &sin[p * half..(p + 1) * half],
        );
        for i in 0..half {
            let (a, b) = if neox {
                (i, i + half)
            } else {
                (2 * i, 2 * i + 1)
            };
            let (x0, x1) = (row[a], row[b]);
            row[a] = x0.mul_add(c[i], -(x1 * s[i]));
            row[b] = x0.mul_add(s[i], x1 * c[i]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// SwiGLU over the 8-aligned prefix; returns how many elements it did.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn swiglu(gate: &[f32], up: &[f32], y: &mut [f32]) -> usize {
        let mut i = 0;
        while i + 7 < gate.len() {
            let x = _mm256_loadu_ps(gate.as_ptr().add(i));
            let g = _mm256_loadu_ps(up.as_ptr().add(i));
            _mm256_storeu_ps(y.as_mut_ptr().add(i), _mm256_mul_ps(silu(x), g));
            i += 8;
        }
        i
    }

    /// SwiGLU over the 16-aligned prefix with ggml's AVX-512 `ggml_v_expf`
    /// (a different polynomial tail and `scalef`: other bits than AVX2's).
    #[target_feature(enable = "avx512f,avx512dq,avx2,fma")]
    pub(super) unsafe fn swiglu_avx512(gate: &[f32], up: &[f32], y: &mut [f32]) -> usize {
        let mut i = 0;
        while i + 15 < gate.len() {
            let x = _mm512_loadu_ps(gate.as_ptr().add(i));
            let g = _mm512_loadu_ps(up.as_ptr().add(i));
            let neg = _mm512_sub_ps(_mm512_setzero_ps(), x);
            let silu = _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), expf512(neg)));
            _mm512_storeu_ps(y.as_mut_ptr().add(i), _mm512_mul_ps(silu, g));
            i += 16;
        }
        i
    }

    /// ggml's `ggml_v_expf` for AVX-512, constant for constant.
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn expf512(x: __m512) -> __m512 {
        let c = |bits: u32| _mm512_set1_ps(f32::from_bits(bits));
        let r = c(0x4B40_0000); // 0x1.8p23
        let z = _mm512_fmadd_ps(x, c(0x3FB8_AA3B), r); // 0x1.715476p+0
        let n = _mm512_sub_ps(z, r);
        let b = _mm512_fnmadd_ps(
            n,
            c(0x35BF_BE8E),                         // 0x1.7f7d1cp-20
            _mm512_fnmadd_ps(n, c(0x3F31_7200), x), // 0x1.62e4p-1
        );
        let d = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_abs_ps(n), _mm512_set1_ps(192.0));
        let u = _mm512_mul_ps(b, b);
        let j = _mm512_fmadd_ps(
            _mm512_fmadd_ps(
                _mm512_fmadd_ps(c(0x3C07_2010), b, c(0x3D2B_9F17)), // 0x1.0e4020p-7, 0x1.573e2ep-5
                u,
                _mm512_fmadd_ps(c(0x3E2A_AF33), b, c(0x3EFF_FEDB)), // 0x1.555e66p-3, 0x1.fffdb6p-2
            ),
            u,
            _mm512_fmadd_ps(c(0x3F7F_FFF6), b, _mm512_set1_ps(1.0)), // 0x1.ffffecp-1
        );
        let res = _mm512_scalef_ps(j, n);
        if d == 0 {
            return res;
        }
        let zero = _mm512_setzero_ps();
        let alt = _mm512_mask_blend_ps(
            _mm512_cmp_ps_mask::<_CMP_LE_OQ>(n, zero),
            _mm512_set1_ps(f32::INFINITY),
            zero,
        );
        _mm512_mask_blend_ps(d, res, alt)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn silu(x: __m256) -> __m256 {
        let neg = _mm256_sub_ps(_mm256_setzero_ps(), x);
        _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), expf(neg)))
    }

    /// ggml's `ggml_v_expf` (AVX2), constant for constant.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn expf(x: __m256) -> __m256 {
        let r = _mm256_set1_ps(f32::from_bits(0x4B40_0000)); // 0x1.8p23
        let z = _mm256_fmadd_ps(x, _mm256_set1_ps(f32::from_bits(0x3FB8_AA3B)), r); // 0x1.715476p+0
        let n = _mm256_sub_ps(z, r);
        let b = _mm256_fnmadd_ps(
            n,
            _mm256_set1_ps(f32::from_bits(0x35BF_BE8E)), // 0x1.7f7d1cp-20
            _mm256_fnmadd_ps(n, _mm256_set1_ps(f32::from_bits(0x3F31_7200)), x), // 0x1.62e4p-1
        );
        let e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
        let k = _mm256_castsi256_ps(_mm256_add_epi32(
            e,
            _mm256_castps_si256(_mm256_set1_ps(1.0)),
        ));
        let abs_n = _mm256_andnot_ps(_mm256_set1_ps(-0.0), n);
        let c = _mm256_castps_si256(_mm256_cmp_ps(abs_n, _mm256_set1_ps(126.0), _CMP_GT_OQ));
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(
                _mm256_fmadd_ps(
                    _mm256_set1_ps(f32::from_bits(0x3C07_2010)),
                    b,
                    _mm256_set1_ps(f32::from_bits(0x3D2B_9F17)),
                ), // 0x1.0e4020p-7, 0x1.573e2ep-5
                u,
                _mm256_fmadd_ps(
                    _mm256_set1_ps(f32::from_bits(0x3E2A_AF33)),
                    b,
                    _mm256_set1_ps(f32::from_bits(0x3EFF_FEDB)),
                ), // 0x1.555e66p-3, 0x1.fffdb6p-2
            ),
            u,
            _mm256_mul_ps(_mm256_set1_ps(f32::from_bits(0x3F7F_FFF6)), b), // 0x1.ffffecp-1
        );
        if _mm256_movemask_ps(_mm256_castsi256_ps(c)) == 0 {
            return _mm256_fmadd_ps(j, k, k);
        }
        let g = _mm256_and_si256(
            _mm256_castps_si256(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ)),
            _mm256_set1_epi32(0x8200_0000u32 as i32),
        );
        let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f00_0000)));
        let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
        let d = _mm256_castps_si256(_mm256_cmp_ps(abs_n, _mm256_set1_ps(192.0), _CMP_GT_OQ));
        _mm256_or_ps(
            _mm256_and_ps(_mm256_castsi256_ps(d), _mm256_mul_ps(s1, s1)),
            _mm256_andnot_ps(
                _mm256_castsi256_ps(d),
                _mm256_or_ps(
                    _mm256_and_ps(
                        _mm256_castsi256_ps(c),
                        _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1),
                    ),
                    _mm256_andnot_ps(_mm256_castsi256_ps(c), _mm256_fmadd_ps(k, j, k)),
                ),
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swiglu_is_close_to_the_definition() {
        let gate: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.7).collect();
        let up: Vec<f32> = (0..37).map(|i| 1.0 + i as f32 * 0.1).collect();
        for ((y, g), u) in swiglu(&gate, &up).iter().zip(&gate).zip(&up) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (y - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{y} vs {want}"
            );
        }
    }

    #[test]
    fn avx512_expf_in_portable_code_gives_the_same_bits() {
        if !crate::quant::avx512_cpu() {
            return;
        }
        let gate: Vec<f32> = (0..4096)
            .map(|i| ((i * 7919 % 4096) as f32 - 2048.0) / 17.0)
            .chain([0.0, -0.0, 88.0, -88.0, 100.0, -104.0, 1e-30, -1e-30])
            .collect();
        let gate = &gate[..gate.len() / 16 * 16];
        let up: Vec<f32> = (0..gate.len()).map(|i| 0.5 + (i % 7) as f32).collect();
        let mut simd = vec![0f32; gate.len()];
        // SAFETY: AVX-512 checked above.
        unsafe { x86::swiglu_avx512(gate, &up, &mut simd) };
        for ((g, u), s) in gate.iter().zip(&up).zip(&simd) {
            let portable = g / (1.0 + expf512(-g)) * u;
            assert_eq!(portable.to_bits(), s.to_bits(), "gate {g}");
        }
    }

    #[test]
    fn rms_norm_and_rope_tables() {
        let y = rms_norm_mul(&[3.0, 4.0], &[1.0, 2.0], 0.0);
        let s = 1.0 / 12.5f32.sqrt();
        assert_eq!(y, [3.0 * s, 4.0 * s * 2.0]);
        // eps keeps an all-zero row finite.
        assert_eq!(rms_norm_mul(&[0.0, 0.0], &[1.0, 2.0], 1e-5), [0.0, 0.0]);
        let (cos, sin) = rope_angles(3, 4, 10000.0, 1.0, None);
        assert_eq!((cos[0], sin[0]), (1.0, 0.0));
        let t = 2.0 * 10000f32.powf(-0.25);
        assert!((cos[9] - t.cos()).abs() < 1e-6 && (sin[9] - t.sin()).abs() < 1e-6);
    }
}

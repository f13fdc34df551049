//! Attention on the CPU over an f16 KV cache, with llama.cpp's arithmetic.
//!
//! llama.cpp (the reference shoal is judged against, token for token) keeps
//! K and V in f16 and runs flash attention: Q rounded to f16 for the dot
//! products, an online softmax over the keys in order, and the weighted sum
//! of V accumulated in f16. Doing the same here, rather than exact f32
//! attention, keeps greedy outputs identical to llama.cpp's for longer, and
//! halves the cache. It is also one plain loop per head instead of a dozen
//! tensor ops per layer.

use half::f16;
use rayon::prelude::*;

/// Query heads × query rows below which attention runs on one thread: a
/// decode step (one row) is a few microseconds, less than a fan-out costs.
const PARALLEL_ROWS_MIN: usize = 16;
/// Query rows from which ggml switches to its tiled f32 flash attention
/// (`GGML_FA_TILE_Q`); below it, the f16-accumulating one-row kernel. Its
/// home is `schedule`, whose batcher must not cut chunks across it.
pub(crate) use schedule::TILED_ROWS_MIN;
/// Keys per tile of the tiled kernel (`GGML_FA_TILE_KV`).
const KV_TILE: usize = 64;

/// Shape of one attention call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnShape {
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (query head `h` reads KV head `h / (n_heads / n_kv_heads)`).
    pub n_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Positions in the cache buffers (row stride of a KV head).
    pub capacity: usize,
    /// Sliding window: a query at position `p` sees keys `p + 1 - window ..= p`.
    pub window: Option<usize>,
}

impl AttnShape {
    /// The first key a query at position `p` sees.
    fn first_key(&self, p: usize) -> usize {
        self.window.map_or(0, |w| (p + 1).saturating_sub(w))
    }
}

/// `out[i, h, :] = softmax(q[h, i, :] · K[..=pos+i]ᵀ · scale) · V` for each
/// query row `i` (at absolute position `pos + i`) and head `h`.
///
/// `q` is `[n_heads, t, head_dim]`; `k`, `v` are `[n_kv_heads, capacity,
/// head_dim]` holding at least `pos + t` positions; `out` is
/// `[t, n_heads * head_dim]`.
pub(crate) fn attend(
    s: AttnShape,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    pos: usize,
    scale: f32,
    out: &mut [f32],
) {
    let (nh, hd) = (s.n_heads, s.head_dim);
    let t = q.len() / (nh * hd);
    assert_eq!(q.len(), nh * t * hd, "query shape");
    assert!(
        pos + t <= s.capacity && k.len() >= s.n_kv_heads * s.capacity * hd,
        "cache shape"
    );
    assert_eq!(out.len(), t * nh * hd, "output shape");
    let rep = nh / s.n_kv_heads;
    if t >= TILED_ROWS_MIN {
        tiled(s, q, k, v, pos, scale, out);
        return;
    }
    let one = |(i, h): (usize, usize), dst: &mut [f32]| {
        let kvh = h / rep;
        let base = kvh * s.capacity * hd;
        let qrow = &q[(h * t + i) * hd..(h * t + i + 1) * hd];
        let keys = pos + i + 1; // causal: this row sees positions 0..=pos+i
                                // ggml skips masked keys: the window's start is where the loop starts.
        let first = s.first_key(pos + i);
        let (kr, vr) = (
            &k[base + first * hd..base + keys * hd],
            &v[base + first * hd..base + keys * hd],
        );
        attend_row(qrow, kr, vr, hd, scale, dst);
    };
    if t * nh < PARALLEL_ROWS_MIN {
        for (idx, dst) in out.chunks_exact_mut(hd).enumerate() {
            one((idx / nh, idx % nh), dst);
        }
    } else {
        out.par_chunks_exact_mut(hd)
            .enumerate()
            .for_each(|(idx, dst)| one((idx / nh, idx % nh), dst));
    }
}

/// One query row against `keys` cached positions: ggml's
/// `flash_attn_ext_f16` inner loop for an f16 K/V cache.
fn attend_row(q: &[f32], k: &[f16], v: &[f16], hd: usize, scale: f32, out: &mut [f32]) {
    let q16: Vec<f16> = q.iter().map(|&x| f16::from_f32(x)).collect();
    let mut acc = vec![f16::ZERO; hd];
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    let simd = crate::quant::simd_available();
    for (krow, vrow) in k.chunks_exact(hd).zip(v.chunks_exact(hd)) {
        let s = dot_f16(simd, &q16, krow) * scale;
        let (mut ms, mut vs) = (1f32, 1f32);
        if s > max {
            let old = max;
            max = s;
            ms = (old - max).exp();
            scale_f16(simd, &mut acc, ms);
        } else {
            vs = (s - max).exp();
        }
        mad_f16(simd, &mut acc, vrow, vs);
        // ggml's `S = S*ms + vs` compiles to one FMA.
        sum = sum.mul_add(ms, vs);
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a.to_f32() * inv;
    }
}

/// `acc[i] = f16(acc[i] * s)`: ggml's `ggml_vec_scale_f16`.
fn scale_f16(simd: bool, acc: &mut [f16], s: f32) {
    // Set by the x86 kernels; stays 0 on other architectures.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2/FMA/F16C checked at run time; bounds by the loop.
        unsafe { i = x86::scale_f16(acc, s) };
    }
    let _ = simd;
    for a in &mut acc[i..] {
        *a = f16::from_f32(a.to_f32() * s);
    }
}

/// `acc[i] = f16(v[i] * s + acc[i])`, one rounding: ggml's `ggml_vec_mad_f16`.
fn mad_f16(simd: bool, acc: &mut [f16], v: &[f16], s: f32) {
    // Set by the x86 kernels; stays 0 on other architectures.
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
    let mut i = 0;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: as in `scale_f16`; `v` is as long as `acc`.
        unsafe { i = x86::mad_f16(acc, v, s) };
    }
    let _ = simd;
    for (a, &x) in acc[i..].iter_mut().zip(&v[i..]) {
        *a = f16::from_f32(x.to_f32().mul_add(s, a.to_f32()));
    }
}

/// One query row as ggml's tiled kernel computes it for long prompts: f32
/// throughout, keys in tiles of [`KV_TILE`], the softmax rescaled per tile.
///
/// Keys before `first` are masked (a sliding window): their scores are -inf
/// in their tile, as in ggml, which changes no sum.
fn attend_row_tiled(
    q: &[f32],
    k: &[f16],
    v: &[f16],
    hd: usize,
    scale: f32,
    first: usize,
    out: &mut [f32],
) {
    let mut acc = vec![0f32; hd];
    let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
    let mut scores = [0f32; KV_TILE];
    for (tile, (kt, vt)) in k
        .chunks(KV_TILE * hd)
        .zip(v.chunks(KV_TILE * hd))
        .enumerate()
    {
        let n = kt.len() / hd;
        for (j, (s, krow)) in scores.iter_mut().zip(kt.chunks_exact(hd)).enumerate() {
            *s = if tile * KV_TILE + j < first {
                f32::NEG_INFINITY
            } else {
                q.iter()
                    .zip(krow)
                    .fold(0f32, |a, (&x, &y)| x.mul_add(y.to_f32(), a))
                    * scale
            };
        }
        let tile_max = scores[..n]
            .iter()
            .cloned()
            .fold(f32::NEG_INFINITY, f32::max);
        let new_max = max.max(tile_max);
        if new_max == f32::NEG_INFINITY {
            continue; // a tile wholly before the window
        }
        if new_max > max {
            let ms = (max - new_max).exp();
            acc.iter_mut().for_each(|a| *a *= ms);
            sum *= ms;
        }
        max = new_max;
        let mut tile_sum = 0f64;
        for s in scores[..n].iter_mut() {
            *s = (*s - max).exp();
            tile_sum += *s as f64;
        }
        sum += tile_sum as f32;
        for (p, vrow) in scores[..n].iter().zip(vt.chunks_exact(hd)) {
            for (a, &x) in acc.iter_mut().zip(vrow) {
                *a = p.mul_add(x.to_f32(), *a);
            }
        }
    }
    let inv = if sum == 0.0 { 0.0 } else { 1.0 / sum };
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = a * inv;
    }
}

/// Query rows per task of [`tiled`]: they share each converted key tile.
const TILED_BLOCK_ROWS: usize = 16;

/// [`attend_row_tiled`] for many rows at once, with the same arithmetic per
/// row: each task takes one head and [`TILED_BLOCK_ROWS`] rows, converts
/// each tile of keys and values to f32 once for all of them (keys
/// transposed, so eight keys' scores advance together, each in its own
/// lane, in the same order of multiply-adds as the one-row loop).
fn tiled(s: AttnShape, q: &[f32], k: &[f16], v: &[f16], pos: usize, scale: f32, out: &mut [f32]) {
    let (nh, hd) = (s.n_heads, s.head_dim);
    let t = q.len() / (nh * hd);
    let rep = nh / s.n_kv_heads;
    let blocks = t.div_ceil(TILED_BLOCK_ROWS);
    let simd = crate::quant::simd_available();
    // Results per (head, block), copied into `out`'s row-major layout after.
    let parts: Vec<(usize, usize, Vec<f32>)> = (0..nh * blocks)
        .into_par_iter()
        .map(|task| {
            let (h, b) = (task / blocks, task % blocks);
            let rows = b * TILED_BLOCK_ROWS..((b + 1) * TILED_BLOCK_ROWS).min(t);
            let base = h / rep * s.capacity * hd;
            let qs = &q[(h * t + rows.start) * hd..(h * t + rows.end) * hd];
            let keys = pos + rows.end;
            let (kh, vh) = (&k[base..base + keys * hd], &v[base..base + keys * hd]);
            let mut o = vec![0f32; rows.len() * hd];
            // Rows whose window has moved past key 0 take the portable
            // loop (same bits), which knows masks.
            let windowed = s.first_key(pos + rows.end - 1) > 0;
            #[cfg(target_arch = "x86_64")]
            if simd && !windowed {
                // SAFETY: AVX2/FMA/F16C checked at run time.
                unsafe { x86::tiled_block(qs, kh, vh, hd, pos + rows.start, scale, &mut o) };
                return (h, rows.start, o);
            }
            let _ = (simd, windowed);
            for (i, (qr, dst)) in qs.chunks_exact(hd).zip(o.chunks_exact_mut(hd)).enumerate() {
                let p = pos + rows.start + i;
                let n = p + 1;
                let first = s.first_key(p);
                attend_row_tiled(qr, &kh[..n * hd], &vh[..n * hd], hd, scale, first, dst);
            }
            (h, rows.start, o)
        })
        .collect();
    for (h, start, o) in parts {
        for (i, row) in o.chunks_exact(hd).enumerate() {
            let at = ((start + i) * nh + h) * hd;
            out[at..at + hd].copy_from_slice(row);
        }
    }
}

/// f16 dot product summed as ggml's AVX2 `ggml_vec_dot_f16`: four 8-lane
/// f32 accumulators over 32-element steps, reduced pairwise, tail in f64
/// (or its AVX-512 sibling, 16 lanes over 64-element steps, on CPUs where
/// llama.cpp runs that one).
fn dot_f16(simd: bool, a: &[f16], b: &[f16]) -> f32 {
    if crate::quant::kernels() == crate::quant::Kernels::Avx512 {
        #[cfg(target_arch = "x86_64")]
        if simd && crate::quant::avx512_cpu() {
            // SAFETY: AVX-512 F/DQ checked at run time.
            return unsafe { x86::dot_f16_avx512(a, b) };
        }
        return dot_f16_wide_portable(a, b);
    }
    const STEP: usize = 32;
    let main = a.len() / STEP * STEP;
    // The eight lanes after the pairwise reduction of the accumulators.
    let mut r = [0f32; 8];
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2/FMA/F16C checked at run time; `main` ≤ both lengths.
        unsafe { r = x86::dot_f16_lanes(&a[..main], &b[..main]) };
    }
    if !simd || cfg!(not(target_arch = "x86_64")) {
        let mut acc = [[0f32; 8]; 4];
        for (ca, cb) in a[..main]
            .chunks_exact(STEP)
            .zip(b[..main].chunks_exact(STEP))
        {
            for j in 0..4 {
                for l in 0..8 {
                    let (x, y) = (ca[j * 8 + l].to_f32(), cb[j * 8 + l].to_f32());
                    acc[j][l] = x.mul_add(y, acc[j][l]);
                }
            }
        }
        for l in 0..8 {
            r[l] = (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]);
        }
    }
    // 256 -> 128 bits, then two horizontal adds.
    let h = [r[0] + r[4], r[1] + r[5], r[2] + r[6], r[3] + r[7]];
    let mut total = ((h[0] + h[1]) + (h[2] + h[3])) as f64;
    for i in main..a.len() {
        total += (a[i].to_f32() * b[i].to_f32()) as f64;
    }
    total as f32
}

/// [`x86::dot_f16_avx512`]'s arithmetic in portable code: the definition
/// its bits are checked against, and the AVX-512 family on other CPUs.
fn dot_f16_wide_portable(a: &[f16], b: &[f16]) -> f32 {
    const STEP: usize = 64;
    let main = a.len() / STEP * STEP;
    let mut acc = [[0f32; 16]; 4];
    for (ca, cb) in a[..main]
        .chunks_exact(STEP)
        .zip(b[..main].chunks_exact(STEP))
    {
        for j in 0..4 {
            for l in 0..16 {
                let (x, y) = (ca[j * 16 + l].to_f32(), cb[j * 16 + l].to_f32());
                acc[j][l] = x.mul_add(y, acc[j][l]);
            }
        }
    }
    let x: [f32; 16] = std::array::from_fn(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]));
    let t3: [f32; 8] = std::array::from_fn(|l| x[l + 8] + x[l]);
    let t6: [f32; 4] = std::array::from_fn(|l| t3[l + 4] + t3[l]);
    let mut total = ((t6[0] + t6[2]) + (t6[1] + t6[3])) as f64;
    for i in main..a.len() {
        total += (a[i].to_f32() * b[i].to_f32()) as f64;
    }
    total as f32
}

#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests {
    use super::*;

    /// Exact f32 attention, the mathematical definition.
    fn reference(
        s: AttnShape,
        q: &[f32],
        k: &[f16],
        v: &[f16],
        pos: usize,
        scale: f32,
    ) -> Vec<f32> {
        let (nh, hd) = (s.n_heads, s.head_dim);
        let t = q.len() / (nh * hd);
        let mut out = vec![0f32; t * nh * hd];
        for i in 0..t {
            for h in 0..nh {
                let base = h / (nh / s.n_kv_heads) * s.capacity * hd;
                let qr = &q[(h * t + i) * hd..][..hd];
                let first = s.first_key(pos + i);
                let scores: Vec<f32> = (first..=pos + i)
                    .map(|j| {
                        (0..hd)
                            .map(|d| qr[d] * k[base + j * hd + d].to_f32())
                            .sum::<f32>()
                            * scale
                    })
                    .collect();
                let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = scores.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for d in 0..hd {
                    out[(i * nh + h) * hd + d] = (first..=pos + i)
                        .map(|j| e[j - first] * v[base + j * hd + d].to_f32())
                        .sum::<f32>()
                        / z;
                }
            }
        }
        out
    }

    #[test]
    fn simd_vector_loops_give_the_scalar_bits() {
        if !crate::quant::simd_available() {
            return;
        }
        let val = |i: usize| f16::from_f32(((i * 7919 % 1000) as f32 / 97.0) - 5.0);
        for n in [8usize, 31, 64, 72, 100] {
            let a: Vec<f16> = (0..n).map(val).collect();
            let b: Vec<f16> = (0..n).map(|i| val(i + 17)).collect();
            let portable = if crate::quant::kernels() == crate::quant::Kernels::Avx512 {
                dot_f16_wide_portable(&a, &b)
            } else {
                dot_f16(false, &a, &b)
            };
            assert_eq!(dot_f16(true, &a, &b).to_bits(), portable.to_bits());
            let (mut x, mut y) = (a.clone(), a.clone());
            scale_f16(true, &mut x, 0.37);
            scale_f16(false, &mut y, 0.37);
            assert_eq!(x, y);
            mad_f16(true, &mut x, &b, 1.9);
            mad_f16(false, &mut y, &b, 1.9);
            assert_eq!(x, y);
        }
    }

    #[test]
    fn shared_tiles_give_the_one_row_bits() {
        let s = AttnShape {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            capacity: 300,
            window: None,
        };
        let val = |i: usize| ((i * 7919 % 1000) as f32 / 300.0) - 1.5;
        let k: Vec<f16> = (0..2 * 300 * 64).map(|i| f16::from_f32(val(i))).collect();
        let v: Vec<f16> = (0..2 * 300 * 64)
            .map(|i| f16::from_f32(val(i + 7)))
            .collect();
        for (t, pos) in [(64, 0), (70, 5), (130, 100)] {
            let q: Vec<f32> = (0..4 * t * 64).map(|i| val(i + 3)).collect();
            let mut out = vec![0f32; t * 4 * 64];
            attend(s, &q, &k, &v, pos, 0.125, &mut out);
            for i in 0..t {
                for h in 0..4 {
                    let base = h / 2 * 300 * 64;
                    let n = (pos + i + 1) * 64;
                    let mut want = vec![0f32; 64];
                    let qr = &q[(h * t + i) * 64..][..64];
                    attend_row_tiled(
                        qr,
                        &k[base..base + n],
                        &v[base..base + n],
                        64,
                        0.125,
                        0,
                        &mut want,
                    );
                    let got = &out[(i * 4 + h) * 64..][..64];
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "t {t} pos {pos} row {i} head {h}"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_exact_attention_to_f16_precision() {
        let s = AttnShape {
            n_heads: 6,
            n_kv_heads: 2,
            head_dim: 40,
            capacity: 80,
            window: None,
        };
        let val = |i: usize| ((i * 7919 % 1000) as f32 / 500.0) - 1.0;
        let k: Vec<f16> = (0..2 * 80 * 40).map(|i| f16::from_f32(val(i))).collect();
        let v: Vec<f16> = (0..2 * 80 * 40)
            .map(|i| f16::from_f32(val(i + 13)))
            .collect();
        let cases = [(1, 0), (1, 17), (5, 3), (20, 4), (70, 2)];
        for ((t, pos), window) in cases.into_iter().flat_map(|c| [(c, None), (c, Some(9))]) {
            let s = AttnShape { window, ..s };
            let q: Vec<f32> = (0..6 * t * 40).map(|i| val(i + 101)).collect();
            let mut out = vec![0f32; t * 6 * 40];
            attend(s, &q, &k, &v, pos, 0.3, &mut out);
            let want = reference(s, &q, &k, &v, pos, 0.3);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 5e-3, "t {t} pos {pos}: {a} vs {b}");
            }
        }
    }
}

//! The kernels against their portable definition (bit for bit) and against
//! exact products (within 8-bit activation error).
use super::*;
use rand::{Rng, SeedableRng};

const ALL: [NativeType; 10] = [
    NativeType::Q2_K,
    NativeType::Q3_K,
    NativeType::Q4_0,
    NativeType::Q4_1,
    NativeType::Q5_0,
    NativeType::Q5_1,
    NativeType::Q8_0,
    NativeType::Q4_K,
    NativeType::Q5_K,
    NativeType::Q6_K,
];

fn quantize_weights(ty: NativeType, w: &[f32], k: usize) -> Vec<u8> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let dtype = match ty {
        NativeType::Q4_0 => GgmlDType::Q4_0,
        NativeType::Q4_1 => GgmlDType::Q4_1,
        NativeType::Q5_0 => GgmlDType::Q5_0,
        NativeType::Q5_1 => GgmlDType::Q5_1,
        NativeType::Q8_0 => GgmlDType::Q8_0,
        NativeType::Q4_K => GgmlDType::Q4K,
        NativeType::Q5_K => GgmlDType::Q5K,
        NativeType::Q6_K => GgmlDType::Q6K,
        NativeType::Q3_K => GgmlDType::Q3K,
        NativeType::Q2_K => GgmlDType::Q2K,
    };
    let t =
        candle_core::Tensor::from_slice(w, (w.len() / k, k), &candle_core::Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype)
        .unwrap()
        .data()
        .unwrap()
        .into_owned()
}

/// The reference: every row pair through the portable kernels, with
/// the Q4_K shape the row's position in the batch gives it.
fn portable(
    ty: NativeType,
    bytes: &[u8],
    n: usize,
    k: usize,
    acts: &Activations,
    t: usize,
) -> Vec<f32> {
    let row_bytes = k / ty.block_elems() * ty.block_bytes();
    let mut out = vec![0f32; t * n];
    for r in 0..t {
        let shape = KShape::of(ty, n, t, r);
        for j in 0..n {
            let w = &bytes[j * row_bytes..(j + 1) * row_bytes];
            out[r * n + j] = if ty.is_k() {
                let bpr = k / QK_K;
                kquant::dot(ty, w, &acts.q8k[r * bpr..(r + 1) * bpr], shape)
            } else {
                let bpr = k / QK;
                scalar::dot(
                    ty,
                    w,
                    &acts.q8[r * bpr..(r + 1) * bpr],
                    shape == KShape::PerBlock,
                )
            };
        }
    }
    out
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
    let acts = Activations::new(&x, k, !ty.is_k(), ty.is_k());
    let mut out = vec![0f32; t * (n + 3)];
    matmul(view, &acts, &mut out, n + 3, 3);
    let reference = portable(ty, &bytes, n, k, &acts, t);
    let mut wrow = vec![0f32; k];
    for j in 0..n {
        dequantize_row(ty, &bytes, k, j, &mut wrow);
        for r in 0..t {
            let got = out[r * (n + 3) + 3 + j];
            // The SIMD path and the portable one agree to the bit.
            assert_eq!(
                got.to_bits(),
                reference[r * n + j].to_bits(),
                "{ty:?} row {r} col {j}: {got} vs portable {}",
                reference[r * n + j]
            );
            // 8-bit activations cost ~1% relative error on sums of this size.
            let exact: f32 = (0..k).map(|i| wrow[i] * x[r * k + i]).sum();
            assert!(
                (got - exact).abs() <= 0.05 * (1.0 + exact.abs()) + 0.02 * (k as f32).sqrt(),
                "{ty:?} {got} vs exact {exact}"
            );
        }
    }
}

#[test]
fn kernels_match_reference() {
    for ty in ALL {
        let shapes: &[(usize, usize, usize)] = if ty.is_k() {
            &[
                (1, 256, 1),
                (37, 512, 1),
                (16, 256, 5),
                (33, 768, 9),
                (40, 512, 7),
                (64, 512, 1),
                (96, 1536, 2),
                (40, 256, 3),
                (48, 512, 16),
                (24, 768, 23),
                (17, 256, 37),
            ]
        } else {
            &[
                (1, 32, 1),
                (37, 64, 1),
                (70, 96, 5),
                (33, 256, 9),
                (40, 64, 6),
            ]
        };
        for &(n, k, t) in shapes {
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
    // Q8_K: the signed maximum (positive here) maps to -127 and makes
    // the scale negative; bsums of 16.
    let x: Vec<f32> = (0..256).map(|i| i as f32 * 0.1 - 5.0).collect();
    let k = quantize_activations_k(&x, 256);
    assert!(k[0].d < 0.0);
    assert_eq!(k[0].qs[255], -127);
    let s: i16 = k[0].qs[..16].iter().map(|&q| q as i16).sum();
    assert_eq!(k[0].bsums[0], s);
}

/// A row's bits depend only on its own sequence's rows: five one-row
/// sequences batched (Q4_K would sum the first four per pair of
/// sub-blocks as a 5-row chunk), and a 9-row chunk beside two single rows
/// (Q6_K would go tiled for all eleven), each equal to its sequence alone.
#[test]
fn batched_rows_sum_as_their_own_sequence() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for ty in [NativeType::Q4_K, NativeType::Q6_K, NativeType::Q5_K] {
        let (n, k) = (64, 512);
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let bytes = quantize_weights(ty, &w, k);
        let view = WeightView {
            ty,
            bytes: &bytes,
            n,
            k,
        };
        for seqs in [vec![1usize, 1, 1, 1, 1], vec![9, 1, 1], vec![2, 4, 1, 8]] {
            let t: usize = seqs.iter().sum();
            let x: Vec<f32> = (0..t * k).map(|_| rng.random_range(-2.0..2.0)).collect();
            let acts = Activations::new(&x, k, false, true);
            let mut batched = vec![0f32; t * n];
            with_sequence_rows(&seqs, || matmul(view, &acts, &mut batched, n, 0));
            let mut start = 0;
            for &len in &seqs {
                let alone_acts = Activations::new(&x[start * k..(start + len) * k], k, false, true);
                let mut alone = vec![0f32; len * n];
                matmul(view, &alone_acts, &mut alone, n, 0);
                let got = &batched[start * n..(start + len) * n];
                assert!(
                    got.iter()
                        .zip(&alone)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{ty:?} {seqs:?}: a sequence of {len} rows differs batched"
                );
                start += len;
            }
        }
    }
}

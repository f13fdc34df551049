//! Which float order each row of a K-type product takes, and the product
//! run row group by row group; the decode rows' eight-weight-row walk.
//!
//! llama.cpp picks a K product's summation order from the batch (see
//! [`KShape`]); shoal follows it per *sequence*: each row is summed as its
//! own sequence's chunk alone would be, so batching never changes a
//! sequence's bits.

#[cfg(target_arch = "x86_64")]
use super::gemm512;
use super::kquant::{BlockQ8K, KShape, QK_K};
use super::{matmul_blocks, ActBlock, NativeType, OutPtr, WeightView};

thread_local! {
    /// The rows of each sequence of the pass this thread is running (see
    /// [`with_sequence_rows`]).
    static SEQUENCE_ROWS: std::cell::RefCell<Option<Vec<usize>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the products on this thread summing each row as its own
/// sequence's chunk alone would: `rows[s]` consecutive rows per sequence.
///
/// The K types' float order depends on the batch (see [`KShape`]): without
/// this, a row of a batch of several sequences was summed as row `r` of
/// `Σ rows` (a decode row beside a prompt chunk took the prompt's order),
/// so batching could change a sequence's bits. A product whose row count
/// is not `Σ rows` (an expert's share of the rows) keeps the batch's order.
pub fn with_sequence_rows<T>(rows: &[usize], f: impl FnOnce() -> T) -> T {
    let before = SEQUENCE_ROWS.with(|c| c.replace(Some(rows.to_vec())));
    let out = f();
    SEQUENCE_ROWS.with(|c| *c.borrow_mut() = before);
    out
}

/// The shape of each of `t` rows of a `ty` product of `n` outputs.
fn row_shapes(ty: NativeType, n: usize, t: usize) -> Vec<KShape> {
    SEQUENCE_ROWS.with(|c| match c.borrow().as_deref() {
        Some(seqs) if seqs.iter().sum::<usize>() == t => seqs
            .iter()
            .flat_map(|&len| (0..len).map(move |i| KShape::of(ty, n, len, i)))
            .collect(),
        _ => (0..t).map(|r| KShape::of(ty, n, t, r)).collect(),
    })
}

/// A K-type product: the rows grouped by their shape, each group through
/// the kernel of that shape (the AVX-512 gemm for prompt shapes where the
/// CPU has it), so each row's bits depend only on its own shape.
pub(super) fn matmul_k(
    w: WeightView<'_>,
    acts: &[BlockQ8K],
    out: &mut [f32],
    out_stride: usize,
    col: usize,
) {
    let bpr = w.k / QK_K;
    assert!(
        bpr > 0 && acts.len().is_multiple_of(bpr),
        "activation shape"
    );
    let t = acts.len() / bpr;
    let shapes = row_shapes(w.ty, w.n, t);
    let mut kinds: Vec<KShape> = Vec::new();
    for s in &shapes {
        if !kinds.contains(s) {
            kinds.push(*s);
        }
    }
    for shape in kinds {
        let rows: Vec<usize> = (0..t).filter(|&r| shapes[r] == shape).collect();
        #[cfg(target_arch = "x86_64")]
        if gemm512::takes(w, shape, rows.len()) {
            gemm512::matmul_rows(w, acts, &rows, out, out_stride, col);
            continue;
        }
        let (first, last) = (rows[0], rows[rows.len() - 1]);
        if last - first + 1 == rows.len() {
            // Consecutive rows (every single-sequence pass): in place.
            let a = &acts[first * bpr..(last + 1) * bpr];
            let o = &mut out[first * out_stride..];
            matmul_blocks(w, a, o, out_stride, col, Some(shape));
            continue;
        }
        let gathered: Vec<BlockQ8K> = rows
            .iter()
            .flat_map(|&r| acts[r * bpr..(r + 1) * bpr].iter().copied())
            .collect();
        let mut tmp = vec![0f32; rows.len() * w.n];
        matmul_blocks(w, &gathered, &mut tmp, w.n, 0, Some(shape));
        for (i, &r) in rows.iter().enumerate() {
            out[r * out_stride + col..r * out_stride + col + w.n]
                .copy_from_slice(&tmp[i * w.n..(i + 1) * w.n]);
        }
    }
}

/// One or two activation rows (`acts`, batch rows `r..`) against the
/// weight rows `weight_rows`, eight weight rows at a time where a kernel
/// takes them so ([`ActBlock::dot_rows8`]); returns the first weight row
/// left for the caller (all of them where no kernel does).
pub(super) fn decode_rows8<B: ActBlock>(
    w: WeightView<'_>,
    row_bytes: usize,
    acts: &[&[B]],
    weight_rows: std::ops::Range<usize>,
    shape: KShape,
    dst: &OutPtr,
    r: usize,
) -> usize {
    let mut first = weight_rows.start;
    while first + 8 <= weight_rows.end {
        let w8 = &w.bytes[first * row_bytes..(first + 8) * row_bytes];
        let mut vals = [[0f32; 8]; 2];
        let done = if let [a, b] = acts {
            B::dot_rows8(w.ty, w8, row_bytes, &[*a, *b], &mut vals, shape)
        } else {
            let mut one = [[0f32; 8]; 1];
            let done = B::dot_rows8(w.ty, w8, row_bytes, &[acts[0]], &mut one, shape);
            vals[0] = one[0];
            done
        };
        if !done {
            break;
        }
        for (i, row) in vals.iter().take(acts.len()).enumerate() {
            for (c, v) in row.iter().enumerate() {
                // SAFETY: batch row `r + i` < t and column `col + first + c`
                // < stride (asserted by `matmul_blocks`); each column is
                // written by the one task that owns its weight row.
                unsafe { *dst.ptr.add((r + i) * dst.stride + dst.col + first + c) = *v };
            }
        }
        first += 8;
    }
    first
}

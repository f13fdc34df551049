//! Projection weights and embeddings, read from the mapped GGUF.
//!
//! A [`LinearGroup`] is a set of matrices that share an input (q/k/v, or
//! gate/up). On the CPU the whole group is one candle custom op: the input
//! is quantized once and every matrix runs from the file's bytes with
//! [`crate::quant`]'s kernels (or candle's CPU kernels for types without one).
//! On CUDA/Metal each matrix is a candle `QMatMul` on the device.

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Tensor};
use sharding::gguf::MappedSpan;
use sharding::{GgmlType, TensorInfo};

use crate::quant::{self, NativeType, WeightView};

/// A tensor's bytes inside a mapped span of the model file.
#[derive(Clone, Debug)]
pub struct WeightBytes {
    span: Arc<MappedSpan>,
    info: TensorInfo,
}

impl WeightBytes {
    /// The bytes of `info`, which must lie in `span`.
    pub fn new(span: Arc<MappedSpan>, info: TensorInfo) -> Self {
        assert!(
            span.contains(&info),
            "tensor {} outside its span",
            info.name
        );
        WeightBytes { span, info }
    }

    /// Rows `[start, start + count)` of this matrix (GGUF dims `[k, rows…]`,
    /// any dims after the first flattened into rows) as a matrix of its
    /// own: an expert of a stacked expert tensor.
    pub fn rows(&self, start: u64, count: u64) -> WeightBytes {
        let k = self.info.dims[0];
        let total: u64 = self.info.dims[1..].iter().product();
        assert!(start + count <= total, "rows outside {}", self.info.name);
        let row_bytes = self.info.ggml_type.bytes_for(k);
        let info = TensorInfo {
            name: format!("{}[{start}..{}]", self.info.name, start + count),
            dims: vec![k, count],
            ggml_type: self.info.ggml_type,
            offset: self.info.offset + start * row_bytes,
            size_bytes: count * row_bytes,
        };
        WeightBytes::new(self.span.clone(), info)
    }

    /// The raw ggml bytes.
    pub fn bytes(&self) -> &[u8] {
        self.span.tensor_bytes(&self.info)
    }

    /// The tensor's index entry.
    pub fn info(&self) -> &TensorInfo {
        &self.info
    }

    /// A small tensor (norm weights, biases) as f32 on `device`.
    pub fn to_f32_tensor(&self, device: &Device) -> candle_core::Result<Tensor> {
        let n = self.info.elements() as usize;
        let data = match self.info.ggml_type {
            GgmlType::F32 => self
                .bytes()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            _ => dequantize_rows(self, 1, n, 0, 1)?,
        };
        Tensor::from_vec(data, n, device)
    }
}

pub(crate) fn candle_dtype(ty: GgmlType) -> GgmlDType {
    match ty {
        GgmlType::F32 => GgmlDType::F32,
        GgmlType::F16 => GgmlDType::F16,
        GgmlType::BF16 => GgmlDType::BF16,
        GgmlType::Q4_0 => GgmlDType::Q4_0,
        GgmlType::Q4_1 => GgmlDType::Q4_1,
        GgmlType::Q5_0 => GgmlDType::Q5_0,
        GgmlType::Q5_1 => GgmlDType::Q5_1,
        GgmlType::Q8_0 => GgmlDType::Q8_0,
        GgmlType::Q2_K => GgmlDType::Q2K,
        GgmlType::Q3_K => GgmlDType::Q3K,
        GgmlType::Q4_K => GgmlDType::Q4K,
        GgmlType::Q5_K => GgmlDType::Q5K,
        GgmlType::Q6_K => GgmlDType::Q6K,
    }
}

/// Dequantizes rows `[first, first + count)` of a `[rows, k]` matrix to f32.
pub(crate) fn dequantize_rows(
    w: &WeightBytes,
    rows: usize,
    k: usize,
    first: usize,
    count: usize,
) -> candle_core::Result<Vec<f32>> {
    assert!(first + count <= rows, "rows out of range");
    let ty = w.info.ggml_type;
    let row_bytes = ty.bytes_for(k as u64) as usize;
    let mut out = vec![0f32; count * k];
    for (i, o) in out.chunks_exact_mut(k).enumerate() {
        let row = first + i;
        match NativeType::from_ggml(ty) {
            Some(nt) if k.is_multiple_of(nt.block_elems()) => {
                quant::dequantize_row(nt, w.bytes(), k, row, o)
            }
            _ => {
                let raw = &w.bytes()[row * row_bytes..(row + 1) * row_bytes];
                match candle_dtype(ty)
                    .from_data(Cow::Borrowed(raw))
                    .dequantize(k)?
                {
                    CpuStorage::F32(v) => o.copy_from_slice(&v),
                    other => candle_core::bail!("unexpected dequantized dtype {:?}", other.dtype()),
                }
            }
        }
    }
    Ok(out)
}

/// One matrix on the CPU: native kernel from the mapped bytes, or candle's
/// kernels on a copy in candle's block layout.
enum CpuMatrix {
    Native(WeightBytes, NativeType),
    Candle(Box<dyn QuantizedType>),
}

struct CpuPart {
    matrix: CpuMatrix,
    /// Output features.
    n: usize,
}

/// The CPU custom op: `[.., k] -> [.., Σ n]`, one quantization of the input.
struct CpuGroupOp {
    parts: Vec<CpuPart>,
    k: usize,
    n_total: usize,
}

impl CustomOp1 for CpuGroupOp {
    fn name(&self) -> &'static str {
        "shoal-qmatmul"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!(
                "shoal-qmatmul: input must be f32, got {:?}",
                storage.dtype()
            )
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("shoal-qmatmul: input must be contiguous")
        };
        let x = &data[start..end];
        let dims = layout.shape().dims();
        if dims.last() != Some(&self.k) {
            candle_core::bail!("shoal-qmatmul: input {dims:?}, weights take {}", self.k)
        }
        let t = x.len() / self.k;
        let mut out = vec![0f32; t * self.n_total];
        let native = |k_type: bool| {
            self.parts
                .iter()
                .any(|p| matches!(p.matrix, CpuMatrix::Native(_, ty) if ty.is_k() == k_type))
        };
        let acts = quant::Activations::new(x, self.k, native(false), native(true));
        let mut col = 0;
        for part in &self.parts {
            match &part.matrix {
                CpuMatrix::Native(w, ty) => {
                    let view = WeightView {
                        ty: *ty,
                        bytes: w.bytes(),
                        n: part.n,
                        k: self.k,
                    };
                    quant::matmul(view, &acts, &mut out, self.n_total, col);
                }
                CpuMatrix::Candle(m) => {
                    let mut tmp = vec![0f32; t * part.n];
                    m.matmul_t((t, self.k, part.n), x, &mut tmp)?;
                    for (dst, src) in out
                        .chunks_exact_mut(self.n_total)
                        .zip(tmp.chunks_exact(part.n))
                    {
                        dst[col..col + part.n].copy_from_slice(src);
                    }
                }
            }
            col += part.n;
        }
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = self.n_total;
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }
}

enum GroupImpl {
    Cpu(CpuGroupOp),
    Device(Vec<QMatMul>),
}

/// Matrices sharing one input; `forward` returns one output per matrix.
pub struct LinearGroup {
    imp: GroupImpl,
    widths: Vec<usize>,
}

impl LinearGroup {
    /// Builds a group from GGUF matrices of dims `[k, n_i]` (all the same `k`).
    pub fn new(weights: Vec<WeightBytes>, device: &Device) -> candle_core::Result<Self> {
        assert!(!weights.is_empty());
        let k = weights[0].info.dims[0] as usize;
        let widths: Vec<usize> = weights.iter().map(|w| w.info.dims[1] as usize).collect();
        assert!(
            weights.iter().all(|w| w.info.dims[0] as usize == k),
            "group inputs differ"
        );
        let imp = if device.is_cpu() {
            let parts = weights
                .into_iter()
                .zip(&widths)
                .map(|(w, &n)| {
                    let ty = w.info.ggml_type;
                    let matrix = match NativeType::from_ggml(ty) {
                        Some(nt) if k.is_multiple_of(nt.block_elems()) => CpuMatrix::Native(w, nt),
                        _ => {
                            CpuMatrix::Candle(candle_dtype(ty).from_data(Cow::Borrowed(w.bytes())))
                        }
                    };
                    CpuPart { matrix, n }
                })
                .collect();
            GroupImpl::Cpu(CpuGroupOp {
                parts,
                k,
                n_total: widths.iter().sum(),
            })
        } else {
            let mats = weights
                .iter()
                .map(|w| {
                    let dims: Vec<usize> = w.info.dims.iter().rev().map(|&d| d as usize).collect();
                    let storage = QStorage::from_data(
                        Cow::Borrowed(w.bytes()),
                        device,
                        candle_dtype(w.info.ggml_type),
                    )?;
                    QMatMul::from_qtensor(QTensor::new(storage, dims)?)
                })
                .collect::<candle_core::Result<_>>()?;
            GroupImpl::Device(mats)
        };
        Ok(LinearGroup { imp, widths })
    }

    /// `x` is `[.., k]` f32; returns `[.., n_i]` for each matrix.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Vec<Tensor>> {
        match &self.imp {
            GroupImpl::Cpu(op) => {
                let y = x.contiguous()?.apply_op1_no_bwd(op)?;
                if self.widths.len() == 1 {
                    return Ok(vec![y]);
                }
                let last = y.rank() - 1;
                let mut col = 0;
                self.widths
                    .iter()
                    .map(|&n| {
                        let part = y.narrow(last, col, n);
                        col += n;
                        part
                    })
                    .collect()
            }
            GroupImpl::Device(mats) => mats.iter().map(|m| m.forward(x)).collect(),
        }
    }

    /// Single-matrix convenience.
    pub fn forward_one(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut v = self.forward(x)?;
        debug_assert_eq!(v.len(), 1);
        Ok(v.swap_remove(0))
    }
}

/// Token embedding lookup straight from the (possibly quantized) table.
pub struct Embedding {
    table: WeightBytes,
    vocab: usize,
    dim: usize,
}

impl Embedding {
    /// A table of GGUF dims `[dim, vocab]`.
    pub fn new(table: WeightBytes) -> Self {
        let (dim, vocab) = (table.info.dims[0] as usize, table.info.dims[1] as usize);
        Embedding { table, vocab, dim }
    }

    /// `[ids.len(), dim]` f32 rows on `device`. Ids must be `< vocab`.
    pub fn forward(&self, ids: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        let mut out = Vec::with_capacity(ids.len() * self.dim);
        for &id in ids {
            if id as usize >= self.vocab {
                candle_core::bail!("token id {id} outside the vocabulary of {}", self.vocab)
            }
            out.extend(dequantize_rows(
                &self.table,
                self.vocab,
                self.dim,
                id as usize,
                1,
            )?);
        }
        Tensor::from_vec(out, (ids.len(), self.dim), device)?.to_dtype(DType::F32)
    }
}

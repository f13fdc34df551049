//! The model described from a GGUF header: hyperparameters and, per layer,
//! which tensors it has and how many bytes they take. This is what the
//! planner splits and what a stage loads.

use std::ops::Range;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ggml::GgmlType;
use crate::gguf::{GgufFile, TensorInfo};

/// Architectures shoal runs: the llama family. Mistral-style GGUFs declare
/// `llama`; Qwen2 adds q/k/v biases and NeoX RoPE.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2"];

/// What is wrong with a GGUF as a model (the container itself parsed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    /// `general.architecture` is missing or names an architecture shoal does not run.
    #[error("{path}: unsupported model architecture '{arch}' (shoal runs: {})", SUPPORTED_ARCHITECTURES.join(", "))]
    UnknownArchitecture {
        /// The file.
        path: PathBuf,
        /// The architecture found.
        arch: String,
    },
    /// A required metadata key is missing or has the wrong type.
    #[error("{path}: missing or invalid metadata key '{key}'")]
    MissingKey {
        /// The file.
        path: PathBuf,
        /// The key.
        key: String,
    },
    /// A required tensor is missing.
    #[error("{path}: missing tensor '{tensor}'")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
    },
    /// A tensor's shape does not match the hyperparameters.
    #[error("{path}: tensor '{tensor}' has shape {found:?}, expected {expected:?}")]
    BadShape {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// Dims in the file (ggml order).
        found: Vec<u64>,
        /// Dims expected (ggml order).
        expected: Vec<u64>,
    },
    /// The hyperparameters are inconsistent or use a feature shoal lacks.
    #[error("{path}: {what}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is unsupported.
        what: String,
    },
}

/// How rotary embeddings pair up dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1): llama.cpp's "normal" mode, used by llama GGUFs
    /// (the converter permutes q/k so this matches the HF model).
    Interleaved,
    /// Halves (i, i+d/2): GPT-NeoX style, used by Qwen2.
    Neox,
}

/// Hyperparameters of a llama-family model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, if any.
    pub name: Option<String>,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Hidden size.
    pub dim: usize,
    /// MLP inner size.
    pub ffn_dim: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_heads`).
    pub n_kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Context length the model was trained for.
    pub context_length: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// Dimension pairing of RoPE.
    pub rope_style: RopeStyle,
    /// Linear RoPE position scaling (1.0 = none).
    pub rope_scale: f32,
}

/// The tensors of one transformer block.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerLayout {
    /// Block index.
    pub index: usize,
    /// Its tensors, all required ones first.
    pub tensors: Vec<TensorInfo>,
}

impl LayerLayout {
    /// Bytes of weights in this block.
    pub fn bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.size_bytes).sum()
    }

    /// The tensor whose name ends with `.{suffix}`.
    pub fn tensor(&self, suffix: &str) -> Option<&TensorInfo> {
        let name = format!("blk.{}.{suffix}", self.index);
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// A model as the planner and the loader see it.
#[derive(Debug, Clone)]
pub struct ModelLayout {
    /// Hyperparameters.
    pub config: ModelConfig,
    /// `token_embd.weight`.
    pub token_embd: TensorInfo,
    /// `output_norm.weight`.
    pub output_norm: TensorInfo,
    /// `output.weight`, or `None` when the head is tied to the embedding.
    pub output: Option<TensorInfo>,
    /// `rope_freqs.weight` (Llama 3.1 long-context frequency factors), if any.
    pub rope_freqs: Option<TensorInfo>,
    /// The blocks, in order.
    pub layers: Vec<LayerLayout>,
}

const LAYER_TENSORS: &[&str] = &[
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
];
const OPTIONAL_LAYER_TENSORS: &[&str] = &["attn_q.bias", "attn_k.bias", "attn_v.bias"];

impl ModelLayout {
    /// Describes the model in a parsed GGUF, checking every tensor's shape.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, LayoutError> {
        let config = read_config(gguf)?;
        let path = gguf.path().to_path_buf();
        let tensor = |name: &str| {
            gguf.tensor(name)
                .cloned()
                .ok_or(LayoutError::MissingTensor {
                    path: path.clone(),
                    tensor: name.to_string(),
                })
        };
        let c = &config;
        let (dim, ffn) = (c.dim as u64, c.ffn_dim as u64);
        let q_dim = (c.n_heads * c.head_dim) as u64;
        let kv_dim = (c.n_kv_heads * c.head_dim) as u64;
        let vocab = c.vocab_size as u64;
        let token_embd = tensor("token_embd.weight")?;
        check_shape(&path, &token_embd, &[dim, vocab])?;
        let output_norm = tensor("output_norm.weight")?;
        check_shape(&path, &output_norm, &[dim])?;
        let output = gguf.tensor("output.weight").cloned();
        if let Some(o) = &output {
            check_shape(&path, o, &[dim, vocab])?;
        }
        let rope_freqs = gguf.tensor("rope_freqs.weight").cloned();
        if let Some(r) = &rope_freqs {
            check_shape(&path, r, &[c.head_dim as u64 / 2])?;
        }
        let expected = |suffix: &str| -> Vec<u64> {
            match suffix {
                "attn_norm.weight" | "ffn_norm.weight" => vec![dim],
                "attn_q.weight" => vec![dim, q_dim],
                "attn_k.weight" | "attn_v.weight" => vec![dim, kv_dim],
                "attn_output.weight" => vec![q_dim, dim],
                "ffn_gate.weight" | "ffn_up.weight" => vec![dim, ffn],
                "ffn_down.weight" => vec![ffn, dim],
                "attn_q.bias" => vec![q_dim],
                _ => vec![kv_dim],
            }
        };
        let mut layers = Vec::with_capacity(c.n_layers);
        for index in 0..c.n_layers {
            let mut tensors = Vec::new();
            for suffix in LAYER_TENSORS {
                let t = tensor(&format!("blk.{index}.{suffix}"))?;
                check_shape(&path, &t, &expected(suffix))?;
                tensors.push(t);
            }
            for suffix in OPTIONAL_LAYER_TENSORS {
                if let Some(t) = gguf.tensor(&format!("blk.{index}.{suffix}")) {
                    check_shape(&path, t, &expected(suffix))?;
                    tensors.push(t.clone());
                }
            }
            layers.push(LayerLayout { index, tensors });
        }
        Ok(ModelLayout {
            config,
            token_embd,
            output_norm,
            output,
            rope_freqs,
            layers,
        })
    }

    /// The tensors a stage running `layers` needs: the embedding on the
    /// first stage, the norm and head on the last (the embedding again when
    /// the head is tied), and the blocks in between.
    pub fn stage_tensors(&self, layers: Range<usize>) -> Vec<&TensorInfo> {
        assert!(
            layers.start < layers.end && layers.end <= self.layers.len(),
            "layer range {layers:?} outside 0..{}",
            self.layers.len()
        );
        let first = layers.start == 0;
        let last = layers.end == self.layers.len();
        let mut out: Vec<&TensorInfo> = Vec::new();
        if first || (last && self.output.is_none()) {
            out.push(&self.token_embd);
        }
        out.extend(self.rope_freqs.iter());
        out.extend(self.layers[layers].iter().flat_map(|l| l.tensors.iter()));
        if last {
            out.push(&self.output_norm);
            out.extend(self.output.iter());
        }
        out
    }

    /// The tensors outside the blocks: token embedding, output norm, head
    /// (when not tied) and RoPE frequency factors.
    pub fn end_tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        [Some(&self.token_embd), Some(&self.output_norm)]
            .into_iter()
            .chain([self.output.as_ref(), self.rope_freqs.as_ref()])
            .flatten()
    }

    /// Bytes of weights a stage running `layers` holds.
    pub fn stage_bytes(&self, layers: Range<usize>) -> u64 {
        self.stage_tensors(layers)
            .iter()
            .map(|t| t.size_bytes)
            .sum()
    }

    /// Bytes of the KV cache per token of context for `layers` (f32 K and V).
    pub fn kv_bytes_per_token(&self, layers: Range<usize>) -> u64 {
        let c = &self.config;
        (layers.len() * 2 * c.n_kv_heads * c.head_dim * 4) as u64
    }
}

fn check_shape(
    path: &std::path::Path,
    t: &TensorInfo,
    expected: &[u64],
) -> Result<(), LayoutError> {
    if t.dims != expected {
        return Err(LayoutError::BadShape {
            path: path.to_path_buf(),
            tensor: t.name.clone(),
            found: t.dims.clone(),
            expected: expected.to_vec(),
        });
    }
    if matches!(t.ggml_type, GgmlType::BF16) && t.dims.len() > 1 {
        return Err(LayoutError::Unsupported {
            path: path.to_path_buf(),
            what: format!("tensor '{}': BF16 matrices are not supported yet", t.name),
        });
    }
    Ok(())
}

fn read_config(gguf: &GgufFile) -> Result<ModelConfig, LayoutError> {
    let path = gguf.path().to_path_buf();
    let arch = gguf
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .unwrap_or("<none>")
        .to_string();
    if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(LayoutError::UnknownArchitecture { path, arch });
    }
    let missing = |key: &str| LayoutError::MissingKey {
        path: path.clone(),
        key: key.to_string(),
    };
    let key = |k: &str| format!("{arch}.{k}");
    let usize_key = |k: &str| -> Result<Option<usize>, LayoutError> {
        match gguf.get(&key(k)) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .map(Some)
                .ok_or_else(|| missing(&key(k))),
        }
    };
    let required = |k: &str| usize_key(k)?.ok_or_else(|| missing(&key(k)));
    let float_key = |k: &str, default: f32| -> Result<f32, LayoutError> {
        match gguf.get(&key(k)) {
            None => Ok(default),
            Some(v) => v.as_f64().map(|f| f as f32).ok_or_else(|| missing(&key(k))),
        }
    };
    let n_layers = required("block_count")?;
    let dim = required("embedding_length")?;
    let n_heads = required("attention.head_count")?;
    let n_kv_heads = usize_key("attention.head_count_kv")?.unwrap_or(n_heads);
    let head_dim = usize_key("attention.key_length")?.unwrap_or(dim / n_heads);
    let unsupported = |what: String| LayoutError::Unsupported {
        path: path.clone(),
        what,
    };
    if n_heads % n_kv_heads != 0 {
        return Err(unsupported(format!(
            "{n_heads} attention heads are not a multiple of {n_kv_heads} KV heads"
        )));
    }
    if head_dim % 2 != 0 || head_dim == 0 {
        return Err(unsupported(format!("head size {head_dim} must be even")));
    }
    if let Some(rot) = usize_key("rope.dimension_count")? {
        if rot != head_dim {
            return Err(unsupported(format!(
                "partial rotary embeddings ({rot} of {head_dim} dims) are not supported"
            )));
        }
    }
    let vocab_size = match usize_key("vocab_size")? {
        Some(v) => v,
        None => gguf
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .map(|v| v as usize)
            .ok_or_else(|| missing(&key("vocab_size")))?,
    };
    let rope_scale = match gguf.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
        None | Some("none") => 1.0,
        Some("linear") => float_key("rope.scaling.factor", 1.0)?,
        // Llama 3.1 declares its scaling through the rope_freqs tensor.
        Some("llama3") => 1.0,
        Some(other) => {
            return Err(unsupported(format!(
                "RoPE scaling '{other}' is not supported"
            )))
        }
    };
    Ok(ModelConfig {
        name: gguf
            .get("general.name")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        rope_style: if arch == "qwen2" {
            RopeStyle::Neox
        } else {
            RopeStyle::Interleaved
        },
        n_layers,
        dim,
        ffn_dim: required("feed_forward_length")?,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab_size,
        context_length: usize_key("context_length")?.unwrap_or(2048),
        rms_eps: float_key("attention.layer_norm_rms_epsilon", 1e-5)?,
        rope_theta: float_key("rope.freq_base", 10_000.0)?,
        rope_scale: if rope_scale > 0.0 { rope_scale } else { 1.0 },
        architecture: arch,
    })
}

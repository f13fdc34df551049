//! The model described from a GGUF header: hyperparameters and, per layer,
//! which tensors it has and how many bytes they take. This is what the
//! planner splits and what a stage loads.

use std::ops::Range;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ggml::GgmlType;
use crate::gguf::{GgufFile, TensorInfo};

/// Architectures shoal runs. Mistral-style GGUFs declare `llama`; Qwen2
/// adds q/k/v biases and NeoX RoPE; Qwen3 per-head q/k norms; Gemma 3
/// q/k norms, norms after attention and FFN, GeGLU, a scaled embedding and
/// sliding-window layers; Phi-3 fused QKV and gate/up matrices; Qwen3-MoE
/// a routed mixture of experts in every layer.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "llama", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma3", "phi3",
];

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

/// The feed-forward activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Activation {
    /// `silu(gate) * up` (llama, Qwen, Phi).
    #[default]
    SwiGlu,
    /// `gelu_tanh(gate) * up` (Gemma).
    GeGlu,
}

/// A routed mixture of experts in place of the dense feed-forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Experts {
    /// Experts per layer.
    pub count: usize,
    /// Experts each token runs.
    pub used: usize,
    /// Inner size of one expert.
    pub ffn_dim: usize,
    /// Whether the chosen experts' weights are renormalized to sum to 1.
    pub normalize: bool,
}

/// Sliding-window attention on some layers (Gemma 3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlidingWindow {
    /// Keys a query sees, itself included.
    pub window: usize,
    /// Per layer: whether it attends within the window only.
    pub layers: Vec<bool>,
    /// RoPE base of the windowed layers.
    pub rope_theta: f32,
}

/// Hyperparameters of a model.
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
    /// Per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3).
    #[serde(default)]
    pub qk_norm: bool,
    /// RMSNorms after attention and after the feed-forward (Gemma 3).
    #[serde(default)]
    pub post_norms: bool,
    /// The feed-forward activation.
    #[serde(default)]
    pub activation: Activation,
    /// Factor on the token embeddings (Gemma: sqrt(dim)).
    #[serde(default)]
    pub embed_scale: Option<f32>,
    /// Scale of the attention scores.
    #[serde(default)]
    pub attn_scale: f32,
    /// Whether `attn_scale` multiplies q before attention (Gemma, Phi-3)
    /// rather than the scores inside it: the same math, other roundings.
    #[serde(default)]
    pub scale_q: bool,
    /// Sliding-window attention, if any layer has it.
    #[serde(default)]
    pub sliding_window: Option<SlidingWindow>,
    /// Soft cap of the final logits (`cap * tanh(x / cap)`), if any.
    #[serde(default)]
    pub final_softcap: Option<f32>,
    /// Mixture of experts, if the model has one.
    #[serde(default)]
    pub experts: Option<Experts>,
    /// Phi-3 stores q/k/v as one matrix and gate/up as one.
    #[serde(default)]
    pub fused: bool,
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

/// The tensors of block `index` the model's config calls for: `(suffix,
/// expected dims, required)`.
fn layer_tensors(c: &ModelConfig) -> Vec<(&'static str, Vec<u64>, bool)> {
    let (dim, ffn, hd) = (c.dim as u64, c.ffn_dim as u64, c.head_dim as u64);
    let q_dim = (c.n_heads * c.head_dim) as u64;
    let kv_dim = (c.n_kv_heads * c.head_dim) as u64;
    let mut t = vec![
        ("attn_norm.weight", vec![dim], true),
        ("attn_output.weight", vec![q_dim, dim], true),
        ("ffn_norm.weight", vec![dim], true),
    ];
    if c.fused {
        t.push(("attn_qkv.weight", vec![dim, q_dim + 2 * kv_dim], true));
    } else {
        t.push(("attn_q.weight", vec![dim, q_dim], true));
        t.push(("attn_k.weight", vec![dim, kv_dim], true));
        t.push(("attn_v.weight", vec![dim, kv_dim], true));
        t.push(("attn_q.bias", vec![q_dim], false));
        t.push(("attn_k.bias", vec![kv_dim], false));
        t.push(("attn_v.bias", vec![kv_dim], false));
    }
    if c.qk_norm {
        t.push(("attn_q_norm.weight", vec![hd], true));
        t.push(("attn_k_norm.weight", vec![hd], true));
    }
    if c.post_norms {
        t.push(("post_attention_norm.weight", vec![dim], true));
        t.push(("post_ffw_norm.weight", vec![dim], true));
    }
    match (&c.experts, c.fused) {
        (Some(e), _) => {
            let (n, eff) = (e.count as u64, e.ffn_dim as u64);
            t.push(("ffn_gate_inp.weight", vec![dim, n], true));
            t.push(("ffn_gate_exps.weight", vec![dim, eff, n], true));
            t.push(("ffn_up_exps.weight", vec![dim, eff, n], true));
            t.push(("ffn_down_exps.weight", vec![eff, dim, n], true));
        }
        (None, true) => {
            t.push(("ffn_up.weight", vec![dim, 2 * ffn], true));
            t.push(("ffn_down.weight", vec![ffn, dim], true));
        }
        (None, false) => {
            t.push(("ffn_gate.weight", vec![dim, ffn], true));
            t.push(("ffn_up.weight", vec![dim, ffn], true));
            t.push(("ffn_down.weight", vec![ffn, dim], true));
        }
    }
    t
}

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
        let dim = c.dim as u64;
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
        let spec = layer_tensors(c);
        let mut layers = Vec::with_capacity(c.n_layers);
        for index in 0..c.n_layers {
            let mut tensors = Vec::new();
            // Required tensors first, then the optional ones present.
            for required in [true, false] {
                for (suffix, dims, _) in spec.iter().filter(|s| s.2 == required) {
                    let name = format!("blk.{index}.{suffix}");
                    let Some(t) = gguf.tensor(&name) else {
                        if required {
                            return Err(LayoutError::MissingTensor {
                                path: path.clone(),
                                tensor: name,
                            });
                        }
                        continue;
                    };
                    check_shape(&path, t, dims)?;
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
    let neox = matches!(
        arch.as_str(),
        "qwen2" | "qwen3" | "qwen3moe" | "gemma3" | "phi3"
    );
    let gemma = arch == "gemma3";
    let ffn_dim = match usize_key("feed_forward_length")? {
        Some(f) => f,
        None if arch == "qwen3moe" => 0,
        None => return Err(missing(&key("feed_forward_length"))),
    };
    let experts = if arch == "qwen3moe" {
        let count = required("expert_count")?;
        let used = required("expert_used_count")?;
        if used > count {
            return Err(unsupported(format!(
                "{used} experts used per token of {count}"
            )));
        }
        let ffn_dim = match usize_key("expert_feed_forward_length")? {
            Some(f) => f,
            None if ffn_dim > 0 => ffn_dim / used,
            None => return Err(missing(&key("expert_feed_forward_length"))),
        };
        Some(Experts {
            count,
            used,
            ffn_dim,
            normalize: true,
        })
    } else {
        None
    };
    // Gemma 3 27B scales by the model width per head, the others by the
    // head size (llama.cpp's `f_attention_scale`).
    let attn_scale = if gemma && n_layers == 62 {
        1.0 / ((dim / n_heads) as f32).sqrt()
    } else {
        1.0 / (head_dim as f32).sqrt()
    };
    let sliding_window = match usize_key("attention.sliding_window")? {
        Some(window) if gemma => {
            let period = usize_key("attention.sliding_window_pattern")?.unwrap_or(6);
            Some(SlidingWindow {
                window,
                layers: (0..n_layers).map(|l| l % period < period - 1).collect(),
                rope_theta: float_key("rope.freq_base_swa", 10_000.0)?,
            })
        }
        _ => None,
    };
    if arch == "phi3" && gguf.tensor("rope_factors_long.weight").is_some() {
        return Err(unsupported(
            "Phi-3's long-context RoPE factors (LongRoPE) are not supported yet".into(),
        ));
    }
    let softcap = float_key("final_logit_softcapping", 0.0)?;
    Ok(ModelConfig {
        name: gguf
            .get("general.name")
            .and_then(|v| v.as_str())
            .map(str::to_string),
        rope_style: if neox {
            RopeStyle::Neox
        } else {
            RopeStyle::Interleaved
        },
        n_layers,
        dim,
        ffn_dim,
        n_heads,
        n_kv_heads,
        head_dim,
        vocab_size,
        context_length: usize_key("context_length")?.unwrap_or(2048),
        rms_eps: float_key("attention.layer_norm_rms_epsilon", 1e-5)?,
        rope_theta: float_key("rope.freq_base", 10_000.0)?,
        rope_scale: if rope_scale > 0.0 { rope_scale } else { 1.0 },
        qk_norm: matches!(arch.as_str(), "qwen3" | "qwen3moe" | "gemma3"),
        post_norms: gemma,
        activation: if gemma {
            Activation::GeGlu
        } else {
            Activation::SwiGlu
        },
        embed_scale: gemma.then(|| (dim as f32).sqrt()),
        attn_scale,
        scale_q: gemma || arch == "phi3",
        sliding_window,
        final_softcap: (softcap > 0.0).then_some(softcap),
        experts,
        fused: arch == "phi3",
        architecture: arch,
    })
}

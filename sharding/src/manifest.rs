//! Weight manifests: a blake3 hash of every layer's tensors, so nodes can
//! prove they hold the same model before serving it together (and, later,
//! verify layers fetched from peers).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::gguf::{GgufError, TensorInfo};
use crate::layout::ModelLayout;

/// Bytes read per call while hashing: large enough for blake3's SIMD, small
/// enough not to matter for memory (the file is read, not mapped, so
/// hashing a model does not make its pages resident in this process).
const HASH_READ_BYTES: usize = 1 << 20;

/// blake3 hashes of a model's weights, per layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Hash of each layer's tensors (names, shapes, types and bytes).
    pub layers: Vec<[u8; 32]>,
    /// Hash of the token embedding, output norm and head (and rope factors).
    pub ends: [u8; 32],
    /// Hash of all of the above: one value names the model.
    pub model_hash: [u8; 32],
}

impl Manifest {
    /// Hashes the model at `path` described by `layout`.
    pub fn compute(path: &Path, layout: &ModelLayout) -> Result<Manifest, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let mut buf = vec![0u8; HASH_READ_BYTES];
        let mut layers = Vec::with_capacity(layout.layers.len());
        for layer in &layout.layers {
            let mut h = blake3::Hasher::new();
            for t in &layer.tensors {
                hash_tensor(&mut h, &mut file, t, &mut buf).map_err(io)?;
            }
            layers.push(*h.finalize().as_bytes());
        }
        let mut h = blake3::Hasher::new();
        let ends = [Some(&layout.token_embd), Some(&layout.output_norm)]
            .into_iter()
            .chain([layout.output.as_ref(), layout.rope_freqs.as_ref()]);
        for t in ends.flatten() {
            hash_tensor(&mut h, &mut file, t, &mut buf).map_err(io)?;
        }
        let ends = *h.finalize().as_bytes();
        let mut h = blake3::Hasher::new();
        h.update(b"shoal-manifest-v1");
        for l in &layers {
            h.update(l);
        }
        h.update(&ends);
        Ok(Manifest {
            layers,
            ends,
            model_hash: *h.finalize().as_bytes(),
        })
    }

    /// The model hash as short hex, for logs (`a1b2c3d4e5f6`).
    pub fn short_hash(&self) -> String {
        short_hex(&self.model_hash)
    }
}

/// The first 6 bytes of a hash in hex.
pub fn short_hex(hash: &[u8; 32]) -> String {
    hash[..6].iter().map(|b| format!("{b:02x}")).collect()
}

fn hash_tensor(
    h: &mut blake3::Hasher,
    file: &mut File,
    t: &TensorInfo,
    buf: &mut [u8],
) -> std::io::Result<()> {
    h.update(t.name.as_bytes());
    for d in &t.dims {
        h.update(&d.to_le_bytes());
    }
    h.update(format!("{:?}", t.ggml_type).as_bytes());
    file.seek(SeekFrom::Start(t.offset))?;
    let mut left = t.size_bytes;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        file.read_exact(&mut buf[..n])?;
        h.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(())
}

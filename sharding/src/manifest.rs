//! Weight manifests: a blake3 hash of every layer's tensors and of the
//! header, so nodes can prove they hold the same model before serving it
//! together, and a node fetching layers from peers can check each one
//! (chunk hashes catch a bad chunk on arrival; layer hashes, bound to the
//! model hash, check the result).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::gguf::{GgufError, TensorInfo};
use crate::layout::ModelLayout;

/// Bytes read per call while hashing: large enough for blake3's SIMD, small
/// enough not to matter for memory (the file is read, not mapped, so
/// hashing a model does not make its pages resident in this process).
const HASH_READ_BYTES: usize = 1 << 20;

/// Bytes per chunk when a model file is handed from node to node.
pub const CHUNK_BYTES: u32 = 4 << 20;

/// blake3 hashes of a model's weights, per layer, and of its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Hash of each layer's tensors (names, shapes, types and bytes).
    pub layers: Vec<[u8; 32]>,
    /// Hash of the token embedding, output norm and head (and rope factors).
    pub ends: [u8; 32],
    /// Hash of the GGUF header (metadata: tokenizer, template, shapes).
    pub header: [u8; 32],
    /// Hash of all of the above: one value names the model.
    pub model_hash: [u8; 32],
}

impl Manifest {
    /// Hashes the model at `path` described by `layout`.
    pub fn compute(path: &Path, layout: &ModelLayout) -> Result<Manifest, GgufError> {
        let layers = (0..layout.layers.len())
            .map(|i| layer_hash(path, layout, i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Manifest::from_parts(
            layers,
            ends_hash(path, layout)?,
            header_hash(path, layout)?,
        ))
    }

    /// The manifest of these part hashes (the model hash follows from them).
    pub fn from_parts(layers: Vec<[u8; 32]>, ends: [u8; 32], header: [u8; 32]) -> Manifest {
        let mut h = blake3::Hasher::new();
        h.update(b"shoal-manifest-v2");
        for l in &layers {
            h.update(l);
        }
        h.update(&ends);
        h.update(&header);
        Manifest {
            layers,
            ends,
            header,
            model_hash: *h.finalize().as_bytes(),
        }
    }

    /// The model hash as short hex, for logs (`a1b2c3d4e5f6`).
    pub fn short_hash(&self) -> String {
        short_hex(&self.model_hash)
    }
}

/// Bytes before the first tensor: the GGUF header (and alignment padding).
pub fn header_bytes(layout: &ModelLayout) -> u64 {
    layout
        .stage_tensors(0..layout.layers.len())
        .iter()
        .map(|t| t.offset)
        .min()
        .unwrap_or(0)
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> GgufError + '_ {
    move |source| GgufError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Hash of layer `i`'s tensors in the file at `path`.
pub fn layer_hash(path: &Path, layout: &ModelLayout, i: usize) -> Result<[u8; 32], GgufError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut buf = vec![0u8; HASH_READ_BYTES];
    let mut h = blake3::Hasher::new();
    for t in &layout.layers[i].tensors {
        hash_tensor(&mut h, &mut file, t, &mut buf).map_err(io_error(path))?;
    }
    Ok(*h.finalize().as_bytes())
}

/// Hash of the embedding, output norm, head and rope factors.
pub fn ends_hash(path: &Path, layout: &ModelLayout) -> Result<[u8; 32], GgufError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut buf = vec![0u8; HASH_READ_BYTES];
    let mut h = blake3::Hasher::new();
    for t in layout.end_tensors() {
        hash_tensor(&mut h, &mut file, t, &mut buf).map_err(io_error(path))?;
    }
    Ok(*h.finalize().as_bytes())
}

/// Hash of the header bytes.
pub fn header_hash(path: &Path, layout: &ModelLayout) -> Result<[u8; 32], GgufError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut bytes = vec![0u8; header_bytes(layout) as usize];
    file.read_exact(&mut bytes).map_err(io_error(path))?;
    Ok(*blake3::hash(&bytes).as_bytes())
}

/// blake3 of each [`CHUNK_BYTES`] chunk of the file at `path`.
pub fn chunk_hashes(path: &Path) -> Result<Vec<[u8; 32]>, GgufError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    let mut out = Vec::new();
    loop {
        let mut n = 0;
        while n < buf.len() {
            match file.read(&mut buf[n..]).map_err(io_error(path))? {
                0 => break,
                k => n += k,
            }
        }
        if n == 0 {
            break;
        }
        out.push(*blake3::hash(&buf[..n]).as_bytes());
        if n < buf.len() {
            break;
        }
    }
    Ok(out)
}

/// The first 6 bytes of a hash in hex.
pub fn short_hex(hash: &[u8; 32]) -> String {
    hex(&hash[..6])
}

/// Bytes as lower-case hex (hashes and keys in files, logs and status).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
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

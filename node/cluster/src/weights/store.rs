//! The model file as this node holds it (whole, or chunks fetched so far)
//! and the answers it gives to fetching nodes.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use protocol::{Message, WeightIndex};
use sharding::manifest::{self, CHUNK_BYTES};
use sharding::{Manifest, ModelLayout};
use tracing::{info, warn};

use super::*;

/// The model file as this node holds it: whole, or in verified chunks.
pub struct WeightStore {
    pub(super) path: PathBuf,
    /// For a whole file, computed on the first query (hashing costs a read).
    pub(super) index: OnceLock<WeightIndex>,
    pub(super) have: Mutex<Vec<u8>>,
    pub(super) complete: bool,
    pub(super) status: Mutex<WeightsStatus>,
    /// Whether the index of a whole file is being computed in the background.
    pub(super) preparing: std::sync::atomic::AtomicBool,
}

impl WeightStore {
    /// A whole model file (its chunk hashes are computed when first asked).
    pub fn whole(path: &Path) -> WeightStore {
        let total = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        WeightStore {
            path: path.to_path_buf(),
            index: OnceLock::new(),
            have: Mutex::new(Vec::new()),
            complete: true,
            preparing: std::sync::atomic::AtomicBool::new(false),
            status: Mutex::new(WeightsStatus {
                complete: true,
                have_bytes: total,
                total_bytes: total,
                ..WeightsStatus::default()
            }),
        }
    }

    /// The file being fetched into `path`, described by `index` (whose
    /// `have` is this node's).
    pub fn partial(path: &Path, index: WeightIndex) -> WeightStore {
        let have = index.have.clone();
        let store = WeightStore {
            path: path.to_path_buf(),
            index: OnceLock::new(),
            have: Mutex::new(have),
            complete: false,
            preparing: std::sync::atomic::AtomicBool::new(false),
            status: Mutex::new(WeightsStatus {
                total_bytes: index.file_bytes,
                ..WeightsStatus::default()
            }),
        };
        let _ = store.index.set(index);
        store.refresh_status();
        store
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether every chunk is here.
    pub fn is_complete(&self) -> bool {
        self.complete || self.have.lock().expect("have lock").iter().all(|&h| h == 1)
    }

    /// Progress for status.
    pub fn status(&self) -> WeightsStatus {
        self.status.lock().expect("status lock").clone()
    }

    pub(super) fn refresh_status(&self) {
        let Some(index) = self.index.get() else {
            return;
        };
        let have = self.have.lock().expect("have lock");
        let bytes: u64 = have
            .iter()
            .enumerate()
            .filter(|(_, &h)| h == 1)
            .map(|(i, _)| chunk_len(index, i as u32))
            .sum();
        let mut s = self.status.lock().expect("status lock");
        s.have_bytes = if self.complete {
            index.file_bytes
        } else {
            bytes
        };
        s.complete = self.complete || have.iter().all(|&h| h == 1);
    }

    /// The index to hand out (computing chunk hashes of a whole file once).
    pub fn index(
        &self,
        manifest: &Manifest,
        layout: &ModelLayout,
    ) -> Result<WeightIndex, FetchError> {
        if let Some(i) = self.index.get() {
            let mut i = i.clone();
            if !self.complete {
                i.have = self.have.lock().expect("have lock").clone();
            }
            return Ok(i);
        }
        let hashes =
            manifest::chunk_hashes(&self.path).map_err(|e| FetchError::Verify(e.to_string()))?;
        let file_bytes = std::fs::metadata(&self.path)
            .map_err(|source| FetchError::Io {
                path: self.path.clone(),
                source,
            })?
            .len();
        let index = WeightIndex {
            model_hash: manifest.model_hash,
            layer_hashes: manifest.layers.clone(),
            ends_hash: manifest.ends,
            header_hash: manifest.header,
            header_bytes: manifest::header_bytes(layout),
            file_bytes,
            chunk_bytes: CHUNK_BYTES,
            have: vec![1; hashes.len()],
            chunk_hashes: hashes,
        };
        Ok(self.index.get_or_init(|| index).clone())
    }

    /// The index if it is ready (a whole file's is computed on demand).
    pub(super) fn ready_index(&self) -> Option<WeightIndex> {
        let mut i = self.index.get()?.clone();
        if !self.complete {
            i.have = self.have.lock().expect("have lock").clone();
        }
        Some(i)
    }

    /// Starts computing a whole file's index on a thread of its own (it
    /// reads the whole file: seconds to minutes, never on the control loop).
    pub(super) fn prepare_index(self: &Arc<Self>, manifest: &Manifest, layout: &Arc<ModelLayout>) {
        use std::sync::atomic::Ordering;
        if self.preparing.swap(true, Ordering::SeqCst) {
            return;
        }
        let (store, manifest, layout) = (self.clone(), manifest.clone(), layout.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            match store.index(&manifest, &layout) {
                Ok(i) => info!(
                    chunks = i.chunk_hashes.len(),
                    ms = t.elapsed().as_millis() as u64,
                    "weight index ready: this node can hand out its model"
                ),
                Err(e) => {
                    warn!("cannot index the model file for peers: {e}");
                    store.preparing.store(false, Ordering::SeqCst);
                }
            }
        });
    }

    /// Chunk `i`'s bytes, if this node holds it.
    pub fn read_chunk(&self, i: u32) -> Option<Vec<u8>> {
        if !self.complete && self.have.lock().expect("have lock").get(i as usize) != Some(&1) {
            return None;
        }
        let start = u64::from(i) * u64::from(CHUNK_BYTES);
        let mut f = File::open(&self.path).ok()?;
        f.seek(SeekFrom::Start(start)).ok()?;
        let mut buf = Vec::with_capacity(CHUNK_BYTES as usize);
        f.take(u64::from(CHUNK_BYTES)).read_to_end(&mut buf).ok()?;
        (!buf.is_empty()).then_some(buf)
    }

    /// Chunks overlapping the byte ranges, that this node lacks.
    pub fn missing(&self, ranges: &[Range<u64>]) -> Vec<u32> {
        if self.complete {
            return Vec::new();
        }
        let have = self.have.lock().expect("have lock");
        let mut out: Vec<u32> = chunks_of(ranges)
            .into_iter()
            .filter(|&c| have.get(c as usize) == Some(&0))
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Checks `bytes` against chunk `i`'s hash; writes and records it if right.
    pub(super) fn put_chunk(&self, i: u32, bytes: &[u8]) -> Result<bool, FetchError> {
        let index = self.index.get().expect("partial stores have an index");
        let want = index.chunk_hashes.get(i as usize);
        if want != Some(blake3::hash(bytes).as_bytes()) || bytes.len() as u64 != chunk_len(index, i)
        {
            return Ok(false);
        }
        let io = |source| FetchError::Io {
            path: self.path.clone(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(io)?;
        f.seek(SeekFrom::Start(u64::from(i) * u64::from(CHUNK_BYTES)))
            .map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_data().map_err(io)?;
        let have = {
            let mut have = self.have.lock().expect("have lock");
            have[i as usize] = 1;
            have.clone()
        };
        // The record follows the data: a crash between them costs a refetch, never a bad chunk.
        std::fs::write(have_path(&self.path), &have).map_err(io)?;
        self.refresh_status();
        Ok(true)
    }

    /// Forgets chunks (a layer that failed its hash).
    pub(super) fn drop_chunks(&self, chunks: &[u32]) {
        let have = {
            let mut have = self.have.lock().expect("have lock");
            for &c in chunks {
                have[c as usize] = 0;
            }
            have.clone()
        };
        let _ = std::fs::write(have_path(&self.path), &have);
        self.refresh_status();
    }

    pub(super) fn set_fetching(&self, what: Option<String>) {
        self.status.lock().expect("status lock").fetching = what;
    }

    pub(super) fn count_refetch(&self) {
        self.status.lock().expect("status lock").chunks_refetched += 1;
    }
}

pub(super) fn chunk_len(index: &WeightIndex, i: u32) -> u64 {
    let start = u64::from(i) * u64::from(index.chunk_bytes);
    index
        .file_bytes
        .saturating_sub(start)
        .min(u64::from(index.chunk_bytes))
}

pub(super) fn have_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".have");
    PathBuf::from(p)
}

/// Checks that `index`'s manifest parts hash to its model hash.
pub(super) fn check_index(index: &WeightIndex) -> Result<Manifest, FetchError> {
    let m = Manifest::from_parts(
        index.layer_hashes.clone(),
        index.ends_hash,
        index.header_hash,
    );
    if m.model_hash != index.model_hash {
        return Err(FetchError::Verify(
            "the weight index does not hash to its model hash".into(),
        ));
    }
    Ok(m)
}

/// Byte ranges of the tensors of `layers`, and of the embedding/head with `ends`.
pub(super) fn tensor_ranges(layout: &ModelLayout, layers: &[usize], ends: bool) -> Vec<Range<u64>> {
    let blocks = layers.iter().flat_map(|&l| layout.layers[l].tensors.iter());
    let ends = layout.end_tensors().filter(|_| ends);
    blocks.chain(ends).map(|t| t.byte_range()).collect()
}

/// Where a fetched model lives: `<cache>/models/fetched/<hash>.gguf`.
pub fn cache_path(model_hash: &[u8; 32]) -> PathBuf {
    models::cache_dir()
        .join("models/fetched")
        .join(format!("{}.gguf", manifest::hex(model_hash)))
}

/// Who answers whom, for the proof on a weights answer.
pub struct Answering<'a> {
    /// The cluster key.
    pub key: &'a crate::key::ClusterKey,
    /// The cluster name.
    pub cluster: &'a str,
    /// This node (the holder).
    pub holder: &'a str,
    /// The asking peer.
    pub asker: &'a str,
}

/// Hands out the weights this node holds: the control loop's answers,
/// each with this holder's proof of the key.
pub fn answer(
    store: &Arc<WeightStore>,
    req: &Message,
    manifest: &Manifest,
    layout: &Arc<ModelLayout>,
    who: &Answering<'_>,
) -> Message {
    let prove = |nonce: &[u8; 32], what: &[u8]| {
        who.key
            .answer_proof(who.cluster, who.holder, who.asker, nonce, what)
    };
    match req {
        Message::WeightsQuery { nonce, .. } => match store.ready_index() {
            Some(index) => Message::Weights {
                proof: prove(nonce, &index.model_hash),
                index,
            },
            None => {
                store.prepare_index(manifest, layout);
                Message::Preparing
            }
        },
        Message::ChunkQuery { index, nonce, .. } => match store.read_chunk(*index) {
            Some(mut bytes) => {
                if fault_corrupts(*index) {
                    warn!(chunk = index, "fault injection: sending a corrupted chunk");
                    bytes[0] ^= 0xff;
                }
                Message::Chunk {
                    index: *index,
                    bytes,
                    proof: prove(nonce, &index.to_le_bytes()),
                }
            }
            None => Message::Refused {
                reason: format!("chunk {index} is not held here"),
            },
        },
        _ => Message::Refused {
            reason: "not a weights request".into(),
        },
    }
}

/// Test hook: `SHOAL_FAULT_CORRUPT_CHUNK=<n>` makes this node send chunk
/// `n` corrupted, once — to prove the receiver catches and refetches it.
pub(super) fn fault_corrupts(index: u32) -> bool {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    std::env::var("SHOAL_FAULT_CORRUPT_CHUNK")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        == Some(index)
        && !DONE.swap(true, std::sync::atomic::Ordering::SeqCst)
}

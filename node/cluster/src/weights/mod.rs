//! Weights shared between nodes: a node without the model file gets the
//! chunks it needs from members that have them.
//!
//! The file is cut into [`CHUNK_BYTES`] chunks. A node holding the model
//! answers [`Message::WeightsQuery`] with a [`WeightIndex`] (chunk hashes
//! and the manifest's parts) and [`Message::ChunkQuery`] with a chunk, on
//! the control plane (Noise-encrypted libp2p), to anyone proving the
//! cluster key. The fetching node:
//! 1. checks the index against its model hash (the hash of the manifest's
//!    parts), then every chunk against its hash on arrival — a corrupted
//!    chunk is dropped and asked again, from another holder if there is one;
//! 2. writes chunks in place into a sparse file of the model's size under
//!    the cache (`models/fetched/<hash>.gguf`), with a `.have` file marking
//!    the verified ones: a restart resumes where it stopped;
//! 3. once the chunks of a layer are in, recomputes the layer's hash and
//!    compares it with the manifest's.
//!
//! At start ([`bootstrap`]) it fetches the header and what calibration runs
//! on (a middle layer, the last one and the head); the worker fetches the
//! rest of its stage when a plan assigns it ([`Fetcher::ensure_layers`]).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protocol::WeightIndex;
use serde::{Deserialize, Serialize};
use sharding::manifest::{self, CHUNK_BYTES};
use sharding::ModelLayout;
use tracing::info;

/// Chunk requests in flight at once: enough to keep a LAN link busy
/// without holding more than a few chunks in memory.
const IN_FLIGHT: usize = 4;

/// Tries per chunk (across holders) before a fetch gives up.
const ATTEMPTS_PER_CHUNK: u32 = 5;

/// How long a fetch waits for a holder to connect and answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// Why weights could not be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// No node holding the model answered.
    #[error(
        "no node holding the model answered within {0:?} (is --peer right, and the key the same?)"
    )]
    NoSource(Duration),
    /// A chunk failed every try.
    #[error("chunk {index} could not be fetched: {why}")]
    Chunk {
        /// The chunk.
        index: u32,
        /// The last failure.
        why: String,
    },
    /// The index or a layer does not match the model hash.
    #[error("verification failed: {0}")]
    Verify(String),
    /// Local file trouble.
    #[error("weight cache {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The swarm could not start.
    #[error("control plane: {0}")]
    Swarm(String),
}

/// Progress of weight fetching, for status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WeightsStatus {
    /// Whether this node holds the whole file.
    pub complete: bool,
    /// Bytes of the file held (verified).
    pub have_bytes: u64,
    /// Bytes of the file.
    pub total_bytes: u64,
    /// What is being fetched now, if anything (`layers 10..20: 12 of 30 MiB`).
    pub fetching: Option<String>,
    /// Chunks that arrived corrupted and were fetched again.
    pub chunks_refetched: u64,
}

/// Fetches the chunks of `layers` (and with `ends` the embedding/head)
/// that `store` lacks (blocking; for the worker thread), then checks their
/// hashes against the manifest.
pub fn fetch_ranges(
    runtime: &tokio::runtime::Handle,
    store: &WeightStore,
    sources: &Sources,
    layout: &ModelLayout,
    layers: &[usize],
    ends: bool,
    what: &str,
) -> Result<(), FetchError> {
    let ranges = tensor_ranges(layout, layers, ends);
    if !store.missing(&ranges).is_empty() {
        let hash = store.index.get().expect("partial store").model_hash;
        runtime.block_on(async {
            let mut s = Session::start(sources.clone())?;
            s.first_index(Some(hash)).await?;
            fetch_missing(&mut s, store, &ranges, what).await
        })?;
    }
    verify_layers(store, layout, layers, ends)
}

/// Fetches the chunks of `ranges` that `store` lacks over session `s`.
async fn fetch_missing(
    s: &mut Session,
    store: &WeightStore,
    ranges: &[Range<u64>],
    what: &str,
) -> Result<(), FetchError> {
    let missing = store.missing(ranges);
    if missing.is_empty() {
        return Ok(());
    }
    let index = store.index.get().expect("partial store");
    let bytes: u64 = missing.iter().map(|&c| chunk_len(index, c)).sum();
    let t = Instant::now();
    info!(
        what,
        chunks = missing.len(),
        mib = bytes >> 20,
        "fetching weights from peers"
    );
    let result = s.fetch(store, missing, bytes, what).await;
    store.set_fetching(None);
    result?;
    info!(
        what,
        mib = bytes >> 20,
        ms = t.elapsed().as_millis() as u64,
        "weights fetched"
    );
    Ok(())
}

/// Recomputes the hashes of `layers` (and the ends) in the local file.
fn verify_layers(
    store: &WeightStore,
    layout: &ModelLayout,
    layers: &[usize],
    ends: bool,
) -> Result<(), FetchError> {
    if store.complete {
        return Ok(());
    }
    let index = store.index.get().expect("partial store").clone();
    let err = |e: sharding::GgufError| FetchError::Verify(e.to_string());
    for &l in layers {
        if manifest::layer_hash(&store.path, layout, l).map_err(err)? != index.layer_hashes[l] {
            store.drop_chunks(&chunks_of(&tensor_ranges(layout, &[l], false)));
            return Err(FetchError::Verify(format!(
                "layer {l} does not match the manifest"
            )));
        }
    }
    if ends && manifest::ends_hash(&store.path, layout).map_err(err)? != index.ends_hash {
        return Err(FetchError::Verify(
            "embedding/head do not match the manifest".into(),
        ));
    }
    Ok(())
}

fn chunks_of(ranges: &[Range<u64>]) -> Vec<u32> {
    let c = u64::from(CHUNK_BYTES);
    ranges
        .iter()
        .filter(|r| r.end > r.start)
        .flat_map(|r| ((r.start / c)..(r.end - 1) / c + 1).map(|x| x as u32))
        .collect()
}

/// Start-up of a node without the model file: asks a holder for the index,
/// opens (or resumes) the cached file, fetches the header and what
/// calibration needs. Returns the file and its index.
pub fn bootstrap(
    runtime: &tokio::runtime::Handle,
    sources: &Sources,
) -> Result<(PathBuf, WeightIndex), FetchError> {
    // One session for the header and the calibration layers.
    runtime.block_on(async {
        let mut s = Session::start(sources.clone())?;
        let mut index = s.first_index(None).await?;
        check_index(&index)?;
        let path = cache_path(&index.model_hash);
        let store = open_partial(&path, &index)?;
        let have = store
            .have
            .lock()
            .expect("have lock")
            .iter()
            .filter(|&&h| h == 1)
            .count();
        if have > 0 {
            info!(
                chunks = have,
                of = index.chunk_hashes.len(),
                "resuming a fetch: chunks already cached"
            );
        }
        let header_range = 0..index.header_bytes;
        let header = std::slice::from_ref(&header_range);
        fetch_missing(&mut s, &store, header, "the model header").await?;
        // The header parses, and hashes to the manifest's.
        let gguf =
            sharding::GgufFile::open(&path).map_err(|e| FetchError::Verify(e.to_string()))?;
        let layout =
            ModelLayout::from_gguf(&gguf).map_err(|e| FetchError::Verify(e.to_string()))?;
        if layout.layers.len() != index.layer_hashes.len() {
            return Err(FetchError::Verify(format!(
                "the header has {} layers, the weight index {}",
                layout.layers.len(),
                index.layer_hashes.len()
            )));
        }
        if manifest::header_hash(&path, &layout).map_err(|e| FetchError::Verify(e.to_string()))?
            != index.header_hash
        {
            store.drop_chunks(&chunks_of(header));
            return Err(FetchError::Verify(
                "the model header does not match the manifest".into(),
            ));
        }
        let n = layout.layers.len();
        let calibration = [n / 2, n - 1];
        let ranges = tensor_ranges(&layout, &calibration, true);
        fetch_missing(&mut s, &store, &ranges, "calibration layers").await?;
        verify_layers(&store, &layout, &calibration, true)?;
        index.have = store.have.lock().expect("have lock").clone();
        Ok((path, index))
    })
}

/// Opens the cached partial file (creating it sparse at full size).
fn open_partial(path: &Path, index: &WeightIndex) -> Result<WeightStore, FetchError> {
    let io = |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io)?;
    f.set_len(index.file_bytes).map_err(io)?;
    let mut index = index.clone();
    index.have = match std::fs::read(have_path(path)) {
        Ok(h) if h.len() == index.chunk_hashes.len() => h,
        _ => vec![0; index.chunk_hashes.len()],
    };
    Ok(WeightStore::partial(path, index))
}

/// What the worker uses to get the layers a plan assigns it.
pub struct Fetcher {
    /// The local file.
    pub store: Arc<WeightStore>,
    /// Who to ask (the control loop keeps the members' addresses here).
    pub sources: Mutex<Sources>,
    /// The node's runtime (fetches run on it; the worker blocks).
    pub runtime: tokio::runtime::Handle,
    /// The model's layout.
    pub layout: Arc<ModelLayout>,
}

impl Fetcher {
    /// Makes sure the tensors of `layers` are here and verified (blocking).
    pub fn ensure_layers(&self, layers: Range<usize>) -> Result<(), FetchError> {
        if self.store.complete {
            return Ok(());
        }
        let n = self.layout.layers.len();
        let ends = layers.start == 0 || layers.end == n;
        let list: Vec<usize> = layers.clone().collect();
        let sources = self.sources.lock().expect("sources lock").clone();
        let what = format!("layers {}..{}", layers.start, layers.end);
        fetch_ranges(
            &self.runtime,
            &self.store,
            &sources,
            &self.layout,
            &list,
            ends,
            &what,
        )
    }
}

mod session;
mod store;
#[cfg(test)]
mod tests;

pub use session::Sources;
use session::*;
use store::*;
pub use store::{answer, cache_path, Answering, WeightStore};

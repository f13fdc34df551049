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

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use protocol::{Message, WeightIndex};
use serde::{Deserialize, Serialize};
use sharding::manifest::{self, CHUNK_BYTES};
use sharding::{Manifest, ModelLayout};
use tracing::{info, warn};

use crate::key::ClusterKey;
use crate::swarm::{self, BehaviourEvent};

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

/// The model file as this node holds it: whole, or in verified chunks.
pub struct WeightStore {
    path: PathBuf,
    /// For a whole file, computed on the first query (hashing costs a read).
    index: OnceLock<WeightIndex>,
    have: Mutex<Vec<u8>>,
    complete: bool,
    status: Mutex<WeightsStatus>,
    /// Whether the index of a whole file is being computed in the background.
    preparing: std::sync::atomic::AtomicBool,
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

    fn refresh_status(&self) {
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
    fn ready_index(&self) -> Option<WeightIndex> {
        let mut i = self.index.get()?.clone();
        if !self.complete {
            i.have = self.have.lock().expect("have lock").clone();
        }
        Some(i)
    }

    /// Starts computing a whole file's index on a thread of its own (it
    /// reads the whole file: seconds to minutes, never on the control loop).
    fn prepare_index(self: &Arc<Self>, manifest: &Manifest, layout: &Arc<ModelLayout>) {
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
    fn put_chunk(&self, i: u32, bytes: &[u8]) -> Result<bool, FetchError> {
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
    fn drop_chunks(&self, chunks: &[u32]) {
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

    fn set_fetching(&self, what: Option<String>) {
        self.status.lock().expect("status lock").fetching = what;
    }

    fn count_refetch(&self) {
        self.status.lock().expect("status lock").chunks_refetched += 1;
    }
}

fn chunk_len(index: &WeightIndex, i: u32) -> u64 {
    let start = u64::from(i) * u64::from(index.chunk_bytes);
    index
        .file_bytes
        .saturating_sub(start)
        .min(u64::from(index.chunk_bytes))
}

fn have_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".have");
    PathBuf::from(p)
}

/// Checks that `index`'s manifest parts hash to its model hash.
fn check_index(index: &WeightIndex) -> Result<Manifest, FetchError> {
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
fn tensor_ranges(layout: &ModelLayout, layers: &[usize], ends: bool) -> Vec<Range<u64>> {
    let blocks = layers.iter().flat_map(|&l| layout.layers[l].tensors.iter());
    let ends = layout.end_tensors().filter(|_| ends);
    blocks.chain(ends).map(|t| t.byte_range()).collect()
}

/// Where a fetched model lives: `<cache>/models/fetched/<hash>.gguf`.
pub fn cache_path(model_hash: &[u8; 32]) -> PathBuf {
    let hex: String = model_hash.iter().map(|b| format!("{b:02x}")).collect();
    models::cache_dir()
        .join("models/fetched")
        .join(format!("{hex}.gguf"))
}

/// Hands out the weights this node holds: the control loop's answers.
pub fn answer(
    store: &Arc<WeightStore>,
    req: &Message,
    manifest: &Manifest,
    layout: &Arc<ModelLayout>,
) -> Message {
    match req {
        Message::WeightsQuery { .. } => match store.ready_index() {
            Some(i) => Message::Weights(i),
            None => {
                store.prepare_index(manifest, layout);
                Message::Preparing
            }
        },
        Message::ChunkQuery { index, .. } => match store.read_chunk(*index) {
            Some(mut bytes) => {
                if fault_corrupts(*index) {
                    warn!(chunk = index, "fault injection: sending a corrupted chunk");
                    bytes[0] ^= 0xff;
                }
                Message::Chunk {
                    index: *index,
                    bytes,
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

/// How long a fetcher waits before asking a preparing holder again.
const INDEX_RETRY: Duration = Duration::from_millis(300);

/// Test hook: `SHOAL_FAULT_CORRUPT_CHUNK=<n>` makes this node send chunk
/// `n` corrupted, once — to prove the receiver catches and refetches it.
fn fault_corrupts(index: u32) -> bool {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    std::env::var("SHOAL_FAULT_CORRUPT_CHUNK")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        == Some(index)
        && !DONE.swap(true, std::sync::atomic::Ordering::SeqCst)
}

/// Where and how to fetch from.
#[derive(Clone)]
pub struct Sources {
    /// Cluster name.
    pub cluster: String,
    /// Cluster key (proofs).
    pub key: ClusterKey,
    /// Addresses of nodes to ask.
    pub addrs: Vec<Multiaddr>,
    /// Find holders by mDNS too.
    pub mdns: bool,
}

/// A fetch session: its own short-lived libp2p identity, connected to the
/// holders it can reach, asking chunks from those that have them.
struct Session {
    swarm: libp2p::Swarm<swarm::Behaviour>,
    sources: Sources,
    /// Holders that answered, with their index.
    holders: HashMap<PeerId, WeightIndex>,
    asked: HashSet<PeerId>,
    pending: HashMap<OutboundRequestId, (PeerId, Option<u32>)>,
}

impl Session {
    fn start(sources: Sources) -> Result<Session, FetchError> {
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let mut swarm = swarm::build(keypair, sources.mdns).map_err(FetchError::Swarm)?;
        for a in &sources.addrs {
            let _ = swarm.dial(a.clone());
        }
        Ok(Session {
            swarm,
            sources,
            holders: HashMap::new(),
            asked: HashSet::new(),
            pending: HashMap::new(),
        })
    }

    fn proof(&self, to: &PeerId) -> [u8; 32] {
        let me = self.swarm.local_peer_id().to_string();
        self.sources
            .key
            .proof(&self.sources.cluster, &me, &to.to_string())
    }

    fn ask_index(&mut self, peer: PeerId) {
        if self.asked.insert(peer) {
            let proof = self.proof(&peer);
            let id = self
                .swarm
                .behaviour_mut()
                .control
                .send_request(&peer, Message::WeightsQuery { proof });
            self.pending.insert(id, (peer, None));
        }
    }

    fn ask_chunk(&mut self, peer: PeerId, index: u32) {
        let proof = self.proof(&peer);
        let id = self
            .swarm
            .behaviour_mut()
            .control
            .send_request(&peer, Message::ChunkQuery { index, proof });
        self.pending.insert(id, (peer, Some(index)));
    }

    /// Drives the swarm until one event of interest: a response or failure.
    async fn next(&mut self) -> Option<(PeerId, Option<u32>, Result<Message, String>)> {
        loop {
            match self.swarm.select_next_some().await {
                SwarmEvent::ConnectionEstablished { peer_id, .. } => self.ask_index(peer_id),
                SwarmEvent::Behaviour(BehaviourEvent::Mdns(libp2p::mdns::Event::Discovered(
                    list,
                ))) => {
                    for (_, addr) in list {
                        let _ = self.swarm.dial(addr);
                    }
                }
                SwarmEvent::Behaviour(BehaviourEvent::Control(ev)) => match ev {
                    request_response::Event::Message {
                        message:
                            request_response::Message::Response {
                                request_id,
                                response,
                            },
                        ..
                    } => {
                        if let Some((peer, chunk)) = self.pending.remove(&request_id) {
                            return Some((peer, chunk, Ok(response)));
                        }
                    }
                    request_response::Event::OutboundFailure {
                        request_id, error, ..
                    } => {
                        if let Some((peer, chunk)) = self.pending.remove(&request_id) {
                            return Some((peer, chunk, Err(error.to_string())));
                        }
                    }
                    // The node asks us to join: we are not a member, and say nothing.
                    _ => {}
                },
                _ => {}
            }
        }
    }

    /// Waits for the first holder's index of the model (any model when
    /// `want` is none).
    async fn first_index(&mut self, want: Option<[u8; 32]>) -> Result<WeightIndex, FetchError> {
        let mut deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.next())
                .await
                .map_err(|_| FetchError::NoSource(CONNECT_TIMEOUT))?;
            let Some((peer, None, result)) = ev else {
                continue;
            };
            match result {
                Ok(Message::Weights(index)) => {
                    if want.is_none_or(|h| h == index.model_hash) {
                        self.holders.insert(peer, index.clone());
                        return Ok(index);
                    }
                }
                Ok(Message::Preparing) => {
                    // A holder hashing a big file is alive: keep waiting for it.
                    deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
                    tokio::time::sleep(INDEX_RETRY).await;
                    self.asked.remove(&peer);
                    self.ask_index(peer);
                }
                Ok(Message::Refused { reason }) => warn!(peer = %peer, "weights refused: {reason}"),
                Ok(_) => {}
                Err(e) => info!(peer = %peer, "weights query failed: {e}"),
            }
        }
    }

    /// Fetches `chunks` into `store`, spreading them over the holders.
    async fn fetch(
        &mut self,
        store: &WeightStore,
        chunks: Vec<u32>,
        total_bytes: u64,
        what: &str,
    ) -> Result<(), FetchError> {
        if chunks.is_empty() {
            return Ok(());
        }
        let index = store
            .index
            .get()
            .expect("partial store has an index")
            .clone();
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(total_bytes),
            indicatif::ProgressDrawTarget::stderr(),
        );
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .expect("template"),
        );
        bar.set_message(format!("fetching {what}"));
        let mut queue: VecDeque<u32> = chunks.into();
        let mut tries: HashMap<u32, u32> = HashMap::new();
        let mut in_flight = 0usize;
        let mut done_bytes = 0u64;
        let mut turn = 0usize;
        let deadline_idle = CONNECT_TIMEOUT;
        loop {
            // Ask holders of each queued chunk, round robin.
            while in_flight < IN_FLIGHT {
                let Some(c) = queue.pop_front() else { break };
                let holders: Vec<PeerId> = self
                    .holders
                    .iter()
                    .filter(|(_, i)| i.have.get(c as usize) == Some(&1))
                    .map(|(p, _)| *p)
                    .collect();
                if holders.is_empty() {
                    return Err(FetchError::Chunk {
                        index: c,
                        why: "no connected node holds it".into(),
                    });
                }
                let peer =
                    holders[(turn + tries.get(&c).copied().unwrap_or(0) as usize) % holders.len()];
                turn += 1;
                self.ask_chunk(peer, c);
                in_flight += 1;
            }
            if in_flight == 0 {
                break;
            }
            let ev = tokio::time::timeout(deadline_idle, self.next())
                .await
                .map_err(|_| FetchError::NoSource(deadline_idle))?;
            let Some((peer, chunk, result)) = ev else {
                continue;
            };
            let Some(c) = chunk else {
                // A late index answer: one more holder.
                if let Ok(Message::Weights(i)) = result {
                    if i.model_hash == index.model_hash {
                        self.holders.insert(peer, i);
                    }
                }
                continue;
            };
            in_flight -= 1;
            let failure = match result {
                Ok(Message::Chunk { index: got, bytes }) if got == c => {
                    if store.put_chunk(c, &bytes)? {
                        done_bytes += bytes.len() as u64;
                        bar.set_position(done_bytes);
                        store.set_fetching(Some(format!(
                            "{what}: {} of {} MiB",
                            done_bytes >> 20,
                            total_bytes >> 20
                        )));
                        continue;
                    }
                    store.count_refetch();
                    warn!(chunk = c, peer = %peer, "chunk failed verification (blake3 mismatch): fetching it again");
                    "blake3 mismatch".to_string()
                }
                Ok(Message::Refused { reason }) => reason,
                Ok(other) => format!("unexpected answer {other:?}")
                    .chars()
                    .take(200)
                    .collect(),
                Err(e) => e,
            };
            let n = tries.entry(c).or_insert(0);
            *n += 1;
            if *n >= ATTEMPTS_PER_CHUNK {
                return Err(FetchError::Chunk {
                    index: c,
                    why: failure,
                });
            }
            queue.push_back(c);
        }
        bar.finish_and_clear();
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn index_of(path: &Path) -> WeightIndex {
        let hashes = manifest::chunk_hashes(path).unwrap();
        WeightIndex {
            model_hash: [0; 32],
            layer_hashes: Vec::new(),
            ends_hash: [0; 32],
            header_hash: [0; 32],
            header_bytes: 0,
            file_bytes: std::fs::metadata(path).unwrap().len(),
            chunk_bytes: CHUNK_BYTES,
            have: vec![0; hashes.len()],
            chunk_hashes: hashes,
        }
    }

    #[test]
    // One-range lists are the natural way to ask about one span here.
    #[allow(clippy::single_range_in_vec_init)]
    fn chunks_are_checked_recorded_and_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.gguf");
        let data: Vec<u8> = (0..(2 * CHUNK_BYTES as usize + 1000))
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        std::fs::write(&src, &data).unwrap();
        let index = index_of(&src);
        assert_eq!(index.chunk_hashes.len(), 3);
        let dst = dir.path().join("dst.gguf");
        let store = open_partial(&dst, &index).unwrap();
        let c = u64::from(CHUNK_BYTES);
        assert_eq!(store.missing(&[10..20, c - 1..c + 1]), vec![0, 1]);
        assert_eq!(store.missing(&[3 * c - 10..3 * c]), vec![2]);
        // A corrupted chunk is refused and not recorded; the right one is.
        let whole = WeightStore::whole(&src);
        let mut chunk = whole.read_chunk(1).unwrap();
        chunk[7] ^= 1;
        assert!(!store.put_chunk(1, &chunk).unwrap());
        chunk[7] ^= 1;
        assert!(store.put_chunk(1, &chunk).unwrap());
        assert_eq!(store.missing(&[0..3 * c]), vec![0, 2]);
        assert!(store.read_chunk(0).is_none() && store.read_chunk(1) == Some(chunk));
        // The record survives a restart; the short last chunk fits exactly.
        let again = open_partial(&dst, &index).unwrap();
        assert_eq!(again.missing(&[0..3 * c]), vec![0, 2]);
        for i in [0, 2] {
            assert!(again.put_chunk(i, &whole.read_chunk(i).unwrap()).unwrap());
        }
        assert!(again.is_complete());
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        assert!(again.status().complete && again.status().have_bytes == data.len() as u64);
    }
}

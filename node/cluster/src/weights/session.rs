//! A fetch session: its own libp2p identity, the holders it reaches, the
//! index and chunks it asks them for, each chunk checked on arrival.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use futures::StreamExt;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId};
use protocol::{Message, WeightIndex};
use tracing::{info, warn};

use super::*;
use crate::key::ClusterKey;
use crate::swarm::{self, BehaviourEvent};

/// How long a fetcher waits before asking a preparing holder again.
pub(super) const INDEX_RETRY: Duration = Duration::from_millis(300);

/// Corrupted chunks after which a holder is not asked again.
const BAD_CHUNKS_MAX: u32 = 2;

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
pub(super) struct Session {
    swarm: libp2p::Swarm<swarm::Behaviour>,
    sources: Sources,
    /// Holders that answered, with their index.
    holders: HashMap<PeerId, WeightIndex>,
    asked: HashSet<PeerId>,
    /// Fresh for this session: every holder's answer is bound to it.
    nonce: [u8; 32],
    /// Corrupted chunks each holder sent.
    bad_chunks: HashMap<PeerId, u32>,
    pending: HashMap<OutboundRequestId, (PeerId, Option<u32>)>,
}

impl Session {
    pub(super) fn start(sources: Sources) -> Result<Session, FetchError> {
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
            nonce: rand::random(),
            bad_chunks: HashMap::new(),
            pending: HashMap::new(),
        })
    }

    /// Whether `holder`'s answer about `what` carries its proof of the
    /// key for this session.
    fn proven(&self, holder: &PeerId, proof: &[u8; 32], what: &[u8]) -> bool {
        let me = self.swarm.local_peer_id().to_string();
        self.sources.key.verify_answer(
            proof,
            &self.sources.cluster,
            &holder.to_string(),
            &me,
            &self.nonce,
            what,
        )
    }

    /// `index` from `holder`, if its proof holds (else the holder is
    /// not asked again: it does not have the key).
    fn proven_index(
        &mut self,
        holder: PeerId,
        index: WeightIndex,
        proof: &[u8; 32],
    ) -> Option<WeightIndex> {
        if self.proven(&holder, proof, &index.model_hash) {
            return Some(index);
        }
        warn!(peer = %holder, "a weight index without a proof of the cluster key: ignored");
        self.holders.remove(&holder);
        None
    }

    pub(super) fn proof(&self, to: &PeerId) -> [u8; 32] {
        let me = self.swarm.local_peer_id().to_string();
        self.sources
            .key
            .proof(&self.sources.cluster, &me, &to.to_string())
    }

    pub(super) fn ask_index(&mut self, peer: PeerId) {
        if self.asked.insert(peer) {
            let proof = self.proof(&peer);
            let id = self.swarm.behaviour_mut().control.send_request(
                &peer,
                Message::WeightsQuery {
                    proof,
                    nonce: self.nonce,
                },
            );
            self.pending.insert(id, (peer, None));
        }
    }

    pub(super) fn ask_chunk(&mut self, peer: PeerId, index: u32) {
        let proof = self.proof(&peer);
        let id = self.swarm.behaviour_mut().control.send_request(
            &peer,
            Message::ChunkQuery {
                index,
                proof,
                nonce: self.nonce,
            },
        );
        self.pending.insert(id, (peer, Some(index)));
    }

    /// Drives the swarm until one event of interest: a response or failure.
    pub(super) async fn next(&mut self) -> Option<(PeerId, Option<u32>, Result<Message, String>)> {
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
    pub(super) async fn first_index(
        &mut self,
        want: Option<[u8; 32]>,
    ) -> Result<WeightIndex, FetchError> {
        let mut deadline = tokio::time::Instant::now() + CONNECT_TIMEOUT;
        loop {
            let ev = tokio::time::timeout_at(deadline, self.next())
                .await
                .map_err(|_| FetchError::NoSource(CONNECT_TIMEOUT))?;
            let Some((peer, None, result)) = ev else {
                continue;
            };
            match result {
                Ok(Message::Weights { index, proof }) => {
                    let Some(index) = self.proven_index(peer, index, &proof) else {
                        continue;
                    };
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
    pub(super) async fn fetch(
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
        let bar = progress_bar(total_bytes, what);
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
                let peer =
                    self.holder_of(c, turn + tries.get(&c).copied().unwrap_or(0) as usize)?;
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
                if let Ok(Message::Weights { index: i, proof }) = result {
                    if let Some(i) = self.proven_index(peer, i, &proof) {
                        // Same model, same chunk table: else it cannot serve ours.
                        if i.model_hash == index.model_hash
                            && i.chunk_hashes == index.chunk_hashes
                            && i.chunk_bytes == index.chunk_bytes
                        {
                            self.holders.insert(peer, i);
                        }
                    }
                }
                continue;
            };
            in_flight -= 1;
            let failure = match result {
                Ok(Message::Chunk {
                    index: got, proof, ..
                }) if got == c && !self.proven(&peer, &proof, &c.to_le_bytes()) => {
                    self.holders.remove(&peer);
                    format!("chunk {c} from {peer} without a proof of the key: holder dropped")
                }
                Ok(Message::Chunk {
                    index: got, bytes, ..
                }) if got == c => {
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
                    // Once is an accident; twice, the holder is not asked again.
                    let bad = self.bad_chunks.entry(peer).or_insert(0);
                    *bad += 1;
                    if *bad >= BAD_CHUNKS_MAX {
                        warn!(peer = %peer, "holder sent {bad} corrupted chunks: dropped");
                        self.holders.remove(&peer);
                    }
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

    /// The `turn`-th holder (round robin) of chunk `c`.
    fn holder_of(&self, c: u32, turn: usize) -> Result<PeerId, FetchError> {
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
        Ok(holders[turn % holders.len()])
    }
}

/// A progress bar on stderr for a fetch of `total_bytes`.
fn progress_bar(total_bytes: u64, what: &str) -> indicatif::ProgressBar {
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
    bar
}

//! The messages nodes exchange, and the checks a receiver runs on them.
//!
//! Control messages ([`Hello`], [`Plan`], load reports) travel on the
//! authenticated control plane; [`Activations`], [`Tokens`] and `Cancel` on
//! the QUIC data plane between neighbouring stages. One enum serves both so a
//! single decoder and a single set of limits cover every byte a node reads.

use serde::{Deserialize, Serialize};

use crate::RequestError;

/// Version of this protocol. A node refuses a [`Hello`] with another one.
/// 4: `Failed` carries a typed [`RequestError`]; `Preparing` answers a
/// weights query. 7: `Distrust`, `Leaving`. 8: constraints, logprobs,
/// proposals. 9: a chunk of proposals only (speculation in flight).
pub const PROTOCOL_VERSION: u32 = 9;

/// Every message on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// Who is speaking and what it can do (travels inside [`Join`] and
    /// [`Welcome`]; a bare one is only validated, never sent).
    Hello(Hello),
    /// The leader's layer assignment (travels inside `PlanUpdate`).
    Plan(Plan),
    /// Hidden states from one stage to the next.
    Activations(Activations),
    /// Sampled tokens from the last stage back to the first.
    Tokens(Tokens),
    /// Forget a request along the chain (client gone, stop reached).
    Cancel {
        /// The request.
        request_id: u64,
    },
    /// Control plane, every second to every member: how busy the sender
    /// is (the status page's per-node and cluster tokens/s).
    Load(LoadReport),
    /// Control plane: ask to join, proving knowledge of the cluster key.
    Join(Join),
    /// Control plane: the answer to [`Join`] from a member, with its own proof.
    Welcome(Welcome),
    /// Control plane: a join or request refused, and why.
    Refused {
        /// Human-readable reason, logged by the refused node.
        reason: String,
    },
    /// Control plane: the leader's plan and the members it knows.
    PlanUpdate {
        /// The plan.
        plan: Plan,
        /// Every member the leader knows, so nodes that joined through one
        /// peer can reach all others.
        members: Vec<MemberAddrs>,
    },
    /// Control plane: links measured by a node, for the leader's planner.
    LinkReport {
        /// One entry per peer it measured.
        links: Vec<LinkMeasure>,
    },
    /// Control plane: a request was accepted.
    Ack,
    /// Control plane: what a node holding the model can hand out, asked by
    /// a node that has no copy (it proves the key like a [`Join`]).
    WeightsQuery {
        /// `ClusterKey::proof(cluster, asker, answerer)`.
        proof: [u8; 32],
        /// Fresh for each fetch session: the holder's answer is bound to it.
        nonce: [u8; 32],
    },
    /// The answer to [`Message::WeightsQuery`]: the index, and the holder's
    /// proof that it holds the key (`ClusterKey::answer_proof`, bound to
    /// the asker, the nonce and the index's model hash) — a host without
    /// the key cannot serve a model.
    Weights {
        /// What the holder has.
        index: WeightIndex,
        /// The holder's proof.
        proof: [u8; 32],
    },
    /// Control plane: one chunk of the model file, asked by a node fetching
    /// the layers it was assigned.
    ChunkQuery {
        /// Chunk number (`offset / chunk_bytes`).
        index: u32,
        /// As in [`Message::WeightsQuery`].
        proof: [u8; 32],
        /// As in [`Message::WeightsQuery`].
        nonce: [u8; 32],
    },
    /// The answer to [`Message::ChunkQuery`]: the chunk's bytes as stored
    /// (the receiver checks them against the index's hash).
    Chunk {
        /// Chunk number.
        index: u32,
        /// Its bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        /// The holder's proof, as for [`Message::Weights`] (bound to the chunk number).
        proof: [u8; 32],
    },
    /// Data plane: a new request enters the pipeline.
    Begin(Begin),
    /// Data plane: tokens for the first stage to run.
    Input(Input),
    /// Data plane: a request failed at some stage; sent to its origin.
    Failed {
        /// The request.
        request_id: u64,
        /// What went wrong (the origin hands it to the client as is).
        error: RequestError,
    },
    /// Control plane: the answer to [`Message::WeightsQuery`] from a holder
    /// still indexing its file (on a thread of its own): ask again shortly.
    Preparing,
    /// Control plane, to every member: the sender is leaving (SIGTERM,
    /// Ctrl-C). Members plan without it at once; requests that ran through
    /// it go on under the new plan (their origins replay them).
    Leaving,
    /// Control plane, to every member: the sender caught member `node_id`
    /// sending what no honest node sends (a message for a request it has no
    /// part in, activations of the wrong width or not finite, an invalid
    /// plan). Every member counts the accusations it hears and leaves out
    /// the same nodes (see `membership::excluded`).
    Distrust {
        /// The accused member.
        node_id: String,
        /// What it did, for the logs.
        reason: String,
    },
}

/// A node asking a member to let it into the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Join {
    /// The sender's [`PROTOCOL_VERSION`], in the clear: a node of another
    /// version is told so instead of failing to open the Hello.
    pub version: u32,
    /// The cluster it asks to join, in the clear (mDNS shows it anyway).
    pub cluster: String,
    /// `keyed_blake3(cluster key, "join" | cluster | sender id | receiver id)`:
    /// proves the key without revealing it, bound to both peer ids so it
    /// cannot be replayed to another node or by another node.
    pub proof: [u8; 32],
    /// Who is asking: its [`Hello`] (addresses, certificate fingerprint,
    /// model hash), sealed with a key only holders of the cluster key can
    /// derive (ChaCha20-Poly1305, bound to both peer ids): the node it
    /// dials learns nothing about it unless that node holds the key too.
    pub sealed_hello: SealedHello,
}

/// An encoded [`Message::Hello`] frame, sealed (see [`Join`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SealedHello {
    /// Fresh per seal.
    pub nonce: [u8; 12],
    /// Ciphertext and tag.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
}

/// A member's answer to [`Join`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// Who answers.
    pub hello: Hello,
    /// The answerer's own proof (same construction, ids swapped).
    pub proof: [u8; 32],
    /// Members the answerer knows, to dial.
    pub members: Vec<MemberAddrs>,
}

/// A link from the reporting node to a peer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkMeasure {
    /// The peer at the other end.
    pub node_id: String,
    /// Round-trip time, microseconds (data plane when probed, else ping).
    pub rtt_us: u32,
    /// Throughput measured on the data plane, bytes per second (0: not yet).
    pub bytes_per_second: f64,
}

/// A member and where to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberAddrs {
    /// Its node id.
    pub node_id: String,
    /// Its libp2p multiaddrs.
    pub addrs: Vec<String>,
}

/// Sampling settings, as the last stage needs them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Temperature; 0 is greedy.
    pub temperature: f32,
    /// Top-k (0 = off).
    pub top_k: u32,
    /// Top-p (1 = off).
    pub top_p: f32,
    /// Min-p (0 = off).
    pub min_p: f32,
    /// Repetition penalty (1 = off).
    pub repeat_penalty: f32,
    /// Tokens the penalties look back on.
    pub repeat_last_n: u32,
    /// Presence penalty (0 = off).
    pub presence_penalty: f32,
    /// Frequency penalty (0 = off).
    pub frequency_penalty: f32,
    /// RNG seed.
    pub seed: u64,
}

/// Opens a request on every stage: each allocates its KV cache, the last
/// one its sampler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Begin {
    /// The request (random, chosen by the origin).
    pub request_id: u64,
    /// The plan epoch the origin saw; a stage on another epoch refuses.
    pub epoch: u64,
    /// The node that gets the sampled tokens.
    pub origin: String,
    /// Context window to reserve, tokens.
    pub context: u32,
    /// How the last stage picks tokens.
    pub sampling: Sampling,
    /// The prompt (the sampler's repetition history starts with it).
    pub prompt: Vec<u32>,
    /// How many of `prompt`'s tokens are the request's own prompt; the rest
    /// were generated before (a replay) and the constraint's matcher reads
    /// them as output so far.
    pub prompt_len: u32,
    /// A grammar the sampled tokens must follow (structured output, tool
    /// calls), enforced by the last stage's token masks.
    pub constraint: Option<Constraint>,
    /// Log-probabilities wanted with each token: `Some(n)` gives the
    /// sampled token's and the `n` most likely ones (at most
    /// [`crate::limits::TOP_LOGPROBS_MAX`]).
    pub logprobs: Option<u8>,
}

/// A grammar for the output, as text the last stage compiles (it is a
/// peer's input: compiled under the grammar engine's own limits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Constraint {
    /// A JSON Schema (as JSON text): the output is one JSON value valid
    /// against it.
    JsonSchema(String),
    /// A Lark grammar (llguidance's dialect, which embeds JSON schemas).
    Lark(String),
}

impl Constraint {
    /// The grammar's text.
    pub fn text(&self) -> &str {
        match self {
            Constraint::JsonSchema(t) | Constraint::Lark(t) => t,
        }
    }
}

/// Tokens for the first stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// The request.
    pub request_id: u64,
    /// Position of the first token.
    pub position: u32,
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Whether the last stage samples after this chunk (false for all but
    /// the last chunk of a prompt).
    pub sample: bool,
    /// Speculation: the last `draft` tokens are proposals to verify (the
    /// last stage draws at each of their positions and keeps those that
    /// match; every stage drops the rest from its cache when the next
    /// chunk starts before them). `draft == tokens.len()`: every token is
    /// a proposal continuing the previous chunk's, sent before that chunk
    /// was verified (see [`draws`]).
    pub draft: u32,
}

/// Tokens the last stage draws for a sampled chunk of `rows` rows with
/// `draft` proposals: one after the last row, and one after each proposal
/// but the last (which the one after the last row is). A chunk of
/// proposals only (`draft == rows`) continues one in flight: its first
/// row's draw is that chunk's last, so it draws after each of its rows.
pub fn draws(rows: u32, draft: u32) -> u32 {
    if draft == 0 {
        1
    } else {
        (draft + 1).min(rows)
    }
}

/// A node introducing itself.
/// A model file cut into chunks, with what binds them to the model hash.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightIndex {
    /// The model's hash (its manifest's).
    pub model_hash: [u8; 32],
    /// The manifest's parts: per-layer hashes, the ends (embedding, head),
    /// the header; the model hash is their hash, so the asker checks them.
    pub layer_hashes: Vec<[u8; 32]>,
    /// See [`WeightIndex::layer_hashes`].
    pub ends_hash: [u8; 32],
    /// See [`WeightIndex::layer_hashes`].
    pub header_hash: [u8; 32],
    /// Bytes of the GGUF header (metadata and tensor index) at the start.
    pub header_bytes: u64,
    /// Length of the file.
    pub file_bytes: u64,
    /// Bytes per chunk (the last one may be shorter).
    pub chunk_bytes: u32,
    /// blake3 of each chunk: a corrupted chunk is caught on arrival.
    pub chunk_hashes: Vec<[u8; 32]>,
    /// Which chunks the answering node holds (1) or not (0).
    #[serde(with = "serde_bytes")]
    pub have: Vec<u8>,
}

/// How busy a node is, over the last second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Tokens generated per second for the requests it originated.
    pub tokens_per_s: f32,
    /// Requests it originated that are running.
    pub running: u32,
    /// Requests waiting at it for a running slot.
    pub queued: u32,
    /// Sequences holding a KV cache on its stage.
    pub sequences: u32,
    /// Fraction of the last interval its stage spent computing (0..=1).
    pub busy: f32,
    /// The highest plan epoch it has seen: a new leader (after the old one
    /// left, or when two halves of a split network meet again) plans past
    /// the highest any member reached, so every member takes its plan.
    pub epoch: u64,
    /// Its process's resident memory, bytes (0 where unknown).
    pub rss_bytes: u64,
    /// KV cache its stage's requests have filled, bytes.
    pub kv_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// The sender's node id (its libp2p peer id, as text).
    pub node_id: String,
    /// Cluster name.
    pub cluster: String,
    /// blake3 manifest hash of the model it holds.
    pub model_hash: [u8; 32],
    /// What the node offers.
    pub capabilities: Capabilities,
}

/// Compute device kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceKind {
    /// CPU cores.
    Cpu,
    /// An NVIDIA GPU.
    Cuda,
    /// An Apple GPU.
    Metal,
}

/// What a node offers to the planner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Where it computes.
    pub device: DeviceKind,
    /// Compute threads.
    pub threads: u32,
    /// Which CPU kernel family it runs (`avx512`, `avx2`, `portable`): the
    /// same family computes the same bits.
    pub kernels: String,
    /// Memory it may use for weights and caches, bytes.
    pub memory_bytes: u64,
    /// Measured decode time per MiB of this model's weights, microseconds.
    pub us_per_mib: f32,
    /// What each extra row of a small batch adds, µs per MiB (sharding's
    /// `NodeSpec::row_us_per_mib`).
    pub row_us_per_mib: f32,
    /// What each row of a long prompt pass adds, µs per MiB.
    pub prompt_row_us_per_mib: f32,
    /// Its QUIC data-plane address (`ip:port`; an unspecified ip means
    /// "the address you reach me on").
    pub data_addr: String,
    /// Its HTTP API address (`ip:port`).
    pub http_addr: String,
    /// SHA-256 fingerprint of its data-plane certificate.
    pub cert_fingerprint: [u8; 32],
    /// Its libp2p multiaddrs.
    pub addrs: Vec<String>,
    /// A name for people: `--name`, else the machine's host name.
    pub name: String,
}

/// One stage of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageAssignment {
    /// The node running it.
    pub node_id: String,
    /// First layer.
    pub layers_start: u32,
    /// One past the last layer.
    pub layers_end: u32,
}

/// The leader's assignment of layers to nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Increases with every replan; older plans are ignored.
    pub epoch: u64,
    /// blake3 of the model's layer manifest: all stages serve the same model.
    pub model_hash: [u8; 32],
    /// Layers in the model.
    pub n_layers: u32,
    /// Stages in pipeline order; contiguous and covering `0..n_layers`.
    pub stages: Vec<StageAssignment>,
    /// Predicted time per token of one request, microseconds.
    pub token_latency_us: f64,
    /// Predicted tokens per second with the pipeline full.
    pub throughput_tokens_per_s: f64,
}

/// Element type of an activation payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DType {
    /// 32-bit float, exact.
    F32,
    /// 16-bit float, for slow links.
    F16,
    /// bfloat16, for slow links.
    BF16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

/// The rows one sequence contributes to a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRows {
    /// The request.
    pub request_id: u64,
    /// Position of the first row in the sequence.
    pub position: u32,
    /// Rows (token positions) of this sequence in the payload.
    pub rows: u32,
    /// Whether the last stage samples a token from the last row.
    pub sample: bool,
    /// Of the rows, proposals to verify (see [`Input::draft`]): the last
    /// stage turns the last [`draws`] rows into logits.
    pub draft: u32,
}

/// Hidden states of a batch of sequences, rows concatenated in batch order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activations {
    /// The sequences, in payload order.
    pub batch: Vec<SeqRows>,
    /// Hidden size (columns).
    pub dim: u32,
    /// Element type.
    pub dtype: DType,
    /// Little-endian elements, `Σ rows × dim`. Encoded as one length and
    /// raw bytes (not element by element): megabytes per step on the data plane.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    /// The proposals of each sequence with any ([`SeqRows::draft`] of
    /// them, its last input tokens), in batch order: the last stage checks
    /// them against its draws, and skips a chunk of proposals only that
    /// follows one that did not stand (its origin expects nothing back).
    pub proposals: Vec<u32>,
}

/// One sampled token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SampledToken {
    /// The request.
    pub request_id: u64,
    /// Its position in the sequence.
    pub position: u32,
    /// The token id.
    pub token: u32,
}

/// The log-probabilities of a sampled token and its best rivals, from the
/// distribution the token was drawn from (after penalties and the
/// constraint's mask, before temperature and truncation, as OpenAI's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprobs {
    /// The request.
    pub request_id: u64,
    /// The sampled token's position.
    pub position: u32,
    /// Its log-probability.
    pub logprob: f32,
    /// The most likely tokens and their log-probabilities, best first.
    pub top: Vec<(u32, f32)>,
}

/// Tokens sampled by the last stage in one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tokens {
    /// One entry per sequence.
    pub entries: Vec<SampledToken>,
    /// Log-probabilities of the entries whose requests asked for them.
    pub logprobs: Vec<TokenLogprobs>,
}

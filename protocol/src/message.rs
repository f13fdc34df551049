//! The messages nodes exchange, and the checks a receiver runs on them.
//!
//! Control messages ([`Hello`], [`Plan`], heartbeats) travel on the
//! authenticated control plane; [`Activations`], [`Tokens`] and `Cancel` on
//! the QUIC data plane between neighbouring stages. One enum serves both so a
//! single decoder and a single set of limits cover every byte a node reads.

use serde::{Deserialize, Serialize};

use crate::limits::*;

/// Version of this protocol. A node refuses a [`Hello`] with another one.
pub const PROTOCOL_VERSION: u32 = 1;

/// Every message on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Message {
    /// First message on every connection: who is speaking and what it can do.
    Hello(Hello),
    /// The leader's layer assignment.
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
    /// Liveness and link latency probe.
    Heartbeat {
        /// Sequence number, echoed back.
        seq: u64,
        /// Sender's clock, milliseconds (only compared with itself).
        sent_at_ms: u64,
    },
}

/// A node introducing itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// The sender's node id (its libp2p peer id, as text).
    pub node_id: String,
    /// Cluster name.
    pub cluster: String,
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
    /// Memory it may use for weights and caches, bytes.
    pub memory_bytes: u64,
    /// Measured time per layer per generated token, microseconds.
    pub layer_us: u32,
    /// Its QUIC data-plane address (`ip:port`).
    pub data_addr: String,
    /// SHA-256 fingerprint of its data-plane certificate.
    pub cert_fingerprint: [u8; 32],
    /// Its libp2p multiaddrs.
    pub addrs: Vec<String>,
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// Increases with every replan; older plans are ignored.
    pub epoch: u64,
    /// blake3 of the model's layer manifest: all stages serve the same model.
    pub model_hash: [u8; 32],
    /// Layers in the model.
    pub n_layers: u32,
    /// Stages in pipeline order; contiguous and covering `0..n_layers`.
    pub stages: Vec<StageAssignment>,
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

/// Tokens sampled by the last stage in one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    /// One entry per sequence.
    pub entries: Vec<SampledToken>,
}

impl Message {
    /// Checks every limit and invariant a receiver relies on; the error
    /// says which.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Message::Hello(h) => {
                name(&h.node_id, "node id")?;
                name(&h.cluster, "cluster name")?;
                name(&h.capabilities.data_addr, "data address")?;
                if h.capabilities.addrs.len() > ADDRS_MAX {
                    return Err(format!(
                        "{} addresses, at most {ADDRS_MAX}",
                        h.capabilities.addrs.len()
                    ));
                }
                h.capabilities
                    .addrs
                    .iter()
                    .try_for_each(|a| name(a, "address"))
            }
            Message::Plan(p) => validate_plan(p),
            Message::Activations(a) => validate_activations(a),
            Message::Tokens(t) => {
                if t.entries.len() > REQUESTS_PER_MESSAGE_MAX {
                    return Err(format!(
                        "{} tokens in one message, at most {REQUESTS_PER_MESSAGE_MAX}",
                        t.entries.len()
                    ));
                }
                Ok(())
            }
            Message::Cancel { .. } | Message::Heartbeat { .. } => Ok(()),
        }
    }
}

fn name(s: &str, what: &str) -> Result<(), String> {
    if s.len() > NAME_BYTES_MAX {
        return Err(format!(
            "{what} of {} bytes, at most {NAME_BYTES_MAX}",
            s.len()
        ));
    }
    Ok(())
}

fn validate_plan(p: &Plan) -> Result<(), String> {
    if p.stages.is_empty() || p.stages.len() > STAGES_MAX {
        return Err(format!(
            "plan with {} stages (1..={STAGES_MAX})",
            p.stages.len()
        ));
    }
    let mut next = 0;
    for s in &p.stages {
        name(&s.node_id, "node id")?;
        if s.layers_start != next || s.layers_end <= s.layers_start {
            return Err(format!(
                "plan stages must be contiguous and non-empty: {}..{} after layer {next}",
                s.layers_start, s.layers_end
            ));
        }
        next = s.layers_end;
    }
    if next != p.n_layers {
        return Err(format!("plan covers layers 0..{next} of {}", p.n_layers));
    }
    Ok(())
}

fn validate_activations(a: &Activations) -> Result<(), String> {
    if a.batch.is_empty() || a.batch.len() > REQUESTS_PER_MESSAGE_MAX {
        return Err(format!(
            "{} sequences in one batch (1..={REQUESTS_PER_MESSAGE_MAX})",
            a.batch.len()
        ));
    }
    let mut rows = 0u64;
    for s in &a.batch {
        if s.rows == 0 || s.rows as usize > TOKENS_PER_MESSAGE_MAX {
            return Err(format!(
                "request {} has {} rows (1..={TOKENS_PER_MESSAGE_MAX})",
                s.request_id, s.rows
            ));
        }
        rows += u64::from(s.rows);
    }
    let expected = rows * u64::from(a.dim) * a.dtype.size() as u64;
    if a.payload.len() > TENSOR_BYTES_MAX {
        return Err(format!(
            "payload of {} bytes, at most {TENSOR_BYTES_MAX}",
            a.payload.len()
        ));
    }
    if expected != a.payload.len() as u64 {
        return Err(format!(
            "payload of {} bytes, shape [{rows}, {}] {:?} needs {expected}",
            a.payload.len(),
            a.dim,
            a.dtype
        ));
    }
    Ok(())
}

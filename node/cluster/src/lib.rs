//! A member of a shoal cluster: discovery and membership (libp2p), the
//! plan, the QUIC data plane between stages, the stage worker, request
//! origins and weights shared between nodes. The HTTP API lives in the
//! `api` crate and reaches all this through [`Handle`] only.
//!
//! # Layout
//! - [`start`](Cluster::start): loads and calibrates the model, binds the
//!   data plane, spawns the worker and the control loop.
//! - [`Handle`]: the narrow interface for the API: submit a request and
//!   receive its events, read a status snapshot, render metrics.
//! - [`key`]: the cluster secret and join proofs.
//! - [`membership`]: members, leader, plans (pure state, owned by control).
//! - `control`: the control loop, the only writer of membership and plan;
//!   `swarm`: its libp2p setup.
//! - [`tls`], [`wire`], [`dataplane`]: QUIC links between stages.
//! - [`worker`]: the thread that runs this node's layers.
//! - [`calibrate`]: a short speed measurement at start.
//! - `origin`: a request from prompt to streamed tokens, through the pipeline.
//! - [`status`]: the status snapshot (`/api/status`, `shoal status`).
//! - [`metrics`]: Prometheus metrics.
//! - [`weights`]: a model file fetched from members, chunk by checked chunk.
//!
//! Architecture Invariant: only the control loop mutates membership and
//! the plan; everything else reads snapshots (a `watch` channel each).
//! Architecture Invariant: nothing here knows HTTP (no axum or hyper in
//! this crate's dependencies, checked by the `dependency_edges` test).

pub mod calibrate;
mod control;
pub mod dataplane;
mod fault;
mod handle;
pub mod key;
pub mod membership;
pub mod metrics;
mod origin;
pub mod routes;
mod shared;
mod start;
pub mod status;
mod swarm;
pub mod tls;
pub mod weights;
pub mod wire;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;

pub use handle::{Handle, ModelInfo};
pub use libp2p::Multiaddr;
pub use origin::{AskEvent, AskRequest, Logprob, NodeStats, Prompt, RecentRequest, TopLogprob};
pub use protocol::RequestError;
pub use start::{available_memory, host_name, Cluster, Prepared};

use key::ClusterKey;
use protocol::DType;
use sharding::PlanGoal;

/// Everything a cluster member is started with (`shoal node`'s flags but
/// the API's).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// The GGUF model file.
    pub model: PathBuf,
    /// Cluster name.
    pub cluster: String,
    /// Cluster secret.
    pub key: ClusterKey,
    /// libp2p listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial.
    pub peers: Vec<Multiaddr>,
    /// Discover peers with mDNS.
    pub mdns: bool,
    /// QUIC data-plane address.
    pub data: SocketAddr,
    /// The data-plane address peers should dial, when not the bound one
    /// (a port forward, a relay).
    pub data_advertise: Option<SocketAddr>,
    /// Memory this node may use for weights and KV cache (default: what is available).
    pub max_memory: Option<u64>,
    /// Context window per request, tokens.
    pub context: usize,
    /// Compute threads (reported; the caller sizes the pool).
    pub threads: usize,
    /// What the planner optimises.
    pub goal: PlanGoal,
    /// Element type of activations between stages.
    pub activations: DType,
    /// Requests this node runs at once as their origin.
    pub max_running: usize,
    /// Requests waiting for a running slot before new ones are refused
    /// ([`RequestError::Overloaded`]).
    pub max_queued: usize,
    /// The model's name in the API (`--alias`); default: the short name
    /// from its header.
    pub alias: Option<String>,
    /// A name for people (`--name`; default: the host name).
    pub name: Option<String>,
    /// Speculative decoding for requests this node originates: `None` off,
    /// `Some(0)` adaptive, `Some(k)` always up to `k` proposals.
    pub speculate: Option<usize>,
    /// The model is being fetched from peers into `model`: this index (with
    /// what is here so far), from [`weights::bootstrap`]. `None`: `model`
    /// is a whole file.
    pub fetched: Option<protocol::WeightIndex>,
}

/// Why a cluster member could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The model could not be read.
    #[error(transparent)]
    Engine(#[from] engine::EngineError),
    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The control plane could not start.
    #[error("control plane: {0}")]
    Control(String),
}

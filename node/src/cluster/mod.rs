//! A cluster node: discovery and membership (libp2p), the plan, the QUIC
//! data plane, the stage worker, request origins and the HTTP API.
//!
//! # Layout
//! - [`key`]: the cluster secret and join proofs.
//! - [`membership`]: members, leader, plans (pure state).
//! - [`metrics`]: Prometheus metrics (`/metrics`).
//! - [`control`]: the control loop driving membership; `swarm`: its libp2p setup.
//! - [`tls`], [`wire`], [`dataplane`]: QUIC links between stages.
//! - [`worker`]: the thread that runs this node's layers.
//! - [`calibrate`]: a short speed measurement at start.
//! - [`origin`]: a request from prompt to streamed tokens, through the pipeline.
//! - [`http`]: the node's HTTP API (`/api/shoal/generate`, `/api/status`; OpenAI in [`openai`], Ollama in [`ollama`]).
//! - [`openai`]: OpenAI-compatible endpoints (`/v1/...`).
//!
//! Architecture Invariant: only the control loop mutates membership; the
//! data plane and HTTP read snapshots of it.

pub mod batch;
pub mod calibrate;
pub mod control;
pub mod dataplane;
pub mod http;
pub mod key;
pub mod membership;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod origin;
mod swarm;
pub mod tls;
pub mod weights;
pub mod wire;

pub use libp2p::Multiaddr;
pub mod worker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use protocol::{Capabilities, DType, DeviceKind, Hello, Plan, PROTOCOL_VERSION};
use sharding::{GgufFile, Manifest, ModelLayout, ModelSpec, PlanGoal};
use tokio::sync::{watch, OnceCell};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::model::LoadOptions;
use crate::text::TextModel;
use dataplane::{short, DataPlane};
use key::ClusterKey;
use membership::Membership;
use worker::WorkerMsg;

/// Everything `shoal node` is started with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
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
    /// HTTP API address.
    pub http: SocketAddr,
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
    /// Bearer token required by the generation endpoints (none: open).
    pub api_key: Option<String>,
    /// Requests this node runs at once as their origin.
    pub max_running: usize,
    /// Requests waiting for a running slot before new ones get 429.
    pub max_queued: usize,
    /// The model is being fetched from peers into `model`: this index (with
    /// what is here so far), from [`weights::bootstrap`]. `None`: `model`
    /// is a whole file.
    pub fetched: Option<protocol::WeightIndex>,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The model could not be read.
    #[error(transparent)]
    Engine(#[from] crate::EngineError),
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

/// State shared by the control loop, the data plane, origins and HTTP.
pub struct Shared {
    /// Membership and plan (written by the control loop only).
    pub membership: Mutex<Membership>,
    /// The data plane.
    pub data: Arc<DataPlane>,
    /// The plan in force, watched by origins.
    pub plan: watch::Sender<Option<Plan>>,
    /// The last planning error logged (to log each once).
    pub last_plan_error: Mutex<Option<String>>,
    /// Node settings.
    pub config: NodeConfig,
    /// This node's id.
    pub node_id: String,
    /// The model's layout.
    pub layout: Arc<ModelLayout>,
    /// The model's manifest.
    pub manifest: Manifest,
    /// Tokenizer and template, loaded when this node first originates a request.
    text: OnceCell<Arc<TextModel>>,
    /// Request counters for status.
    pub stats: Mutex<origin::NodeStats>,
    /// Requests with a KV cache on this node's stage right now.
    pub live_sequences: Arc<std::sync::atomic::AtomicUsize>,
    /// Prometheus metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Running slots for requests originated here (FIFO).
    pub running: Arc<tokio::sync::Semaphore>,
    /// Requests admitted and waiting for a slot.
    pub queued: std::sync::atomic::AtomicUsize,
    /// This node's load over the last second (sent to every member).
    pub load: Mutex<protocol::LoadReport>,
    /// The model file as this node holds it (handed out to peers).
    pub weights: Arc<weights::WeightStore>,
    /// Fetches missing layers from members.
    pub fetcher: Arc<weights::Fetcher>,
}

impl Shared {
    /// Installs a plan (or none): logs it, fails requests of the old one,
    /// reconfigures the worker, and tells origins.
    pub fn apply_plan(&self, plan: Option<Plan>) {
        let old = self.plan.borrow().clone();
        if old == plan {
            return;
        }
        let (layers, next, epoch) = match &plan {
            Some(p) => {
                let pos = p.stages.iter().position(|s| s.node_id == self.node_id);
                let layers =
                    pos.map(|i| p.stages[i].layers_start as usize..p.stages[i].layers_end as usize);
                let next = pos
                    .filter(|&i| i + 1 < p.stages.len())
                    .map(|i| p.stages[i + 1].node_id.clone());
                info!(
                    "plan epoch {}: {} | {:.1} ms/token, {:.1} tok/s full{}",
                    p.epoch,
                    plan_line(p),
                    p.token_latency_us / 1000.0,
                    p.throughput_tokens_per_s,
                    match &layers {
                        Some(l) => format!(" (this node: layers {}..{})", l.start, l.end),
                        None => " (this node: none)".into(),
                    }
                );
                (layers, next, p.epoch)
            }
            None => {
                warn!("no plan in force: waiting for the leader");
                (None, None, 0)
            }
        };
        // Without a plan the worker keeps its layers loaded (the next plan
        // is likely to give them back) but drops its requests.
        let msg = match plan {
            Some(ref p) => WorkerMsg::Reconfigure {
                epoch,
                layers,
                next,
                stages: p.stages.len(),
            },
            None => WorkerMsg::Pause,
        };
        // The worker hears of the plan before any request of it can reach it.
        self.data.to_worker_now(msg);
        self.plan.send_replace(plan);
        // Requests see the new plan (or none) by the time they fail: one
        // that had no token yet runs again on the new plan.
        if old.is_some() {
            self.data.fail_all_requests(
                "the cluster changed during the request (a node left or joined); retry",
            );
        }
    }

    /// The tokenizer and template, loaded on first use.
    pub async fn text(&self) -> Result<Arc<TextModel>, crate::EngineError> {
        let path = self.config.model.clone();
        self.text
            .get_or_try_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    let gguf = GgufFile::open(&path)?;
                    Ok(Arc::new(TextModel::from_gguf(&gguf)?))
                })
                .await
                .expect("tokenizer load task")
            })
            .await
            .cloned()
    }
}

/// `abc123[0..10) -> def456[10..30)`.
pub fn plan_line(p: &Plan) -> String {
    p.stages
        .iter()
        .map(|s| {
            format!(
                "{}[{}..{})",
                short(&s.node_id),
                s.layers_start,
                s.layers_end
            )
        })
        .collect::<Vec<_>>()
        .join(" -> ")
}

/// A running node.
pub struct Node {
    /// Shared state (status, plan).
    pub shared: Arc<Shared>,
    /// Where its HTTP API listens.
    pub http_addr: SocketAddr,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Node {
    /// Starts a node: reads and hashes the model, calibrates, binds the data
    /// plane and HTTP, and joins the cluster.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let path = config.model.clone();
        let context = config.context;
        let fetched = config.fetched.clone();
        let (layout, manifest, speed) = tokio::task::spawn_blocking(move || {
            let gguf = GgufFile::open(&path)?;
            let layout = ModelLayout::from_gguf(&gguf)?;
            let manifest = match &fetched {
                // Checked against its model hash when fetched; layers are
                // checked as they arrive.
                Some(i) => Manifest::from_parts(i.layer_hashes.clone(), i.ends_hash, i.header_hash),
                None => Manifest::compute(&path, &layout)?,
            };
            let speed = calibrate::measure(&gguf, &layout, context)?;
            Ok::<_, crate::EngineError>((Arc::new(layout), manifest, speed))
        })
        .await
        .expect("model load task")?;
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let node_id = keypair.public().to_peer_id().to_string();
        let metrics = Arc::new(metrics::Metrics::default());
        let data =
            DataPlane::bind(node_id.clone(), config.data, metrics.clone()).map_err(|source| {
                NodeError::Bind {
                    what: "the data plane (QUIC)",
                    addr: config.data,
                    source,
                }
            })?;
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|source| NodeError::Bind {
                what: "the HTTP API",
                addr: config.http,
                source,
            })?;
        let http_addr = listener.local_addr().expect("bound listener");
        let memory_bytes = config.max_memory.unwrap_or_else(available_memory);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            node_id: node_id.clone(),
            cluster: config.cluster.clone(),
            model_hash: manifest.model_hash,
            capabilities: Capabilities {
                device: DeviceKind::Cpu,
                threads: config.threads as u32,
                memory_bytes,
                us_per_mib: speed.us_per_mib as f32,
                row_us_per_mib: speed.row_us_per_mib as f32,
                prompt_row_us_per_mib: speed.prompt_row_us_per_mib as f32,
                data_addr: config
                    .data_advertise
                    .unwrap_or_else(|| data.local_addr())
                    .to_string(),
                http_addr: http_addr.to_string(),
                cert_fingerprint: data.fingerprint(),
                addrs: Vec::new(),
            },
        };
        info!(
            node = %short(&node_id),
            model = layout.config.name.as_deref().unwrap_or("?"),
            hash = %manifest.short_hash(),
            us_per_mib = format!("{:.0}", speed.us_per_mib),
            head_us = format!("{:.0}", speed.head_us),
            row_us_per_mib = format!("{:.0}", speed.row_us_per_mib),
            prompt_row_us_per_mib = format!("{:.0}", speed.prompt_row_us_per_mib),
            memory_mib = memory_bytes >> 20,
            data = %data.local_addr(),
            http = %http_addr,
            "node starting"
        );
        let mut spec = ModelSpec::from_layout(&layout, context as u64, 2);
        // What actually travels: f16/bf16 activations halve each hop.
        spec.activation_bytes = layout.config.dim as u64 * config.activations.size() as u64;
        // The leader plans with its own measure of the head against the
        // layers: the ratio is the kernels', the same on every CPU node.
        spec.last_compute_bytes = speed.head_compute_bytes();
        let membership = Membership::new(hello, spec, config.goal);
        let store = Arc::new(match &config.fetched {
            Some(index) => weights::WeightStore::partial(&config.model, index.clone()),
            None => weights::WeightStore::whole(&config.model),
        });
        let fetcher = Arc::new(weights::Fetcher {
            store: store.clone(),
            sources: Mutex::new(weights::Sources {
                cluster: config.cluster.clone(),
                key: config.key.clone(),
                addrs: config.peers.clone(),
                mdns: config.mdns,
            }),
            runtime: tokio::runtime::Handle::current(),
            layout: layout.clone(),
        });
        let live_sequences = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let worker = worker::spawn(
            worker::WorkerConfig {
                me: node_id.clone(),
                model: config.model.clone(),
                layout: layout.clone(),
                load: LoadOptions {
                    max_context: context,
                    ..LoadOptions::default()
                },
                dtype: config.activations,
                live: live_sequences.clone(),
                metrics: metrics.clone(),
                fetcher: fetcher.clone(),
            },
            Arc::new(data.clone()),
        );
        data.set_worker(worker);
        let shared = Arc::new(Shared {
            membership: Mutex::new(membership),
            data,
            plan: watch::channel(None).0,
            last_plan_error: Mutex::new(None),
            config: config.clone(),
            node_id,
            layout,
            manifest,
            text: OnceCell::new(),
            stats: Mutex::default(),
            live_sequences,
            metrics,
            running: Arc::new(tokio::sync::Semaphore::new(config.max_running.max(1))),
            queued: std::sync::atomic::AtomicUsize::new(0),
            load: Mutex::new(protocol::LoadReport::default()),
            weights: store,
            fetcher,
        });
        let stop = CancellationToken::new();
        let control = control::start(
            keypair,
            control::ControlConfig {
                listen: config.listen.clone(),
                peers: config.peers.clone(),
                mdns: config.mdns,
                cluster: config.cluster.clone(),
                key: config.key.clone(),
            },
            shared.clone(),
            stop.clone(),
        )
        .map_err(NodeError::Control)?;
        let http = tokio::spawn(http::serve(listener, shared.clone(), stop.clone()));
        Ok(Node {
            shared,
            http_addr,
            stop,
            tasks: vec![control, http],
        })
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.shared.node_id
    }

    /// Stops the node (its peers see it leave).
    pub async fn shutdown(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Memory available to a new process (Linux `MemAvailable`), or 4 GiB
/// where it cannot be read.
pub fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))?
                .split_whitespace()
                .nth(1)?
                .parse::<u64>()
                .ok()
        })
        .map_or(4 << 30, |kb| kb * 1024)
}

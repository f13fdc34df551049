//! Starting a cluster member, in named steps: load and calibrate the model,
//! bind the data plane, introduce this node, spawn the stage worker and the
//! control loop.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use engine::model::LoadOptions;
use protocol::{Capabilities, DeviceKind, Hello, PROTOCOL_VERSION};
use sharding::{GgufFile, Manifest, ModelLayout, ModelSpec};
use tokio::sync::{watch, OnceCell};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::calibrate::{self, Speed};
use crate::dataplane::{short, DataPlane};
use crate::membership::Membership;
use crate::shared::Shared;
use crate::{control, metrics, weights, worker, ClusterConfig, Handle, StartError};

/// A running cluster member.
pub struct Cluster {
    shared: Arc<Shared>,
    stop: CancellationToken,
    control: tokio::task::JoinHandle<()>,
    commands: tokio::sync::mpsc::Sender<control::Command>,
}

/// Longest a leaving node waits for its members to answer its goodbye.
const GOODBYE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// The model as read at start: layout, manifest and this machine's speed.
struct Loaded {
    layout: Arc<ModelLayout>,
    manifest: Manifest,
    speed: Speed,
    /// What the API says of the model (read with the layout).
    description: sharding::describe::Description,
}

/// A member half started: its model read and measured, its data plane
/// bound. The API binds its socket between the two halves, so that a port
/// in use is reported after a bad model, as a node always did.
pub struct Prepared {
    config: ClusterConfig,
    loaded: Loaded,
    keypair: libp2p::identity::Keypair,
    node_id: String,
    metrics: Arc<metrics::Metrics>,
    data: Arc<DataPlane>,
}

impl Cluster {
    /// The first half of a start: reads and hashes the model, calibrates,
    /// binds the data plane.
    pub async fn prepare(config: ClusterConfig) -> Result<Prepared, StartError> {
        let loaded = load_model(&config).await?;
        let keypair = crate::fault::keypair();
        let node_id = keypair.public().to_peer_id().to_string();
        let metrics = Arc::new(metrics::Metrics::default());
        let data =
            DataPlane::bind(node_id.clone(), config.data, metrics.clone()).map_err(|source| {
                StartError::Bind {
                    what: "the data plane (QUIC)",
                    addr: config.data,
                    source,
                }
            })?;
        Ok(Prepared {
            config,
            loaded,
            keypair,
            node_id,
            metrics,
            data,
        })
    }

    /// Starts a member in one go ([`Cluster::prepare`], then
    /// [`Prepared::start`]). `http_addr` is where this node's API answers
    /// (told to the other members, for the status page).
    pub async fn start(
        config: ClusterConfig,
        http_addr: SocketAddr,
    ) -> Result<Cluster, StartError> {
        Cluster::prepare(config).await?.start(http_addr)
    }
}

impl Prepared {
    /// The second half: introduces this node, spawns the stage worker and
    /// the control loop, and joins the cluster.
    pub fn start(self, http_addr: SocketAddr) -> Result<Cluster, StartError> {
        let Prepared {
            config,
            loaded,
            keypair,
            node_id,
            metrics,
            data,
        } = self;
        let hello = introduce(&config, &node_id, &loaded, &data, http_addr);
        let membership = Membership::new(hello, model_spec(&config, &loaded), config.goal);
        let (view_tx, view) = watch::channel(Arc::new(membership.view()));
        let (plan_tx, plan) = watch::channel(None);
        let (store, fetcher) = weight_store(&config, &loaded.layout);
        let live_sequences = Arc::new(AtomicUsize::new(0));
        let text = Arc::new(OnceCell::new());
        let worker = worker::spawn(
            worker::WorkerConfig {
                me: node_id.clone(),
                model: config.model.clone(),
                layout: loaded.layout.clone(),
                load: LoadOptions {
                    max_context: config.context,
                    ..LoadOptions::default()
                },
                dtype: config.activations,
                live: live_sequences.clone(),
                metrics: metrics.clone(),
                fetcher: fetcher.clone(),
                memory_bytes: config.max_memory.unwrap_or_else(available_memory),
                text: text.clone(),
            },
            Arc::new(data.clone()),
        );
        data.set_worker(worker);
        let shared = Arc::new(Shared {
            view,
            data,
            plan,
            running: Arc::new(tokio::sync::Semaphore::new(config.max_running.max(1))),
            config,
            node_id,
            layout: loaded.layout,
            manifest: loaded.manifest,
            description: loaded.description,
            text,
            stats: Mutex::default(),
            live_sequences,
            metrics,
            queued: AtomicUsize::new(0),
            load: Mutex::new(protocol::LoadReport::default()),
            weights: store,
            fetcher,
            routes: Default::default(),
        });
        let stop = CancellationToken::new();
        let publish = control::Publish {
            view: view_tx,
            plan: plan_tx,
        };
        let (commands, commands_rx) = tokio::sync::mpsc::channel(4);
        let control = control::start(
            keypair,
            membership,
            publish,
            shared.clone(),
            stop.clone(),
            commands_rx,
        )
        .map_err(StartError::Control)?;
        Ok(Cluster {
            shared,
            stop,
            control,
            commands,
        })
    }
}

impl Cluster {
    /// The interface the API uses.
    pub fn handle(&self) -> Handle {
        Handle::new(self.shared.clone())
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        &self.shared.node_id
    }

    /// Says goodbye: every member plans without this node at once (the
    /// requests that ran through it go on under the new plan); returns
    /// when all have answered, or after a few seconds. Requests this node
    /// originated end with it.
    pub async fn leave(&self) {
        let (done, answered) = tokio::sync::oneshot::channel();
        if self
            .commands
            .send(control::Command::Leave(done))
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(GOODBYE_WAIT, answered).await;
        }
        let me = short(&self.shared.node_id).to_string();
        self.shared
            .data
            .fail_all_requests(&protocol::RequestError::Stage {
                node: me,
                why: "this node is shutting down".into(),
            });
    }

    /// Stops the member (its peers see it leave).
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.control.await;
    }
}

/// Reads the model's layout and manifest and measures this machine's
/// speed on it, off the async threads.
async fn load_model(config: &ClusterConfig) -> Result<Loaded, StartError> {
    let path = config.model.clone();
    let context = config.context;
    let fetched = config.fetched.clone();
    let loaded = tokio::task::spawn_blocking(move || {
        let gguf = GgufFile::open(&path)?;
        let layout = ModelLayout::from_gguf(&gguf)?;
        let manifest = match &fetched {
            // Checked against its model hash when fetched; layers are
            // checked as they arrive.
            Some(i) => Manifest::from_parts(i.layer_hashes.clone(), i.ends_hash, i.header_hash),
            None => Manifest::compute(&path, &layout)?,
        };
        let speed = calibrate::measure(&gguf, &layout, context)?;
        let description = sharding::describe::describe(&gguf, &layout);
        Ok::<_, engine::EngineError>(Loaded {
            layout: Arc::new(layout),
            manifest,
            speed,
            description,
        })
    })
    .await
    .expect("model load task")?;
    Ok(loaded)
}

/// The model file as this node holds it (whole, or being fetched) and the
/// fetcher that completes it from members.
fn weight_store(
    config: &ClusterConfig,
    layout: &Arc<ModelLayout>,
) -> (Arc<weights::WeightStore>, Arc<weights::Fetcher>) {
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
    (store, fetcher)
}

/// This node's introduction to its peers: identity, model, measured speed,
/// memory and where it answers.
fn introduce(
    config: &ClusterConfig,
    node_id: &str,
    loaded: &Loaded,
    data: &DataPlane,
    http_addr: SocketAddr,
) -> Hello {
    let memory_bytes = config.max_memory.unwrap_or_else(available_memory);
    let mut speed = loaded.speed;
    if crate::fault::lies().any() {
        // See `fault`: a liar claims speed to get layers.
        speed.us_per_mib /= 4.0;
        speed.row_us_per_mib /= 4.0;
        speed.prompt_row_us_per_mib /= 4.0;
    }
    info!(
        node = %short(node_id),
        model = loaded.layout.config.name.as_deref().unwrap_or("?"),
        hash = %loaded.manifest.short_hash(),
        us_per_mib = format!("{:.0}", speed.us_per_mib),
        head_us = format!("{:.0}", speed.head_us),
        row_us_per_mib = format!("{:.0}", speed.row_us_per_mib),
        prompt_row_us_per_mib = format!("{:.0}", speed.prompt_row_us_per_mib),
        memory_mib = memory_bytes >> 20,
        data = %data.local_addr(),
        http = %http_addr,
        "node starting"
    );
    Hello {
        version: PROTOCOL_VERSION,
        node_id: node_id.to_string(),
        cluster: config.cluster.clone(),
        model_hash: loaded.manifest.model_hash,
        capabilities: Capabilities {
            device: DeviceKind::Cpu,
            threads: config.threads as u32,
            kernels: engine::quant::kernels().name().into(),
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
            name: config.name.clone().unwrap_or_else(|| {
                host_name().map_or_else(|| "node".into(), |n| n.chars().take(64).collect())
            }),
        },
    }
}

/// The model as the planner sees it from this node.
fn model_spec(config: &ClusterConfig, loaded: &Loaded) -> ModelSpec {
    let mut spec = ModelSpec::from_layout(&loaded.layout, config.context as u64, 2);
    // What actually travels: f16/bf16 activations halve each hop.
    spec.activation_bytes = loaded.layout.config.dim as u64 * config.activations.size() as u64;
    // The leader plans with its own measure of the head against the
    // layers: the ratio is the kernels', the same on every CPU node.
    spec.last_compute_bytes = loaded.speed.head_compute_bytes();
    spec
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

/// The machine's host name (Linux; `None` elsewhere or when empty): a
/// node's name on the page when `--name` is not given, and a name the API
/// answers to.
pub fn host_name() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
}

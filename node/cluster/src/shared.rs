//! The state a member's tasks share. Crate-private: the API sees it only
//! through [`crate::Handle`]; membership and the plan have one writer, the
//! control loop, which publishes them on `watch` channels.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use engine::text::TextModel;
use protocol::Plan;
use sharding::{GgufFile, Manifest, ModelLayout};
use tokio::sync::{watch, OnceCell};

use crate::dataplane::{short, DataPlane};
use crate::membership::View;
use crate::origin::NodeStats;
use crate::{metrics, weights, ClusterConfig};

/// State shared by the control loop, the data plane and origins.
pub(crate) struct Shared {
    /// Membership as the control loop last published it (read-only here).
    pub view: watch::Receiver<Arc<View>>,
    /// The data plane.
    pub data: Arc<DataPlane>,
    /// The plan in force, watched by origins (the control loop holds the
    /// only sender).
    pub plan: watch::Receiver<Option<Plan>>,
    /// Node settings.
    pub config: ClusterConfig,
    /// This node's id.
    pub node_id: String,
    /// The model's layout.
    pub layout: Arc<ModelLayout>,
    /// The model's manifest.
    pub manifest: Manifest,
    /// What its header says of it to people (name, parameters, quantisation, template).
    pub description: sharding::describe::Description,
    /// Tokenizer and template, loaded when this node first originates a request.
    /// (Shared with the stage worker, whose grammars use the same vocabulary.)
    pub text: Arc<OnceCell<Arc<TextModel>>>,
    /// Request counters for status.
    pub stats: Mutex<NodeStats>,
    /// Requests with a KV cache on this node's stage right now.
    pub live_sequences: Arc<AtomicUsize>,
    /// Prometheus metrics.
    pub metrics: Arc<metrics::Metrics>,
    /// Running slots for requests originated here (FIFO).
    pub running: Arc<tokio::sync::Semaphore>,
    /// Requests admitted and waiting for a slot.
    pub queued: AtomicUsize,
    /// This node's load over the last second (sent to every member).
    pub load: Mutex<protocol::LoadReport>,
    /// The model file as this node holds it (handed out to peers).
    pub weights: Arc<weights::WeightStore>,
    /// Fetches missing layers from members.
    pub fetcher: Arc<weights::Fetcher>,
    /// Where the API sent requests (see `routes`).
    pub routes: crate::routes::RouteBook,
}

impl Shared {
    /// The tokenizer and template, loaded on first use.
    pub async fn text(&self) -> Result<Arc<TextModel>, engine::LoadError> {
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

//! A shoal node: one cluster member ([`cluster`]) and its HTTP API
//! ([`api`]), started and stopped together. This crate is only the
//! wiring; each part lives in its own crate under `node/`:
//!
//! - `engine`: the model's forward pass, kernels, tokenizer, chat
//!   templates, sampling (no networking).
//! - `schedule`: batching and chunking decisions (pure; the simulator
//!   calls the same code).
//! - `cluster`: membership, control and data planes, stage worker,
//!   request origins, weights shared between nodes.
//! - `api`: OpenAI, Ollama and shoal endpoints, status page, metrics.
//! - `models`: the cache folder and the default model.

use std::net::SocketAddr;

pub use api::{route, ApiConfig};
pub use cluster::ClusterConfig;
use tokio_util::sync::CancellationToken;

/// Everything `shoal node` is started with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The cluster member's settings.
    pub cluster: ClusterConfig,
    /// Where the HTTP API listens.
    pub http: SocketAddr,
    /// The API's settings.
    pub api: ApiConfig,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The cluster member could not start.
    #[error(transparent)]
    Cluster(#[from] cluster::StartError),
    /// The API's socket could not be bound.
    #[error("cannot bind the HTTP API on {addr}")]
    BindHttp {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

/// A running node.
pub struct Node {
    cluster: cluster::Cluster,
    /// Where its HTTP API listens.
    pub http_addr: SocketAddr,
    stop: CancellationToken,
    http: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Reads and measures the model and binds the data plane, then binds
    /// the API (its address is part of this node's introduction), starts
    /// the cluster member, and serves the API.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        let prepared = cluster::Cluster::prepare(config.cluster).await?;
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|source| NodeError::BindHttp {
                addr: config.http,
                source,
            })?;
        let http_addr = listener.local_addr().expect("bound listener");
        let cluster = prepared.start(http_addr)?;
        let stop = CancellationToken::new();
        let http = tokio::spawn(api::serve(
            listener,
            cluster.handle(),
            config.api,
            stop.clone(),
        ));
        Ok(Node {
            cluster,
            http_addr,
            stop,
            http,
        })
    }

    /// This node's id.
    pub fn id(&self) -> &str {
        self.cluster.id()
    }

    /// Leaves the cluster with a goodbye (see `Cluster::leave`), then
    /// stops: what a node does on SIGTERM or Ctrl-C.
    pub async fn leave_and_shutdown(self) {
        self.cluster.leave().await;
        self.shutdown().await;
    }

    /// Stops the node: the API first, then the member (its peers see it leave).
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.http.await;
        self.cluster.shutdown().await;
    }
}

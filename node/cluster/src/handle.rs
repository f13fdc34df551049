//! The one interface between the cluster and the HTTP API: submit a
//! request and receive its events, read a status snapshot, render the
//! metrics, describe the model. Nothing else of the member is reachable
//! from the API crate, so it cannot touch membership or the plan.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use protocol::RequestError;
use tokio::sync::mpsc;

use crate::origin::{AskEvent, AskRequest};
use crate::shared::Shared;
use crate::status::Status;

/// A cheap, cloneable handle on a running member.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
    /// Fixed for the member's life: described once, not per request.
    model: Arc<ModelInfo>,
}

/// The model this member serves, as the API describes it.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Its name in the API: `--alias`, else the short name from its header
    /// (`smollm2:135m`), else the file name without `.gguf`.
    pub name: String,
    /// The GGUF file name without `.gguf` (a name it answers to as well).
    pub id: String,
    /// Architecture (`llama`, ...).
    pub architecture: String,
    /// Weight bytes.
    pub bytes: u64,
    /// blake3 manifest hash, hex.
    pub hash: String,
    /// Parameters (every weight).
    pub parameters: u64,
    /// The same as model names write it (`135M`, `8.0B`).
    pub parameter_size: String,
    /// The quantisation llama.cpp wrote (`Q4_K_M`), if the file says.
    pub quantization: Option<String>,
    /// The context window this node serves, tokens.
    pub context: usize,
    /// The chat template, if the model has one.
    pub template: Option<String>,
}

impl ModelInfo {
    /// Whether a client asking for `asked` means this model: its name or
    /// file name (see `models::catalog::answers_to`), or its hash (at least
    /// 12 hex digits of it).
    pub fn answers_to(&self, asked: &str) -> bool {
        models::catalog::answers_to(&self.name, &self.id, asked)
            || (asked.len() >= 12 && self.hash.starts_with(&asked.to_ascii_lowercase()))
    }
}

impl Handle {
    pub(crate) fn new(shared: Arc<Shared>) -> Handle {
        let cfg = &shared.layout.config;
        let d = &shared.description;
        let id: String = shared
            .config
            .model
            .file_stem()
            .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
        let model = Arc::new(ModelInfo {
            name: (shared.config.alias.clone())
                .or_else(|| d.short_name.clone())
                .unwrap_or_else(|| id.clone()),
            id,
            architecture: cfg.architecture.clone(),
            bytes: shared.layout.stage_bytes(0..cfg.n_layers),
            hash: sharding::manifest::hex(&shared.manifest.model_hash),
            parameters: d.parameters,
            parameter_size: sharding::describe::parameter_size(d.parameters),
            quantization: d.quantization.map(String::from),
            context: shared.config.context,
            template: d.template.clone(),
        });
        Handle { shared, model }
    }

    /// Admits `req` (or refuses it with [`RequestError::Overloaded`] when
    /// the wait queue is full) and runs it in the background once a
    /// running slot is free, first come first served. Its events arrive on
    /// `events`, ending with `Done` or `Error`; dropping the receiver
    /// cancels it along the pipeline.
    pub fn submit(
        &self,
        req: AskRequest,
        events: mpsc::UnboundedSender<AskEvent>,
    ) -> Result<(), RequestError> {
        let sh = &self.shared;
        let queued = sh.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= sh.config.max_queued {
            sh.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(RequestError::Overloaded {
                queued: queued as u32,
            });
        }
        sh.metrics.requests_queued.inc();
        let shared = sh.clone();
        tokio::spawn(async move {
            // Waiting is given up when the client goes away meanwhile.
            let permit = tokio::select! {
                p = shared.running.clone().acquire_owned() => p.ok(),
                _ = events.closed() => None,
            };
            shared.queued.fetch_sub(1, Ordering::SeqCst);
            shared.metrics.requests_queued.dec();
            if let Some(_permit) = permit {
                shared.ask(req, events).await;
            }
        });
        Ok(())
    }

    /// Whether a plan is in force (the cluster can answer now).
    pub fn has_plan(&self) -> bool {
        self.shared.plan.borrow().is_some()
    }

    /// The cluster as this node sees it now.
    pub fn status(&self) -> Status {
        crate::status::build(&self.shared)
    }

    /// The record of where the API sent requests.
    pub fn routes(&self) -> &crate::routes::RouteBook {
        &self.shared.routes
    }

    /// Prometheus/OpenMetrics text of this node's metrics.
    pub fn metrics_text(&self) -> String {
        let mut text = self.shared.metrics.render();
        // The route counters go before OpenMetrics' closing `# EOF`.
        let at = text.rfind("# EOF").unwrap_or(text.len());
        text.insert_str(at, &self.shared.routes.metrics_text());
        text
    }

    /// The model this member serves.
    pub fn model(&self) -> &ModelInfo {
        &self.model
    }
}

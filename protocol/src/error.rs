//! Why a request ended without its answer, as one type from the place it
//! fails to the client: a stage raises it, [`crate::Message::Failed`]
//! carries it to the origin, the origin hands it to the HTTP layer, which
//! maps the variant (never the words) to a status code.

use serde::{Deserialize, Serialize};

/// Why a request failed. Strings inside are for people and bounded by the
/// codec like every other text on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The prompt has no tokens.
    #[error("empty prompt: nothing to run")]
    EmptyPrompt,
    /// The sequence does not fit its context window.
    #[error("context full: {needed} tokens needed, the context holds {context} (raise --ctx)")]
    ContextFull {
        /// Positions needed (the prompt's tokens, or all so far).
        needed: u32,
        /// Context tokens.
        context: u32,
    },
    /// The input could not be turned into tokens (template, tokenizer).
    #[error("{0}")]
    BadInput(String),
    /// The cluster has no plan that can hold the model.
    #[error("the cluster cannot serve this model: {0}")]
    Unservable(String),
    /// No plan in force yet.
    #[error("no plan yet: the cluster is still forming (see `shoal status`)")]
    NoPlan,
    /// The plan changed while the request ran (a node left or joined).
    #[error("the cluster changed during the request (a node left or joined); retry")]
    Replanned,
    /// A stage of the request's plan was not reachable or its link broke.
    #[error("{why}")]
    StageLost {
        /// The stage's node id (short form).
        node: String,
        /// What the transport said.
        why: String,
    },
    /// A stage holds as many requests as it may.
    #[error("node {node} is at its limit of {max} requests")]
    StageFull {
        /// The stage's node id (short form).
        node: String,
        /// Its limit.
        max: u32,
    },
    /// A stage has no room for another request's KV cache within the
    /// memory it may use (`--max-memory`).
    #[error("node {node} has no room for another {mib} MiB KV cache within its memory limit; retry shortly")]
    StageMemory {
        /// The stage's node id (short form).
        node: String,
        /// The cache the request needs there, MiB.
        mib: u32,
    },
    /// This node's wait queue is full.
    #[error("this node is busy: {queued} requests are waiting already; retry shortly")]
    Overloaded {
        /// Requests waiting already.
        queued: u32,
    },
    /// No token came back in time: a stage is stuck.
    #[error("no token from the cluster in {secs} s: a stage is stuck")]
    Timeout {
        /// The timeout.
        secs: u32,
    },
    /// The request was cancelled (client gone, node stopping).
    #[error("the request was cancelled")]
    Cancelled,
    /// A stage failed to run its layers (load or compute error).
    #[error("node {node}: {why}")]
    Stage {
        /// The stage's node id (short form).
        node: String,
        /// What failed.
        why: String,
    },
    /// The origin could not read the model's tokenizer or template.
    #[error("{0}")]
    Model(String),
}

impl RequestError {
    /// Whether the client's prompt is at fault (empty, or longer than the
    /// context): HTTP 400.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            RequestError::EmptyPrompt
                | RequestError::ContextFull { .. }
                | RequestError::BadInput(_)
        )
    }

    /// Whether the cluster has no plan that serves the model (none yet, or
    /// none possible): HTTP 503. Everything else but a full queue is the
    /// server's (500), as before the errors were typed.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            RequestError::Unservable(_)
                | RequestError::NoPlan
                | RequestError::StageFull { .. }
                | RequestError::StageMemory { .. }
        )
    }

    /// The texts inside, for the codec's length checks.
    pub(crate) fn texts(&self) -> impl Iterator<Item = &str> {
        let (a, b): (Option<&str>, Option<&str>) = match self {
            RequestError::BadInput(s) | RequestError::Unservable(s) | RequestError::Model(s) => {
                (Some(s), None)
            }
            RequestError::StageLost { node, why } | RequestError::Stage { node, why } => {
                (Some(node), Some(why))
            }
            RequestError::StageFull { node, .. } | RequestError::StageMemory { node, .. } => {
                (Some(node), None)
            }
            _ => (None, None),
        };
        a.into_iter().chain(b)
    }
}

//! The data plane's side of the requests this node originates: their
//! queues, and tokens and failures taken only from their stages.

use std::sync::Arc;

use protocol::{Message, RequestError};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{DataPlane, OriginRequest, ORIGIN_QUEUE};

impl DataPlane {
    /// Registers a request this node originates; its tokens and failure
    /// arrive on the returned receiver.
    /// `route` is the plan's stages: only they may answer for it.
    pub fn open_request(&self, id: u64, route: Vec<String>) -> mpsc::Receiver<Message> {
        let (tx, rx) = mpsc::channel(ORIGIN_QUEUE);
        self.requests
            .lock()
            .expect("lock")
            .insert(id, OriginRequest { tx, route });
        rx
    }

    /// Forgets a request this node originated.
    pub fn close_request(&self, id: u64) {
        self.requests.lock().expect("lock").remove(&id);
    }

    /// Fails every request this node originates (the plan changed).
    pub fn fail_all_requests(&self, error: &RequestError) {
        let requests = self.requests.lock().expect("lock");
        for (&request_id, r) in requests.iter() {
            let _ = r.tx.try_send(Message::Failed {
                request_id,
                error: error.clone(),
            });
        }
    }

    /// Tokens or a failure from `from` for requests this node originates.
    pub(super) fn for_origins(&self, from: &str, msg: Message) {
        match msg {
            Message::Tokens(t) => {
                for e in &t.entries {
                    let logprobs = t
                        .logprobs
                        .iter()
                        .filter(|l| l.request_id == e.request_id)
                        .cloned()
                        .collect();
                    self.to_origin(
                        from,
                        e.request_id,
                        Message::Tokens(protocol::Tokens {
                            entries: vec![*e],
                            logprobs,
                        }),
                    );
                }
            }
            Message::Failed { request_id, .. } => self.to_origin(from, request_id, msg),
            _ => {}
        }
    }

    /// Sends tokens or a failure to an origin without waiting: false when
    /// its link is full (the origin stopped reading: frozen, or its
    /// machine asleep) or down. The last stage then drops those requests
    /// instead of stopping every other one behind a full queue.
    pub(super) fn send_now(self: &Arc<Self>, to: &str, msg: Message) -> bool {
        if to == self.me {
            self.for_origins(to, msg);
            return true;
        }
        // A new link's writer task needs the runtime (this runs on the worker's thread).
        let _runtime = self.runtime.enter();
        match self.link(to) {
            Ok(tx) => tx.try_send(msg).is_ok(),
            Err(_) => false,
        }
    }

    fn to_origin(&self, from: &str, id: u64, msg: Message) {
        let requests = self.requests.lock().expect("lock");
        let Some(r) = requests.get(&id) else {
            debug!(request_id = id, "message for a finished request dropped");
            return;
        };
        let allowed = match &msg {
            Message::Tokens(_) => r.route.last().is_some_and(|last| last == from),
            _ => from == self.me || r.route.iter().any(|s| s == from),
        };
        if !allowed {
            // Request ids are random: only a node the request passed
            // through knows this one, and none but its last stage has
            // tokens for it, none off its route a failure.
            drop(requests);
            let what = match msg {
                Message::Tokens(_) => "tokens",
                _ => "a failure",
            };
            self.caught(
                from,
                format!("{what} for request {id}, which it does not finish"),
            );
            return;
        }
        if r.tx.try_send(msg).is_err() {
            warn!(request_id = id, "origin queue full: message dropped");
        }
    }
}

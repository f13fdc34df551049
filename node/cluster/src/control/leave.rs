//! Leaving with a goodbye (SIGTERM, Ctrl-C): the node tells every member
//! it leaves, they plan without it at once — requests that ran through it
//! go on under the new plan, replayed by their origins — and it exits once
//! they have answered, instead of vanishing and being found out by ping.

use std::collections::HashSet;

use libp2p::request_response::OutboundRequestId;
use libp2p::PeerId;
use protocol::Message;
use tracing::info;

use super::Control;
use crate::dataplane::short;

/// A goodbye in progress.
pub(super) struct Leaving {
    /// Goodbyes not answered yet.
    waiting: HashSet<OutboundRequestId>,
    /// Told when all are answered.
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Control {
    /// Says goodbye to every member; `done` hears when all answered.
    pub(super) fn leave(&mut self, done: tokio::sync::oneshot::Sender<()>) {
        let waiting = self.tell_members(&Message::Leaving, None);
        info!(members = waiting.len(), "leaving: telling every member");
        self.leaving = Some(Leaving {
            waiting: waiting.into_iter().collect(),
            done: Some(done),
        });
        self.goodbye_answered_check();
    }

    /// A control request got its answer (or failed): one goodbye fewer to wait for.
    pub(super) fn goodbye_answered(&mut self, id: OutboundRequestId) {
        if let Some(l) = &mut self.leaving {
            l.waiting.remove(&id);
        }
        self.goodbye_answered_check();
    }

    fn goodbye_answered_check(&mut self) {
        if let Some(l) = &mut self.leaving {
            if l.waiting.is_empty() {
                if let Some(done) = l.done.take() {
                    let _ = done.send(());
                }
            }
        }
    }

    /// Member `peer` says goodbye: plan without it now, and do not dial it again.
    pub(super) fn on_leaving(&mut self, peer: PeerId) {
        let id = peer.to_string();
        if self.m.leave(&id) {
            info!(peer = %short(&id), "node left the cluster (goodbye)");
            self.shared.metrics.members_left.inc();
            self.mark_refused(peer);
            self.members_changed();
            // Plan at once: requests through it wait for this plan.
            self.replan_at = Some(std::time::Instant::now());
        }
    }
}

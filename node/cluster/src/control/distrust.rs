//! Lies caught and members left out for them: this node's own catches go
//! to every member, members' catches are counted with the same rule (see
//! `membership::distrust`), and a node left out is disconnected, refused
//! when it asks to join again, and planned without.

use libp2p::PeerId;
use protocol::Message;
use tracing::{error, info, warn};

use super::Control;
use crate::dataplane::short;

impl Control {
    /// This node caught member `node` lying (its data plane, its worker,
    /// or a plan that cannot be taken): tell every member, then count it.
    pub(super) fn on_caught(&mut self, node: String, reason: String) {
        if !self.m.members().contains_key(&node) {
            return;
        }
        warn!(peer = %short(&node), "telling every member that it lied: {reason}");
        let msg = Message::Distrust {
            node_id: node.clone(),
            reason,
        };
        self.tell_members(&msg, Some(&node));
        let me = self.m.me().node_id.clone();
        let out = self.m.accuse(&me, &node);
        self.left_out(out);
    }

    /// Member `from` says it caught `node` lying.
    pub(super) fn on_distrust(&mut self, from: &str, node: &str, reason: &str) {
        info!(peer = %short(from), accused = %short(node), "a member caught another lying: {reason}");
        let out = self.m.accuse(from, node);
        self.left_out(out);
    }

    /// Tells a member that just joined whom this node caught lying.
    pub(super) fn tell_accusations(&mut self, peer: PeerId) {
        for node_id in self.m.my_accusations() {
            let msg = Message::Distrust {
                node_id,
                reason: "caught lying before this node joined".into(),
            };
            self.swarm.behaviour_mut().control.send_request(&peer, msg);
        }
    }

    /// Acts on the nodes the accusations newly leave out.
    fn left_out(&mut self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let me = self.m.me().node_id.clone();
        for id in &ids {
            self.shared.metrics.members_excluded.inc();
            if *id == me {
                error!("the other members left this node out for lying (or a liar outnumbered it): restart it to rejoin under a new id");
                continue;
            }
            warn!(peer = %short(id), "left out of the cluster for lying");
            if let Ok(peer) = id.parse::<PeerId>() {
                self.mark_refused(peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
        }
        self.members_changed();
    }
}

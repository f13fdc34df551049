//! Admission: joins proven with the cluster key both ways, answers to
//! members' requests (plans, loads, link reports, weights), and whom to
//! dial or back off from.

use std::time::Instant;

use libp2p::{request_response, Multiaddr, PeerId};
use protocol::{Hello, Join, Message, Welcome, PROTOCOL_VERSION};
use tracing::{debug, info, warn};

use super::{Control, REFUSED_BACKOFF, REPLAN_SETTLE};
use crate::dataplane::short;
use crate::membership::PlanRejected;

/// Why a peer's introduction was refused (its text goes back in
/// `Refused`, for the peer's log).
#[derive(Debug, thiserror::Error)]
pub(super) enum Refusal {
    /// Another protocol version.
    #[error("protocol version {theirs} but this node speaks {PROTOCOL_VERSION}: run the same shoal version on every node")]
    Version {
        /// The peer's version.
        theirs: u32,
    },
    /// Its id is not its connection's.
    #[error("claims to be {claimed} but its connection is {connection}")]
    Impostor {
        /// The id it claims.
        claimed: String,
        /// Its connection's peer id.
        connection: String,
    },
    /// Another cluster's node.
    #[error("it belongs to cluster '{theirs}', this node to '{ours}'")]
    OtherCluster {
        /// Its cluster.
        theirs: String,
        /// Ours.
        ours: String,
    },
    /// Left out for lying (under this id: ids are fresh at every start).
    #[error("it was left out of this cluster for lying")]
    Excluded,
    /// No valid key proof.
    #[error("{} does not hold this cluster's key (--cluster-key-file)", if *.welcome { "it" } else { "the joining node" })]
    NoKey {
        /// The proof came in a welcome (an answer), not a join.
        welcome: bool,
    },
}

impl Control {
    /// Remembers a refusal so neither mDNS nor `--peer` redials it at once.
    pub(super) fn mark_refused(&mut self, peer: PeerId) {
        let now = Instant::now();
        self.refused.insert(peer, now);
        for (addr, p) in &self.peer_addrs {
            if *p == Some(peer) {
                self.refused_addrs.insert(addr.clone(), now);
            }
        }
    }

    pub(super) fn backing_off(&self, peer: &PeerId) -> bool {
        self.refused
            .get(peer)
            .is_some_and(|t| t.elapsed() < REFUSED_BACKOFF)
    }

    pub(super) fn send_join(&mut self, peer: PeerId) {
        let me = self.swarm.local_peer_id().to_string();
        let to = peer.to_string();
        let proof = self.cfg.key.proof(&self.cfg.cluster, &me, &to);
        // The Hello goes sealed: a peer without the key (anyone answering
        // on the LAN) learns nothing from it.
        let plain =
            protocol::encode(&Message::Hello(self.m.me().clone())).expect("our own Hello is valid");
        let sealed_hello = self.cfg.key.seal_hello(&self.cfg.cluster, &me, &to, &plain);
        let join = Join {
            version: PROTOCOL_VERSION,
            cluster: self.cfg.cluster.clone(),
            proof,
            sealed_hello,
        };
        let id = self
            .swarm
            .behaviour_mut()
            .control
            .send_request(&peer, Message::Join(join));
        self.pending_joins.insert(id, peer);
    }

    pub(super) fn on_control(&mut self, ev: request_response::Event<Message, Message>) {
        match ev {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => {
                    let (resp, refuse) = self.on_request(peer, request);
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .control
                        .send_response(channel, resp);
                    if refuse {
                        self.mark_refused(peer);
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    self.goodbye_answered(request_id);
                    let was_join = self.pending_joins.remove(&request_id).is_some();
                    self.on_response(peer, response, was_join);
                }
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                self.goodbye_answered(request_id);
                if self.pending_joins.remove(&request_id).is_some() {
                    info!(peer = %short(&peer.to_string()), "join failed: {error}");
                } else {
                    debug!(peer = %short(&peer.to_string()), "control request failed: {error}");
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                // Malformed frames and timeouts land here: that stream is gone, nothing else.
                info!(peer = %short(&peer.to_string()), "bad control request: {error}");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    /// Answers a request; the flag says whether the peer was refused.
    pub(super) fn on_request(&mut self, peer: PeerId, req: Message) -> (Message, bool) {
        let pid = peer.to_string();
        if self.leaving.is_some() {
            let reason = "this node is leaving the cluster".into();
            return (Message::Refused { reason }, false);
        }
        if let Message::Join(j) = req {
            let hello = match self.open_join(&pid, &j) {
                Ok(h) => h,
                Err(refusal) => {
                    warn!(peer = %short(&pid), "refused join: {refusal}");
                    let reason = refusal.to_string();
                    return (Message::Refused { reason }, true);
                }
            };
            let me = self.swarm.local_peer_id().to_string();
            let proof = self.cfg.key.proof(&self.cfg.cluster, &me, &pid);
            self.admit(peer, hello);
            let welcome = Welcome {
                hello: self.m.me().clone(),
                proof,
                members: self.m.member_addrs(),
            };
            return (Message::Welcome(welcome), false);
        }
        // Weights go to anyone proving the key: a node fetching its model
        // is not a member yet.
        if let Message::WeightsQuery { proof, .. } | Message::ChunkQuery { proof, .. } = &req {
            let me = self.swarm.local_peer_id().to_string();
            if !self.cfg.key.verify(proof, &self.cfg.cluster, &pid, &me) {
                return (
                    Message::Refused {
                        reason: "weights are for holders of this cluster's key".into(),
                    },
                    false,
                );
            }
            // It proved the key: a node fetching its weights, however long
            // that takes, is no stranger to drop (see `drop_strangers`).
            self.strangers.remove(&peer);
            let sh = &self.shared;
            let who = crate::weights::Answering {
                key: &self.cfg.key,
                cluster: &self.cfg.cluster,
                holder: &me,
                asker: &pid,
            };
            return (
                crate::weights::answer(&sh.weights, &req, &sh.manifest, &sh.layout, &who),
                false,
            );
        }
        if !self.m.members().contains_key(&pid) {
            return (
                Message::Refused {
                    reason: "not a member of this cluster".into(),
                },
                false,
            );
        }
        match req {
            Message::PlanUpdate { plan, members } => {
                self.dial_unknown(&members);
                let accepted = self.m.accept_plan(&pid, plan, &members);
                match accepted {
                    Ok(true) => self.apply_plan(),
                    Ok(false) => {}
                    Err(e @ PlanRejected::Invalid(_)) => {
                        // Only its leader sends a plan this node takes,
                        // and no honest one plans what is not there.
                        self.on_caught(pid, e.to_string());
                        self.apply_plan();
                    }
                    Err(e) => {
                        debug!("{e}");
                        self.apply_plan();
                    }
                }
                (Message::Ack, false)
            }
            Message::Leaving => {
                self.on_leaving(peer);
                (Message::Ack, false)
            }
            Message::Distrust { node_id, reason } => {
                self.on_distrust(&pid, &node_id, &reason);
                (Message::Ack, false)
            }
            Message::Load(load) => {
                if self.m.set_load(&pid, load) {
                    // A member ahead of this leader's epoch (halves of a
                    // split network met again): plan past it.
                    self.replan_at = Some(Instant::now() + REPLAN_SETTLE);
                }
                (Message::Ack, false)
            }
            Message::LinkReport { links } => {
                if self.m.set_reported(&pid, &links) {
                    self.replan_at = Some(Instant::now() + REPLAN_SETTLE);
                }
                (Message::Ack, false)
            }
            other => (
                Message::Refused {
                    reason: format!("unexpected control message {:?}", variant(&other)),
                },
                false,
            ),
        }
    }

    pub(super) fn on_response(&mut self, peer: PeerId, resp: Message, was_join: bool) {
        let pid = peer.to_string();
        match resp {
            Message::Welcome(w) if was_join => {
                if let Err(reason) = self.check_hello(&pid, &w.hello, &w.proof, true) {
                    warn!(peer = %short(&pid), "refusing the node that welcomed us: {reason}");
                    self.mark_refused(peer);
                    let _ = self.swarm.disconnect_peer_id(peer);
                    return;
                }
                self.admit(peer, w.hello);
                self.dial_unknown(&w.members);
            }
            Message::Refused { reason } => {
                warn!(peer = %short(&pid), "refused by peer: {reason}");
                self.mark_refused(peer);
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            _ => {}
        }
    }

    /// Checks a peer's introduction: its id, protocol version, cluster and key proof.
    /// A join's Hello, once its version, cluster and proof hold and it
    /// opens with the key.
    fn open_join(&self, pid: &str, j: &Join) -> Result<Hello, Refusal> {
        if j.version != PROTOCOL_VERSION {
            return Err(Refusal::Version { theirs: j.version });
        }
        if j.cluster != self.cfg.cluster {
            return Err(Refusal::OtherCluster {
                theirs: j.cluster.clone(),
                ours: self.cfg.cluster.clone(),
            });
        }
        let me = self.swarm.local_peer_id().to_string();
        let plain = self
            .cfg
            .key
            .open_hello(&self.cfg.cluster, pid, &me, &j.sealed_hello)
            .ok_or(Refusal::NoKey { welcome: false })?;
        let hello = match protocol::decode(&plain) {
            Ok(Some((Message::Hello(h), used))) if used == plain.len() => h,
            _ => return Err(Refusal::NoKey { welcome: false }),
        };
        self.check_hello(pid, &hello, &j.proof, false)?;
        Ok(hello)
    }

    pub(super) fn check_hello(
        &self,
        pid: &str,
        h: &Hello,
        proof: &[u8; 32],
        answer: bool,
    ) -> Result<(), Refusal> {
        if h.version != PROTOCOL_VERSION {
            return Err(Refusal::Version { theirs: h.version });
        }
        if self.m.is_excluded(pid) {
            return Err(Refusal::Excluded);
        }
        if h.node_id != pid {
            return Err(Refusal::Impostor {
                claimed: h.node_id.clone(),
                connection: pid.to_string(),
            });
        }
        if h.cluster != self.cfg.cluster {
            return Err(Refusal::OtherCluster {
                theirs: h.cluster.clone(),
                ours: self.cfg.cluster.clone(),
            });
        }
        let me = self.swarm.local_peer_id().to_string();
        // A join proves (sender -> receiver); a welcome answers with (answerer -> joiner).
        if !self.cfg.key.verify(proof, &self.cfg.cluster, pid, &me) {
            return Err(Refusal::NoKey { welcome: answer });
        }
        Ok(())
    }

    pub(super) fn admit(&mut self, peer: PeerId, hello: Hello) {
        let ip = self.ips.get(&peer).copied();
        let pid = peer.to_string();
        let other_model = hello.model_hash != self.m.me().model_hash;
        let new = self.m.join(hello, ip);
        if new {
            info!(peer = %short(&pid), ?ip, "node joined the cluster");
            self.shared.metrics.members_joined.inc();
            if other_model {
                warn!(peer = %short(&pid), "it holds a different model (blake3 manifest differs): it will not serve");
            }
            self.members_changed();
            self.start_probe(pid);
            self.tell_accusations(peer);
        }
    }

    pub(super) fn dial_unknown(&mut self, members: &[protocol::MemberAddrs]) {
        let me = *self.swarm.local_peer_id();
        for m in members {
            let Ok(peer) = m.node_id.parse::<PeerId>() else {
                continue;
            };
            if peer == me || self.swarm.is_connected(&peer) || self.backing_off(&peer) {
                continue;
            }
            let addrs: Vec<Multiaddr> = m.addrs.iter().filter_map(|a| a.parse().ok()).collect();
            if addrs.is_empty() {
                continue;
            }
            let _ = self.swarm.dial(super::dial_opts(peer, addrs));
        }
    }
}

fn variant(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "Hello",
        Message::Plan(_) => "Plan",
        Message::Activations(_) => "Activations",
        Message::Tokens(_) => "Tokens",
        _ => "other",
    }
}

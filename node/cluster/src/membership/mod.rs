//! Who is in the cluster, who leads, and the plan: a pure state machine the
//! control loop feeds with events (joins, leaves, plans, link reports).
//!
//! The leader is the member with the smallest node id. Every member knows
//! every other (the control plane is a full mesh, and member lists travel
//! with welcomes and plans), so all agree on the leader without a vote; a
//! plan is only accepted from the node this member thinks leads.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use protocol::{Hello, LinkMeasure, MemberAddrs, Plan, StageAssignment};
use sharding::{plan, LinkSpec, ModelSpec, NodeSpec, PlanError, PlanGoal, PlanInput};

/// Assumed bandwidth of a LAN link between machines, bytes per second
/// (1 Gbit/s Ethernet): only latency is measured so far.
pub const LAN_BYTES_PER_SECOND: f64 = 125e6;

/// An authenticated member other than this node.
#[derive(Debug, Clone)]
pub struct Member {
    /// Its introduction (capabilities, data-plane address, model hash).
    pub hello: Hello,
    /// The address its control connection comes from: where its data plane
    /// is reached when it listens on all interfaces.
    pub ip: Option<IpAddr>,
    /// Round-trip time of the control connection (libp2p ping), microseconds.
    pub rtt_us: Option<u32>,
    /// The data-plane probe to it: round trip (µs) and bytes per second.
    pub probe: Option<(u32, f64)>,
    /// The links it reported to others: round trip (µs), bytes per second (0: unknown).
    pub reported: BTreeMap<String, (u32, f64)>,
    /// Its last load report.
    pub load: Option<protocol::LoadReport>,
}

impl Member {
    /// Its data-plane socket address: the advertised one, with the observed
    /// ip when it advertised an unspecified one.
    pub fn data_addr(&self) -> Option<std::net::SocketAddr> {
        let mut addr: std::net::SocketAddr = self.hello.capabilities.data_addr.parse().ok()?;
        if addr.ip().is_unspecified() {
            addr.set_ip(self.ip?);
        }
        Some(addr)
    }
}

/// Why a plan from a member was not taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanRejected {
    /// It does not come from the leader this node sees.
    #[error("plan from {from} ignored: the leader is {leader}")]
    NotLeader {
        /// The sender.
        from: String,
        /// The leader.
        leader: String,
    },
    /// The plan does not fit this model or these members (a leader with a
    /// bug, or lying): taking it would index layers or nodes that do not exist.
    #[error("plan refused: {0}")]
    Invalid(String),
    /// The plan gives layers to a node this node left out for lying (the
    /// leader may not have heard the accusations yet: not held against it).
    #[error("plan refused: it gives layers to {0}, left out for lying")]
    Excluded(String),
    /// The leader serves another model (this node cannot take part).
    #[error("the cluster's leader serves another model (blake3 {theirs}), this node holds {ours}: start it with the same GGUF")]
    OtherModel {
        /// The plan's model hash (short).
        theirs: String,
        /// This node's (short).
        ours: String,
    },
}

/// How far ahead of this node's epoch a plan may be: plans count up by
/// one per replan, so a jump this large is a lie that would wrap the count.
pub const EPOCH_JUMP_MAX: u64 = 1 << 32;

/// Membership as readers outside the control loop see it: a copy the
/// control loop publishes after each change (status, origins).
#[derive(Debug, Clone)]
pub struct View {
    /// This node's introduction.
    pub me: Hello,
    /// The leader's id.
    pub leader: String,
    /// Every other member, by id.
    pub members: Vec<Member>,
    /// The model as the planner sees it.
    pub model: ModelSpec,
    /// Why the leader could not plan, if it could not.
    pub plan_error: Option<String>,
}

/// The cluster as this node sees it.
#[derive(Debug)]
pub struct Membership {
    me: Hello,
    members: BTreeMap<String, Member>,
    plan: Option<Plan>,
    plan_error: Option<String>,
    /// Highest plan epoch seen: epochs only grow, across leaders too.
    epoch: u64,
    model: ModelSpec,
    goal: PlanGoal,
    /// `(accuser, accused)`: who caught whom lying (see `distrust`).
    accusations: BTreeSet<(String, String)>,
    /// The nodes left out for it.
    excluded: BTreeSet<String>,
}

impl Membership {
    /// The model as this node plans it.
    pub fn model(&self) -> &ModelSpec {
        &self.model
    }

    /// A copy for readers outside the control loop.
    pub fn view(&self) -> View {
        View {
            me: self.me.clone(),
            leader: self.leader().to_string(),
            members: self.members.values().cloned().collect(),
            model: self.model.clone(),
            plan_error: self.plan_error.clone(),
        }
    }

    /// A cluster of one: this node.
    pub fn new(me: Hello, model: ModelSpec, goal: PlanGoal) -> Membership {
        Membership {
            me,
            members: BTreeMap::new(),
            plan: None,
            plan_error: None,
            epoch: 0,
            model,
            goal,
            accusations: BTreeSet::new(),
            excluded: BTreeSet::new(),
        }
    }

    /// This node's introduction.
    pub fn me(&self) -> &Hello {
        &self.me
    }

    /// Records one of this node's listen addresses (they appear after start).
    pub fn add_my_addr(&mut self, addr: String) {
        let addrs = &mut self.me.capabilities.addrs;
        if !addrs.contains(&addr) && addrs.len() < protocol::limits::ADDRS_MAX {
            addrs.push(addr);
        }
    }

    /// The other members.
    pub fn members(&self) -> &BTreeMap<String, Member> {
        &self.members
    }

    /// The highest plan epoch this node has seen (a plan in force or not).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The plan in force.
    pub fn plan(&self) -> Option<&Plan> {
        self.plan.as_ref()
    }

    /// Why the leader could not plan, if it could not.
    pub fn plan_error(&self) -> Option<&str> {
        self.plan_error.as_deref()
    }

    /// The leader's node id.
    pub fn leader(&self) -> &str {
        // Among the nodes serving this node's model only: a member with
        // another model (or claiming one) and a smaller id cannot take the
        // lead and drop this model's plan.
        self.members
            .iter()
            .filter(|(_, m)| m.hello.model_hash == self.me.model_hash)
            .map(|(id, _)| id.as_str())
            .chain([self.me.node_id.as_str()])
            .min()
            .expect("at least this node")
    }

    /// Whether this node leads.
    pub fn is_leader(&self) -> bool {
        // A node the others left out plans for no one.
        self.leader() == self.me.node_id && !self.is_excluded(&self.me.node_id)
    }

    /// Adds or refreshes a member; true when it is new. A node left out
    /// for lying is not added.
    pub fn join(&mut self, hello: Hello, ip: Option<IpAddr>) -> bool {
        let id = hello.node_id.clone();
        if self.is_excluded(&id) {
            return false;
        }
        match self.members.get_mut(&id) {
            Some(m) => {
                m.hello = hello;
                m.ip = ip.or(m.ip);
                false
            }
            None => {
                self.members.insert(
                    id,
                    Member {
                        hello,
                        ip,
                        rtt_us: None,
                        probe: None,
                        reported: BTreeMap::new(),
                        load: None,
                    },
                );
                true
            }
        }
    }

    /// Removes a member; true when it was one.
    pub fn leave(&mut self, id: &str) -> bool {
        self.members.remove(id).is_some()
    }

    /// Records a round-trip time this node measured.
    pub fn set_rtt(&mut self, id: &str, rtt_us: u32) {
        if let Some(m) = self.members.get_mut(id) {
            m.rtt_us = Some(rtt_us);
        }
    }

    /// Records a data-plane probe to a member; true when it changed the
    /// picture enough to replan (first measurement, or latency or
    /// bandwidth off by more than 2x).
    pub fn set_probe(&mut self, id: &str, rtt_us: u32, bytes_per_second: f64) -> bool {
        let Some(m) = self.members.get_mut(id) else {
            return false;
        };
        let changed = match m.probe {
            None => true,
            Some((r, bw)) => {
                far(f64::from(r.max(100)), f64::from(rtt_us.max(100))) || far(bw, bytes_per_second)
            }
        };
        m.probe = Some((rtt_us, bytes_per_second));
        changed
    }

    /// Records a member's load report; true when this node leads and the
    /// member runs a plan of a later epoch than this node's (a replan is
    /// due: see [`Membership::replan`]).
    pub fn set_load(&mut self, id: &str, load: protocol::LoadReport) -> bool {
        let ahead = self.is_leader() && self.member_epoch(load.epoch) > self.epoch;
        if let Some(m) = self.members.get_mut(id) {
            m.load = Some(load);
            return ahead;
        }
        false
    }

    /// A member's reported epoch as the leader counts it: at most
    /// [`EPOCH_JUMP_MAX`] past this node's (a lie cannot wrap the count).
    fn member_epoch(&self, epoch: u64) -> u64 {
        epoch.min(self.epoch.saturating_add(EPOCH_JUMP_MAX))
    }

    /// Records the links a member measured; true when one is new or moved
    /// by more than 2x (worth a replan).
    pub fn set_reported(&mut self, id: &str, links: &[LinkMeasure]) -> bool {
        let Some(m) = self.members.get_mut(id) else {
            return false;
        };
        let new: BTreeMap<String, (u32, f64)> = links
            .iter()
            .map(|l| (l.node_id.clone(), (l.rtt_us, l.bytes_per_second)))
            .collect();
        let changed = new.iter().any(|(k, &(r, bw))| match m.reported.get(k) {
            None => true,
            Some(&(r0, bw0)) => far(f64::from(r0.max(100)), f64::from(r.max(100))) || far(bw0, bw),
        });
        m.reported = new;
        changed
    }

    /// The links this node measured, to report to the leader.
    pub fn my_links(&self) -> Vec<LinkMeasure> {
        self.members
            .iter()
            .filter_map(|(id, m)| {
                let (rtt_us, bytes_per_second) = m.probe.or(m.rtt_us.map(|r| (r, 0.0)))?;
                Some(LinkMeasure {
                    node_id: id.clone(),
                    rtt_us,
                    bytes_per_second,
                })
            })
            .collect()
    }

    /// Every member with its addresses (this node included), for peers to dial.
    pub fn member_addrs(&self) -> Vec<MemberAddrs> {
        std::iter::once(&self.me)
            .chain(self.members.values().map(|m| &m.hello))
            .map(|h| MemberAddrs {
                node_id: h.node_id.clone(),
                addrs: h.capabilities.addrs.clone(),
            })
            .collect()
    }

    /// Accepts a plan from `from` if it leads and the plan is new; true when
    /// the plan in force changed.
    pub fn accept_plan(
        &mut self,
        from: &str,
        plan: Plan,
        introduced: &[MemberAddrs],
    ) -> Result<bool, PlanRejected> {
        if from != self.leader() {
            return Err(PlanRejected::NotLeader {
                from: from.to_string(),
                leader: self.leader().to_string(),
            });
        }
        if plan.model_hash != self.me.model_hash {
            let e = PlanRejected::OtherModel {
                theirs: sharding::manifest::short_hex(&plan.model_hash),
                ours: sharding::manifest::short_hex(&self.me.model_hash),
            };
            self.plan = None;
            self.plan_error = Some(e.to_string());
            return Err(e);
        }
        if self.plan.as_ref() == Some(&plan) || plan.epoch < self.epoch {
            return Ok(false);
        }
        let layers = self.model.layer_bytes.len();
        if plan.n_layers as usize != layers {
            return Err(PlanRejected::Invalid(format!(
                "the plan is for {} layers, the model has {layers}",
                plan.n_layers
            )));
        }
        if let Some(s) = plan.stages.iter().find(|s| self.is_excluded(&s.node_id)) {
            return Err(PlanRejected::Excluded(s.node_id.clone()));
        }
        // Each stage is this node, a member serving this model, or a node
        // the update introduces (joined when it is dialled).
        if let Some(s) = plan.stages.iter().find(|s| {
            s.node_id != self.me.node_id
                && match self.members.get(&s.node_id) {
                    Some(m) => m.hello.model_hash != self.me.model_hash,
                    None => !introduced.iter().any(|m| m.node_id == s.node_id),
                }
        }) {
            return Err(PlanRejected::Invalid(format!(
                "stage {}..{} goes to {}, not a member serving this model",
                s.layers_start, s.layers_end, s.node_id
            )));
        }
        if plan.epoch > self.epoch.saturating_add(EPOCH_JUMP_MAX) {
            return Err(PlanRejected::Invalid(format!(
                "epoch {} jumps from {} (at most {EPOCH_JUMP_MAX} ahead)",
                plan.epoch, self.epoch
            )));
        }
        self.epoch = plan.epoch;
        self.plan = Some(plan);
        self.plan_error = None;
        Ok(true)
    }

    /// The leader's decision: a plan over the members holding this node's
    /// model. `Ok(Some(plan))` when the assignment changed (a new epoch),
    /// `Ok(None)` when it stays.
    pub fn replan(&mut self) -> Result<Option<Plan>, PlanError> {
        let ids: Vec<&Hello> = std::iter::once(&self.me)
            .chain(
                self.members
                    .values()
                    .map(|m| &m.hello)
                    .filter(|h| h.model_hash == self.me.model_hash),
            )
            .collect();
        let nodes: Vec<NodeSpec> = ids
            .iter()
            .map(|h| NodeSpec {
                id: h.node_id.clone(),
                us_per_mib: f64::from(h.capabilities.us_per_mib),
                row_us_per_mib: f64::from(h.capabilities.row_us_per_mib),
                prompt_row_us_per_mib: f64::from(h.capabilities.prompt_row_us_per_mib),
                memory_bytes: h.capabilities.memory_bytes,
            })
            .collect();
        let links = ids
            .iter()
            .map(|a| {
                ids.iter()
                    .map(|b| self.link(&a.node_id, &b.node_id))
                    .collect()
            })
            .collect();
        let input = PlanInput {
            model: self.model.clone(),
            nodes,
            links,
            goal: self.goal,
        };
        let planned = match plan(&input) {
            Ok(p) => p,
            Err(e) => {
                self.plan_error = Some(e.to_string());
                self.plan = None;
                return Err(e);
            }
        };
        let stages: Vec<StageAssignment> = planned
            .stages
            .iter()
            .map(|s| StageAssignment {
                node_id: s.node_id.clone(),
                layers_start: s.layers.start as u32,
                layers_end: s.layers.end as u32,
            })
            .collect();
        // Past every epoch a member runs: after a split network heals, the
        // other half's members take only a plan newer than theirs.
        let seen = self
            .members
            .values()
            .filter_map(|m| m.load.map(|l| self.member_epoch(l.epoch)))
            .max()
            .unwrap_or(0);
        if self.plan.as_ref().is_some_and(|p| p.stages == stages) && seen <= self.epoch {
            return Ok(None);
        }
        self.epoch = self.epoch.max(seen).saturating_add(1);
        let epoch = self.epoch;
        let plan = Plan {
            epoch,
            model_hash: self.me.model_hash,
            n_layers: self.model.layer_bytes.len() as u32,
            stages,
            token_latency_us: planned.token_latency_us,
            throughput_tokens_per_s: planned.throughput_tokens_per_s,
        };
        self.plan = Some(plan.clone());
        self.plan_error = None;
        Ok(Some(plan))
    }

    /// Forgets the plan (e.g. when the leader changed and a new one is due).
    pub fn clear_plan_if_stale(&mut self) -> bool {
        let stale = self.plan.as_ref().is_some_and(|p| {
            p.stages
                .iter()
                .any(|s| s.node_id != self.me.node_id && !self.members.contains_key(&s.node_id))
        });
        if stale {
            self.plan = None;
        }
        stale
    }

    /// The planner's view of the link from `a` to `b`: half the measured
    /// round trip and the measured bandwidth (either end's measurement);
    /// unmeasured, LAN figures between machines, loopback's on one machine.
    pub fn link(&self, a: &str, b: &str) -> LinkSpec {
        if a == b {
            return LinkSpec::LOCAL;
        }
        let same_host = self
            .ip_of(a)
            .zip(self.ip_of(b))
            .is_some_and(|(x, y)| x == y)
            || self.ip_of(a).is_some_and(|x| x.is_loopback())
            || self.ip_of(b).is_some_and(|x| x.is_loopback());
        let base = if same_host {
            LinkSpec::LOCAL
        } else {
            LinkSpec {
                latency_us: 200.0,
                bytes_per_second: LAN_BYTES_PER_SECOND,
            }
        };
        let (rtt, bw) = match self.measured(a, b).or_else(|| self.measured(b, a)) {
            Some(m) => m,
            None => return base,
        };
        LinkSpec {
            latency_us: f64::from(rtt) / 2.0,
            bytes_per_second: if bw > 0.0 { bw } else { base.bytes_per_second },
        }
    }

    fn measured(&self, a: &str, b: &str) -> Option<(u32, f64)> {
        if a == self.me.node_id {
            let m = self.members.get(b)?;
            return m.probe.or(m.rtt_us.map(|r| (r, 0.0)));
        }
        self.members.get(a)?.reported.get(b).copied()
    }

    fn ip_of(&self, id: &str) -> Option<IpAddr> {
        if id == self.me.node_id {
            return None;
        }
        self.members.get(id)?.ip
    }
}

/// Whether two measurements differ by more than 2x.
fn far(a: f64, b: f64) -> bool {
    a > 2.0 * b || b > 2.0 * a
}

mod distrust;
pub use distrust::excluded;

#[cfg(test)]
mod tests;

//! The control plane: libp2p (TCP + Noise + Yamux) with mDNS discovery,
//! identify, ping for liveness and link latency, and a request-response
//! protocol carrying shoal's own frames: joins proven with the cluster key,
//! plans from the leader, link reports to it.
//!
//! Node ids are libp2p peer ids of a keypair made fresh at every start, so a
//! copied configuration can never give two machines one id. A peer is a
//! member only while a connection to it is up and after the key proof both
//! ways; mDNS only suggests whom to dial.

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, OutboundRequestId};
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, mdns, ping, Multiaddr, PeerId, Swarm};
use protocol::{Hello, Join, Message, Welcome, PROTOCOL_VERSION};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::dataplane::{short, PeerData};
use super::key::ClusterKey;
use super::membership::Membership;
use super::swarm::{ip_of, same_dial_target, Behaviour, BehaviourEvent};
use super::Shared;

/// Membership settles this long before the leader replans, so a burst of
/// joins (three nodes starting together) gives one plan, not three.
const REPLAN_SETTLE: Duration = Duration::from_millis(400);

/// A peer that refused us (or that we refused) is not redialled for this long.
const REFUSED_BACKOFF: Duration = Duration::from_secs(30);

/// `--peer` addresses not connected are redialled this often.
const REDIAL_INTERVAL: Duration = Duration::from_secs(2);

/// Link reports go to the leader this often.
const REPORT_INTERVAL: Duration = Duration::from_secs(3);

/// Link probes tried before giving up, and the wait between them (growing).
const PROBE_ATTEMPTS: u32 = 5;

/// How often each node tells every member its load (the page's tokens/s).
const LOAD_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_RETRY: Duration = Duration::from_millis(300);

/// Settings of the control plane.
pub struct ControlConfig {
    /// libp2p listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial (for networks without multicast).
    pub peers: Vec<Multiaddr>,
    /// Whether to discover peers with mDNS.
    pub mdns: bool,
    /// Cluster name.
    pub cluster: String,
    /// Cluster secret.
    pub key: ClusterKey,
}

/// Builds the swarm; the returned future runs the control loop until `stop`.
pub fn start(
    keypair: libp2p::identity::Keypair,
    cfg: ControlConfig,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let mut swarm = super::swarm::build(keypair, cfg.mdns)?;
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    }
    let load_meter = super::metrics::LoadMeter::new(&shared.metrics);
    let mut ctl = Control {
        swarm,
        cfg,
        shared,
        pending_joins: HashMap::new(),
        refused: HashMap::new(),
        peer_addrs: HashMap::new(),
        refused_addrs: HashMap::new(),
        last_redial: Instant::now() - REDIAL_INTERVAL,
        replan_at: Some(Instant::now()),
        last_report: Instant::now(),
        last_load: Instant::now(),
        load_meter,
        ips: HashMap::new(),
        probes: tokio::sync::mpsc::channel(64),
    };
    // Dialled without their `/p2p/<id>` part: ids are fresh at every start,
    // so a copied address would stop working after that node restarts; the
    // key proof, not the id, decides who joins.
    for addr in ctl.cfg.peers.clone() {
        let bare: Multiaddr = addr
            .iter()
            .filter(|p| !matches!(p, Protocol::P2p(_)))
            .collect();
        ctl.peer_addrs.insert(bare, None);
    }
    Ok(tokio::spawn(async move { ctl.run(stop).await }))
}

/// A data-plane probe's outcome: (peer, (rtt µs, bytes per second)).
type ProbeResult = (String, Result<(u32, f64), String>);

struct Control {
    swarm: Swarm<Behaviour>,
    cfg: ControlConfig,
    shared: Arc<Shared>,
    /// Joins sent and not answered yet.
    pending_joins: HashMap<OutboundRequestId, PeerId>,
    /// Peers refused (either way), and when.
    refused: HashMap<PeerId, Instant>,
    /// `--peer` addresses and the peer each is connected to.
    peer_addrs: HashMap<Multiaddr, Option<PeerId>>,
    /// `--peer` addresses whose node refused us (or we it), and when.
    refused_addrs: HashMap<Multiaddr, Instant>,
    last_redial: Instant,
    replan_at: Option<Instant>,
    last_report: Instant,
    last_load: Instant,
    load_meter: super::metrics::LoadMeter,
    /// Remote ip of each connected peer.
    ips: HashMap<PeerId, IpAddr>,
    /// Results of data-plane link probes.
    probes: (
        tokio::sync::mpsc::Sender<ProbeResult>,
        tokio::sync::mpsc::Receiver<ProbeResult>,
    ),
}

impl Control {
    async fn run(&mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                event = self.swarm.select_next_some() => self.on_event(event),
                Some((peer, result)) = self.probes.1.recv() => self.on_probe(peer, result),
                _ = tick.tick() => self.on_tick(),
            }
        }
    }

    fn membership(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.shared.membership.lock().expect("membership lock")
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_redial) >= REDIAL_INTERVAL {
            self.last_redial = now;
            let addrs: Vec<Multiaddr> = self
                .peer_addrs
                .iter()
                .filter(|(a, p)| {
                    let refused = self
                        .refused_addrs
                        .get(*a)
                        .is_some_and(|t| t.elapsed() < REFUSED_BACKOFF);
                    p.is_none() && !refused
                })
                .map(|(a, _)| a.clone())
                .collect();
            for addr in addrs {
                debug!(%addr, "dialling --peer");
                if let Err(e) = self.swarm.dial(addr.clone()) {
                    debug!(%addr, "dial failed: {e}");
                }
            }
        }
        if self.replan_at.is_some_and(|t| now >= t) {
            self.replan_at = None;
            self.replan();
        }
        if now.duration_since(self.last_load) >= LOAD_INTERVAL {
            self.last_load = now;
            self.report_load();
        }
        if now.duration_since(self.last_report) >= REPORT_INTERVAL {
            self.last_report = now;
            let (leader, links, is_leader) = {
                let m = self.membership();
                (m.leader().to_string(), m.my_links(), m.is_leader())
            };
            if !is_leader && !links.is_empty() {
                if let Ok(peer) = leader.parse::<PeerId>() {
                    self.swarm
                        .behaviour_mut()
                        .control
                        .send_request(&peer, Message::LinkReport { links });
                }
            }
        }
    }

    /// Samples this node's load and sends it to every member.
    fn report_load(&mut self) {
        let sh = &self.shared;
        let running = sh.stats.lock().expect("stats lock").running as u32;
        let queued = sh.queued.load(std::sync::atomic::Ordering::Relaxed) as u32;
        let sequences = sh.live_sequences.load(std::sync::atomic::Ordering::Relaxed) as u32;
        let load = self
            .load_meter
            .sample(&sh.metrics, running, queued, sequences);
        *sh.load.lock().expect("load lock") = load;
        let members: Vec<PeerId> = self
            .membership()
            .members()
            .keys()
            .filter_map(|id| id.parse().ok())
            .collect();
        for peer in members {
            self.swarm
                .behaviour_mut()
                .control
                .send_request(&peer, Message::Load(load));
        }
    }

    /// Measures the data-plane link to a new member in the background.
    fn start_probe(&self, peer: String) {
        let data = self.shared.data.clone();
        let tx = self.probes.0.clone();
        tokio::spawn(async move {
            // The peer may not have admitted us yet (its allow list lags
            // its answer to our join by a moment): retry a few times.
            let mut result = Err(String::new());
            for attempt in 1..=PROBE_ATTEMPTS {
                result = data.probe(&peer).await;
                if result.is_ok() {
                    break;
                }
                tokio::time::sleep(PROBE_RETRY * attempt).await;
            }
            let _ = tx.send((peer, result)).await;
        });
    }

    fn on_probe(&mut self, peer: String, result: Result<(u32, f64), String>) {
        match result {
            Ok((rtt_us, bps)) => {
                info!(
                    peer = %short(&peer),
                    rtt_ms = format!("{:.2}", f64::from(rtt_us) / 1000.0),
                    mbit_s = format!("{:.0}", bps * 8.0 / 1e6),
                    "link measured"
                );
                let changed = self.membership().set_probe(&peer, rtt_us, bps);
                if changed {
                    self.last_report = Instant::now() - REPORT_INTERVAL;
                    self.replan_at = Some(Instant::now() + REPLAN_SETTLE);
                }
            }
            Err(e) => info!("{e}"),
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let me = *self.swarm.local_peer_id();
                let full = address.with(Protocol::P2p(me));
                info!(addr = %full, "listening");
                let mut m = self.shared.membership.lock().expect("lock");
                m.add_my_addr(full.to_string());
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => self.on_connected(peer_id, endpoint),
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => self.on_disconnected(peer_id, cause.map(|c| c.to_string())),
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                debug!(?peer_id, "dial failed: {error}");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(found))) => {
                self.on_discovered(found)
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                for addr in info.listen_addrs {
                    self.swarm.add_peer_address(peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Ping(ping::Event { peer, result, .. })) => {
                match result {
                    Ok(rtt) => {
                        let us = rtt.as_micros().min(u32::MAX as u128) as u32;
                        self.membership().set_rtt(&peer.to_string(), us);
                    }
                    Err(e) => {
                        warn!(peer = %short(&peer.to_string()), "ping failed ({e}): disconnecting");
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Control(ev)) => self.on_control(ev),
            _ => {}
        }
    }

    fn on_discovered(&mut self, found: Vec<(PeerId, Multiaddr)>) {
        let mut by_peer: HashMap<PeerId, Vec<Multiaddr>> = HashMap::new();
        for (peer, addr) in found {
            by_peer.entry(peer).or_default().push(addr);
        }
        let me = *self.swarm.local_peer_id();
        for (peer, addrs) in by_peer {
            if peer == me || self.swarm.is_connected(&peer) || self.backing_off(&peer) {
                continue;
            }
            debug!(peer = %short(&peer.to_string()), ?addrs, "discovered by mDNS");
            let opts = DialOpts::peer_id(peer).addresses(addrs).build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!("dial failed: {e}");
            }
        }
    }

    /// Remembers a refusal so neither mDNS nor `--peer` redials it at once.
    fn mark_refused(&mut self, peer: PeerId) {
        let now = Instant::now();
        self.refused.insert(peer, now);
        for (addr, p) in &self.peer_addrs {
            if *p == Some(peer) {
                self.refused_addrs.insert(addr.clone(), now);
            }
        }
    }

    fn backing_off(&self, peer: &PeerId) -> bool {
        self.refused
            .get(peer)
            .is_some_and(|t| t.elapsed() < REFUSED_BACKOFF)
    }

    fn on_connected(&mut self, peer: PeerId, endpoint: ConnectedPoint) {
        let remote = match &endpoint {
            ConnectedPoint::Dialer { address, .. } => address.clone(),
            ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr.clone(),
        };
        if let Some(ip) = ip_of(&remote) {
            self.ips.insert(peer, ip);
        }
        if let ConnectedPoint::Dialer { address, .. } = &endpoint {
            for (addr, p) in self.peer_addrs.iter_mut() {
                if same_dial_target(addr, address) {
                    *p = Some(peer);
                }
            }
        }
        let is_member = self.membership().members().contains_key(&peer.to_string());
        if !is_member && !self.pending_joins.values().any(|p| *p == peer) {
            self.send_join(peer);
        }
    }

    fn send_join(&mut self, peer: PeerId) {
        let me = self.swarm.local_peer_id().to_string();
        let hello = self.membership().me().clone();
        let proof = self
            .cfg
            .key
            .proof(&self.cfg.cluster, &me, &peer.to_string());
        let id = self
            .swarm
            .behaviour_mut()
            .control
            .send_request(&peer, Message::Join(Join { hello, proof }));
        self.pending_joins.insert(id, peer);
    }

    fn on_disconnected(&mut self, peer: PeerId, cause: Option<String>) {
        self.ips.remove(&peer);
        for p in self.peer_addrs.values_mut() {
            if *p == Some(peer) {
                *p = None;
            }
        }
        let id = peer.to_string();
        let left = self.membership().leave(&id);
        if left {
            warn!(peer = %short(&id), cause = cause.as_deref().unwrap_or("closed"), "node left the cluster");
            self.members_changed();
        }
    }

    fn on_control(&mut self, ev: request_response::Event<Message, Message>) {
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
    fn on_request(&mut self, peer: PeerId, req: Message) -> (Message, bool) {
        let pid = peer.to_string();
        if let Message::Join(j) = req {
            if let Err(reason) = self.check_hello(&pid, &j.hello, &j.proof, false) {
                warn!(peer = %short(&pid), "refused join: {reason}");
                return (Message::Refused { reason }, true);
            }
            let me = self.swarm.local_peer_id().to_string();
            let proof = self.cfg.key.proof(&self.cfg.cluster, &me, &pid);
            self.admit(peer, j.hello);
            let m = self.membership();
            let welcome = Welcome {
                hello: m.me().clone(),
                proof,
                members: m.member_addrs(),
            };
            return (Message::Welcome(welcome), false);
        }
        // Weights go to anyone proving the key: a node fetching its model
        // is not a member yet.
        if let Message::WeightsQuery { proof } | Message::ChunkQuery { proof, .. } = &req {
            let me = self.swarm.local_peer_id().to_string();
            if !self.cfg.key.verify(proof, &self.cfg.cluster, &pid, &me) {
                return (
                    Message::Refused {
                        reason: "weights are for holders of this cluster's key".into(),
                    },
                    false,
                );
            }
            let sh = &self.shared;
            return (
                super::weights::answer(&sh.weights, &req, &sh.manifest, &sh.layout),
                false,
            );
        }
        if !self.membership().members().contains_key(&pid) {
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
                let accepted = self.membership().accept_plan(&pid, plan);
                match accepted {
                    Ok(true) => self.apply_plan(),
                    Ok(false) => {}
                    Err(e) => {
                        debug!("{e}");
                        self.apply_plan();
                    }
                }
                (Message::Ack, false)
            }
            Message::Load(load) => {
                self.membership().set_load(&pid, load);
                (Message::Ack, false)
            }
            Message::LinkReport { links } => {
                if self.membership().set_reported(&pid, &links) {
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

    fn on_response(&mut self, peer: PeerId, resp: Message, was_join: bool) {
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
    fn check_hello(
        &self,
        pid: &str,
        h: &Hello,
        proof: &[u8; 32],
        answer: bool,
    ) -> Result<(), String> {
        if h.version != PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {} but this node speaks {PROTOCOL_VERSION}: run the same shoal version on every node",
                h.version
            ));
        }
        if h.node_id != pid {
            return Err(format!(
                "claims to be {} but its connection is {pid}",
                h.node_id
            ));
        }
        if h.cluster != self.cfg.cluster {
            return Err(format!(
                "it belongs to cluster '{}', this node to '{}'",
                h.cluster, self.cfg.cluster
            ));
        }
        let me = self.swarm.local_peer_id().to_string();
        // A join proves (sender -> receiver); a welcome answers with (answerer -> joiner).
        if !self.cfg.key.verify(proof, &self.cfg.cluster, pid, &me) {
            let who = if answer { "it" } else { "the joining node" };
            return Err(format!(
                "{who} does not hold this cluster's key (--cluster-key-file)"
            ));
        }
        Ok(())
    }

    fn admit(&mut self, peer: PeerId, hello: Hello) {
        let ip = self.ips.get(&peer).copied();
        let pid = peer.to_string();
        let (new, other_model) = {
            let mut m = self.membership();
            let other = hello.model_hash != m.me().model_hash;
            (m.join(hello, ip), other)
        };
        if new {
            info!(peer = %short(&pid), ?ip, "node joined the cluster");
            if other_model {
                warn!(peer = %short(&pid), "it holds a different model (blake3 manifest differs): it will not serve");
            }
            self.members_changed();
            self.start_probe(pid);
        }
    }

    fn dial_unknown(&mut self, members: &[protocol::MemberAddrs]) {
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
            let _ = self
                .swarm
                .dial(DialOpts::peer_id(peer).addresses(addrs).build());
        }
    }

    /// Members changed: update the data plane's allow list, drop a plan
    /// naming a node that left, and (if leading) replan after settling.
    fn members_changed(&mut self) {
        let (peers, stale) = {
            let mut m = self.membership();
            let peers: HashMap<String, PeerData> = m
                .members()
                .iter()
                .filter_map(|(id, mem)| {
                    Some((
                        id.clone(),
                        PeerData {
                            addr: mem.data_addr()?,
                            fingerprint: mem.hello.capabilities.cert_fingerprint,
                        },
                    ))
                })
                .collect();
            (peers, m.clear_plan_if_stale())
        };
        self.shared.data.set_members(peers);
        // Members are where missing layers come from.
        let addrs: Vec<Multiaddr> = self
            .membership()
            .members()
            .values()
            .flat_map(|m| {
                m.hello
                    .capabilities
                    .addrs
                    .iter()
                    .filter_map(|a| a.parse().ok())
            })
            .collect();
        self.shared
            .fetcher
            .sources
            .lock()
            .expect("sources lock")
            .addrs = addrs
            .into_iter()
            .chain(self.cfg.peers.iter().cloned())
            .collect();
        if stale {
            self.apply_plan();
        }
        self.replan_at = Some(Instant::now() + REPLAN_SETTLE);
    }

    /// The leader plans and tells every member; others wait for it.
    fn replan(&mut self) {
        let (result, members, ids) = {
            let mut m = self.membership();
            if !m.is_leader() {
                return;
            }
            let r = m.replan();
            let ids: BTreeSet<String> = m.members().keys().cloned().collect();
            (r, m.member_addrs(), ids)
        };
        match result {
            Ok(Some(_)) => self.apply_plan(),
            Ok(None) => {}
            Err(e) => {
                {
                    let mut last = self.shared.last_plan_error.lock().expect("lock");
                    if last.as_deref() != Some(&e.to_string()) {
                        warn!("cannot plan: {e}");
                        *last = Some(e.to_string());
                    }
                }
                self.apply_plan();
                return;
            }
        }
        let Some(plan) = self.membership().plan().cloned() else {
            return;
        };
        // Everyone gets the plan, changed or not: a node that just joined needs it.
        for id in ids {
            if let Ok(peer) = id.parse::<PeerId>() {
                self.swarm.behaviour_mut().control.send_request(
                    &peer,
                    Message::PlanUpdate {
                        plan: plan.clone(),
                        members: members.clone(),
                    },
                );
            }
        }
    }

    /// Hands the plan in force to the rest of the node.
    fn apply_plan(&mut self) {
        let plan = self.membership().plan().cloned();
        self.shared.apply_plan(plan);
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

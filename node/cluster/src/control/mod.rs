//! The control plane: libp2p (TCP + Noise + Yamux) with mDNS discovery,
//! identify, ping for liveness and link latency, and a request-response
//! protocol carrying shoal's own frames: joins proven with the cluster key,
//! plans from the leader, link reports to it.
//!
//! Node ids are libp2p peer ids of a keypair made fresh at every start, so a
//! copied configuration can never give two machines one id. A peer is a
//! member only while a connection to it is up and after the key proof both
//! ways; mDNS only suggests whom to dial.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::OutboundRequestId;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, mdns, ping, Multiaddr, PeerId, Swarm};
use protocol::{Message, Plan};
use tokio::sync::watch;

mod admit;
mod distrust;
mod leave;
mod plan;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::dataplane::short;
use crate::key::ClusterKey;
use crate::membership::{Membership, View};
use crate::shared::Shared;
use crate::swarm::{ip_of, same_dial_target, Behaviour, BehaviourEvent};

/// Membership settles this long before the leader replans, so a burst of
/// joins (three nodes starting together) gives one plan, not three.
const REPLAN_SETTLE: Duration = Duration::from_millis(400);

/// A peer that refused us (or that we refused) is not redialled for this long.
const REFUSED_BACKOFF: Duration = Duration::from_secs(30);

/// How long a connected peer may stay a stranger (no key proved, no
/// join) before its connection is closed: a join takes well under a
/// second; a weights index for a node bootstrapping from peers, seconds.
pub(crate) const PROOF_DEADLINE: Duration = Duration::from_secs(30);

/// `--peer` addresses not connected are redialled this often.
const REDIAL_INTERVAL: Duration = Duration::from_secs(2);

/// A member not heard from for this long (no ping answered, no load
/// report: both come every second) is taken for gone: a frozen process, a
/// sleeping laptop, a cut cable. Its connection is closed and the cluster
/// plans without it; its requests go on under the new plan. (libp2p's own
/// ping failure comes only after a second timeout and a stream
/// negotiation timeout, ~15 s.)
pub(crate) const SILENCE: Duration = Duration::from_secs(3);

/// Link reports go to the leader this often.
const REPORT_INTERVAL: Duration = Duration::from_secs(3);

/// Link probes tried before giving up, and the wait between them (growing).
const PROBE_ATTEMPTS: u32 = 5;

/// How often each node tells every member its load (the page's tokens/s).
const LOAD_INTERVAL: Duration = Duration::from_secs(1);
const PROBE_RETRY: Duration = Duration::from_millis(300);

/// The control loop's outputs: the only senders of membership's view and
/// of the plan in force.
pub(crate) struct Publish {
    /// A copy of membership after each event.
    pub view: watch::Sender<Arc<View>>,
    /// The plan this node runs.
    pub plan: watch::Sender<Option<Plan>>,
}

/// Settings of the control plane (from the member's config).
struct ControlConfig {
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
pub(crate) fn start(
    keypair: libp2p::identity::Keypair,
    membership: Membership,
    publish: Publish,
    shared: Arc<Shared>,
    stop: CancellationToken,
    commands: tokio::sync::mpsc::Receiver<Command>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let c = &shared.config;
    let cfg = ControlConfig {
        listen: c.listen.clone(),
        peers: c.peers.clone(),
        mdns: c.mdns,
        cluster: c.cluster.clone(),
        key: c.key.clone(),
    };
    let mut swarm = crate::swarm::build(keypair, cfg.mdns)?;
    for addr in &cfg.listen {
        swarm
            .listen_on(addr.clone())
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    }
    let load_meter = crate::metrics::LoadMeter::new(&shared.metrics);
    let shared_caught = shared
        .data
        .take_caught()
        .ok_or("the data plane's lies are already read")?;
    let mut ctl = Control {
        swarm,
        cfg,
        shared,
        m: membership,
        publish,
        last_plan_error: None,
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
        strangers: HashMap::new(),
        heard: HashMap::new(),
        probes: tokio::sync::mpsc::channel(64),
        caught: shared_caught,
        leaving: None,
        commands,
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

/// How this node dials a peer: from a fresh port. libp2p's default reuses
/// the listening port, and two nodes that discover each other in the same
/// instant (mDNS answers arrive together) then open one TCP connection from
/// both ends at once, on which both sides start the Noise handshake as its
/// initiator: it fails, and neither dials again (seen in namespaces: a node
/// left out for good in about one start in eight). With fresh ports the two
/// dials are two connections, and both work.
fn dial_opts(peer: PeerId, addrs: Vec<Multiaddr>) -> DialOpts {
    DialOpts::peer_id(peer)
        .addresses(addrs)
        .allocate_new_port()
        .build()
}

/// A data-plane probe's outcome: (peer, (rtt µs, bytes per second)).
type ProbeResult = (String, Result<(u32, f64), String>);

struct Control {
    swarm: Swarm<Behaviour>,
    cfg: ControlConfig,
    shared: Arc<Shared>,
    /// Membership and plan: this loop is their only writer.
    m: Membership,
    /// Where readers get membership and the plan.
    publish: Publish,
    /// The last planning error logged (to log each once).
    last_plan_error: Option<String>,
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
    load_meter: crate::metrics::LoadMeter,
    /// Remote ip of each connected peer.
    ips: HashMap<PeerId, IpAddr>,
    /// When each connected peer was last heard from (ping answers, control
    /// messages): members silent for [`SILENCE`] are dropped.
    heard: HashMap<PeerId, Instant>,
    /// Connected peers that are not members yet, since when: dropped when
    /// they have not proved the key within [`PROOF_DEADLINE`].
    strangers: HashMap<PeerId, Instant>,
    /// Results of data-plane link probes.
    probes: (
        tokio::sync::mpsc::Sender<ProbeResult>,
        tokio::sync::mpsc::Receiver<ProbeResult>,
    ),
    /// Lies the data plane and the worker caught: (member, what it did).
    caught: tokio::sync::mpsc::Receiver<(String, String)>,
    /// This node is leaving: the goodbyes not answered yet, and whom to
    /// tell when all are (see `leave.rs`).
    leaving: Option<leave::Leaving>,
    /// Asks from the rest of the node (leave).
    commands: tokio::sync::mpsc::Receiver<Command>,
}

/// What the rest of the node asks of the control loop.
pub(crate) enum Command {
    /// Say goodbye to every member; the sender hears back when all have
    /// answered (or the goodbyes failed).
    Leave(tokio::sync::oneshot::Sender<()>),
}

impl Control {
    async fn run(&mut self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                event = self.swarm.select_next_some() => self.on_event(event),
                Some((peer, result)) = self.probes.1.recv() => self.on_probe(peer, result),
                Some((node, why)) = self.caught.recv() => self.on_caught(node, why),
                Some(cmd) = self.commands.recv() => match cmd {
                    Command::Leave(done) => self.leave(done),
                },
                _ = tick.tick() => self.on_tick(),
            }
            self.publish.view.send_replace(Arc::new(self.m.view()));
        }
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.last_redial) >= REDIAL_INTERVAL && self.leaving.is_none() {
            self.last_redial = now;
            self.redial_mdns();
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
                let opts = DialOpts::unknown_peer_id()
                    .address(addr.clone())
                    .allocate_new_port()
                    .build();
                if let Err(e) = self.swarm.dial(opts) {
                    debug!(%addr, "dial failed: {e}");
                }
            }
        }
        self.drop_strangers(now);
        self.drop_silent(now);
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
            let links = self.m.my_links();
            if !self.m.is_leader() && !links.is_empty() {
                if let Ok(peer) = self.m.leader().parse::<PeerId>() {
                    self.swarm
                        .behaviour_mut()
                        .control
                        .send_request(&peer, Message::LinkReport { links });
                }
            }
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let me = *self.swarm.local_peer_id();
                let full = address.with(Protocol::P2p(me));
                info!(addr = %full, "listening");
                self.m.add_my_addr(full.to_string());
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
                        self.heard.insert(peer, Instant::now());
                        let us = rtt.as_micros().min(u32::MAX as u128) as u32;
                        self.m.set_rtt(&peer.to_string(), us);
                    }
                    Err(e) => {
                        warn!(peer = %short(&peer.to_string()), "ping failed ({e}): disconnecting");
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Control(ev)) => {
                if let libp2p::request_response::Event::Message { peer, .. } = &ev {
                    self.heard.insert(*peer, Instant::now());
                }
                self.on_control(ev)
            }
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
            if let Err(e) = self.swarm.dial(dial_opts(peer, addrs)) {
                debug!("dial failed: {e}");
            }
        }
    }

    /// Dials the peers mDNS knows that are not connected: mDNS reports a
    /// peer once, while its record lives (minutes), so nodes separated for
    /// a while (a network split, a laptop asleep) would not meet again
    /// until it expires.
    fn redial_mdns(&mut self) {
        let Some(mdns) = self.swarm.behaviour().mdns.as_ref() else {
            return;
        };
        let known: Vec<PeerId> = mdns.discovered_nodes().copied().collect();
        for peer in known {
            if self.swarm.is_connected(&peer) || self.backing_off(&peer) {
                continue;
            }
            // mDNS hands the swarm the peer's addresses.
            let opts = DialOpts::peer_id(peer).allocate_new_port().build();
            if let Err(e) = self.swarm.dial(opts) {
                debug!(%peer, "redial failed: {e}");
            }
        }
    }

    /// Closes the connections of peers that stayed strangers (no key
    /// proved, no join) past the deadline.
    fn drop_strangers(&mut self, now: Instant) {
        let members = self.m.members();
        self.strangers
            .retain(|p, _| !members.contains_key(&p.to_string()));
        let late: Vec<PeerId> = self
            .strangers
            .iter()
            .filter(|(_, since)| now.duration_since(**since) > PROOF_DEADLINE)
            .map(|(p, _)| *p)
            .collect();
        for peer in late {
            debug!(%peer, "no proof of the key in time: disconnecting");
            self.strangers.remove(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    /// Every member but `except`, as libp2p peers.
    fn member_peers(&self, except: Option<&str>) -> Vec<PeerId> {
        self.m
            .members()
            .keys()
            .filter(|id| Some(id.as_str()) != except)
            .filter_map(|id| id.parse().ok())
            .collect()
    }

    /// Sends `msg` to every member but `except`; the requests' ids.
    fn tell_members(&mut self, msg: &Message, except: Option<&str>) -> Vec<OutboundRequestId> {
        self.member_peers(except)
            .iter()
            .map(|p| {
                self.swarm
                    .behaviour_mut()
                    .control
                    .send_request(p, msg.clone())
            })
            .collect()
    }

    /// Closes the connections of members silent past [`SILENCE`].
    fn drop_silent(&mut self, now: Instant) {
        let silent: Vec<PeerId> = self
            .member_peers(None)
            .into_iter()
            .filter(|p| {
                self.heard
                    .get(p)
                    .is_some_and(|t| now.duration_since(*t) > SILENCE)
            })
            .collect();
        for peer in silent {
            warn!(peer = %short(&peer.to_string()), "silent for {} s: taken for gone", SILENCE.as_secs());
            self.heard.remove(&peer);
            let _ = self.swarm.disconnect_peer_id(peer);
        }
    }

    fn on_connected(&mut self, peer: PeerId, endpoint: ConnectedPoint) {
        self.heard.insert(peer, Instant::now());
        if !self.m.members().contains_key(&peer.to_string()) {
            self.strangers.entry(peer).or_insert_with(Instant::now);
        }
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
        let is_member = self.m.members().contains_key(&peer.to_string());
        if !is_member && !self.pending_joins.values().any(|p| *p == peer) {
            self.send_join(peer);
        }
    }

    fn on_disconnected(&mut self, peer: PeerId, cause: Option<String>) {
        self.ips.remove(&peer);
        self.heard.remove(&peer);
        self.strangers.remove(&peer);
        for p in self.peer_addrs.values_mut() {
            if *p == Some(peer) {
                *p = None;
            }
        }
        let id = peer.to_string();
        let left = self.m.leave(&id);
        if left {
            warn!(peer = %short(&id), cause = cause.as_deref().unwrap_or("closed"), "node lost: it left without a goodbye");
            self.shared.metrics.members_lost.inc();
            self.members_changed();
        }
    }
}

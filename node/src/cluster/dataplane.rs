//! The QUIC data plane: one long-lived connection per hop, frames on one
//! unidirectional stream per connection (ordered: a request's Begin, chunks
//! and Cancel arrive in the order sent), mutual TLS pinned to fingerprints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use protocol::Message;
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use super::tls::{AllowList, Fingerprint, Identity};
use super::wire::{read_frame, write_frame};
use super::worker::{Outbox, WorkerMsg};

/// Frames queued per outgoing link before senders wait: backpressure
/// from a slow next stage reaches the one before it.
pub const LINK_QUEUE: usize = 32;

/// Tokens (or a failure) queued per request at its origin. The origin asks
/// for one token at a time, so a few slots are plenty.
pub const ORIGIN_QUEUE: usize = 8;

/// Where to reach a member's data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerData {
    /// Its address.
    pub addr: SocketAddr,
    /// Its certificate fingerprint.
    pub fingerprint: Fingerprint,
}

/// This node's data plane.
pub struct DataPlane {
    me: String,
    endpoint: quinn::Endpoint,
    identity: Identity,
    allowed: AllowList,
    peers: Mutex<HashMap<String, PeerData>>,
    links: Mutex<HashMap<String, mpsc::Sender<Message>>>,
    worker: Mutex<Option<mpsc::Sender<WorkerMsg>>>,
    requests: Mutex<HashMap<u64, mpsc::Sender<Message>>>,
    runtime: tokio::runtime::Handle,
}

impl DataPlane {
    /// Binds the QUIC endpoint on `bind` and starts accepting members.
    pub fn bind(me: String, bind: SocketAddr) -> std::io::Result<Arc<DataPlane>> {
        let identity = Identity::generate();
        let allowed = AllowList::default();
        let endpoint = quinn::Endpoint::server(identity.server_config(allowed.clone()), bind)?;
        let plane = Arc::new(DataPlane {
            me,
            endpoint,
            identity,
            allowed,
            peers: Mutex::default(),
            links: Mutex::default(),
            worker: Mutex::default(),
            requests: Mutex::default(),
            runtime: tokio::runtime::Handle::current(),
        });
        tokio::spawn(accept_loop(plane.clone()));
        Ok(plane)
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().expect("bound endpoint")
    }

    /// This node's certificate fingerprint.
    pub fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint
    }

    /// Connects the stage worker.
    pub fn set_worker(&self, worker: mpsc::Sender<WorkerMsg>) {
        *self.worker.lock().expect("lock") = Some(worker);
    }

    /// Sends to this node's own worker.
    pub async fn to_worker(&self, msg: WorkerMsg) {
        let w = self.worker.lock().expect("lock").clone();
        if let Some(w) = w {
            let _ = w.send(msg).await;
        }
    }

    /// Replaces the member table: who may connect, and where each is.
    /// Links to nodes no longer members are closed.
    pub fn set_members(&self, members: HashMap<String, PeerData>) {
        {
            let mut allowed = self.allowed.write().expect("lock");
            allowed.clear();
            allowed.extend(members.values().map(|p| p.fingerprint));
        }
        let mut links = self.links.lock().expect("lock");
        let mut peers = self.peers.lock().expect("lock");
        links.retain(|id, _| members.get(id).is_some_and(|p| peers.get(id) == Some(p)));
        *peers = members;
    }

    /// Registers a request this node originates; its tokens and failure
    /// arrive on the returned receiver.
    pub fn open_request(&self, id: u64) -> mpsc::Receiver<Message> {
        let (tx, rx) = mpsc::channel(ORIGIN_QUEUE);
        self.requests.lock().expect("lock").insert(id, tx);
        rx
    }

    /// Forgets a request this node originated.
    pub fn close_request(&self, id: u64) {
        self.requests.lock().expect("lock").remove(&id);
    }

    /// Fails every request this node originates (the plan changed).
    pub fn fail_all_requests(&self, reason: &str) {
        let requests = self.requests.lock().expect("lock");
        for (&request_id, tx) in requests.iter() {
            let _ = tx.try_send(Message::Failed {
                request_id,
                reason: reason.to_string(),
            });
        }
    }

    /// Sends `msg` to node `to` (this node included), waiting while the link is full.
    pub async fn send(self: &Arc<Self>, to: &str, msg: Message) -> Result<(), String> {
        if to == self.me {
            self.dispatch(msg).await;
            return Ok(());
        }
        for _ in 0..2 {
            let link = self.link(to)?;
            match link.send(msg.clone()).await {
                Ok(()) => return Ok(()),
                // The link's connection died: forget it and open a new one.
                Err(_) => {
                    self.links.lock().expect("lock").remove(to);
                }
            }
        }
        Err(format!("cannot reach node {to} on the data plane"))
    }

    fn link(self: &Arc<Self>, to: &str) -> Result<mpsc::Sender<Message>, String> {
        let mut links = self.links.lock().expect("lock");
        if let Some(l) = links.get(to).filter(|l| !l.is_closed()) {
            return Ok(l.clone());
        }
        let peer = *self
            .peers
            .lock()
            .expect("lock")
            .get(to)
            .ok_or_else(|| format!("node {to} is not a member"))?;
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let span = info_span!("link", peer = %short(to), addr = %peer.addr);
        tokio::spawn(write_loop(self.clone(), peer, rx).instrument(span));
        links.insert(to.to_string(), tx.clone());
        Ok(tx)
    }

    /// Routes a message that arrived for this node.
    async fn dispatch(&self, msg: Message) {
        match msg {
            Message::Begin(_)
            | Message::Input(_)
            | Message::Activations(_)
            | Message::Cancel { .. } => self.to_worker(WorkerMsg::Data(msg)).await,
            Message::Tokens(t) => {
                for e in &t.entries {
                    self.to_origin(
                        e.request_id,
                        Message::Tokens(protocol::Tokens { entries: vec![*e] }),
                    );
                }
            }
            Message::Failed { request_id, .. } => self.to_origin(request_id, msg),
            other => debug!(?other, "control message on the data plane ignored"),
        }
    }

    fn to_origin(&self, id: u64, msg: Message) {
        let tx = self.requests.lock().expect("lock").get(&id).cloned();
        match tx {
            Some(tx) => {
                if tx.try_send(msg).is_err() {
                    warn!(request_id = id, "origin queue full: message dropped");
                }
            }
            None => debug!(request_id = id, "message for a finished request dropped"),
        }
    }
}

impl Outbox for Arc<DataPlane> {
    fn send(&self, to: &str, msg: Message) {
        let plane = self.clone();
        if let Err(e) = self
            .runtime
            .block_on(async move { plane.send(to, msg).await })
        {
            warn!("{e}");
        }
    }
}

async fn write_loop(plane: Arc<DataPlane>, peer: PeerData, mut rx: mpsc::Receiver<Message>) {
    let config = plane.identity.client_config(peer.fingerprint);
    let conn = match plane.endpoint.connect_with(config, peer.addr, "shoal") {
        Ok(c) => c.await,
        Err(e) => {
            warn!("cannot connect: {e}");
            return;
        }
    };
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            warn!("cannot connect: {e}");
            return;
        }
    };
    let mut stream = match conn.open_uni().await {
        Ok(s) => s,
        Err(e) => {
            warn!("cannot open a stream: {e}");
            return;
        }
    };
    debug!("link up");
    while let Some(msg) = rx.recv().await {
        if let Err(e) = write_frame(&mut stream, &msg).await {
            warn!("link lost: {e}");
            return;
        }
    }
    let _ = stream.finish();
}

async fn accept_loop(plane: Arc<DataPlane>) {
    while let Some(incoming) = plane.endpoint.accept().await {
        let plane = plane.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => {
                    serve_connection(plane, conn)
                        .instrument(info_span!("data-in", %remote))
                        .await
                }
                // Unknown certificates end here: not a member.
                Err(e) => info!(%remote, "data-plane connection refused: {e}"),
            }
        });
    }
}

async fn serve_connection(plane: Arc<DataPlane>, conn: quinn::Connection) {
    while let Ok(mut stream) = conn.accept_uni().await {
        let plane = plane.clone();
        let conn = conn.clone();
        tokio::spawn(
            async move {
                let mut buf = Vec::new();
                loop {
                    match read_frame(&mut stream, &mut buf).await {
                        Ok(Some(msg)) => plane.dispatch(msg).await,
                        Ok(None) => return,
                        Err(e) => {
                            // A broken peer costs its own connection, nothing else.
                            warn!("closing data connection: {e}");
                            conn.close(1u32.into(), b"malformed frame");
                            return;
                        }
                    }
                }
            }
            .in_current_span(),
        );
    }
}

/// The tail of a node id, for logs.
pub fn short(id: &str) -> &str {
    &id[id.len().saturating_sub(6)..]
}

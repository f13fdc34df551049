//! The QUIC data plane: one long-lived connection per hop, frames on one
//! unidirectional stream per connection (ordered: a request's Begin, chunks
//! and Cancel arrive in the order sent), mutual TLS pinned to fingerprints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use protocol::{Message, RequestError};
use tokio::sync::mpsc;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::tls::{AllowList, Fingerprint, Identity};
use crate::wire::{read_frame, write_frame};
use crate::worker::{Outbox, WorkerMsg};

/// Frames queued per outgoing link before senders wait: backpressure
/// from a slow next stage reaches the one before it.
pub const LINK_QUEUE: usize = 32;

/// Tokens (or a failure) queued per request at its origin. The origin asks
/// for one token at a time, or for verifications' draws (one per proposal
/// and one more), at most one trip per stage up to
/// [`schedule::flight::DEPTH_MAX`]: room for that many trips of
/// the most proposals, and a few more.
pub const ORIGIN_QUEUE: usize =
    schedule::flight::DEPTH_MAX * (protocol::limits::DRAFT_TOKENS_MAX as usize + 1) + 8;

/// Bytes of the first bandwidth probe: measures a slow link in well under a
/// second (64 KiB at 1 Mbit/s is 0.5 s).
const PROBE_BYTES_SMALL: usize = 64 << 10;

/// Bytes of the second probe, sent when the first took under
/// [`PROBE_FAST`]: enough to see past QUIC's slow start on a fast link.
const PROBE_BYTES_LARGE: usize = 2 << 20;

/// A first probe faster than this is followed by the large one.
const PROBE_FAST: std::time::Duration = std::time::Duration::from_millis(50);

/// Most bytes a probe stream may carry (the receiver's bound).
const PROBE_BYTES_MAX: usize = 4 << 20;

/// Where to reach a member's data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerData {
    /// Its address.
    pub addr: SocketAddr,
    /// Its certificate fingerprint.
    pub fingerprint: Fingerprint,
}

/// Why a message could not be sent to a member.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The node is not (or no longer) a member.
    #[error("node {0} is not a member")]
    NotMember(String),
    /// Its link broke twice in a row.
    #[error("cannot reach node {0} on the data plane")]
    Unreachable(String),
}

impl From<SendError> for RequestError {
    fn from(e: SendError) -> RequestError {
        let (SendError::NotMember(node) | SendError::Unreachable(node)) = &e;
        RequestError::StageLost {
            node: node.clone(),
            why: e.to_string(),
        }
    }
}

/// A request this node originates: where its messages go, and the stages
/// that may send them.
struct OriginRequest {
    tx: mpsc::Sender<Message>,
    /// The plan's stages when it was opened: tokens only from the last,
    /// failures from any.
    route: Vec<String>,
}

/// An outgoing link: its queue and its writer task.
struct Link {
    tx: mpsc::Sender<Message>,
    /// Aborted when the member leaves: a writer stuck on a frozen peer
    /// would otherwise hold every sender waiting on its full queue.
    task: tokio::task::AbortHandle,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// This node's data plane.
pub struct DataPlane {
    me: String,
    endpoint: quinn::Endpoint,
    identity: Identity,
    allowed: AllowList,
    peers: Mutex<HashMap<String, PeerData>>,
    links: Mutex<HashMap<String, Link>>,
    worker: Mutex<Option<mpsc::Sender<WorkerMsg>>>,
    requests: Mutex<HashMap<u64, OriginRequest>>,
    /// Connections members opened to this node, by their certificate:
    /// closed when the member leaves.
    incoming: Mutex<Vec<(Fingerprint, quinn::Connection)>>,
    runtime: tokio::runtime::Handle,
    metrics: Arc<crate::metrics::Metrics>,
    /// Lies caught here or in the worker, for the control loop to act on:
    /// (member, what it did).
    caught: mpsc::Sender<(String, String)>,
    caught_rx: Mutex<Option<mpsc::Receiver<(String, String)>>>,
}

/// Lies queued for the control loop at most; more are counted and logged
/// but not queued (one is enough to act on a member).
const CAUGHT_QUEUE: usize = 64;

impl DataPlane {
    /// Binds the QUIC endpoint on `bind` and starts accepting members.
    pub fn bind(
        me: String,
        bind: SocketAddr,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> std::io::Result<Arc<DataPlane>> {
        let identity = Identity::generate();
        let allowed = AllowList::default();
        let endpoint = quinn::Endpoint::server(identity.server_config(allowed.clone()), bind)?;
        let (caught, caught_rx) = mpsc::channel(CAUGHT_QUEUE);
        let plane = Arc::new(DataPlane {
            me,
            endpoint,
            identity,
            allowed,
            peers: Mutex::default(),
            links: Mutex::default(),
            worker: Mutex::default(),
            requests: Mutex::default(),
            incoming: Mutex::default(),
            runtime: tokio::runtime::Handle::current(),
            metrics,
            caught,
            caught_rx: Mutex::new(Some(caught_rx)),
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

    /// Member `node` sent what no honest node sends: logged, counted, and
    /// handed to the control loop, which tells every member and leaves the
    /// node out (see `membership::distrust`).
    pub fn caught(&self, node: &str, why: String) {
        warn!(peer = %short(node), "caught a member lying: {why}");
        self.metrics.lies_caught.inc();
        let _ = self.caught.try_send((node.to_string(), why));
    }

    /// The lies caught, for the control loop (once).
    pub(crate) fn take_caught(&self) -> Option<mpsc::Receiver<(String, String)>> {
        self.caught_rx.lock().expect("lock").take()
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

    /// Sends to this node's own worker without waiting (from synchronous
    /// code); a full queue hands the message to a task.
    pub fn to_worker_now(&self, msg: WorkerMsg) {
        let w = self.worker.lock().expect("lock").clone();
        if let Some(w) = w {
            if let Err(mpsc::error::TrySendError::Full(msg)) = w.try_send(msg) {
                tokio::spawn(async move {
                    let _ = w.send(msg).await;
                });
            }
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
        // A member that left keeps no connection into this node.
        self.incoming.lock().expect("lock").retain(|(fp, conn)| {
            let member = members.values().any(|p| &p.fingerprint == fp);
            if !member {
                conn.close(2u32.into(), b"no longer a member");
            }
            member && conn.close_reason().is_none()
        });
        *peers = members;
    }

    /// The member whose certificate has fingerprint `fp`.
    fn member_by_fingerprint(&self, fp: &Fingerprint) -> Option<String> {
        self.peers
            .lock()
            .expect("lock")
            .iter()
            .find(|(_, p)| &p.fingerprint == fp)
            .map(|(id, _)| id.clone())
    }

    /// Sends `msg` to node `to` (this node included), waiting while the link is full.
    pub async fn send(self: &Arc<Self>, to: &str, msg: Message) -> Result<(), SendError> {
        if to == self.me {
            self.dispatch(&self.me, msg).await;
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
        Err(SendError::Unreachable(short(to).to_string()))
    }

    fn link(self: &Arc<Self>, to: &str) -> Result<mpsc::Sender<Message>, SendError> {
        let mut links = self.links.lock().expect("lock");
        if let Some(l) = links.get(to).filter(|l| !l.tx.is_closed()) {
            return Ok(l.tx.clone());
        }
        let peer = *self
            .peers
            .lock()
            .expect("lock")
            .get(to)
            .ok_or_else(|| SendError::NotMember(short(to).to_string()))?;
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let span = info_span!("link", peer = %short(to), addr = %peer.addr);
        let task =
            tokio::spawn(write_loop(self.clone(), to.to_string(), peer, rx).instrument(span));
        let link = Link {
            tx: tx.clone(),
            task: task.abort_handle(),
        };
        links.insert(to.to_string(), link);
        Ok(tx)
    }

    /// Measures the link to `to` on a connection of its own: the best of
    /// three small round trips, then throughput of a bulk transfer (small,
    /// and a large one on a fast link). Returns (rtt µs, bytes per second).
    pub async fn probe(&self, to: &str) -> Result<(u32, f64), String> {
        let peer = *self
            .peers
            .lock()
            .expect("lock")
            .get(to)
            .ok_or_else(|| format!("node {to} is not a member"))?;
        let err = |e: &dyn std::fmt::Display| format!("probe of {}: {e}", short(to));
        let config = self.identity.client_config(peer.fingerprint);
        let conn = self
            .endpoint
            .connect_with(config, peer.addr, "shoal")
            .map_err(|e| err(&e))?
            .await
            .map_err(|e| err(&e))?;
        let mut rtt = std::time::Duration::MAX;
        for _ in 0..3 {
            rtt = rtt.min(probe_transfer(&conn, 1).await.map_err(|e| err(&e))?);
        }
        let mut took = probe_transfer(&conn, PROBE_BYTES_SMALL)
            .await
            .map_err(|e| err(&e))?;
        let mut bytes = PROBE_BYTES_SMALL;
        if took < PROBE_FAST {
            bytes = PROBE_BYTES_LARGE;
            took = probe_transfer(&conn, bytes).await.map_err(|e| err(&e))?;
        }
        conn.close(0u32.into(), b"probe done");
        let transfer = took
            .saturating_sub(rtt)
            .max(std::time::Duration::from_micros(1));
        let rtt_us = rtt.as_micros().min(u32::MAX as u128) as u32;
        Ok((rtt_us, bytes as f64 / transfer.as_secs_f64()))
    }

    /// Routes a message that arrived for this node from member `from`.
    /// Messages for a request this node originates are taken only from
    /// that request's stages (tokens only from its last); the worker checks
    /// its own (see `worker`).
    async fn dispatch(&self, from: &str, msg: Message) {
        match msg {
            Message::Begin(_)
            | Message::Input(_)
            | Message::Activations(_)
            | Message::Cancel { .. } => {
                self.to_worker(WorkerMsg::Data {
                    from: from.to_string(),
                    msg,
                })
                .await
            }
            Message::Tokens(_) | Message::Failed { .. } => self.for_origins(from, msg),
            other => debug!(?other, "control message on the data plane ignored"),
        }
    }
}

impl Outbox for Arc<DataPlane> {
    fn caught(&self, node: &str, why: String) {
        DataPlane::caught(self, node, why)
    }

    fn send_now(&self, to: &str, msg: Message) -> bool {
        DataPlane::send_now(self, to, msg)
    }

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

async fn write_loop(
    plane: Arc<DataPlane>,
    peer_id: String,
    peer: PeerData,
    mut rx: mpsc::Receiver<Message>,
) {
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
        match write_frame(&mut stream, &msg).await {
            Ok(bytes) => plane.metrics.sent(&peer_id, bytes),
            Err(e) => {
                warn!("link lost: {e}");
                return;
            }
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

/// Sends `bytes` on a new stream and waits for the receiver's one-byte
/// answer; the time it took.
async fn probe_transfer(
    conn: &quinn::Connection,
    bytes: usize,
) -> std::io::Result<std::time::Duration> {
    let t = std::time::Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let chunk = vec![0u8; bytes.min(64 << 10)];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        send.write_all(&chunk[..n]).await?;
        left -= n;
    }
    send.finish()?;
    let mut ack = [0u8; 1];
    recv.read_exact(&mut ack)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(t.elapsed())
}

/// The receiving end of a probe: counts bytes to the end of the stream
/// (at most [`PROBE_BYTES_MAX`]) and answers with one byte.
async fn answer_probe(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0usize;
    loop {
        let Some(n) = recv.read(&mut buf).await.map_err(std::io::Error::from)? else {
            break;
        };
        total += n;
        if total > PROBE_BYTES_MAX {
            return Err(std::io::Error::other("probe too large"));
        }
    }
    send.write_all(&[1]).await?;
    send.finish()?;
    Ok(())
}

async fn serve_connection(plane: Arc<DataPlane>, conn: quinn::Connection) {
    // The TLS handshake admitted a member's certificate: which member.
    let fp = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|certs| certs.first().map(crate::tls::fingerprint));
    let Some((fp, from)) = fp.and_then(|fp| Some((fp, plane.member_by_fingerprint(&fp)?))) else {
        conn.close(2u32.into(), b"not a member");
        return;
    };
    plane
        .incoming
        .lock()
        .expect("lock")
        .push((fp, conn.clone()));
    loop {
        let mut stream = tokio::select! {
            uni = conn.accept_uni() => match uni {
                Ok(s) => s,
                Err(_) => return,
            },
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    let conn = conn.clone();
                    tokio::spawn(async move {
                        if answer_probe(send, recv).await.is_err() {
                            conn.close(1u32.into(), b"bad probe");
                        }
                    });
                    continue;
                }
                Err(_) => return,
            },
        };
        let plane = plane.clone();
        let conn = conn.clone();
        let from = from.clone();
        tokio::spawn(
            async move {
                let mut buf = Vec::new();
                loop {
                    match read_frame(&mut stream, &mut buf).await {
                        Ok(Some(_)) if !plane.allowed.read().expect("lock").contains(&fp) => {
                            conn.close(2u32.into(), b"no longer a member");
                            return;
                        }
                        Ok(Some(msg)) => plane.dispatch(&from, msg).await,
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

#[cfg(test)]
mod tests;

mod origins;

//! The libp2p side of the control plane: transports (TCP + Noise + Yamux),
//! behaviours (mDNS, identify, ping, request-response with shoal's frames)
//! and their settings. The control loop in `control` drives it.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{identify, mdns, noise, ping, tcp, yamux, Multiaddr, StreamProtocol, Swarm};
use protocol::{Message, PROTOCOL_VERSION};

use crate::wire::{read_frame_futures, write_frame_futures, CONTROL_REQUEST_BYTES_MAX};
use protocol::limits::FRAME_BYTES_MAX;

/// The request-response protocol name, versioned.
const CONTROL_PROTOCOL: StreamProtocol = StreamProtocol::new("/shoal/control/1");

/// How often mDNS queries: libp2p's default is 5 minutes, far too slow
/// for a node to find its cluster when it starts.
const MDNS_QUERY_INTERVAL: Duration = Duration::from_secs(1);

/// Ping period and timeout: a silent peer (a frozen process, a sleeping
/// laptop, a cut cable) is dropped within 3.5 s of its last answer, and
/// its requests go on under the next plan (see `origin`). A node busy
/// computing still answers: pings run on the async thread, compute on
/// its own threads.
const PING_INTERVAL: Duration = Duration::from_secs(1);
const PING_TIMEOUT: Duration = Duration::from_millis(2500);

/// Control requests time out after this: a peer that does not answer a
/// join in 10 s is not one to run a pipeline with.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    /// Caps on connections, before any of them proves the key.
    pub(super) limits: libp2p::connection_limits::Behaviour,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) control: request_response::Behaviour<FrameCodec>,
}

/// Incoming connections still in their handshake at once.
const PENDING_INCOMING_MAX: u32 = 32;
/// Incoming connections held at once: members use one or two each, so
/// this leaves room for a full cluster while a flood of strangers (each
/// dropped after [`crate::control`]'s proof deadline) cannot use up the
/// process's file descriptors.
const ESTABLISHED_INCOMING_MAX: u32 = 256;
/// Connections one peer id may hold.
const PER_PEER_MAX: u32 = 4;

/// request-response codec: one shoal frame each way.
#[derive(Debug, Clone, Default)]
pub(super) struct FrameCodec;

#[async_trait::async_trait]
impl request_response::Codec for FrameCodec {
    type Protocol = StreamProtocol;
    type Request = Message;
    type Response = Message;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        Ok(read_frame_futures(io, CONTROL_REQUEST_BYTES_MAX).await?)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Message>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        Ok(read_frame_futures(io, FRAME_BYTES_MAX).await?)
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        m: Message,
    ) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        Ok(write_frame_futures(io, &m).await?)
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        m: Message,
    ) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        Ok(write_frame_futures(io, &m).await?)
    }
}

/// Builds the swarm with this node's identity (mDNS only if `mdns_on`).
pub(super) fn build(
    keypair: libp2p::identity::Keypair,
    mdns_on: bool,
) -> Result<Swarm<Behaviour>, String> {
    let peer_id = keypair.public().to_peer_id();
    let swarm = libp2p::SwarmBuilder::with_existing_identity(keypair)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| e.to_string())?
        .with_behaviour(|key| {
            let mdns = if mdns_on {
                let config = mdns::Config {
                    query_interval: MDNS_QUERY_INTERVAL,
                    ..Default::default()
                };
                Some(mdns::tokio::Behaviour::new(config, peer_id)?)
            } else {
                None
            };
            let limits = libp2p::connection_limits::ConnectionLimits::default()
                .with_max_pending_incoming(Some(PENDING_INCOMING_MAX))
                .with_max_established_incoming(Some(ESTABLISHED_INCOMING_MAX))
                .with_max_established_per_peer(Some(PER_PEER_MAX));
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Behaviour {
                limits: libp2p::connection_limits::Behaviour::new(limits),
                mdns: mdns.into(),
                identify: identify::Behaviour::new(identify::Config::new(
                    format!("/shoal/{PROTOCOL_VERSION}"),
                    key.public(),
                )),
                ping: ping::Behaviour::new(
                    ping::Config::new()
                        .with_interval(PING_INTERVAL)
                        .with_timeout(PING_TIMEOUT),
                ),
                control: request_response::Behaviour::with_codec(
                    FrameCodec,
                    [(CONTROL_PROTOCOL, ProtocolSupport::Full)],
                    request_response::Config::default().with_request_timeout(REQUEST_TIMEOUT),
                ),
            })
        })
        .map_err(|e| e.to_string())?
        // Membership follows connections, so they stay open while idle;
        // ping failures and the peer's kernel closing the socket end them.
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(365 * 86400)))
        .build();
    Ok(swarm)
}

pub(super) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

/// Whether a dialled address is the `--peer` address (ignoring a `/p2p` suffix).
pub(super) fn same_dial_target(peer_arg: &Multiaddr, dialled: &Multiaddr) -> bool {
    let strip = |a: &Multiaddr| -> Vec<String> {
        a.iter()
            .filter(|p| !matches!(p, Protocol::P2p(_)))
            .map(|p| p.to_string())
            .collect()
    };
    strip(peer_arg) == strip(dialled)
}

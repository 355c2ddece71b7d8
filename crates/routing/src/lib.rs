//! Content routing between mirrorlet agents over libp2p: a Kademlia DHT (server mode,
//! protocol `/mirrorlet/kad/1.0.0`) over TCP with noise and yamux, an optional private
//! network key, and identify. Every digest and tag a node can serve is a provider record.
//!
//! [`P2pRouter`] is a cheap, cloneable client of the task that owns the swarm; it
//! implements [`mirrorlet_oci::Router`]. [`advertiser`] keeps the DHT in step with the
//! node's content store.

// The workspace denies unsafe code; only the agent binary allows it, in one place.
#![forbid(unsafe_code)]

pub mod advertiser;
mod behaviour;
pub mod config;
pub mod identity;
pub mod metrics;
mod store;
mod swarm;
mod transport;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};
use libp2p::{Multiaddr, PeerId, Swarm};
use mirrorlet_oci::{Owner, Peer, Router, RouterError, RouterStatus};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

pub use behaviour::{KAD_PROTOCOL, WithdrawRequest, WithdrawResponse};
pub use config::P2pConfig;
pub use metrics::P2pMetrics;
pub use swarm::{closest_first, socket_to_multiaddr};

use crate::behaviour::Behaviour;
use crate::swarm::{Command, EventLoop};

/// Providers buffered per lookup before the consumer reads them.
const LOOKUP_BUFFER: usize = 16;

/// Why the router could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Building the transport failed.
    #[error("building the libp2p transport: {0}")]
    Transport(#[source] std::io::Error),
    /// The listen address could not be bound.
    #[error("listening on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
}

/// An error and its causes, `: `-separated (libp2p's transport errors show nothing
/// themselves: the cause, e.g. "Too many open files", is their source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.retain(|p| !p.is_empty());
    parts.dedup();
    parts.join(": ")
}

/// A handle to the running router. Cheap to clone.
#[derive(Debug, Clone)]
pub struct P2pRouter {
    commands: mpsc::Sender<Command>,
    peer_id: PeerId,
    registry_addrs: tokio::sync::watch::Receiver<Vec<SocketAddr>>,
}

impl P2pRouter {
    /// Starts the swarm task: binds the listener now (so a bad address fails here), then
    /// bootstraps in the background. The task stops when `shutdown` is cancelled.
    pub fn start(
        config: P2pConfig,
        metrics: P2pMetrics,
        shutdown: CancellationToken,
    ) -> Result<(Self, JoinHandle<()>), StartError> {
        let key = config.keypair.clone();
        let peer_id = key.public().to_peer_id();
        let transport = transport::build(&key, config.psk).map_err(StartError::Transport)?;
        let behaviour = Behaviour::new(&key, &config, metrics.provider_records.clone());
        let swarm_config = libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(config.idle_timeout);
        let mut swarm = Swarm::new(transport, behaviour, peer_id, swarm_config);
        let addr = socket_to_multiaddr(config.listen);
        let listening = swarm.listen_on(addr.clone());
        // `[::]` means every address, as it does for the HTTP listeners: libp2p's IPv6
        // sockets are IPv6-only, so IPv4 gets its own listener; and a node without IPv6
        // keeps IPv4.
        let dual = match config.listen.ip() {
            IpAddr::V6(ip) if ip.is_unspecified() => Some(socket_to_multiaddr(SocketAddr::new(
                Ipv4Addr::UNSPECIFIED.into(),
                config.listen.port(),
            ))),
            _ => None,
        };
        let listen = match (listening, dual) {
            (Ok(_), None) => vec![addr],
            (Ok(_), Some(v4)) => match swarm.listen_on(v4.clone()) {
                Ok(_) => vec![addr, v4],
                Err(e) => {
                    tracing::warn!(addr = %v4, error = %e, "p2p: no IPv4 listener");
                    vec![addr]
                }
            },
            (Err(e), Some(v4)) => {
                tracing::info!(%addr, error = %e, "p2p: no IPv6 here, listening on IPv4 only");
                swarm
                    .listen_on(v4.clone())
                    .map_err(|e| StartError::Listen {
                        addr: v4.clone(),
                        reason: error_chain(&e),
                    })?;
                vec![v4]
            }
            (Err(e), None) => {
                return Err(StartError::Listen {
                    addr,
                    reason: error_chain(&e),
                });
            }
        };
        let (tx, rx) = mpsc::channel(1024);
        let (addrs_tx, registry_addrs) = tokio::sync::watch::channel(Vec::new());
        let event_loop = EventLoop::new(swarm, rx, addrs_tx, config, metrics, shutdown);
        let task = tokio::spawn(event_loop.run());
        tracing::info!(peer_id = %peer_id, listen = ?listen, "p2p router started");
        Ok((
            Self {
                commands: tx,
                peer_id,
                registry_addrs,
            },
            task,
        ))
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// The addresses the router listens on (known once the listener is up).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, RouterError> {
        self.call(|reply| Command::ListenAddrs { reply }).await
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, RouterError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| RouterError::Stopped)?;
        rx.await.map_err(|_| RouterError::Stopped)
    }
}

#[async_trait::async_trait]
impl Router for P2pRouter {
    async fn ready(&self) -> bool {
        !self.commands.is_closed()
    }

    async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError> {
        self.call(|reply| Command::Advertise { keys, reply })
            .await?
    }

    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError> {
        self.call(|reply| Command::Withdraw { keys, reply }).await
    }

    fn lookup(&self, key: &str) -> BoxStream<'static, Peer> {
        let commands = self.commands.clone();
        let key = key.to_owned();
        stream::once(async move {
            let (tx, rx) = mpsc::channel(LOOKUP_BUFFER);
            // If the router has stopped, the stream is simply empty.
            let _ = commands.send(Command::Lookup { key, tx }).await;
            ReceiverStream::new(rx)
        })
        .flatten()
        .boxed()
    }

    async fn status(&self) -> Result<RouterStatus, RouterError> {
        self.call(|reply| Command::Status { reply }).await
    }

    fn local_id(&self) -> String {
        self.peer_id.to_string()
    }

    /// The agents of this node's routing table closest to the key in the DHT's metric, this
    /// node among them, closest first (no network query: see `swarm/owners.rs`).
    async fn owners(&self, key: &str) -> Result<Vec<Owner>, RouterError> {
        self.call(|reply| Command::Owners {
            key: key.to_owned(),
            reply,
        })
        .await
    }

    /// This node's reachable listen addresses with its registry port.
    fn registry_addrs(&self) -> Vec<SocketAddr> {
        self.registry_addrs.borrow().clone()
    }
}

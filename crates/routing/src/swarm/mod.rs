//! The task that owns the libp2p swarm. Everyone else talks to it through [`Command`]s on
//! a bounded channel and gets answers on oneshots (or, for lookups, a bounded stream).
//! Pending lookups live in a map keyed by query id. The loop never panics: a closed
//! channel is just a finished conversation.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use futures_util::StreamExt;
use libp2p::kad::QueryId;
use libp2p::{Multiaddr, PeerId, Swarm};
use mirrorlet_oci::{Peer, PeerLink, RouterError, RouterStatus};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

mod addr;
mod commands;
mod events;
mod pacing;

use addr::socket_of;
pub use addr::socket_to_multiaddr;
use pacing::Announcements;

use crate::behaviour::Behaviour;
use crate::config::P2pConfig;
use crate::metrics::P2pMetrics;

/// Requests to the swarm task.
#[derive(Debug)]
pub(crate) enum Command {
    Advertise {
        keys: Vec<String>,
        reply: oneshot::Sender<Result<(), RouterError>>,
    },
    Withdraw {
        keys: Vec<String>,
        reply: oneshot::Sender<()>,
    },
    Lookup {
        key: String,
        tx: mpsc::Sender<Peer>,
    },
    Status {
        reply: oneshot::Sender<RouterStatus>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Members {
        reply: oneshot::Sender<Vec<Peer>>,
    },
}

#[derive(Debug, Default)]
struct PeerState {
    /// The address peers reach it at (from the connection or identify).
    ip: Option<IpAddr>,
    /// Its registry port (from identify).
    http_port: Option<u16>,
    /// Open connections.
    connections: u32,
    /// When all its connections closed: it is left out of lookups until it reconnects,
    /// and forgotten once records naming it have expired.
    disconnected_at: Option<std::time::Instant>,
    /// Addresses it listens on (dialled, or from identify), to restore it in the routing table.
    addrs: Vec<Multiaddr>,
    /// The remote address of its latest connection.
    remote: Option<Multiaddr>,
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    resolved_tx: mpsc::Sender<Vec<SocketAddr>>,
    resolved_rx: mpsc::Receiver<Vec<SocketAddr>>,
    lookups: HashMap<QueryId, mpsc::Sender<Peer>>,
    /// Announcements to the nodes closest to each key, queued and running.
    announcements: Announcements<QueryId>,
    /// Withdrawals waiting for their requests to peers to finish, with whom to tell.
    withdrawals: Vec<(
        HashSet<libp2p::request_response::OutboundRequestId>,
        oneshot::Sender<()>,
    )>,
    peers: HashMap<PeerId, PeerState>,
    advertised: HashSet<String>,
    /// Addresses this node listens on (to never dial itself).
    own: HashSet<SocketAddr>,
    config: P2pConfig,
    metrics: P2pMetrics,
    shutdown: CancellationToken,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        commands: mpsc::Receiver<Command>,
        config: P2pConfig,
        metrics: P2pMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        let (resolved_tx, resolved_rx) = mpsc::channel(4);
        let mut own = HashSet::new();
        if !config.listen.ip().is_unspecified() {
            own.insert(config.listen);
        }
        Self {
            swarm,
            commands,
            resolved_tx,
            resolved_rx,
            lookups: HashMap::new(),
            announcements: Announcements::new(),
            withdrawals: Vec::new(),
            peers: HashMap::new(),
            advertised: HashSet::new(),
            own,
            config,
            metrics,
            shutdown,
        }
    }

    pub(crate) async fn run(mut self) {
        let mut tick = tokio::time::interval(self.config.rebootstrap);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_command(cmd),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.on_event(event),
                Some(addrs) = self.resolved_rx.recv() => self.dial_addrs(addrs),
                _ = tick.tick() => self.housekeeping(),
                () = self.shutdown.cancelled() => break,
            }
        }
        tracing::info!("p2p router stopped");
    }

    /// Re-adds every connected peer's known addresses to the routing table.
    pub(super) fn heal_routing_table(&mut self) {
        let known: Vec<(PeerId, Vec<Multiaddr>)> = self
            .peers
            .iter()
            .filter(|(_, p)| p.connections > 0)
            .map(|(id, p)| (*id, p.addrs.clone()))
            .collect();
        for (peer, addrs) in known {
            for addr in addrs {
                self.swarm.behaviour_mut().kad.add_address(&peer, addr);
            }
        }
    }

    pub(super) fn connected_peers(&self) -> usize {
        self.peers.values().filter(|p| p.connections > 0).count()
    }

    /// What the status page shows: listeners and every peer known, sorted by id.
    pub(super) fn status(&self) -> RouterStatus {
        let mut peers: Vec<PeerLink> = self
            .peers
            .iter()
            .map(|(id, p)| PeerLink {
                id: id.to_string(),
                registry: p
                    .ip
                    .zip(p.http_port)
                    .map(|(ip, port)| SocketAddr::new(ip, port)),
                address: p.remote.as_ref().map(ToString::to_string),
                connected: p.connections > 0,
            })
            .collect();
        peers.sort_by(|a, b| a.id.cmp(&b.id));
        RouterStatus {
            connected_peers: self.connected_peers(),
            advertised_keys: self.advertised.len(),
            listen: self.swarm.listeners().map(ToString::to_string).collect(),
            peers,
        }
    }

    /// Connected peers that identified as mirrorlet agents (they told their registry port),
    /// with their registry addresses.
    pub(super) fn members(&self) -> Vec<Peer> {
        self.peers
            .iter()
            .filter(|(_, p)| p.connections > 0)
            .filter_map(|(id, p)| {
                Some(Peer {
                    id: id.to_string(),
                    addr: SocketAddr::new(p.ip?, p.http_port?),
                })
            })
            .collect()
    }

    /// Runs every `rebootstrap`: re-bootstraps when alone, drops abandoned lookups,
    /// refreshes gauges.
    pub(super) fn housekeeping(&mut self) {
        if self.connected_peers() == 0 {
            self.bootstrap();
        } else {
            self.heal_routing_table();
        }
        let abandoned: Vec<QueryId> = self
            .lookups
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in abandoned {
            self.finish_lookup(id);
        }
        // Peers gone for longer than a record lives cannot be named by any record: forget them.
        let ttl = self.config.provider_ttl;
        self.peers
            .retain(|_, p| p.disconnected_at.is_none_or(|at| at.elapsed() < ttl));
        self.refresh_gauges();
    }

    pub(super) fn refresh_gauges(&mut self) {
        let members = self.members().len();
        self.metrics
            .members
            .set(i64::try_from(members).unwrap_or(i64::MAX));
        let connected = self.connected_peers();
        self.metrics
            .connected_peers
            .set(i64::try_from(connected).unwrap_or(i64::MAX));
        self.metrics
            .advertised_keys
            .set(i64::try_from(self.advertised.len()).unwrap_or(i64::MAX));
        let table: usize = self
            .swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum();
        self.metrics
            .routing_table_peers
            .set(i64::try_from(table).unwrap_or(i64::MAX));
    }

    /// Dials the static bootstrap peers and resolves the DNS name (in the background, then
    /// [`EventLoop::dial_addrs`]). Called when the node has no connections; once connected,
    /// Kademlia's own periodic bootstrap refreshes the routing table.
    pub(super) fn bootstrap(&mut self) {
        for addr in self.config.bootstrap.clone() {
            if !self.is_own(&addr)
                && let Err(e) = self.swarm.dial(addr.clone())
            {
                tracing::debug!(%addr, error = %e, "bootstrap dial failed");
            }
        }
        if let Some((name, port)) = self.config.bootstrap_dns.clone() {
            let tx = self.resolved_tx.clone();
            tokio::spawn(async move {
                match tokio::net::lookup_host((name.as_str(), port)).await {
                    Ok(addrs) => {
                        let _ = tx.send(addrs.collect()).await;
                    }
                    Err(e) => tracing::debug!(%name, error = %e, "bootstrap DNS lookup failed"),
                }
            });
        }
    }

    pub(super) fn is_own(&self, addr: &Multiaddr) -> bool {
        socket_of(addr).is_some_and(|sa| self.own.contains(&sa))
    }

    pub(super) fn dial_addrs(&mut self, addrs: Vec<SocketAddr>) {
        let connected: HashSet<IpAddr> = self
            .peers
            .values()
            .filter(|p| p.connections > 0)
            .filter_map(|p| p.ip)
            .collect();
        for sa in addrs {
            // Peers share the port, so an address is ours if its IP is; and an IP we are
            // connected to is a peer we already know.
            let own_ip = self.own.iter().any(|o| o.ip() == sa.ip());
            if self.own.contains(&sa)
                || (own_ip && sa.port() == self.config.listen.port())
                || connected.contains(&sa.ip())
            {
                continue;
            }
            let addr = socket_to_multiaddr(sa);
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::debug!(%addr, error = %e, "dial of a DNS bootstrap address failed");
            }
        }
    }
}

//! The task that owns the libp2p swarm. Everyone else talks to it through [`Command`]s on
//! a bounded channel and gets answers on oneshots (or, for lookups, a bounded stream).
//! Pending lookups live in a map keyed by query id. The loop never panics: a closed
//! channel is just a finished conversation.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use futures_util::StreamExt;
use libp2p::kad::QueryId;
use libp2p::{Multiaddr, PeerId, Swarm};
use mirrorlet_oci::{LinkState, Owner, Peer, PeerLink, RouterError, RouterStatus};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

mod addr;
mod commands;
mod events;
mod owners;
mod pacing;
mod republish;

use addr::socket_of;
pub use addr::socket_to_multiaddr;
pub use owners::closest_first;
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
    Owners {
        key: String,
        reply: oneshot::Sender<Vec<Owner>>,
    },
}

/// How long a peer that could not be dialled is left out of lookups and rankings (unless
/// it connects again sooner).
pub(crate) const UNREACHABLE_FOR: std::time::Duration = std::time::Duration::from_secs(60);
/// A peer whose connection breaks is probed (a bare TCP connect to where it listens) to see
/// whether it is gone, at most this often: an idle connection the other side closed looks
/// the same as a peer that died.
const LIVENESS_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a probe may take before the peer counts as unreachable.
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Probes of providers per housekeeping round at most (see
/// [`crate::config::DEFAULT_PROVIDER_CHECK`]): up to 1,500 distinct providers keep its
/// bound; more lengthen the cycle.
const PROVIDER_CHECKS_PER_ROUND: usize = 256;
/// A node that knows peers but is connected to none bootstraps again once every this many
/// `rebootstrap` periods (a minute by default).
const IDLE_REBOOTSTRAPS: u32 = 6;
/// Addresses dialled at most from one DNS bootstrap answer: enough to join, without
/// connecting to every node of a large cluster at once.
const BOOTSTRAP_DIALS: usize = 8;

/// What a probe of a peer's listener found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Probe {
    /// It took the connection.
    Up,
    /// The connection was refused (or the host is unreachable): nothing listens there.
    Refused,
    /// No answer within [`PROBE_TIMEOUT`].
    Silent,
}

#[derive(Debug, Default, Clone)]
struct PeerState {
    /// The address peers reach it at (from the connection or identify).
    ip: Option<IpAddr>,
    /// Its registry port (from identify).
    http_port: Option<u16>,
    /// Open connections. Connections close when idle (`P2pConfig::idle_timeout`), so none
    /// open says nothing about whether the peer is alive.
    connections: u32,
    /// When its last connection closed; it is forgotten once records naming it have expired.
    idle_since: Option<std::time::Instant>,
    /// When a dial to it or a probe of it failed: it is left out of lookups and rankings
    /// for [`UNREACHABLE_FOR`], or until it connects again.
    unreachable_at: Option<std::time::Instant>,
    /// When it was last probed to see whether it is still there (its connection broke, or
    /// this node stores records of its).
    checked_at: Option<std::time::Instant>,
    /// Probes in a row that it left unanswered.
    silent_probes: u8,
    /// Addresses it listens on (dialled, or from identify), to restore it in the routing table.
    addrs: Vec<Multiaddr>,
    /// The remote address of its latest connection.
    remote: Option<Multiaddr>,
}

impl PeerState {
    /// The address to reach its registry at: an address it listens on (dialled, or told
    /// through identify) of the same family as its latest connection, else that
    /// connection's address. An inbound connection's source address is not always where
    /// the peer listens (a node with several addresses, or loopback, where it is
    /// 127.0.0.1 whatever the peer's address).
    fn registry_ip(&self) -> Option<IpAddr> {
        let seen = self.ip?;
        Some(self.listen_socket().map_or(seen, |sa| sa.ip()))
    }

    /// Where its libp2p listener is: the listen address on the IP of its latest connection
    /// if it has one, else the first of that connection's family (never the other family:
    /// a probe of an IPv6 address from an IPv4-only network fails whatever the peer's state).
    fn listen_socket(&self) -> Option<SocketAddr> {
        let seen = self.ip?;
        let mut same_family = self
            .addrs
            .iter()
            .filter_map(socket_of)
            .filter(|sa| sa.is_ipv4() == seen.is_ipv4());
        let first = same_family.next()?;
        Some(
            std::iter::once(first)
                .chain(same_family)
                .find(|sa| sa.ip() == seen)
                .unwrap_or(first),
        )
    }

    /// Whether a dial to it or a probe of it failed within [`UNREACHABLE_FOR`] (and it has
    /// not connected since: an open connection proves it is there).
    fn is_unreachable(&self) -> bool {
        self.connections == 0
            && self
                .unreachable_at
                .is_some_and(|at| at.elapsed() < UNREACHABLE_FOR)
    }
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    resolved_tx: mpsc::Sender<Vec<SocketAddr>>,
    resolved_rx: mpsc::Receiver<Vec<SocketAddr>>,
    /// Results of liveness probes: the peer, and whether its listener answered.
    probed_tx: mpsc::Sender<(PeerId, Probe, std::time::Instant)>,
    probed_rx: mpsc::Receiver<(PeerId, Probe, std::time::Instant)>,
    lookups: HashMap<QueryId, mpsc::Sender<Peer>>,
    /// Where peers reach this node's registry, for [`crate::P2pRouter::registry_addrs`].
    registry_addrs: watch::Sender<Vec<SocketAddr>>,
    /// When [`EventLoop::bootstrap`] last ran.
    last_bootstrap: Option<std::time::Instant>,
    /// Announcements to the nodes closest to each key, queued and running.
    announcements: Announcements<QueryId>,
    /// Withdrawals waiting for their requests to peers to finish, with whom to tell.
    withdrawals: Vec<(
        HashSet<libp2p::request_response::OutboundRequestId>,
        oneshot::Sender<()>,
    )>,
    peers: HashMap<PeerId, PeerState>,
    /// The keys this node provides, with when each is due to be announced again (`None`
    /// while its announcement is queued or running).
    advertised: HashMap<String, Option<std::time::Instant>>,
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
        registry_addrs: watch::Sender<Vec<SocketAddr>>,
        config: P2pConfig,
        metrics: P2pMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        let (resolved_tx, resolved_rx) = mpsc::channel(4);
        let (probed_tx, probed_rx) = mpsc::channel(64);
        let mut own = HashSet::new();
        if !config.listen.ip().is_unspecified() {
            own.insert(config.listen);
        }
        Self {
            swarm,
            commands,
            resolved_tx,
            resolved_rx,
            probed_tx,
            probed_rx,
            lookups: HashMap::new(),
            registry_addrs,
            last_bootstrap: None,
            announcements: Announcements::new(),
            withdrawals: Vec::new(),
            peers: HashMap::new(),
            advertised: HashMap::new(),
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
                Some((peer, probe, started)) = self.probed_rx.recv() => self.probed(peer, probe, started),
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
                    .registry_ip()
                    .zip(p.http_port)
                    .map(|(ip, port)| SocketAddr::new(ip, port)),
                address: p.remote.as_ref().map(ToString::to_string),
                state: if p.connections > 0 {
                    LinkState::Connected
                } else if p.is_unreachable() {
                    LinkState::Unreachable
                } else {
                    LinkState::Idle
                },
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

    /// Connected peers that identified as mirrorlet agents (they told their registry port).
    fn members_connected(&self) -> usize {
        self.peers
            .values()
            .filter(|p| p.connections > 0 && p.ip.is_some() && p.http_port.is_some())
            .count()
    }

    /// Connects to `peer`'s listener at `addr` and closes at once (in the background; the
    /// answer comes back to [`EventLoop::probed`]).
    pub(super) fn probe(&self, peer: PeerId, addr: SocketAddr) {
        let tx = self.probed_tx.clone();
        let started = std::time::Instant::now();
        tokio::spawn(async move {
            let probe =
                match tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr))
                    .await
                {
                    Ok(Ok(_)) => Probe::Up,
                    Ok(Err(_)) => Probe::Refused,
                    Err(_) => Probe::Silent,
                };
            let _ = tx.send((peer, probe, started)).await;
        });
    }

    /// A probe's answer: a peer whose listener did not answer, and that has not connected
    /// since the probe started, is unreachable; one that refused, or stayed silent twice in
    /// a row, is gone, and the records it left here are dropped (nobody should be sent to
    /// it; if it comes back it announces them again).
    fn probed(&mut self, peer: PeerId, probe: Probe, started: std::time::Instant) {
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        // Connected now, or closed again after the probe began (so it connected since).
        if probe == Probe::Up || state.idle_since.is_none_or(|closed| closed > started) {
            state.silent_probes = 0;
            return;
        }
        let gone = match probe {
            Probe::Silent => {
                state.silent_probes = state.silent_probes.saturating_add(1);
                state.silent_probes >= 2
            }
            _ => true,
        };
        self.mark_unreachable(peer, "its listener did not take a probe");
        if !gone {
            return;
        }
        let dropped = self
            .swarm
            .behaviour_mut()
            .kad
            .store_mut()
            .forget_provider(&peer);
        if dropped > 0 {
            tracing::info!(%peer, records = dropped, "dropped the provider records of a peer that is gone");
        }
    }

    /// Probes a few of the providers whose records this node stores and that it has no
    /// connection to (see [`PROVIDER_CHECKS_PER_ROUND`]).
    fn check_providers(&mut self) {
        let now = std::time::Instant::now();
        let mut due: Vec<(PeerId, SocketAddr)> = Vec::new();
        let mut seen: HashSet<PeerId> = HashSet::new();
        for record in self
            .swarm
            .behaviour_mut()
            .kad
            .store_mut()
            .remote_providers()
        {
            if due.len() >= PROVIDER_CHECKS_PER_ROUND {
                break;
            }
            if !seen.insert(record.provider) {
                continue;
            }
            let state = self.peers.get(&record.provider);
            let idle = state.is_none_or(|s| s.connections == 0);
            let checked = state
                .and_then(|s| s.checked_at)
                .is_some_and(|at| at.elapsed() < self.config.provider_check);
            if !idle || checked {
                continue;
            }
            let addr = state
                .and_then(PeerState::listen_socket)
                .or_else(|| record.addresses.iter().find_map(socket_of));
            if let Some(addr) = addr {
                due.push((record.provider, addr));
            }
        }
        for (peer, addr) in due {
            let state = self.peers.entry(peer).or_default();
            state.checked_at = Some(now);
            // A probe's answer counts only if it did not connect since (see `probed`).
            state.idle_since.get_or_insert(now);
            self.probe(peer, addr);
        }
    }

    /// Leaves `peer` out of lookups and rankings for [`UNREACHABLE_FOR`].
    pub(super) fn mark_unreachable(&mut self, peer: PeerId, why: &str) {
        let now = std::time::Instant::now();
        let state = self.peers.entry(peer).or_default();
        if state.connections > 0 {
            return; // an open connection proves it is there
        }
        // A peer never connected is forgotten like one that was (see `housekeeping`).
        state.idle_since.get_or_insert(now);
        if state
            .unreachable_at
            .is_none_or(|at| at.elapsed() >= UNREACHABLE_FOR)
        {
            tracing::info!(%peer, why, "peer unreachable; left out of lookups for {}s", UNREACHABLE_FOR.as_secs());
        }
        state.unreachable_at = Some(now);
        self.metrics.peers_unreachable.inc();
    }

    /// Whether `peer` is left out of lookups and rankings ([`PeerState::is_unreachable`]).
    pub(super) fn is_unreachable(&self, peer: &PeerId) -> bool {
        self.peers.get(peer).is_some_and(PeerState::is_unreachable)
    }

    fn routing_table_len(&mut self) -> usize {
        self.swarm
            .behaviour_mut()
            .kad
            .kbuckets()
            .map(|b| b.num_entries())
            .sum()
    }

    /// Runs every `rebootstrap`: when the node has no connection (idle ones close), dials
    /// its bootstrap peers and checks its routing table with a Kademlia bootstrap, so a node
    /// whose peers all restarted finds them again; drops abandoned lookups and old
    /// rankings; refreshes gauges.
    pub(super) fn housekeeping(&mut self) {
        // Knowing nobody: at once. Connected to nobody (idle connections close, so that is
        // normal at rest): at most every IDLE_REBOOTSTRAPS rounds, to find peers that all
        // restarted elsewhere without a cluster-wide stream of bootstraps.
        let due = self
            .last_bootstrap
            .is_none_or(|at| at.elapsed() >= self.config.rebootstrap * IDLE_REBOOTSTRAPS);
        if self.connected_peers() == 0 && (self.routing_table_len() == 0 || due) {
            self.last_bootstrap = Some(std::time::Instant::now());
            self.bootstrap();
            if self.routing_table_len() > 0 {
                let _ = self.swarm.behaviour_mut().kad.bootstrap();
            }
        } else if self.connected_peers() > 0 {
            self.heal_routing_table();
        }
        self.check_providers();
        self.republish_due();
        let abandoned: Vec<QueryId> = self
            .lookups
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in abandoned {
            self.finish_lookup(id);
        }
        // Peers not seen for longer than a record lives cannot be named by any record:
        // forget them.
        let ttl = self.config.provider_ttl;
        self.peers
            .retain(|_, p| p.idle_since.is_none_or(|at| at.elapsed() < ttl));
        self.refresh_gauges();
    }

    pub(super) fn refresh_gauges(&mut self) {
        let members = self.members_connected();
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
        let table = self.routing_table_len();
        self.metrics
            .routing_table_peers
            .set(i64::try_from(table).unwrap_or(i64::MAX));
    }

    /// Dials the static bootstrap peers and resolves the DNS name (in the background, then
    /// [`EventLoop::dial_addrs`]). Called when the node knows no peer, and once a minute
    /// when it is connected to none; otherwise Kademlia's own periodic bootstrap refreshes
    /// the routing table.
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
        let mut candidates: Vec<SocketAddr> = addrs
            .into_iter()
            .filter(|sa| {
                // Peers share the port, so an address is ours if its IP is; and an IP we
                // are connected to is a peer we already know.
                let own_ip = self.own.iter().any(|o| o.ip() == sa.ip());
                !(self.own.contains(sa)
                    || (own_ip && sa.port() == self.config.listen.port())
                    || connected.contains(&sa.ip()))
            })
            .collect();
        // A few, chosen at random (every node dialling the same first addresses of a large
        // cluster would make those the hubs of the network); Kademlia finds the rest.
        let order = std::collections::hash_map::RandomState::new();
        candidates.sort_by_key(|sa| std::hash::BuildHasher::hash_one(&order, sa));
        candidates.truncate(BOOTSTRAP_DIALS);
        for sa in candidates {
            let addr = socket_to_multiaddr(sa);
            if let Err(e) = self.swarm.dial(addr.clone()) {
                tracing::debug!(%addr, error = %e, "dial of a DNS bootstrap address failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_is_reached_where_it_listens_not_where_its_connection_came_from() {
        let listening: Multiaddr = "/ip4/127.1.0.5/tcp/4001".parse().expect("addr");
        let v6: Multiaddr = "/ip6/fd00::5/tcp/4001".parse().expect("addr");
        let mut p = PeerState {
            ip: Some("127.0.0.1".parse().expect("ip")),
            addrs: vec![v6, listening],
            ..PeerState::default()
        };
        assert_eq!(p.registry_ip(), Some("127.1.0.5".parse().expect("ip")));
        // Of several in the family, the one the connection came from.
        let mut multi = p.clone();
        multi.ip = Some("10.0.0.7".parse().expect("ip"));
        multi.addrs = ["/ip4/172.17.0.1/tcp/4001", "/ip4/10.0.0.7/tcp/4001"]
            .iter()
            .map(|a| a.parse().expect("addr"))
            .collect();
        assert_eq!(multi.registry_ip(), multi.ip);
        assert_eq!(
            p.listen_socket(),
            Some("127.1.0.5:4001".parse().expect("socket"))
        );
        // Nothing announced in the connection's family: the connection's address.
        p.addrs.truncate(1);
        assert_eq!(p.registry_ip(), Some("127.0.0.1".parse().expect("ip")));
        p.ip = None;
        assert_eq!(p.registry_ip(), None);
    }
}

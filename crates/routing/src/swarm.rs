//! The task that owns the libp2p swarm. Everyone else talks to it through [`Command`]s on
//! a bounded channel and gets answers on oneshots (or, for lookups, a bounded stream).
//! Pending lookups live in a map keyed by query id. The loop never panics: a closed
//! channel is just a finished conversation.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};

use futures_util::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{self, GetProvidersOk, ProviderRecord, QueryId, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, identify, request_response};
use mirrorlet_oci::{Peer, RouterError, RouterStatus};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::behaviour::{
    Behaviour, BehaviourEvent, KAD_PROTOCOL, WITHDRAW_BATCH, WithdrawRequest, WithdrawResponse,
    http_port_of,
};
use crate::config::P2pConfig;
use crate::metrics::P2pMetrics;

/// Announcement queries (to the nodes closest to a key) run at once. Starting thousands
/// together overwhelms the peers' stream limits and drops announcements; Kademlia's own
/// republication is paced the same way.
const ANNOUNCE_IN_FLIGHT: usize = 64;

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
}

#[derive(Debug, Default)]
struct PeerState {
    /// The address peers reach it at (from the connection or identify).
    ip: Option<IpAddr>,
    /// Its registry port (from identify).
    http_port: Option<u16>,
    /// Open connections.
    connections: u32,
    /// All its connections closed: left out of lookups until it reconnects.
    disconnected: bool,
    /// Addresses it listens on (dialled, or from identify), to restore it in the routing table.
    addrs: Vec<Multiaddr>,
}

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    commands: mpsc::Receiver<Command>,
    resolved_tx: mpsc::Sender<Vec<SocketAddr>>,
    resolved_rx: mpsc::Receiver<Vec<SocketAddr>>,
    lookups: HashMap<QueryId, mpsc::Sender<Peer>>,
    /// Keys advertised but not yet announced to the nodes closest to them.
    to_announce: VecDeque<String>,
    /// Announcement queries running.
    announcing: HashSet<QueryId>,
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
            to_announce: VecDeque::new(),
            announcing: HashSet::new(),
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

    /// Starts announcements from the queue while fewer than [`ANNOUNCE_IN_FLIGHT`] run.
    fn announce_more(&mut self) {
        while self.announcing.len() < ANNOUNCE_IN_FLIGHT {
            let Some(key) = self.to_announce.pop_front() else {
                return;
            };
            if !self.advertised.contains(&key) {
                continue; // withdrawn while queued
            }
            match self
                .swarm
                .behaviour_mut()
                .kad
                .start_providing(RecordKey::new(&key))
            {
                Ok(id) => {
                    self.announcing.insert(id);
                }
                Err(e) => tracing::warn!(%key, error = ?e, "announcing a key failed"),
            }
        }
    }

    /// Re-adds every connected peer's known addresses to the routing table.
    fn heal_routing_table(&mut self) {
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

    fn connected_peers(&self) -> usize {
        self.peers.values().filter(|p| p.connections > 0).count()
    }

    /// Runs every `rebootstrap`: re-bootstraps when alone, drops abandoned lookups,
    /// refreshes gauges.
    fn housekeeping(&mut self) {
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
        self.refresh_gauges();
    }

    fn refresh_gauges(&mut self) {
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

    /// Dials the static bootstrap peers, resolves the DNS name (in the background), and
    /// refreshes the routing table if it has entries.
    fn bootstrap(&mut self) {
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
        if self.connected_peers() > 0 {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
    }

    fn is_own(&self, addr: &Multiaddr) -> bool {
        socket_of(addr).is_some_and(|sa| self.own.contains(&sa))
    }

    fn dial_addrs(&mut self, addrs: Vec<SocketAddr>) {
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

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Advertise { keys, reply } => {
                // The record goes into the local store at once (so peers asking this node
                // find it, and Kademlia republishes it); the announcements to the nodes
                // closest to each key are paced (see ANNOUNCE_IN_FLIGHT).
                let local = *self.swarm.local_peer_id();
                let mut failed = 0usize;
                let mut first_error = None;
                for key in keys {
                    let record = ProviderRecord::new(RecordKey::new(&key), local, Vec::new());
                    match self
                        .swarm
                        .behaviour_mut()
                        .kad
                        .store_mut()
                        .add_provider(record)
                    {
                        Ok(()) => {
                            if self.advertised.insert(key.clone()) {
                                self.to_announce.push_back(key);
                            }
                        }
                        Err(e) => {
                            failed += 1;
                            first_error.get_or_insert_with(|| format!("{key}: {e:?}"));
                        }
                    }
                }
                self.announce_more();
                self.metrics
                    .advertised_keys
                    .set(i64::try_from(self.advertised.len()).unwrap_or(i64::MAX));
                let result = match first_error {
                    None => Ok(()),
                    Some(e) => Err(RouterError::Advertise(format!(
                        "{failed} keys not advertised (record store full?), first: {e}"
                    ))),
                };
                let _ = reply.send(result);
            }
            Command::Withdraw { keys, reply } => {
                for key in &keys {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .stop_providing(&RecordKey::new(key));
                    self.advertised.remove(key);
                }
                let connected: Vec<PeerId> = self
                    .peers
                    .iter()
                    .filter(|(_, p)| p.connections > 0)
                    .map(|(id, _)| *id)
                    .collect();
                for batch in keys.chunks(WITHDRAW_BATCH) {
                    for peer in &connected {
                        let req = WithdrawRequest {
                            keys: batch.to_vec(),
                        };
                        self.swarm.behaviour_mut().withdraw.send_request(peer, req);
                    }
                }
                self.metrics
                    .advertised_keys
                    .set(i64::try_from(self.advertised.len()).unwrap_or(i64::MAX));
                let _ = reply.send(());
            }
            Command::Lookup { key, tx } => {
                let id = self
                    .swarm
                    .behaviour_mut()
                    .kad
                    .get_providers(RecordKey::new(&key));
                self.lookups.insert(id, tx);
            }
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.swarm.listeners().cloned().collect());
            }
            Command::Status { reply } => {
                let _ = reply.send(RouterStatus {
                    connected_peers: self.connected_peers(),
                    advertised_keys: self.advertised.len(),
                });
            }
        }
    }

    fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "p2p listening");
                if let Some(sa) = socket_of(&address) {
                    self.own.insert(sa);
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                ..
            } => {
                let remote = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => address,
                    ConnectedPoint::Listener { send_back_addr, .. } => send_back_addr,
                };
                let state = self.peers.entry(peer_id).or_default();
                state.connections = num_established.get();
                state.disconnected = false;
                if let Some(ip) = ip_of(remote) {
                    state.ip = Some(ip);
                }
                if let ConnectedPoint::Dialer { address, .. } = &endpoint
                    && !state.addrs.contains(address)
                {
                    state.addrs.push(address.clone());
                }
                if num_established.get() == 1 {
                    tracing::info!(peer = %peer_id, addr = %remote, "peer connected");
                    if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, address.clone());
                    }
                }
                self.refresh_gauges();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                let state = self.peers.entry(peer_id).or_default();
                state.connections = 0;
                state.disconnected = true;
                tracing::info!(peer = %peer_id, cause = ?cause.map(|c| c.to_string()), "peer disconnected");
                self.refresh_gauges();
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, %error, "dial failed");
            }
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if !info.protocols.contains(&KAD_PROTOCOL) {
                    tracing::debug!(peer = %peer_id, agent = %info.agent_version, "peer does not speak mirrorlet's DHT");
                    return;
                }
                let state = self.peers.entry(peer_id).or_default();
                state.http_port = http_port_of(&info.agent_version);
                // Loopback addresses are only useful when the peer is on this host too.
                let local_peer = state.ip.is_some_and(|ip| ip.is_loopback());
                for addr in info.listen_addrs {
                    if ip_of(&addr)
                        .is_some_and(|ip| !ip.is_unspecified() && (local_peer || !ip.is_loopback()))
                    {
                        // Kademlia does not learn inbound peers' listen addresses by itself.
                        self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                ..
            })) => {
                match result {
                    QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders {
                        providers,
                        ..
                    })) => {
                        self.forward(id, providers);
                    }
                    QueryResult::GetProviders(Ok(
                        GetProvidersOk::FinishedWithNoAdditionalRecord { closest_peers },
                    )) => {
                        self.lookups.remove(&id);
                        if closest_peers.is_empty() && self.connected_peers() > 0 {
                            // Connected, yet nobody to ask: Kademlia dropped peers from its
                            // table (it does under load). Put them back.
                            self.heal_routing_table();
                        }
                    }
                    QueryResult::GetProviders(Err(_)) => {
                        self.lookups.remove(&id);
                    }
                    QueryResult::StartProviding(result) => {
                        if let Err(e) = result {
                            tracing::debug!(error = ?e, "announcing a key did not reach enough peers");
                        }
                        if self.announcing.remove(&id) {
                            self.announce_more();
                        }
                    }
                    _ => {}
                }
                if step.last {
                    self.lookups.remove(&id);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Withdraw(request_response::Event::Message {
                peer,
                message:
                    request_response::Message::Request {
                        request, channel, ..
                    },
                ..
            })) => {
                let store = self.swarm.behaviour_mut().kad.store_mut();
                let mut removed = 0;
                for key in &request.keys {
                    let key = RecordKey::new(key);
                    let before = store.providers(&key).len();
                    store.remove_provider(&key, &peer);
                    if store.providers(&key).len() < before {
                        removed += 1;
                    }
                }
                self.metrics.withdrawals_received.inc_by(removed as u64);
                tracing::debug!(%peer, keys = request.keys.len(), removed, "peer withdrew keys");
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .withdraw
                    .send_response(channel, WithdrawResponse { removed });
            }
            _ => {}
        }
    }

    /// Sends found providers to the lookup's stream, skipping this node and peers whose
    /// connections dropped. Finishes the query when the consumer is gone or has enough.
    fn forward(&mut self, id: QueryId, providers: HashSet<PeerId>) {
        let local = *self.swarm.local_peer_id();
        let mut found = Vec::new();
        for p in providers {
            if p == local {
                continue;
            }
            if self.peers.get(&p).is_some_and(|s| s.disconnected) {
                self.metrics.providers_skipped_disconnected.inc();
                continue;
            }
            if let Some(addr) = self.http_addr(&p) {
                found.push(Peer {
                    id: p.to_string(),
                    addr,
                });
            }
        }
        let Some(tx) = self.lookups.get(&id) else {
            return;
        };
        let mut done = false;
        for peer in found {
            if tx.try_send(peer).is_err() {
                done = true;
                break;
            }
        }
        if done {
            self.finish_lookup(id);
        }
    }

    fn finish_lookup(&mut self, id: QueryId) {
        self.lookups.remove(&id);
        if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
            q.finish();
        }
    }

    /// Where a peer's registry listens: its address from the connection, identify or the
    /// routing table, and the port it announced (else the same port as ours).
    fn http_addr(&mut self, peer: &PeerId) -> Option<SocketAddr> {
        let state = self.peers.get(peer);
        let port = state
            .and_then(|s| s.http_port)
            .unwrap_or(self.config.http_port);
        if let Some(ip) = state.and_then(|s| s.ip) {
            return Some(SocketAddr::new(ip, port));
        }
        let bucket = self.swarm.behaviour_mut().kad.kbucket(*peer)?;
        let ip = bucket
            .iter()
            .find(|e| e.node.key.preimage() == peer)
            .and_then(|e| e.node.value.iter().find_map(ip_of))?;
        Some(SocketAddr::new(ip, port))
    }
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

fn socket_of(addr: &Multiaddr) -> Option<SocketAddr> {
    let ip = ip_of(addr)?;
    let port = addr.iter().find_map(|p| match p {
        Protocol::Tcp(port) => Some(port),
        _ => None,
    })?;
    Some(SocketAddr::new(ip, port))
}

/// `/ip4/<ip>/tcp/<port>` (or ip6).
pub fn socket_to_multiaddr(sa: SocketAddr) -> Multiaddr {
    let ip = match sa.ip() {
        IpAddr::V4(v4) => Protocol::Ip4(v4),
        IpAddr::V6(v6) => Protocol::Ip6(v6),
    };
    Multiaddr::empty().with(ip).with(Protocol::Tcp(sa.port()))
}

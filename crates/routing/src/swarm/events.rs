//! Swarm events: connections, identify, query progress and withdrawals from peers.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};

use libp2p::core::ConnectedPoint;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{self, GetProvidersOk, QueryId, QueryResult, RecordKey};
use libp2p::swarm::SwarmEvent;
use libp2p::{PeerId, identify, request_response};
use mirrorlet_oci::Peer;

use super::addr::{ip_of, socket_of};
use super::pacing::Ended;
use super::{EventLoop, PeerState};
use crate::behaviour::{BehaviourEvent, KAD_PROTOCOL, WithdrawResponse, http_port_of};

impl EventLoop {
    /// Records where a peer listens and puts it in the routing table (kept so that
    /// [`EventLoop::heal_routing_table`] can restore it).
    fn learn_address(&mut self, peer: PeerId, addr: libp2p::Multiaddr) {
        let state = self.peers.entry(peer).or_default();
        if !state.addrs.contains(&addr) {
            state.addrs.push(addr.clone());
        }
        self.swarm.behaviour_mut().kad.add_address(&peer, addr);
    }

    pub(super) fn on_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "p2p listening");
                if let Some(sa) = socket_of(&address) {
                    self.own.insert(sa);
                }
                if self.is_reachable_listen_addr(&address) {
                    // Announcements carry this node's external addresses: with them, a
                    // node that holds the record can pass this node on to anyone asking,
                    // whether or not this node is in its own routing table.
                    self.swarm.add_external_address(address);
                    self.registry_addrs.send_replace(self.registry_addrs());
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.swarm.remove_external_address(&address);
                self.registry_addrs.send_replace(self.registry_addrs());
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
                let new = !self.peers.contains_key(&peer_id);
                let state = self.peers.entry(peer_id).or_default();
                state.connections = num_established.get();
                state.idle_since = None;
                if state.unreachable_at.take().is_some() {
                    tracing::info!(peer = %peer_id, addr = %remote, "peer reachable again");
                }
                if let Some(ip) = ip_of(remote) {
                    state.ip = Some(ip);
                }
                state.remote = Some(remote.clone());
                // Connections open and close as they are needed (idle ones close): only a
                // peer met for the first time is news.
                if new {
                    tracing::info!(peer = %peer_id, addr = %remote, "new peer");
                } else if num_established.get() == 1 {
                    tracing::debug!(peer = %peer_id, addr = %remote, "peer connected");
                }
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.learn_address(peer_id, address.clone());
                }
                self.refresh_gauges();
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                let now = std::time::Instant::now();
                let state = self.peers.entry(peer_id).or_default();
                state.connections = 0;
                state.idle_since = Some(now);
                tracing::debug!(peer = %peer_id, cause = ?cause.as_ref().map(ToString::to_string), "peer connection closed");
                // Closed by the other side or broken: the peer may have died, or closed a
                // connection it had no use for (the two look the same here). Probe its
                // listener with a bare TCP connect: refused means gone.
                if matches!(cause, Some(libp2p::swarm::ConnectionError::IO(_)))
                    && state
                        .checked_at
                        .is_none_or(|at| at.elapsed() >= super::LIVENESS_CHECK_EVERY)
                    && let Some(sa) = state.listen_socket()
                {
                    state.checked_at = Some(now);
                    self.probe(peer_id, sa);
                }
                self.refresh_gauges();
            }
            SwarmEvent::OutgoingConnectionError {
                peer_id: Some(peer),
                error: error @ libp2p::swarm::DialError::Transport(_),
                ..
            } => {
                tracing::debug!(%peer, %error, "dial failed");
                self.mark_unreachable(peer, "a dial to it failed");
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
                // Loopback addresses are only useful when the peer is on this host too, and
                // IPv6 link-local ones never (they need the peer's interface).
                let local_peer = state.ip.is_some_and(|ip| ip.is_loopback());
                // What it says now replaces what it said before: a restarted agent keeps
                // its peer id but may have a new address.
                state.addrs.clear();
                for addr in info.listen_addrs {
                    if ip_of(&addr).is_some_and(|ip| {
                        !ip.is_unspecified()
                            && (local_peer || !ip.is_loopback())
                            && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
                    }) {
                        // Kademlia does not learn inbound peers' listen addresses by itself.
                        self.learn_address(peer_id, addr);
                    }
                }
                // It is a member now that its registry port is known.
                self.refresh_gauges();
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
                        match self.announcements.ended(&id, result.is_ok()) {
                            None => {}
                            Some(Ended::Announced(key)) => self.announced(&key, true),
                            Some(Ended::Retrying) => {
                                self.metrics.announce_retries.inc();
                            }
                            Some(Ended::GaveUp(key)) => {
                                self.metrics.announce_failures.inc();
                                tracing::debug!(%key, "announcing a key failed repeatedly; it is tried again later");
                                self.announced(&key, false);
                            }
                        }
                        self.announce_more();
                    }
                    _ => {}
                }
                if step.last {
                    self.lookups.remove(&id);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Withdraw(request_response::Event::Message {
                message: request_response::Message::Response { request_id, .. },
                ..
            })) => self.withdrawal_done(request_id),
            SwarmEvent::Behaviour(BehaviourEvent::Withdraw(
                request_response::Event::OutboundFailure {
                    request_id,
                    peer,
                    error,
                    ..
                },
            )) => {
                tracing::debug!(%peer, %error, "a withdrawal did not reach a peer");
                self.withdrawal_done(request_id);
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

    /// Sends found providers to the lookup's stream, skipping this node and peers that could
    /// not be dialled lately. Finishes the query when the consumer is gone or has enough.
    pub(super) fn forward(&mut self, id: QueryId, providers: HashSet<PeerId>) {
        let local = *self.swarm.local_peer_id();
        let mut found = Vec::new();
        for p in providers {
            if p == local {
                continue;
            }
            if self.is_unreachable(&p) {
                self.metrics.providers_skipped_unreachable.inc();
                continue;
            }
            match self.http_addr(&p) {
                Some(addr) => found.push(Peer {
                    id: p.to_string(),
                    addr,
                }),
                None => {
                    self.metrics.providers_without_address.inc();
                }
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

    pub(super) fn finish_lookup(&mut self, id: QueryId) {
        self.lookups.remove(&id);
        if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
            q.finish();
        }
    }

    /// Where a peer's registry listens: its address from a connection or identify, else
    /// what Kademlia knows (the routing table, and the addresses that provider records and
    /// answers to running queries carried), and the port it announced (else the same port
    /// as ours: the chart gives every agent the same).
    pub(super) fn http_addr(&mut self, peer: &PeerId) -> Option<SocketAddr> {
        use libp2p::swarm::NetworkBehaviour as _;
        let state = self.peers.get(peer);
        let port = state
            .and_then(|s| s.http_port)
            .unwrap_or(self.config.http_port);
        if let Some(ip) = state.and_then(PeerState::registry_ip) {
            return Some(SocketAddr::new(ip, port));
        }
        // The addresses Kademlia would dial the peer at (asking it costs nothing: it only
        // reads the routing table and the queries).
        let known = self
            .swarm
            .behaviour_mut()
            .kad
            .handle_pending_outbound_connection(
                libp2p::swarm::ConnectionId::new_unchecked(0),
                Some(*peer),
                &[],
                libp2p::core::Endpoint::Dialer,
            )
            .unwrap_or_default();
        let ip = known.iter().find_map(ip_of)?;
        Some(SocketAddr::new(ip, port))
    }

    /// Whether peers can reach this node at `addr`, one of its listen addresses: not an
    /// unspecified or IPv6 link-local address, and not loopback unless this node listens
    /// on loopback only (tests, one host).
    pub(super) fn is_reachable_listen_addr(&self, addr: &libp2p::Multiaddr) -> bool {
        ip_of(addr).is_some_and(|ip| {
            !ip.is_unspecified()
                && (!ip.is_loopback() || self.config.listen.ip().is_loopback())
                && !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local())
        })
    }
}

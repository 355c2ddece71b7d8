//! The router's Prometheus metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Gauges and counters the router keeps current. Cheap to clone (shared handles).
#[derive(Debug, Clone, Default)]
pub struct P2pMetrics {
    /// Peers with at least one open connection.
    pub connected_peers: Gauge,
    /// Connected peers known to be agents with a registry (connections close when idle).
    pub members: Gauge,
    /// Keys this node advertises.
    pub advertised_keys: Gauge,
    /// Peers in the Kademlia routing table.
    pub routing_table_peers: Gauge,
    /// Provider records this node holds: its own, and those other nodes stored here.
    pub provider_records: Gauge,
    /// Provider entries removed because their peer withdrew them.
    pub withdrawals_received: Counter,
    /// Providers left out of lookups because a dial to them failed lately.
    pub providers_skipped_unreachable: Counter,
    /// Dials to known peers that failed (each marks the peer unreachable for a while).
    pub peers_unreachable: Counter,
    /// Providers found in the DHT but left out of lookups for want of an address.
    pub providers_without_address: Counter,
    /// Announcements that failed (timed out) and were queued again.
    pub announce_retries: Counter,
    /// Keys whose announcements failed every attempt (left to the next republication).
    pub announce_failures: Counter,
    /// Announcements queued or running (paced: see the router's pacing).
    pub announcements_pending: Gauge,
}

impl P2pMetrics {
    /// Creates the metrics and registers them under `mirrorlet_p2p_`.
    pub fn register(registry: &mut Registry) -> Self {
        let me = Self::default();
        registry.register(
            "mirrorlet_p2p_connected_peers",
            "Peers with an open connection",
            me.connected_peers.clone(),
        );
        registry.register(
            "mirrorlet_p2p_members",
            "Agents with an open connection (connections close when idle)",
            me.members.clone(),
        );
        registry.register(
            "mirrorlet_p2p_advertised_keys",
            "Digests and tags this node advertises",
            me.advertised_keys.clone(),
        );
        registry.register(
            "mirrorlet_p2p_routing_table_peers",
            "Peers in the Kademlia routing table",
            me.routing_table_peers.clone(),
        );
        registry.register(
            "mirrorlet_p2p_provider_records",
            "Provider records this node holds: its own, and those other nodes stored here",
            me.provider_records.clone(),
        );
        registry.register(
            "mirrorlet_p2p_withdrawals_received",
            "Provider entries removed because the provider withdrew them",
            me.withdrawals_received.clone(),
        );
        registry.register(
            "mirrorlet_p2p_providers_skipped_unreachable",
            "Providers left out of lookups because a dial to them failed lately",
            me.providers_skipped_unreachable.clone(),
        );
        registry.register(
            "mirrorlet_p2p_peers_unreachable",
            "Dials to known peers that failed (the peer is left out of lookups for a minute)",
            me.peers_unreachable.clone(),
        );
        registry.register(
            "mirrorlet_p2p_providers_without_address",
            "Providers found in the DHT but left out of lookups because no address for them was known",
            me.providers_without_address.clone(),
        );
        registry.register(
            "mirrorlet_p2p_announce_retries",
            "Announcements to the nodes closest to a key that timed out and were queued again",
            me.announce_retries.clone(),
        );
        registry.register(
            "mirrorlet_p2p_announcements_pending",
            "Announcements to the nodes closest to a key queued or running",
            me.announcements_pending.clone(),
        );
        registry.register(
            "mirrorlet_p2p_announce_failures",
            "Keys whose announcements timed out every attempt, left to the next republication",
            me.announce_failures.clone(),
        );
        me
    }
}

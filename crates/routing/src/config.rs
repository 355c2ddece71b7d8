//! Configuration of the peer-to-peer router, with the timing choices explained.

use std::net::SocketAddr;
use std::time::Duration;

use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;

/// Provider records live this long on the nodes that store them.
///
/// Records are republished every [`DEFAULT_REPUBLISH`], so a live node's records never
/// lapse (three republications fit in one TTL, so one lost round does no harm). The TTL
/// only bounds how long the DHT can name a node that vanished *without anyone noticing*;
/// in practice stale records matter little because (1) a node withdraws its keys on
/// graceful shutdown and when content is deleted, telling its peers to drop them at once;
/// (2) a peer whose connection breaks and whose listener then refuses a probe (or that a
/// dial fails to reach) is left out of lookups for a minute; and (3) a peer
/// that fails a transfer is skipped for a while by the registry. Spegel instead relies on
/// a 19-minute validity alone, so a dead node is offered to clients until it expires.
pub const DEFAULT_PROVIDER_TTL: Duration = Duration::from_secs(20 * 60);
/// How often this node re-announces everything it provides (see [`DEFAULT_PROVIDER_TTL`]).
pub const DEFAULT_REPUBLISH: Duration = Duration::from_secs(6 * 60);
/// Limit for one DHT query; lookups are usually answered in well under a millisecond
/// within a cluster, and callers stop waiting much earlier (the registry's idle timeout).
pub const DEFAULT_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Provider keys held in the record store (this node's and those other nodes stored
/// here). libp2p's default of 1,024 would silently cap a node with many layers.
pub const DEFAULT_MAX_KEYS: usize = 500_000;
/// How often a node that knows no peer bootstraps again (one that knows peers but is
/// connected to none, which is normal at rest: every sixth time).
pub const DEFAULT_REBOOTSTRAP: Duration = Duration::from_secs(10);
/// The providers whose records this node stores are probed, when it has no connection to
/// them, once this often each (a bare TCP connect: a SYN, an accept and a close at the
/// other end), so that a node that died without withdrawing is no longer handed out by the
/// nodes that store its records within about this long plus a housekeeping round, rather
/// than when its records expire ([`DEFAULT_PROVIDER_TTL`]). A node receives about one probe
/// a minute from each node that stores records of its.
pub const DEFAULT_PROVIDER_CHECK: Duration = Duration::from_secs(60);
/// How many of the nodes closest to a key store its provider records. Kademlia's 20 is
/// made for the public internet's churn; in a cluster, nodes come and go slowly, records
/// are republished every [`DEFAULT_REPUBLISH`], and a node found dead has its records
/// dropped, so 5 copies are plenty, and every announcement and lookup costs a quarter of
/// the messages. Measured with `make bench-scale` at 250 agents, everyone announcing at
/// once on two cores: with 20, 18% of keys found 15 s later, a new key found by every node
/// after 12 s, 417 records per node; with 5, 72%, 2.6 s and 120.
pub const DEFAULT_REPLICATION: usize = 5;
/// A connection with nothing to do closes after this long, so a node keeps open only the
/// connections it uses (its lookups, announcements and routing-table upkeep) rather than
/// one to every other node. Dialling again costs a millisecond or two within a cluster.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the router needs to start.
#[derive(Debug, Clone)]
pub struct P2pConfig {
    /// Address the libp2p TCP listener binds.
    pub listen: SocketAddr,
    /// The port of this node's registry, told to peers (via identify) so they can fetch.
    pub http_port: u16,
    /// This node's identity.
    pub keypair: Keypair,
    /// Private-network key: with one set, only nodes holding the same key can connect.
    pub psk: Option<PreSharedKey>,
    /// Peers to dial at start and whenever the node has no connections.
    pub bootstrap: Vec<Multiaddr>,
    /// A DNS name (and port) that resolves to peers' addresses, e.g. a headless Service.
    pub bootstrap_dns: Option<(String, u16)>,
    /// See [`DEFAULT_PROVIDER_TTL`].
    pub provider_ttl: Duration,
    /// See [`DEFAULT_REPUBLISH`].
    pub republish: Duration,
    /// See [`DEFAULT_QUERY_TIMEOUT`].
    pub query_timeout: Duration,
    /// See [`DEFAULT_MAX_KEYS`].
    pub max_keys: usize,
    /// See [`DEFAULT_REBOOTSTRAP`].
    pub rebootstrap: Duration,
    /// See [`DEFAULT_IDLE_TIMEOUT`].
    pub idle_timeout: Duration,
    /// See [`DEFAULT_REPLICATION`].
    pub replication: std::num::NonZeroUsize,
    /// See [`DEFAULT_PROVIDER_CHECK`].
    pub provider_check: Duration,
}

impl P2pConfig {
    /// A configuration with the defaults above and no bootstrap peers.
    pub fn new(listen: SocketAddr, http_port: u16, keypair: Keypair) -> Self {
        Self {
            listen,
            http_port,
            keypair,
            psk: None,
            bootstrap: Vec::new(),
            bootstrap_dns: None,
            provider_ttl: DEFAULT_PROVIDER_TTL,
            republish: DEFAULT_REPUBLISH,
            query_timeout: DEFAULT_QUERY_TIMEOUT,
            max_keys: DEFAULT_MAX_KEYS,
            rebootstrap: DEFAULT_REBOOTSTRAP,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            replication: std::num::NonZeroUsize::new(DEFAULT_REPLICATION)
                .unwrap_or(std::num::NonZeroUsize::MIN),
            provider_check: DEFAULT_PROVIDER_CHECK,
        }
    }
}

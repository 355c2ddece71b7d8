//! The router interface: how a node announces what it can serve and finds peers that can
//! serve what it lacks. The libp2p Kademlia implementation lives in `mirrorlet-routing`.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};

/// A peer that can serve content: its identity and its registry's address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Peer {
    /// The peer's identity (a libp2p peer id).
    pub id: String,
    /// Where its registry listens.
    pub addr: SocketAddr,
}

/// Why a router operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The router's task has stopped (shutdown or failure).
    #[error("the router has stopped")]
    Stopped,
    /// Some keys could not be announced (e.g. the local record store is full); the others were.
    #[error("{} keys not advertised: {reason}", failed.len())]
    Advertise {
        /// The keys that were not advertised.
        failed: Vec<String>,
        /// Why.
        reason: String,
    },
}

/// What the router knows about the network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouterStatus {
    /// Peers currently connected.
    pub connected_peers: usize,
    /// Keys this node advertises.
    pub advertised_keys: usize,
    /// Where this node listens for peers (transport addresses).
    pub listen: Vec<String>,
    /// The agents this node knows: connected, idle (connections close when unused) or
    /// unreachable, until records naming them would have expired. Sorted by id.
    pub peers: Vec<PeerLink>,
}

/// Another agent, as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerLink {
    /// Its identity.
    pub id: String,
    /// Where its registry listens, once known.
    pub registry: Option<SocketAddr>,
    /// The transport address of a connection to it (or where it was last reached).
    pub address: Option<String>,
    /// Its connection's state.
    pub state: LinkState,
}

/// The state of the connection to another agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// A connection is open.
    Connected,
    /// No connection is open (connections close when idle); nothing says it is gone.
    Idle,
    /// A dial to it failed lately: it is left out of lookups for a while.
    Unreachable,
}

impl LinkState {
    /// `connected`, `idle` or `unreachable`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Idle => "idle",
            Self::Unreachable => "unreachable",
        }
    }
}

/// Content routing between nodes. Keys are digests (`sha256:...`) and tags
/// (`registry/repo:tag`).
#[async_trait::async_trait]
pub trait Router: Send + Sync + 'static {
    /// Whether the router is running and can answer lookups (a node with no peers is
    /// ready: its lookups simply find nothing).
    async fn ready(&self) -> bool;

    /// Announces that this node can serve `keys`.
    async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError>;

    /// Stops announcing `keys`, and tells peers to forget this node for them.
    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError>;

    /// Peers that can serve `key`, yielded as they are found, never this node. The stream
    /// ends when the search is exhausted; dropping it stops the search.
    fn lookup(&self, key: &str) -> BoxStream<'static, Peer>;

    /// Connected peers and advertised keys.
    async fn status(&self) -> Result<RouterStatus, RouterError>;

    /// This node's identity, as its peers know it.
    fn local_id(&self) -> String;

    /// The nodes that fetch `key` for the whole cluster, best first, as far as this node
    /// knows: the owner, then its backups; this node is in the list at its rank, so the
    /// owners ahead of it are the ones to ask before fetching itself. Answered from what
    /// the node knows, without asking the network. Nodes that know every other rank the
    /// same order; in a large cluster views differ, and a node asked as the owner that
    /// knows a better one sends the asker on to it (the registry's `cluster` module).
    async fn owners(&self, key: &str) -> Result<Vec<Owner>, RouterError>;

    /// Where other agents reach this node's registry, as far as this node knows (empty
    /// when it does not know yet). An agent that streams a blob to others names them with
    /// these addresses when it is too busy to take more.
    fn registry_addrs(&self) -> Vec<SocketAddr>;
}

/// A node ranked by [`Router::owners`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This node.
    Me,
    /// Another agent, with its registry address.
    Peer(Peer),
}

/// A shared in-memory "network" that [`MemoryRouter`]s announce into, for tests.
#[derive(Debug, Default)]
pub struct MemoryNetwork {
    providers: Mutex<HashMap<String, BTreeSet<Peer>>>,
    members: Mutex<BTreeSet<Peer>>,
}

/// A [`Router`] over a [`MemoryNetwork`].
#[derive(Debug, Clone)]
pub struct MemoryRouter {
    network: Arc<MemoryNetwork>,
    me: Peer,
    /// Members this node does not know of (a partial view, as in a large cluster).
    unknown: Arc<Mutex<BTreeSet<String>>>,
}

impl MemoryRouter {
    /// A router for the node `me` on `network` (which it joins as a member).
    pub fn new(network: Arc<MemoryNetwork>, me: Peer) -> Self {
        network
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(me.clone());
        Self {
            network,
            me,
            unknown: Arc::default(),
        }
    }

    /// This node no longer knows of the member `id` when it ranks owners (lookups still
    /// find it as a provider): a partial view of the network, as nodes of a large cluster
    /// have.
    pub fn forget(&self, id: &str) {
        self.unknown
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.to_owned());
    }

    /// Leaves the network, as a node whose connections dropped: it is no longer a member,
    /// and lookups no longer find it.
    pub fn leave(&self) {
        self.network
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.me);
        for set in self.providers().values_mut() {
            set.remove(&self.me);
        }
    }

    /// The other members of the network.
    fn members(&self) -> Vec<Peer> {
        self.network
            .members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|p| **p != self.me)
            .cloned()
            .collect()
    }

    fn providers(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeSet<Peer>>> {
        self.network
            .providers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait::async_trait]
impl Router for MemoryRouter {
    async fn ready(&self) -> bool {
        true
    }

    async fn advertise(&self, keys: Vec<String>) -> Result<(), RouterError> {
        let mut p = self.providers();
        for k in keys {
            p.entry(k).or_default().insert(self.me.clone());
        }
        Ok(())
    }

    async fn withdraw(&self, keys: Vec<String>) -> Result<(), RouterError> {
        let mut p = self.providers();
        for k in keys {
            if let Some(set) = p.get_mut(&k) {
                set.remove(&self.me);
            }
        }
        Ok(())
    }

    fn lookup(&self, key: &str) -> BoxStream<'static, Peer> {
        let found: Vec<Peer> = self
            .providers()
            .get(key)
            .map(|s| s.iter().filter(|p| **p != self.me).cloned().collect())
            .unwrap_or_default();
        stream::iter(found).boxed()
    }

    async fn status(&self) -> Result<RouterStatus, RouterError> {
        let members = self.members();
        let p = self.providers();
        let advertised = p.values().filter(|s| s.contains(&self.me)).count();
        let peers: BTreeSet<&Peer> = p.values().flatten().filter(|x| **x != self.me).collect();
        Ok(RouterStatus {
            connected_peers: peers.len(),
            advertised_keys: advertised,
            listen: vec![format!("memory:{}", self.me.addr)],
            peers: members
                .into_iter()
                .map(|p| PeerLink {
                    id: p.id,
                    registry: Some(p.addr),
                    address: Some(format!("memory:{}", p.addr)),
                    state: LinkState::Connected,
                })
                .collect(),
        })
    }

    fn local_id(&self) -> String {
        self.me.id.clone()
    }

    fn registry_addrs(&self) -> Vec<SocketAddr> {
        vec![self.me.addr]
    }

    /// Rendezvous hashing over the members this node knows of: the same order everywhere
    /// unless some were forgotten ([`MemoryRouter::forget`]).
    async fn owners(&self, key: &str) -> Result<Vec<Owner>, RouterError> {
        let unknown = self
            .unknown
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut all = vec![Owner::Me];
        all.extend(
            self.members()
                .into_iter()
                .filter(|p| !unknown.contains(&p.id))
                .map(Owner::Peer),
        );
        let me = self.me.id.clone();
        Ok(crate::rendezvous::rank(key, all, |o| match o {
            Owner::Me => me.clone(),
            Owner::Peer(p) => p.id.clone(),
        }))
    }
}

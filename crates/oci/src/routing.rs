//! The router interface: how a node announces what it can serve and finds peers that can
//! serve what it lacks. The libp2p Kademlia implementation lives in `mirrorlet-routing`.

use std::net::SocketAddr;

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

/// A router for a node alone: nothing to announce to and nobody to find, so every miss
/// goes to the node's next source (for an agent with peer-to-peer off).
#[derive(Debug, Clone)]
pub struct Alone {
    me: Peer,
}

impl Alone {
    /// The node `me`, alone.
    pub fn new(me: Peer) -> Self {
        Self { me }
    }
}

#[async_trait::async_trait]
impl Router for Alone {
    async fn ready(&self) -> bool {
        true
    }

    async fn advertise(&self, _keys: Vec<String>) -> Result<(), RouterError> {
        Ok(())
    }

    async fn withdraw(&self, _keys: Vec<String>) -> Result<(), RouterError> {
        Ok(())
    }

    fn lookup(&self, _key: &str) -> BoxStream<'static, Peer> {
        stream::empty().boxed()
    }

    async fn status(&self) -> Result<RouterStatus, RouterError> {
        Ok(RouterStatus::default())
    }

    fn local_id(&self) -> String {
        self.me.id.clone()
    }

    fn registry_addrs(&self) -> Vec<SocketAddr> {
        vec![self.me.addr]
    }

    async fn owners(&self, _key: &str) -> Result<Vec<Owner>, RouterError> {
        Ok(vec![Owner::Me])
    }
}

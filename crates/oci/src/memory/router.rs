//! [`MemoryRouter`]: the [`Router`] twin, over a network held in memory.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};

use crate::routing::{LinkState, Owner, Peer, PeerLink, Router, RouterError, RouterStatus};

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

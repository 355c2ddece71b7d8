//! Who fetches a key for the whole cluster: the agents whose ids are closest to the key in
//! the DHT's XOR metric (the same nodes that store the key's provider records), found with
//! an iterative `FIND_NODE` query, so every node agrees on the owner however few of the
//! other nodes it knows itself. Only peers that answered the query are ranked, so a dead
//! node drops out of the ranking by itself. Complete answers are kept for
//! [`OWNERS_FRESH`], and concurrent asks for one key share one query. When the query is
//! too slow the ranking comes from the routing table, which agrees less across nodes and
//! may name a node that died (the registry then skips it after one failed request).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::kad::{KBucketKey, PeerInfo, QueryId};
use mirrorlet_oci::{Owner, Peer};
use tokio::sync::oneshot;

use super::EventLoop;
use super::addr::ip_of;

/// How long a ranking is reused before the DHT is asked again.
pub(crate) const OWNERS_FRESH: Duration = Duration::from_secs(10);
/// Agents a ranking asks for: the owner and its backups, with room for some that fail. The
/// query ends once this many of the closest have answered, so a smaller number is a
/// shorter query than Kademlia's 20.
const OWNERS_RANKED: std::num::NonZeroUsize = std::num::NonZeroUsize::new(6).expect("non-zero");
/// Rankings kept (the least recently computed is dropped first).
const OWNERS_CACHED: usize = 4096;

/// `items` ordered by the XOR distance of their peer id to `key`, closest first: the order
/// in which the DHT ranks the owners of `key`.
pub fn closest_first<T>(key: &str, items: Vec<T>, id: impl Fn(&T) -> PeerId) -> Vec<T> {
    let target = KBucketKey::from(key.as_bytes().to_vec());
    let mut weighed: Vec<_> = items
        .into_iter()
        .map(|t| (KBucketKey::from(id(&t)).distance(&target), t))
        .collect();
    weighed.sort_by_key(|(distance, _)| *distance);
    weighed.into_iter().map(|(_, t)| t).collect()
}

/// Who waits for a ranking.
type Waiting = Vec<oneshot::Sender<Vec<Owner>>>;

/// Rankings computed and being computed.
#[derive(Default)]
pub(crate) struct OwnerQueries {
    running: HashMap<QueryId, (String, Waiting)>,
    by_key: HashMap<String, QueryId>,
    cache: HashMap<String, (Instant, Vec<Owner>)>,
}

impl OwnerQueries {
    /// Drops rankings older than [`OWNERS_FRESH`].
    pub(crate) fn expire(&mut self) {
        self.cache.retain(|_, (at, _)| at.elapsed() < OWNERS_FRESH);
    }
}

impl EventLoop {
    /// Answers from the cache, joins a running query for the key, or starts one.
    pub(super) fn rank_owners(&mut self, key: String, reply: oneshot::Sender<Vec<Owner>>) {
        if let Some((at, ranked)) = self.owner_queries.cache.get(&key)
            && at.elapsed() < OWNERS_FRESH
        {
            // Peers found unreachable since are left out.
            let ranked: Vec<Owner> = ranked
                .iter()
                .filter(|o| match o {
                    Owner::Me => true,
                    Owner::Peer(p) => !p
                        .id
                        .parse::<PeerId>()
                        .is_ok_and(|id| self.is_unreachable(&id)),
                })
                .cloned()
                .collect();
            let _ = reply.send(ranked);
            return;
        }
        let q = &mut self.owner_queries;
        if let Some(id) = q.by_key.get(&key)
            && let Some((_, waiting)) = q.running.get_mut(id)
        {
            waiting.push(reply);
            return;
        }
        let id = self
            .swarm
            .behaviour_mut()
            .kad
            .get_n_closest_peers(key.as_bytes().to_vec(), OWNERS_RANKED);
        let q = &mut self.owner_queries;
        q.by_key.insert(key.clone(), id);
        q.running.insert(id, (key, vec![reply]));
    }

    /// The ranking from this node's routing table alone, for when the DHT is too slow to
    /// answer: the nodes near the key know its neighbourhood exactly, the others nearly, so
    /// nodes still mostly agree (where "everyone fetches alone" would not agree at all).
    pub(super) fn rank_owners_locally(&mut self, key: &str) -> Vec<Owner> {
        self.metrics.owner_rankings_local.inc();
        let target = KBucketKey::from(key.as_bytes().to_vec());
        let near: Vec<PeerInfo> = self
            .swarm
            .behaviour_mut()
            .kad
            .get_closest_local_peers(&target)
            .take(OWNERS_RANKED.get())
            .map(|k| PeerInfo {
                peer_id: *k.preimage(),
                addrs: Vec::new(),
            })
            .collect();
        self.ranking(key, near)
    }

    /// This node and `peers` (those reachable, with a registry address), closest first.
    fn ranking(&mut self, key: &str, peers: Vec<PeerInfo>) -> Vec<Owner> {
        let mut candidates: Vec<(PeerId, Owner)> = vec![(*self.swarm.local_peer_id(), Owner::Me)];
        for info in peers {
            if self.is_unreachable(&info.peer_id) {
                continue;
            }
            let addr = self.http_addr(&info.peer_id).or_else(|| {
                let ip = info.addrs.iter().find_map(ip_of)?;
                Some(SocketAddr::new(ip, self.config.http_port))
            });
            if let Some(addr) = addr {
                let peer = Peer {
                    id: info.peer_id.to_string(),
                    addr,
                };
                candidates.push((info.peer_id, Owner::Peer(peer)));
            }
        }
        closest_first(key, candidates, |(id, _)| *id)
            .into_iter()
            .map(|(_, o)| o)
            .collect()
    }

    /// The query for a ranking ended with the peers that answered (`complete` false: it
    /// timed out). Only a complete ranking that names other agents is kept for reuse.
    pub(super) fn owners_found(&mut self, id: QueryId, peers: Vec<PeerInfo>, complete: bool) {
        let Some((key, waiting)) = self.owner_queries.running.remove(&id) else {
            return;
        };
        self.owner_queries.by_key.remove(&key);
        let keep = complete && !peers.is_empty();
        let ranked = self.ranking(&key, peers);
        for reply in waiting {
            let _ = reply.send(ranked.clone());
        }
        if !keep {
            return;
        }
        self.owner_queries.expire();
        let cache = &mut self.owner_queries.cache;
        if cache.len() >= OWNERS_CACHED
            && let Some(oldest) = cache
                .iter()
                .min_by_key(|(_, (at, _))| *at)
                .map(|(k, _)| k.clone())
        {
            cache.remove(&oldest);
        }
        cache.insert(key, (Instant::now(), ranked));
    }
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;

    use super::*;

    #[test]
    fn the_order_is_the_same_whatever_the_input_order_and_differs_between_keys() {
        let ids: Vec<PeerId> = (0..20)
            .map(|_| Keypair::generate_ed25519().public().to_peer_id())
            .collect();
        let mut reversed = ids.clone();
        reversed.reverse();
        let a = closest_first("sha256:aa", ids.clone(), |p| *p);
        assert_eq!(a, closest_first("sha256:aa", reversed, |p| *p));
        let firsts: std::collections::HashSet<PeerId> = (0..50)
            .map(|i| closest_first(&format!("sha256:{i}"), ids.clone(), |p| *p)[0])
            .collect();
        assert!(
            firsts.len() > 5,
            "owners spread over the nodes: {}",
            firsts.len()
        );
    }

    #[test]
    fn owners_are_the_nodes_that_store_the_keys_provider_records() {
        // Provider records go to the nodes closest to the hash of the record key: the
        // ranking must measure distance to that same point.
        let key = "sha256:0123";
        let record = KBucketKey::new(libp2p::kad::RecordKey::new(&key));
        let target = KBucketKey::from(key.as_bytes().to_vec());
        let peer = KBucketKey::from(Keypair::generate_ed25519().public().to_peer_id());
        assert_eq!(peer.distance(&record), peer.distance(&target));
    }
}

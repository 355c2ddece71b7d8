//! Who fetches a key for the whole cluster: the agent whose id is closest to the key in the
//! DHT's XOR metric (the node that also stores the key's provider records). Each node ranks
//! the agents in its own routing table, at once and without a network query. Views differ
//! in a large cluster (a node knows about 20 agents per distance bucket), but a node knows
//! its own neighbourhood of the id space best: an agent asked to fetch a key that knows one
//! closer to it sends the asker on to that one (see the registry's `cluster` module), so
//! every request ends at the same owner, as a Kademlia lookup would, however little the
//! asking node knows. A query per ranking was tried first: at 250 agents and more on two
//! cores the queries took seconds, and nodes that gave up waiting fetched alone.

use std::net::SocketAddr;

use libp2p::PeerId;
use libp2p::kad::KBucketKey;
use mirrorlet_oci::{Owner, Peer};

use super::EventLoop;

/// Agents ranked: the owner and its backups, with room for some that fail.
const OWNERS_RANKED: usize = 6;

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

impl EventLoop {
    /// This node and the agents of its routing table closest to `key` (leaving out those
    /// found unreachable and those with no known registry address), closest first.
    pub(super) fn rank_owners(&mut self, key: &str) -> Vec<Owner> {
        let target = KBucketKey::from(key.as_bytes().to_vec());
        let near: Vec<PeerId> = self
            .swarm
            .behaviour_mut()
            .kad
            .get_closest_local_peers(&target)
            .map(|k| *k.preimage())
            .take(OWNERS_RANKED * 4)
            .collect();
        let mut candidates: Vec<(PeerId, Owner)> = vec![(*self.swarm.local_peer_id(), Owner::Me)];
        for id in near {
            if candidates.len() > OWNERS_RANKED {
                break;
            }
            if self.is_unreachable(&id) {
                continue;
            }
            if let Some(addr) = self.http_addr(&id) {
                let peer = Peer {
                    id: id.to_string(),
                    addr,
                };
                candidates.push((id, Owner::Peer(peer)));
            }
        }
        closest_first(key, candidates, |(id, _)| *id)
            .into_iter()
            .map(|(_, o)| o)
            .collect()
    }

    /// Where peers reach this node's registry: its reachable listen addresses with the
    /// registry port (one per address, in the order they came up).
    pub(super) fn registry_addrs(&self) -> Vec<SocketAddr> {
        let mut out: Vec<SocketAddr> = Vec::new();
        for a in self.swarm.external_addresses() {
            if let Some(ip) = super::addr::ip_of(a) {
                let sa = SocketAddr::new(ip, self.config.http_port);
                if !out.contains(&sa) {
                    out.push(sa);
                }
            }
        }
        out
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

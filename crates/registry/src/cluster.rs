//! The cluster view of the registry: which node fetches something from upstream for
//! everyone, and the headers agents use between themselves. The owners of a key (a digest
//! or a tag) are ranked by the router ([`mirrorlet_oci::Router::owners`]: in the DHT, the
//! agents whose ids are closest to the key), so every node picks the same owner without
//! a central server; the next ranks are the backups. Peers that failed recently are left
//! out, so a dead owner is passed over at once (other nodes may still pick it until they
//! notice: at worst a few duplicate fetches).

use mirrorlet_oci::{Digest, Owner, Peer};

use crate::state::AppState;

/// With [`crate::PEER_HEADER`], asks the receiving agent to act as the owner: to fetch
/// what it does not hold from upstream, for the cluster, and serve it as it arrives.
pub const CLUSTER_HEADER: &str = "x-mirrorlet-fetch";
/// Peer owners asked (the owner, then one backup) before fetching directly.
pub const OWNER_PEERS: usize = 2;

/// Set on the `503` of an agent that already streams a blob to as many peers as it may.
pub const BUSY_HEADER: &str = "x-mirrorlet-busy";
/// When the digest a tag resolves to was last confirmed upstream, in seconds since the
/// Unix epoch: on tag answers between agents, so a stale answer never looks fresh.
pub const TAG_CONFIRMED_HEADER: &str = "x-mirrorlet-tag-confirmed";

/// The key under which a node advertises a blob it is downloading right now.
pub fn fetching_key(digest: &Digest) -> String {
    format!("fetching:{digest}")
}

/// Peers ranked above this node for `key`, best first, at most `max`: the owner and its
/// backups to ask before fetching here. Empty when this node owns the key.
pub async fn ahead_of_me(state: &AppState, key: &str, max: usize) -> Vec<Peer> {
    owners(state, key)
        .await
        .into_iter()
        .map_while(|o| match o {
            Owner::Peer(p) => Some(p),
            Owner::Me => None,
        })
        .take(max)
        .collect()
}

/// The owners of `key`, best first, as the router ranks them, leaving out peers that
/// failed recently; only this node when peers are off or the ranking fails.
pub async fn owners(state: &AppState, key: &str) -> Vec<Owner> {
    if !state.peers.enabled {
        return vec![Owner::Me];
    }
    match state.router.owners(key).await {
        Ok(ranked) => ranked
            .into_iter()
            .filter(|o| match o {
                Owner::Me => true,
                Owner::Peer(p) => !state.failed_peers.is_failed(p),
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "no ranking of owners; fetching alone");
            vec![Owner::Me]
        }
    }
}

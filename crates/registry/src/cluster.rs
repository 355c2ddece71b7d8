//! The cluster view of the registry: which node fetches something from upstream for
//! everyone, and the headers agents use between themselves.
//!
//! The owner of a key (a digest or a tag) is the agent whose id is closest to the key in
//! the DHT's metric. Each node ranks the agents it knows ([`mirrorlet_oci::Router::owners`])
//! and asks the first one ahead of itself. In a large cluster no node knows every other,
//! but each knows its own neighbourhood of the id space best: an agent asked as the owner
//! that knows one closer to the key answers with a redirect to it ([`OWNER_HEADER`]), and
//! the asker follows ([`Walk`]), so every request ends at the same owner however little the
//! asking node knows, as a Kademlia lookup would, at the cost of a request per hop. A
//! redirect to an agent that failed, or one too many, is answered by asking the agent that
//! redirected to fetch itself ([`INSIST`]), naming the one that failed ([`FAILED_HEADER`]:
//! the redirecting agent checks it, and stops sending others there). Peers that failed
//! recently are left out of the ranking, so a dead owner is passed over at once (nodes that
//! have not noticed yet may still pick it: at worst a few duplicate fetches). An agent of
//! an earlier version asks with the value `cluster`, which knows no redirects: it is
//! answered as if it insisted.
//!
//! An owner streams a blob to a bounded number of peers while it downloads; when full, it
//! answers "busy" with the agents reading from it ([`crate::headers::FOLLOWERS_HEADER`]), each of which can
//! stream its own growing copy to others: the cluster's copies form a tree, and a burst of
//! requests for one new blob costs one upstream download whatever the cluster's size.

use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue};
use mirrorlet_oci::{Owner, Peer};

use crate::headers::{
    ASK_OWNER, CLUSTER_HEADER, FAILED_HEADER, INSIST, OWNER_HEADER, addr_header, addr_list, peer_at,
};
use crate::state::AppState;

/// Peer owners asked (the owner, then one backup) before fetching directly.
pub(crate) const OWNER_PEERS: usize = 2;
/// Redirects followed from one owner asked before insisting. Each hop gets closer to the
/// key, and a few hops reach the owner in any cluster (about log2(N)/4 of them).
pub(crate) const MAX_REDIRECTS: usize = 8;

/// Peers ranked above this node for `key`, best first, at most `max`: the owner and its
/// backups to ask before fetching here. Empty when this node owns the key.
pub(crate) async fn ahead_of_me(state: &AppState, key: &str, max: usize) -> Vec<Peer> {
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
pub(crate) async fn owners(state: &AppState, key: &str) -> Vec<Owner> {
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

/// For a request that asks this node as the owner of `key` (not insisting): an agent this
/// node knows to be closer to the key, to send the asker on to. `None`: this node is the
/// owner as far as it knows.
pub(crate) async fn closer_owner(state: &AppState, key: &str) -> Option<Peer> {
    match owners(state, key).await.into_iter().next() {
        Some(Owner::Peer(p)) => Some(p),
        _ => None,
    }
}

/// An asker insisting says the agent this node sent it to failed: check that agent (a
/// connection to its registry, in the background), and leave it out of this node's
/// rankings for a while if it does not answer, so that others are not sent there too.
pub(crate) fn check_failed(state: &std::sync::Arc<AppState>, headers: &HeaderMap) {
    let Some(addr) = headers
        .get(FAILED_HEADER)
        .and_then(|v| addr_list(v).into_iter().next())
    else {
        return;
    };
    let peer = peer_at(addr);
    if state.failed_peers.is_failed(&peer) {
        return;
    }
    let (state, limit) = (state.clone(), state.peers.connect_timeout);
    tokio::spawn(async move {
        let reached = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await;
        if !matches!(reached, Ok(Ok(_))) {
            state.failed_peers.mark(
                &peer,
                state.peers.failure_backoff,
                "an agent sent to it could not reach it, nor could this one",
            );
        }
    });
}

/// What an agent asked as an owner answered, when it gave no answer for the caller.
pub(crate) enum Step {
    /// It knows an agent closer to the key.
    Redirect(Peer),
    /// It failed (and was marked): the agent that sent us to it must do without it.
    Failed,
    /// It could not get it this time (its upstream fetch failed): not worth asking the
    /// agents on the way to it; the next owner in this node's ranking.
    Unavailable,
}

/// The owners of a key to ask, in turn: those ahead of this node ([`OWNER_PEERS`] at most),
/// each until it gives an answer, following its redirects to agents closer to the key, and
/// going back to the agent that redirected (insisting that it fetch itself) when the one it
/// named fails, was already asked, is this node, or is one hop too many. The caller asks
/// [`Walk::next`] and reports each answer that is not its own with [`Walk::went`]; when
/// `next` gives nothing, no owner ahead of this node answered, and this node fetches itself.
pub(crate) struct Walk {
    /// Owners from this node's ranking still to start from, best last.
    ranked: Vec<Peer>,
    /// The agents on the way from the one started from to the one being asked.
    path: Vec<Peer>,
    insist: bool,
    /// The agent that failed after the one being asked redirected to it.
    failed: Option<SocketAddr>,
    me: Vec<SocketAddr>,
}

impl Walk {
    /// A walk over the owners of `key` ahead of this node.
    pub(crate) async fn new(state: &AppState, key: &str) -> Self {
        let mut ranked = ahead_of_me(state, key, OWNER_PEERS).await;
        ranked.reverse();
        Self {
            ranked,
            path: Vec::new(),
            insist: false,
            failed: None,
            me: state.router.registry_addrs(),
        }
    }

    /// The agent to ask next, and how.
    pub(crate) fn next(&mut self) -> Option<(Peer, Asking)> {
        if self.path.is_empty() {
            self.path.push(self.ranked.pop()?);
            self.insist = false;
            self.failed = None;
        }
        let asking = Asking {
            insist: self.insist,
            failed: self.failed,
        };
        self.path.last().map(|p| (p.clone(), asking))
    }

    /// The agent just asked answered `step`.
    pub(crate) fn went(&mut self, step: Step, state: &AppState, key: &str) {
        match step {
            Step::Redirect(to) if !self.insist => {
                let dead_end = self.path.len() > MAX_REDIRECTS
                    || self.path.iter().any(|p| p.addr == to.addr)
                    || self.me.contains(&to.addr)
                    || state.failed_peers.is_failed(&to);
                if dead_end {
                    self.insist = true;
                    if state.failed_peers.is_failed(&to) {
                        self.failed = Some(to.addr);
                    }
                } else {
                    state.metrics.owner_redirects.inc();
                    if let Some(from) = self.path.last() {
                        tracing::debug!(%key, from = %from.addr, to = %to.addr, "sent on to an owner closer to the key");
                    }
                    self.path.push(to);
                }
            }
            // One that redirects even when asked to insist is not a working owner.
            Step::Redirect(_) | Step::Failed => {
                self.failed = self.path.pop().map(|p| p.addr);
                self.insist = true;
            }
            Step::Unavailable => self.path.clear(),
        }
    }
}

/// How an agent is asked as the owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Asking {
    /// Fetch it, whoever is closer to the key.
    pub(crate) insist: bool,
    /// The agent it redirected to, which failed.
    pub(crate) failed: Option<SocketAddr>,
}

impl Asking {
    /// Adds the headers that say so to a request for the cluster.
    pub(crate) fn headers(self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let mode = if self.insist { INSIST } else { ASK_OWNER };
        let req = req.header(CLUSTER_HEADER, HeaderValue::from_static(mode));
        match self.failed {
            Some(addr) => req.header(FAILED_HEADER, addr_header(&[addr])),
            None => req,
        }
    }
}

/// The value of [`PEER_HEADER`] on this node's requests to other agents: its
/// registry addresses (so that an agent it reads a blob from can send others on to it),
/// or `1` while it does not know them.
pub(crate) fn peer_header(state: &AppState) -> HeaderValue {
    let addrs = state.router.registry_addrs();
    if addrs.is_empty() {
        return HeaderValue::from_static("1");
    }
    addr_header(&addrs)
}

/// The agent a `421` answer from `peer` names as closer to the key; `peer` is marked as
/// failed when it names none.
pub(crate) fn redirect_of(state: &AppState, peer: &Peer, headers: &HeaderMap) -> Option<Peer> {
    let to = headers
        .get(OWNER_HEADER)
        .and_then(|v| addr_list(v).into_iter().next())
        .map(peer_at);
    if to.is_none() {
        state.failed_peers.mark(
            peer,
            state.peers.failure_backoff,
            "redirected to no valid agent",
        );
    }
    to
}

//! What the status page shows of this node that is kept as it runs: what the agent says
//! about itself, and the requests it served lately.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

/// Requests kept for the "recently served" list.
pub(crate) const RECENT: usize = 50;

/// What the agent says about itself (fixed at start).
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    /// The agent's version.
    pub version: String,
    /// Where the registry listens.
    pub registry_listen: String,
    /// Where the operational listener listens.
    pub operations_listen: String,
    /// The containerd namespace served.
    pub containerd_namespace: String,
    /// Whether peer-to-peer is on.
    pub p2p: bool,
}

/// One request served.
#[derive(Debug, Clone)]
pub struct Served {
    /// When its response head was sent.
    pub at: SystemTime,
    /// `GET` or `HEAD`.
    pub method: &'static str,
    /// The request path.
    pub path: String,
    /// The registry asked for (`ns`), if given.
    pub registry: Option<String>,
    /// The status answered.
    pub status: u16,
    /// Where the content came from.
    pub source: &'static str,
    /// `containerd` or `peer`.
    pub requester: &'static str,
    /// The body length, if known.
    pub bytes: Option<u64>,
    /// Time to the response head.
    pub elapsed: Duration,
}

/// The last [`RECENT`] manifest and blob requests, and counts of containerd's content
/// GETs by source (for the hit ratio).
#[derive(Debug, Default)]
pub struct Recent {
    inner: Mutex<RecentInner>,
}

#[derive(Debug, Default)]
struct RecentInner {
    served: VecDeque<Served>,
    by_source: BTreeMap<&'static str, u64>,
}

impl Recent {
    /// Records a manifest or blob request.
    pub fn record(&self, served: Served) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if served.requester != "peer" && served.method == "GET" {
            *inner.by_source.entry(served.source).or_default() += 1;
        }
        if inner.served.len() == RECENT {
            inner.served.pop_front();
        }
        inner.served.push_back(served);
    }

    pub(crate) fn snapshot(&self) -> (Vec<Served>, BTreeMap<&'static str, u64>) {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        (
            inner.served.iter().rev().cloned().collect(),
            inner.by_source.clone(),
        )
    }
}

//! Peers that failed recently: skipped for a while, and shown on the status page.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use mirrorlet_oci::Peer;

/// Peers that failed recently, by registry address, with when they may be tried again
/// and their last failure (shown on the status page).
#[derive(Debug, Default)]
pub struct FailedPeers {
    failures: Mutex<HashMap<SocketAddr, Failure>>,
}

/// A peer's last failure.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Skipped until then.
    pub until: Instant,
    /// When it failed.
    pub at: SystemTime,
    /// Why.
    pub reason: String,
}

impl FailedPeers {
    /// Skips `peer` for `backoff`.
    pub fn mark(&self, peer: &Peer, backoff: Duration, why: &str) {
        tracing::warn!(peer = %peer.addr, id = %peer.id, reason = why, backoff = ?backoff, "peer failed; skipping it for a while");
        let mut m = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let until = Instant::now() + backoff;
        let e = m.entry(peer.addr).or_insert_with(|| Failure {
            until,
            at: SystemTime::now(),
            reason: String::new(),
        });
        e.until = e.until.max(until);
        e.at = SystemTime::now();
        why.clone_into(&mut e.reason);
        // Keep the map small: drop entries that have run out.
        if m.len() > 1024 {
            let now = Instant::now();
            m.retain(|_, f| f.until > now);
        }
    }

    /// Whether `peer` is being skipped.
    pub fn is_failed(&self, peer: &Peer) -> bool {
        let m = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        m.get(&peer.addr).is_some_and(|f| f.until > Instant::now())
    }

    /// The last failure of the peer whose registry is at `addr`, if remembered.
    pub fn last(&self, addr: &SocketAddr) -> Option<Failure> {
        let m = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        m.get(addr).cloned()
    }
}

//! Republication of this node's provider records before they expire at the nodes that
//! store them. libp2p's own job announces every key of a node at once (up to 100 queries
//! at a time) every interval, past the pacing window; nodes that started together (a
//! DaemonSet rollout) then all republish together, each time, which in `make bench-scale`
//! at 1,000 agents kept the DHT overloaded for good. Here each key is due again one
//! interval after its announcement ended, shortened by a fraction that differs from key to
//! key and from node to node (up to a quarter), and goes through the paced queue like any
//! announcement; a key whose announcement failed every attempt is tried again after a
//! quarter of the interval.

use std::hash::{BuildHasher, Hash, Hasher};
use std::time::{Duration, Instant};

use super::EventLoop;

/// The share of the interval a key's republication is brought forward by at most.
const SPREAD: f64 = 0.25;

/// The interval before a key is announced again, spread by `key` and `node`.
pub(super) fn due_after(interval: Duration, node: &[u8], key: &str) -> Duration {
    // A fixed hasher: the same spread for a key on a node across restarts.
    let mut h =
        std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default()
            .build_hasher();
    node.hash(&mut h);
    key.hash(&mut h);
    let fraction = (h.finish() % 10_000) as f64 / 10_000.0;
    interval.mul_f64(1.0 - SPREAD * fraction)
}

impl EventLoop {
    /// An announcement of `key` ended (`ok`: it reached the nodes closest to it).
    pub(super) fn announced(&mut self, key: &str, ok: bool) {
        let interval = self.config.republish;
        let after = if ok {
            due_after(interval, &self.swarm.local_peer_id().to_bytes(), key)
        } else {
            interval.mul_f64(SPREAD)
        };
        if let Some(due) = self.advertised.get_mut(key) {
            *due = Some(Instant::now() + after);
        }
    }

    /// Queues the keys due to be announced again.
    pub(super) fn republish_due(&mut self) {
        let now = Instant::now();
        let mut queued = false;
        for (key, due) in &mut self.advertised {
            if due.is_some_and(|at| at <= now) {
                *due = None;
                self.announcements.push(key.clone());
                queued = true;
            }
        }
        if queued {
            self.announce_more();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn republication_is_spread_over_the_last_quarter_of_the_interval() {
        let interval = Duration::from_secs(360);
        let spread: Vec<Duration> = (0..200)
            .map(|i| due_after(interval, b"node", &format!("sha256:{i}")))
            .collect();
        assert!(
            spread
                .iter()
                .all(|d| *d <= interval && *d >= interval.mul_f64(0.75))
        );
        let (min, max) = (spread.iter().min(), spread.iter().max());
        assert!(
            max.zip(min)
                .is_some_and(|(a, b)| *a - *b > Duration::from_secs(60)),
            "spread"
        );
        // The same key on another node is due at another moment; on the same node, the same.
        assert_eq!(
            due_after(interval, b"node", "k"),
            due_after(interval, b"node", "k")
        );
        let others: std::collections::HashSet<Duration> = (0..20)
            .map(|n| due_after(interval, format!("node{n}").as_bytes(), "k"))
            .collect();
        assert!(others.len() > 10);
    }
}

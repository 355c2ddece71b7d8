//! Pacing of announcements (provider records sent to the nodes closest to each key).
//!
//! Every announcement is a Kademlia query that opens streams to several peers, and a
//! connection carries at most 32 Kademlia streams at once; the rest wait, and a query whose
//! requests wait past the query timeout fails. When a whole cluster announces at the same
//! moment (a DaemonSet rollout, an image pulled everywhere) a fixed number of queries per
//! node overloads every connection, and most announcements time out and reach nobody.
//! So the number running adapts like TCP's congestion window: one more for every window's
//! worth of announcements that succeed, half as many when one times out. A key whose
//! announcement failed is announced again, a few times, before the next republication is
//! left to catch it. Republication goes through the same queue (see `swarm::republish`):
//! libp2p's own job announces every key of a node at once, up to 100 queries at a time,
//! and a cluster that started together does so together every interval.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

/// Announcements running at first, and the bounds of the window.
const WINDOW_START: f64 = 2.0;
const WINDOW_MIN: f64 = 1.0;
const WINDOW_MAX: f64 = 64.0;
/// Announcements of one key before giving up on it until the next republication.
const ATTEMPTS: u8 = 3;

/// How an announcement ended, for the caller's metrics and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Ended {
    /// It reached the nodes closest to the key.
    Announced(String),
    /// It failed and the key is queued again.
    Retrying,
    /// It failed [`ATTEMPTS`] times; the key is left to the next republication.
    GaveUp(String),
}

/// The announcements queued and running.
#[derive(Debug)]
pub(super) struct Announcements<Id> {
    queue: VecDeque<(String, u8)>,
    running: HashMap<Id, (String, u8)>,
    window: f64,
}

impl<Id: Hash + Eq> Announcements<Id> {
    pub(super) fn new() -> Self {
        Self {
            queue: VecDeque::new(),
            running: HashMap::new(),
            window: WINDOW_START,
        }
    }

    /// Queues a key's first announcement.
    pub(super) fn push(&mut self, key: String) {
        self.queue.push_back((key, 0));
    }

    /// The next key to announce (and which attempt this is), if the window has room.
    pub(super) fn next(&mut self) -> Option<(String, u8)> {
        // The window is at least 1, so its floor is too.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let room = self.window.floor() as usize;
        if self.running.len() >= room {
            return None;
        }
        self.queue.pop_front()
    }

    /// Announcements queued or running.
    pub(super) fn pending(&self) -> usize {
        self.queue.len() + self.running.len()
    }

    /// Records that the query `id` announces `key`.
    pub(super) fn started(&mut self, id: Id, key: String, attempt: u8) {
        self.running.insert(id, (key, attempt));
    }

    /// Records the end of query `id`; `None` if it was not an announcement of ours.
    pub(super) fn ended(&mut self, id: &Id, ok: bool) -> Option<Ended> {
        let (key, attempt) = self.running.remove(id)?;
        if ok {
            self.window = (self.window + 1.0 / self.window).min(WINDOW_MAX);
            return Some(Ended::Announced(key));
        }
        self.window = (self.window / 2.0).max(WINDOW_MIN);
        if attempt + 1 < ATTEMPTS {
            self.queue.push_back((key, attempt + 1));
            Some(Ended::Retrying)
        } else {
            Some(Ended::GaveUp(key))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Starts announcements until the window is full; returns their ids.
    fn fill(a: &mut Announcements<u32>, next_id: &mut u32) -> Vec<u32> {
        let mut ids = Vec::new();
        while let Some((key, attempt)) = a.next() {
            *next_id += 1;
            a.started(*next_id, key, attempt);
            ids.push(*next_id);
        }
        ids
    }

    #[test]
    fn the_window_grows_with_successes_and_halves_on_a_failure() {
        let mut a = Announcements::new();
        for k in 0..1000 {
            a.push(format!("k{k}"));
        }
        let mut id = 0;
        let mut running = fill(&mut a, &mut id);
        assert_eq!(running.len(), WINDOW_START as usize, "the start");
        // Successes open the window, up to its bound.
        for _ in 0..300 {
            let done = running.remove(0);
            assert!(matches!(a.ended(&done, true), Some(Ended::Announced(_))));
            running.extend(fill(&mut a, &mut id));
        }
        let grown = running.len();
        assert!(grown > 16, "grown to {grown}");
        assert!(grown <= WINDOW_MAX as usize);
        // A timeout halves it: nothing starts until half of those running have finished.
        let failed = running.remove(0);
        assert_eq!(a.ended(&failed, false), Some(Ended::Retrying));
        let mut finished = 0;
        loop {
            let started = fill(&mut a, &mut id);
            if !started.is_empty() {
                running.extend(started);
                break;
            }
            let done = running.remove(0);
            a.ended(&done, true);
            finished += 1;
        }
        assert!(
            (grown / 2 - 2..=grown / 2 + 2).contains(&finished),
            "{finished} of {grown} finished before the next start"
        );
        // Failures never take it below one.
        for _ in 0..20 {
            for done in running.drain(..) {
                a.ended(&done, false);
            }
            running = fill(&mut a, &mut id);
        }
        assert_eq!(running.len(), 1, "one at a time still goes");
    }

    #[test]
    fn a_key_is_tried_three_times_then_left_to_republication() {
        let mut a = Announcements::new();
        a.push("k".to_owned());
        let mut ended = Vec::new();
        for id in 0..3 {
            let (key, attempt) = a.next().expect("queued");
            assert_eq!((key.as_str(), attempt), ("k", id as u8));
            a.started(id, key, attempt);
            ended.push(a.ended(&id, false).expect("ours"));
        }
        assert_eq!(
            ended,
            [Ended::Retrying, Ended::Retrying, Ended::GaveUp("k".into())]
        );
        assert!(a.next().is_none());
        assert_eq!(a.ended(&99, true), None, "not an announcement");
    }
}

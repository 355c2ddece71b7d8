//! A large blob from several holders at once: the copy is cut into parts, each read by one
//! lane (a holder's stream, or the copy's own sources) into the spool at its offset. A
//! lane that finishes its part takes a part nobody reads (one whose lane failed), else
//! splits the part with the most bytes left and reads its second half: so a slow or busy
//! holder ends up with less to send instead of setting the pace.

use std::sync::{Mutex, PoisonError};

use mirrorlet_oci::Peer;
use tokio::sync::watch;

/// Holders read at once for one blob, the first included.
pub(crate) const MAX_LANES: usize = 4;

#[derive(Debug)]
struct Part {
    /// Where the part starts (its identity: parts never move their start).
    start: u64,
    /// The next byte to read.
    cursor: u64,
    /// Where it ends (exclusive): moves down when the part is split.
    end: u64,
    /// Whether a lane reads it.
    taken: bool,
}

#[derive(Debug)]
struct Inner {
    /// By start.
    parts: Vec<Part>,
    /// Peers that sent bytes of this copy (blamed together if the whole does not match).
    contributors: Vec<Peer>,
}

/// The parts of one copy of `size` bytes.
#[derive(Debug)]
pub(crate) struct Plan {
    inner: Mutex<Inner>,
    /// Parts are not split below this size (a request per part costs a round trip).
    min_part: u64,
    /// Bumped when a part is released or finished.
    changed: watch::Sender<()>,
}

/// A lane's part: read `[from, end)`; `end` may move down (see [`Plan::end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claim {
    pub(crate) start: u64,
    pub(crate) from: u64,
}

impl Plan {
    /// One part, `[0, size)`, taken by the lane that opened the copy; parts of at least
    /// `min_part` bytes.
    pub(crate) fn new(size: u64, min_part: u64) -> Self {
        Self {
            min_part: min_part.max(1),
            inner: Mutex::new(Inner {
                parts: vec![Part {
                    start: 0,
                    cursor: 0,
                    end: size,
                    taken: true,
                }],
                contributors: Vec::new(),
            }),
            changed: watch::Sender::new(()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Work for a lane: a part nobody reads, else the second half of the part with the
    /// most bytes left (if it is worth splitting). `None`: nothing to take now.
    pub(crate) fn take(&self) -> Option<Claim> {
        let mut inner = self.lock();
        if let Some(p) = inner
            .parts
            .iter_mut()
            .find(|p| !p.taken && p.cursor < p.end)
        {
            p.taken = true;
            return Some(Claim {
                start: p.start,
                from: p.cursor,
            });
        }
        let (i, left) = inner
            .parts
            .iter()
            .enumerate()
            .map(|(i, p)| (i, p.end - p.cursor))
            .max_by_key(|&(_, left)| left)?;
        if left < 2 * self.min_part {
            return None;
        }
        let p = &mut inner.parts[i];
        let mid = p.cursor + left / 2;
        let end = std::mem::replace(&mut p.end, mid);
        inner.parts.insert(
            i + 1,
            Part {
                start: mid,
                cursor: mid,
                end,
                taken: true,
            },
        );
        Some(Claim {
            start: mid,
            from: mid,
        })
    }

    /// Where the part `claim` ends now.
    pub(crate) fn end(&self, claim: Claim) -> u64 {
        self.lock()
            .parts
            .iter()
            .find(|p| p.start == claim.start)
            .map_or(claim.start, |p| p.end)
    }

    /// The lane read its part up to `to`; `peer` sent those bytes.
    pub(crate) fn advance(&self, claim: Claim, to: u64, peer: Option<&Peer>) {
        let mut inner = self.lock();
        if let Some(p) = inner.parts.iter_mut().find(|p| p.start == claim.start) {
            p.cursor = to.min(p.end);
            if p.cursor == p.end {
                p.taken = false;
                self.changed.send_replace(());
            }
        }
        if let Some(peer) = peer
            && !inner.contributors.contains(peer)
        {
            inner.contributors.push(peer.clone());
        }
    }

    /// The lane stops reading its part (its source failed): another may take the rest.
    pub(crate) fn release(&self, claim: Claim) {
        if let Some(p) = self
            .lock()
            .parts
            .iter_mut()
            .find(|p| p.start == claim.start)
        {
            p.taken = false;
        }
        self.changed.send_replace(());
    }

    /// Every byte is read.
    pub(crate) fn complete(&self) -> bool {
        self.lock().parts.iter().all(|p| p.cursor == p.end)
    }

    /// Tells of parts released or finished: subscribe, check [`Plan::take`] and
    /// [`Plan::complete`], then wait for a change (none is missed in between).
    pub(crate) fn watch(&self) -> watch::Receiver<()> {
        self.changed.subscribe()
    }

    /// The peers that sent bytes of this copy.
    pub(crate) fn contributors(&self) -> Vec<Peer> {
        self.lock().contributors.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN_PART: u64 = 8 << 20;

    #[test]
    fn lanes_split_the_largest_part_and_take_released_ones() {
        let size = 64 * MIN_PART;
        let plan = Plan::new(size, MIN_PART);
        let first = Claim { start: 0, from: 0 };
        plan.advance(first, 8 * MIN_PART, None);
        // A second lane splits what is left of the first part in half.
        let second = plan.take().expect("a split");
        assert_eq!(second.from, 8 * MIN_PART + 28 * MIN_PART);
        assert_eq!(plan.end(first), second.from);
        assert_eq!(plan.end(second), size);
        // The first lane finishes its (shorter) part and takes half of the second's.
        plan.advance(first, plan.end(first), None);
        plan.advance(second, second.from + 4 * MIN_PART, None);
        let third = plan.take().expect("a split of the slow part");
        assert_eq!(third.from, second.from + 4 * MIN_PART + 12 * MIN_PART);
        assert!(!plan.complete());
        // The second lane fails: the rest of its part is free for whoever comes.
        plan.release(second);
        let again = plan.take().expect("the released part");
        assert_eq!(
            again,
            Claim {
                start: second.start,
                from: second.from + 4 * MIN_PART
            }
        );
        assert_eq!(plan.end(again), third.from);
        plan.advance(again, plan.end(again), None);
        // Nothing left worth splitting once parts are small.
        plan.advance(third, size - MIN_PART, None);
        assert_eq!(plan.take(), None);
        plan.advance(third, size, None);
        assert!(plan.complete());
    }
}

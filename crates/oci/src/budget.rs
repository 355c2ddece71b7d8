//! A byte budget for the buffers of content streams: every chunk read from a file to be
//! sent holds its share of the budget until it is dropped (sent, or its stream ended), so
//! the memory those chunks take is bounded whatever the number of streams. A stream that
//! finds the budget spent waits for its next chunk (the budget is handed out in order)
//! instead of the agent running out of memory. Only the chunk a client waits for may wait
//! for the budget: chunks read ahead take it when it has room ([`Budget::buffer_for`]), so
//! slow clients cannot hoard it; the stall timeout on sends bounds how long a client that
//! stopped reading holds what it has.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Shared by every stream of the process; cheap to clone.
#[derive(Debug, Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    total: usize,
}

impl Budget {
    /// A budget of `bytes` (at least one byte).
    pub fn new(bytes: usize) -> Self {
        let total = bytes.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(total)),
            total,
        }
    }

    /// No bound, for reads that are small and not sent (the agent's own manifest reads).
    pub fn unlimited() -> Self {
        Self::new(Semaphore::MAX_PERMITS)
    }

    /// The budget's size.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held by buffers now.
    pub fn in_use(&self) -> usize {
        self.total - self.permits.available_permits()
    }

    fn share(&self, len: usize) -> u32 {
        u32::try_from(len.min(self.total)).unwrap_or(u32::MAX)
    }

    /// A buffer of `len` bytes' capacity, once the budget has room for it (a request
    /// larger than the whole budget takes all of it).
    pub async fn buffer(&self, len: usize) -> Buffer {
        // The semaphore is never closed, so acquiring only waits.
        let permit = self
            .permits
            .clone()
            .acquire_many_owned(self.share(len))
            .await
            .ok();
        Buffer::new(len, permit)
    }

    /// A buffer of `len` bytes for the stream `held` counts: waiting for the budget only
    /// when the stream holds no other chunk (its client waits for this one), taking it
    /// only if there is room now when the chunk would be read ahead.
    pub async fn buffer_for(&self, held: &Arc<Held>, len: usize) -> Buffer {
        let mut buffer = loop {
            // Registered before the check, so a release in between is not missed.
            let drained = held.drained.notified();
            if held.count.load(Ordering::SeqCst) == 0 {
                break self.buffer(len).await;
            }
            if let Ok(permit) = self.permits.clone().try_acquire_many_owned(self.share(len)) {
                break Buffer::new(len, Some(permit));
            }
            drained.await;
        };
        held.count.fetch_add(1, Ordering::SeqCst);
        buffer.held = Some(held.clone());
        buffer
    }
}

/// The chunks of one stream still alive (read and not yet sent), for [`Budget::buffer_for`].
#[derive(Debug, Default)]
pub struct Held {
    count: AtomicUsize,
    drained: Notify,
}

impl Default for Budget {
    /// 64 MiB: 64 chunks of 1 MiB in flight.
    fn default() -> Self {
        Self::new(64 << 20)
    }
}

/// Memory counted against a [`Budget`] until it is dropped.
#[derive(Debug)]
pub struct Buffer {
    /// The bytes (fill up to the capacity asked for).
    pub data: Vec<u8>,
    _permit: Option<OwnedSemaphorePermit>,
    held: Option<Arc<Held>>,
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(held) = &self.held
            && held.count.fetch_sub(1, Ordering::SeqCst) == 1
        {
            held.drained.notify_waiters();
        }
    }
}

impl Buffer {
    fn new(len: usize, permit: Option<OwnedSemaphorePermit>) -> Self {
        Self {
            data: Vec::with_capacity(len),
            _permit: permit,
            held: None,
        }
    }

    /// The bytes, still counted until the last clone of them is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Buffer {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[tokio::test]
    async fn buffers_wait_for_room_and_free_it_when_their_bytes_are_dropped() {
        let budget = Budget::new(2 << 20);
        let mut a = budget.buffer(1 << 20).await;
        a.data.resize(1 << 20, 1);
        let a = a.freeze();
        let b = budget.buffer(1 << 20).await;
        assert_eq!(budget.in_use(), 2 << 20);

        // Spent: the next one waits.
        let mut third = Box::pin(budget.buffer(1 << 20));
        assert!((&mut third).now_or_never().is_none());

        // A slice of the first still holds its share; dropping every clone frees it.
        let part = a.slice(10..20);
        drop(a);
        assert!((&mut third).now_or_never().is_none());
        assert_eq!(part.as_ref(), &[1; 10]);
        drop(part);
        let third = third.await;
        assert_eq!(budget.in_use(), 2 << 20);
        drop((b, third));
        assert_eq!(budget.in_use(), 0);

        // Larger than the whole budget: takes all of it rather than waiting for ever.
        let big = budget.buffer(8 << 20).await;
        assert_eq!(budget.in_use(), 2 << 20);
        assert!(big.data.capacity() >= 8 << 20);
    }

    #[tokio::test]
    async fn a_stream_reads_ahead_only_into_room_and_waits_only_for_its_next_chunk() {
        let budget = Budget::new(2 << 20);
        let (slow, fast) = (Arc::new(Held::default()), Arc::new(Held::default()));
        // A slow stream takes its chunk and reads ahead while there is room.
        let first = budget.buffer_for(&slow, 1 << 20).await;
        let ahead = budget.buffer_for(&slow, 1 << 20).await;
        assert_eq!(budget.in_use(), 2 << 20);
        // Spent: its next read-ahead does not queue for the budget...
        let mut more = Box::pin(budget.buffer_for(&slow, 1 << 20));
        assert!((&mut more).now_or_never().is_none());
        // ...while another stream's first chunk does, and gets the first room made.
        let mut other = Box::pin(budget.buffer_for(&fast, 1 << 20));
        assert!((&mut other).now_or_never().is_none());
        drop(first);
        let other = (&mut other)
            .now_or_never()
            .expect("the waiting stream goes first");
        assert!(
            (&mut more).now_or_never().is_none(),
            "no room: still waiting"
        );
        // Once the slow stream's client took everything it had, it waits its turn.
        drop(ahead);
        let _more = more.await;
        assert_eq!(budget.in_use(), 2 << 20);
        drop(other);
        assert_eq!(budget.in_use(), 1 << 20);
    }
}

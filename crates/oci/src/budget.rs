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
    /// Streams counting their chunks ([`Budget::stream`]) now.
    streams: Arc<AtomicUsize>,
}

/// The smallest chunk a stream is given, however many share the budget.
pub const MIN_CHUNK: usize = 64 * 1024;

impl Budget {
    /// A budget of `bytes` (at least one byte).
    pub fn new(bytes: usize) -> Self {
        let total = bytes.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(total)),
            total,
            streams: Arc::default(),
        }
    }

    /// A stream's count of its chunks, for [`Budget::buffer_for`] (the stream counts among
    /// those sharing the budget until it is dropped).
    pub fn stream(&self) -> Arc<Held> {
        self.streams.fetch_add(1, Ordering::SeqCst);
        Arc::new(Held {
            count: AtomicUsize::new(0),
            drained: Notify::new(),
            streams: self.streams.clone(),
        })
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

    /// `bytes` (already read elsewhere), counted once the budget has room for them, until
    /// the last clone of what it returns is dropped.
    pub async fn count(&self, bytes: Bytes) -> Bytes {
        // The semaphore is never closed, so acquiring only waits.
        let permit = self
            .permits
            .clone()
            .acquire_many_owned(self.share(bytes.len()))
            .await
            .ok();
        Bytes::from_owner(Counted {
            bytes,
            _permit: permit,
        })
    }

    /// A buffer of at most `len` bytes ([`Buffer::limit`]) for the stream `held` counts.
    /// Its size is a fair share: two chunks for every stream (the one the HTTP server is
    /// writing and the next it already took) fit in half the budget (but no less than
    /// [`MIN_CHUNK`]). It waits for the budget only when the stream holds no
    /// other chunk (its client waits for this one); a chunk read ahead is taken only while
    /// less than a quarter of the budget is in use. So streams whose clients stopped
    /// reading hold at most three quarters, and the rest is there for the others' next
    /// chunks.
    pub async fn buffer_for(&self, held: &Arc<Held>, len: usize) -> Buffer {
        let streams = self.streams.load(Ordering::SeqCst).max(1);
        let fair = (self.total / (4 * streams)).max(MIN_CHUNK).min(len);
        let mut buffer = loop {
            // Registered before the check, so a release in between is not missed.
            let drained = held.drained.notified();
            if held.count.load(Ordering::SeqCst) == 0 {
                break self.buffer(fair).await;
            }
            if self.in_use() + fair <= self.total / 4
                && let Ok(permit) = self
                    .permits
                    .clone()
                    .try_acquire_many_owned(self.share(fair))
            {
                break Buffer::new(fair, Some(permit));
            }
            drained.await;
        };
        held.count.fetch_add(1, Ordering::SeqCst);
        buffer.held = Some(held.clone());
        buffer
    }
}

/// The chunks of one stream still alive (read and not yet sent), for [`Budget::buffer_for`].
#[derive(Debug)]
pub struct Held {
    count: AtomicUsize,
    drained: Notify,
    streams: Arc<AtomicUsize>,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::SeqCst);
    }
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
    /// The bytes (fill up to [`Buffer::limit`]).
    pub data: Vec<u8>,
    limit: usize,
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
            limit: len,
            _permit: permit,
            held: None,
        }
    }

    /// The bytes it may hold.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The bytes, still counted until the last clone of them is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

/// Bytes counted against a [`Budget`] (see [`Budget::count`]).
struct Counted {
    bytes: Bytes,
    _permit: Option<OwnedSemaphorePermit>,
}

impl AsRef<[u8]> for Counted {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
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
    async fn bytes_counted_hold_their_share_until_every_clone_is_dropped() {
        let budget = Budget::new(2 << 20);
        let a = budget.count(Bytes::from(vec![1u8; 1 << 20])).await;
        let b = budget.count(Bytes::from(vec![2u8; 1 << 20])).await;
        assert_eq!(budget.in_use(), 2 << 20);
        let mut third = Box::pin(budget.count(Bytes::from(vec![3u8; 1 << 20])));
        assert!((&mut third).now_or_never().is_none(), "spent: it waits");
        let part = a.slice(..10);
        drop(a);
        assert!(
            (&mut third).now_or_never().is_none(),
            "a slice still holds it"
        );
        assert_eq!(part.as_ref(), &[1; 10]);
        drop(part);
        let third = third.await;
        assert_eq!(third.len(), 1 << 20);
        drop((b, third));
        assert_eq!(budget.in_use(), 0);
    }

    #[tokio::test]
    async fn streams_read_ahead_into_a_quarter_of_the_budget_and_share_it_fairly() {
        let budget = Budget::new(8 << 20);
        let slow = budget.stream();
        // Alone, a stream gets whole chunks and reads ahead up to a quarter of the budget...
        let mut kept = Vec::new();
        for _ in 0..2 {
            let b = budget.buffer_for(&slow, 1 << 20).await;
            assert_eq!(b.limit(), 1 << 20);
            kept.push(b);
        }
        let mut more = Box::pin(budget.buffer_for(&slow, 1 << 20));
        assert!(
            (&mut more).now_or_never().is_none(),
            "no read-ahead past a quarter"
        );
        // ...so another stream's next chunk finds room at once.
        let fast = budget.stream();
        let f = budget
            .buffer_for(&fast, 1 << 20)
            .now_or_never()
            .expect("room for a chunk a client waits for");
        // With 16 streams, two chunks for each fit in half the budget.
        let others: Vec<_> = (0..14).map(|_| budget.stream()).collect();
        let small = budget.buffer_for(&others[0], 1 << 20).await;
        assert_eq!(small.limit(), 128 << 10);
        // Once its client took what it had, the slow stream's next chunk waits its turn.
        drop(kept);
        let m = more.await;
        assert!(m.limit() <= 1 << 20);
        drop((f, small, m));
        assert_eq!(budget.in_use(), 0);
        drop(others);
        assert_eq!(budget.streams.load(Ordering::SeqCst), 2);
    }
}

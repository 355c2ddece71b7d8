//! A byte budget for the buffers of content streams: every chunk read from a file to be
//! sent holds its share of the budget until it is dropped (sent, or its stream ended), so
//! the memory those chunks take is bounded whatever the number of streams. A stream that
//! finds the budget spent waits for its next chunk (the budget is handed out in order)
//! instead of the agent running out of memory; the stall timeout on sends bounds how long
//! a client that stopped reading can hold its share.

use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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

    /// The budget's size.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes held by buffers now.
    pub fn in_use(&self) -> usize {
        self.total - self.permits.available_permits()
    }

    /// A buffer of `len` bytes' capacity, once the budget has room for it (a request
    /// larger than the whole budget takes all of it).
    pub async fn buffer(&self, len: usize) -> Buffer {
        let share = u32::try_from(len.min(self.total)).unwrap_or(u32::MAX);
        // The semaphore is never closed, so acquiring only waits.
        let permit = self.permits.clone().acquire_many_owned(share).await.ok();
        Buffer {
            data: Vec::with_capacity(len),
            _permit: permit,
        }
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
    /// The bytes (fill up to the capacity asked for).
    pub data: Vec<u8>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Buffer {
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
}

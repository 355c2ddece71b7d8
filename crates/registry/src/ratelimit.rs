//! A shared bandwidth limit (bytes per second) for what this node serves to other agents,
//! so peer-to-peer traffic cannot saturate a node's network.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How far ahead of the schedule a sender may run (a burst).
const BURST: Duration = Duration::from_millis(100);

/// A leaky-bucket limiter shared by all streams that use it.
#[derive(Debug)]
pub struct RateLimiter {
    bytes_per_sec: u64,
    /// When the bytes handed out so far would have finished at the limit.
    next_free: Mutex<Instant>,
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec` (more than zero).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            next_free: Mutex::new(Instant::now()),
        }
    }

    /// Waits until `n` more bytes may be sent.
    pub async fn acquire(&self, n: u64) {
        let wait = {
            let mut next = self
                .next_free
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let now = Instant::now();
            let start = (*next).max(now);
            *next = start + Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
            (*next).saturating_duration_since(now + BURST)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn spreads_bytes_over_time() {
        let limit = RateLimiter::new(1_000_000);
        let started = tokio::time::Instant::now();
        for _ in 0..10 {
            limit.acquire(100_000).await;
        }
        let elapsed = started.elapsed();
        // 1 MB at 1 MB/s, less the burst allowance.
        assert!(
            elapsed >= Duration::from_millis(850) && elapsed <= Duration::from_millis(1000),
            "{elapsed:?}"
        );
    }
}

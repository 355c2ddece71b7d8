//! Liveness. The agent is live while it serves HTTP and has reached containerd within
//! `--liveness-containerd-timeout`: an agent that can no longer reach containerd at all
//! (a socket it cannot see, a stuck connection) is restarted by the kubelet, while a
//! containerd restart or a short outage does not restart it (readiness reports those).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mirrorlet_oci::Store;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often containerd is pinged.
const PING_EVERY: Duration = Duration::from_secs(10);

/// When containerd last answered.
#[derive(Debug)]
pub(crate) struct ContainerdHealth {
    last_ok: Mutex<Instant>,
    limit: Duration,
}

impl ContainerdHealth {
    /// Starts pinging `store` until `shutdown`; the agent counts as having reached
    /// containerd when it starts (a grace of one `limit`).
    pub(crate) fn watch(
        store: Arc<dyn Store>,
        limit: Duration,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let me = Arc::new(Self {
            last_ok: Mutex::new(Instant::now()),
            limit,
        });
        let health = me.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(PING_EVERY);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shutdown.cancelled() => return,
                }
                if store.ping().await.is_ok() {
                    health.ok();
                }
            }
        });
        me
    }

    fn ok(&self) {
        *self.last_ok.lock().unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// `Err` once containerd has not answered for longer than the limit.
    pub(crate) fn check(&self) -> Result<(), String> {
        let since = self
            .last_ok
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed();
        if since > self.limit {
            return Err(format!(
                "containerd has not answered for {}s (--liveness-containerd-timeout {:?})",
                since.as_secs(),
                self.limit
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn live_until_containerd_has_been_silent_too_long() {
        let h = ContainerdHealth {
            last_ok: Mutex::new(Instant::now()),
            limit: Duration::from_secs(300),
        };
        assert!(h.check().is_ok(), "a grace at start");
        tokio::time::advance(Duration::from_secs(299)).await;
        assert!(h.check().is_ok());
        tokio::time::advance(Duration::from_secs(2)).await;
        let err = h.check().expect_err("silent too long");
        assert!(err.contains("--liveness-containerd-timeout"), "{err}");
        h.ok();
        assert!(h.check().is_ok(), "back once it answers");
    }
}

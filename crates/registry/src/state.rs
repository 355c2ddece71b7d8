//! What the registry's handlers share.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use mirrorlet_oci::{Router, Store};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;
use crate::peers::{FailedPeers, PeerConfig};
use crate::ratelimit::RateLimiter;

/// Answers whether the agent is ready: `Err` carries the reason it is not.
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Blob fetches from peers that may buffer a whole (small) blob at once; with the verify
/// buffer this bounds that memory.
pub const BUFFER_SLOTS: usize = 16;
/// Blob fetches from peers spooling to disk at once.
pub const SPOOL_SLOTS: usize = 16;

/// State shared by every request.
pub struct AppState {
    /// Where local content is read.
    pub store: Arc<dyn Store>,
    /// Where peers are found.
    pub router: Arc<dyn Router>,
    /// How peers are used.
    pub peers: PeerConfig,
    /// Peers that failed recently.
    pub failed_peers: FailedPeers,
    /// The HTTP client for peers (no proxy, short connect timeout).
    pub http: reqwest::Client,
    /// Bounds concurrent whole-blob buffering (see [`BUFFER_SLOTS`]).
    pub buffer_slots: Arc<Semaphore>,
    /// Bounds concurrent spooling (see [`SPOOL_SLOTS`]).
    pub spool_slots: Arc<Semaphore>,
    /// Caps the bandwidth this node spends serving other agents, if set.
    pub peer_upload_limit: Option<RateLimiter>,
    /// Request and byte metrics.
    pub metrics: Metrics,
    /// The metrics registry rendered at `/metrics`.
    pub metrics_registry: Arc<prometheus_client::registry::Registry>,
    /// What `/readyz` reports.
    pub ready: ReadyCheck,
}

impl AppState {
    /// State with the given parts and a peer HTTP client built from `peers`.
    pub fn new(
        store: Arc<dyn Store>,
        router: Arc<dyn Router>,
        peers: PeerConfig,
        metrics: Metrics,
        metrics_registry: Arc<prometheus_client::registry::Registry>,
        ready: ReadyCheck,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(peers.connect_timeout)
            .read_timeout(peers.read_timeout)
            .pool_idle_timeout(std::time::Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self {
            store,
            router,
            peers,
            failed_peers: FailedPeers::default(),
            http,
            buffer_slots: Arc::new(Semaphore::new(BUFFER_SLOTS)),
            spool_slots: Arc::new(Semaphore::new(SPOOL_SLOTS)),
            peer_upload_limit: None,
            metrics,
            metrics_registry,
            ready,
        })
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

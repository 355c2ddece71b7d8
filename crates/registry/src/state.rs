//! What the registry's handlers share.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use mirrorlet_oci::layered::Layered;
use mirrorlet_oci::private::Private;
use mirrorlet_oci::{Budget, Digest, NoUpstream, Registry, Repository, Router, Store, Upstream};
use tokio::sync::Semaphore;

use crate::cache::Cache;
use crate::config::{PeerConfig, PullThroughConfig};
use crate::failed::FailedPeers;
use crate::manifest_cache::ManifestCache;
use crate::metrics::Metrics;
use crate::outcome::{Fetched, Miss};
use crate::ratelimit::RateLimiter;
use crate::recent::{NodeInfo, Recent};
use crate::singleflight::SingleFlight;
use crate::tag_memory::Tags;
use crate::transfer::Transfers;

/// Answers whether the agent is ready (or live): `Err` carries the reason it is not.
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Blob transfers that keep a whole (small) blob in memory at once; with the verify
/// buffer this bounds that memory.
pub(crate) const BUFFER_SLOTS: usize = 16;
/// Blob transfers spooling to disk at once.
pub(crate) const SPOOL_SLOTS: usize = 32;
/// Batches on their way into spool files, by default (see [`AppState::with_spool_budget`]).
const DEFAULT_SPOOL_MEMORY: usize = 16 << 20;

/// State shared by every request.
pub struct AppState {
    /// Where local content is read: the node's store, then the pull-through cache.
    pub store: Arc<dyn Store>,
    /// Where peers are found.
    pub router: Arc<dyn Router>,
    /// Where content comes from when no node has it (pull-through; allows no registry
    /// unless configured).
    pub upstream: Arc<dyn Upstream>,
    /// How peers are used.
    pub peers: PeerConfig,
    /// How the cluster pulls through.
    pub pull: PullThroughConfig,
    /// Repositories whose tags are never answered (see [`Private`]).
    pub private: Private,
    /// Peers that failed recently.
    pub failed_peers: FailedPeers,
    /// The HTTP client for peers (no proxy, short connect timeout).
    pub http: reqwest::Client,
    /// Bounds concurrent whole-blob buffering (see [`BUFFER_SLOTS`]).
    pub buffer_slots: Arc<Semaphore>,
    /// Bounds concurrent spooling (see [`SPOOL_SLOTS`]).
    pub spool_slots: Arc<Semaphore>,
    /// What the chunks of blobs read from the spool to be sent count against (the same
    /// budget as the store's blob files: see [`AppState::with_stream_budget`]).
    pub stream_budget: Budget,
    /// What batches of blobs on their way into spool files count against until they are
    /// written and hashed (see [`AppState::with_spool_budget`]).
    pub spool_budget: Budget,
    /// Caps the bandwidth this node spends serving other agents, if set.
    pub peer_upload_limit: Option<RateLimiter>,
    /// Blobs being fetched, one transfer per digest.
    pub transfers: Transfers,
    /// What was fetched for the cluster and verified (part of [`AppState::store`]).
    pub cache: Arc<Cache>,
    /// Tags resolved or learnt, and their revalidations in flight.
    pub tags: Tags,
    /// Manifest fetches in flight.
    pub manifests: SingleFlight<Digest, Result<Fetched, Miss>>,
    /// Manifests served from [`AppState::store`], kept by digest.
    pub(crate) local_manifests: ManifestCache,
    /// Request and byte metrics.
    pub metrics: Metrics,
    /// The metrics registry rendered at `/metrics`.
    pub metrics_registry: Arc<prometheus_client::registry::Registry>,
    /// What `/readyz` reports.
    pub ready: ReadyCheck,
    /// What `/livez` reports (by default: live while it serves HTTP).
    pub live: ReadyCheck,
    /// What the status page says about this node.
    pub node: NodeInfo,
    /// When the state was built (the agent started).
    pub started: std::time::SystemTime,
    /// Requests served recently, for the status page.
    pub recent: Recent,
}

impl AppState {
    /// State over the node's `store` (the pull-through cache is layered under it), with a
    /// peer HTTP client built from `peers`. Pull-through is off until
    /// [`AppState::with_upstream`].
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
            .local_address(peers.source_address)
            .connect_timeout(peers.connect_timeout)
            .read_timeout(peers.read_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()?;
        let cache = Arc::new(Cache::default());
        Ok(Self {
            store: Arc::new(Layered::new(store, cache.clone())),
            router,
            upstream: Arc::new(NoUpstream),
            peers,
            pull: PullThroughConfig::default(),
            private: Private::default(),
            failed_peers: FailedPeers::default(),
            http,
            buffer_slots: Arc::new(Semaphore::new(BUFFER_SLOTS)),
            spool_slots: Arc::new(Semaphore::new(SPOOL_SLOTS)),
            stream_budget: Budget::default(),
            spool_budget: Budget::new(DEFAULT_SPOOL_MEMORY),
            peer_upload_limit: None,
            transfers: Transfers::default(),
            cache,
            tags: Tags::default(),
            manifests: SingleFlight::default(),
            local_manifests: ManifestCache::default(),
            metrics,
            metrics_registry,
            ready,
            live: Arc::new(|| Box::pin(async { Ok(()) })),
            node: NodeInfo::default(),
            started: std::time::SystemTime::now(),
            recent: Recent::default(),
        })
    }

    /// Pulls through from `upstream` (for the registries it allows), as `pull` says,
    /// keeping at most `cache_bytes` of fetched blobs on disk.
    pub fn with_upstream(
        mut self,
        upstream: Arc<dyn Upstream>,
        pull: PullThroughConfig,
        cache_bytes: u64,
    ) -> Self {
        self.upstream = upstream;
        self.pull = pull;
        self.cache.set_disk_budget(cache_bytes);
        self
    }

    /// Counts chunks read from the spool against `budget` (share the store's, so that one
    /// bound covers every stream).
    pub fn with_stream_budget(mut self, budget: Budget) -> Self {
        self.stream_budget = budget;
        self
    }

    /// Counts the batches of blobs on their way into spool files against `budget`: a copy
    /// hands a batch to the spool's writer once the budget has room for it, and the batch
    /// gives its share back once written and hashed. Its own budget, not the streams': a
    /// copy waiting for room waits only for this node's disk, never for clients or peers.
    pub fn with_spool_budget(mut self, budget: Budget) -> Self {
        self.spool_budget = budget;
        self
    }

    /// Treats the repositories `private` covers as private.
    pub fn with_private(mut self, private: Private) -> Self {
        self.private = private;
        self
    }

    /// Whether this agent pulls `registry/repository` through: the upstream allows the
    /// registry, and the repository is not private (or private pull-through is allowed).
    pub fn pulls_through(&self, registry: &Registry, repository: &Repository) -> bool {
        self.upstream.allows(registry)
            && self
                .private
                .may_pull_through(registry.as_str(), repository.as_str())
    }
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("peers", &self.peers)
            .field("pull", &self.pull)
            .finish_non_exhaustive()
    }
}

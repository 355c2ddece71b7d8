//! The upstream interface: how the registry reaches the registries images come from, to
//! pull content through for the whole cluster. The HTTP implementation (auth, redirects,
//! rate limits) lives in `mirrorlet-upstream`; `MemoryUpstream` (feature `test-util`) is its
//! in-memory twin, and [`NoUpstream`] stands for none.

use std::time::Duration;

use bytes::Bytes;

use crate::digest::Digest;
use crate::manifest::Descriptor;
use crate::name::{Registry, Repository};
use crate::reference::Reference;
use crate::store::BlobStream;

/// Why the upstream registry did not deliver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The agent may not pull from this registry (it is not on its list).
    #[error("pulling through from {0} is not enabled")]
    NotAllowed(Registry),
    /// The registry says there is no such repository, tag or content.
    #[error("not found upstream: {0}")]
    NotFound(String),
    /// The registry wants credentials the agent does not have, or refused them (401/403).
    #[error("access denied upstream: {0}")]
    Denied(String),
    /// The registry is rate limiting (429), or was recently and is not being asked.
    #[error("{registry} is rate limiting; not asking it for another {retry_after:?}")]
    RateLimited {
        /// The registry.
        registry: Registry,
        /// How long until it may be asked again.
        retry_after: Duration,
    },
    /// Unreachable, timed out, or a server error (5xx).
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// An answer that cannot be used: a bad header, a body too large, the wrong range.
    #[error("unusable answer from upstream: {0}")]
    Invalid(String),
}

impl UpstreamError {
    /// Whether the registry is down or limiting, as opposed to answering "no": then what
    /// the cluster already knows (a tag's last digest) may stand in for it.
    pub fn is_outage(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::RateLimited { .. })
    }
}

/// A blob body from upstream.
pub struct UpstreamBlob {
    /// The blob's total size.
    pub size: u64,
    /// Where the body starts in the blob (the offset asked for).
    pub offset: u64,
    /// The bytes from `offset` to the end. An error item means the transfer broke (a
    /// stall, a reset, a short body); the caller may ask again from where it got to.
    pub body: BlobStream,
}

impl std::fmt::Debug for UpstreamBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBlob")
            .field("size", &self.size)
            .field("offset", &self.offset)
            .finish_non_exhaustive()
    }
}

/// How a registry the agent pulls through stands now, for the status page. It names no
/// credentials, only whether there are some.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryState {
    /// The registry.
    pub registry: Registry,
    /// Where it is reached.
    pub endpoint: String,
    /// Whether credentials are configured for it.
    pub credentials: bool,
    /// The last `ratelimit-remaining` it reported.
    pub remaining: Option<i64>,
    /// The last `ratelimit-limit` it reported.
    pub limit: Option<i64>,
    /// How much longer it is left alone after a `429`.
    pub rate_limited_for: Option<Duration>,
    /// How much longer it is left alone after it could not be reached.
    pub unreachable_for: Option<Duration>,
    /// The last time it could not be used, and why.
    pub last_problem: Option<(std::time::SystemTime, String)>,
}

/// Pull access to upstream registries.
#[async_trait::async_trait]
pub trait Upstream: Send + Sync + 'static {
    /// Whether the agent may pull through from `registry`. For any other registry every
    /// call fails with [`UpstreamError::NotAllowed`] without contacting anything.
    fn allows(&self, registry: &Registry) -> bool;

    /// The registries it pulls through from, in a stable order, and how each stands.
    fn states(&self) -> Vec<RegistryState>;

    /// `HEAD` of a manifest by tag or digest: its digest, media type and size. (Docker Hub
    /// does not count a `HEAD` as a pull.)
    async fn head_manifest(
        &self,
        registry: &Registry,
        repository: &Repository,
        reference: &Reference,
        accept: &str,
    ) -> Result<Descriptor, UpstreamError>;

    /// `GET` of a manifest by tag or digest, at most 4 MiB. The descriptor's digest is
    /// computed from the bytes received (the caller checks it against what it asked for).
    async fn get_manifest(
        &self,
        registry: &Registry,
        repository: &Repository,
        reference: &Reference,
        accept: &str,
    ) -> Result<(Descriptor, Bytes), UpstreamError>;

    /// `GET` of a blob from `offset` to its end. The bytes are not verified here.
    async fn get_blob(
        &self,
        registry: &Registry,
        repository: &Repository,
        digest: &Digest,
        offset: u64,
    ) -> Result<UpstreamBlob, UpstreamError>;
}

/// No upstream: pulls nothing through (every registry is refused), for an agent that only
/// mirrors what the cluster holds.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoUpstream;

#[async_trait::async_trait]
impl Upstream for NoUpstream {
    fn allows(&self, _registry: &Registry) -> bool {
        false
    }

    fn states(&self) -> Vec<RegistryState> {
        Vec::new()
    }

    async fn head_manifest(
        &self,
        registry: &Registry,
        _repository: &Repository,
        _reference: &Reference,
        _accept: &str,
    ) -> Result<Descriptor, UpstreamError> {
        Err(UpstreamError::NotAllowed(registry.clone()))
    }

    async fn get_manifest(
        &self,
        registry: &Registry,
        _repository: &Repository,
        _reference: &Reference,
        _accept: &str,
    ) -> Result<(Descriptor, Bytes), UpstreamError> {
        Err(UpstreamError::NotAllowed(registry.clone()))
    }

    async fn get_blob(
        &self,
        registry: &Registry,
        _repository: &Repository,
        _digest: &Digest,
        _offset: u64,
    ) -> Result<UpstreamBlob, UpstreamError> {
        Err(UpstreamError::NotAllowed(registry.clone()))
    }
}

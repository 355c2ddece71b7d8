//! [`MemoryUpstream`]: the [`Upstream`] twin, with content per repository, a log of
//! requests and faults to inject.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream;

use crate::digest::Digest;
use crate::manifest::{self, Descriptor};
use crate::name::{Registry, Repository};
use crate::reference::Reference;
use crate::store::BlobStream;
use crate::upstream::{RegistryState, Upstream, UpstreamBlob, UpstreamError};

/// What a request to a [`MemoryUpstream`] asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RequestKind {
    /// `HEAD` of a manifest.
    Head,
    /// `GET` of a manifest.
    Manifest,
    /// `GET` of a blob.
    Blob,
}

/// One request a [`MemoryUpstream`] answered (or refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRequest {
    /// What was asked.
    pub kind: RequestKind,
    /// The registry.
    pub registry: Registry,
    /// The repository.
    pub repository: Repository,
    /// The tag or digest.
    pub reference: String,
    /// Where a blob was asked from.
    pub offset: u64,
}

/// A fault a [`MemoryUpstream`] injects into one blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// One byte in the middle is flipped (and the manifest or blob no longer matches).
    Corrupt,
    /// The body comes in `chunk`-byte pieces with `delay` before each.
    Slow {
        /// Bytes per piece.
        chunk: usize,
        /// Wait before each piece.
        delay: Duration,
    },
    /// The body breaks (an error item) once it reaches this offset; asking again from
    /// there works.
    BreakAt(u64),
}

#[derive(Debug, Default)]
struct Repo {
    tags: HashMap<String, Digest>,
    content: HashMap<Digest, (String, Bytes)>,
}

#[derive(Debug, Default)]
struct Inner {
    repos: HashMap<(Registry, Repository), Repo>,
    requests: Vec<UpstreamRequest>,
    outage: Option<UpstreamError>,
    faults: HashMap<Digest, Fault>,
}

/// An [`Upstream`] held in memory, for tests: content per repository, a log of requests,
/// and switches for outages and faults.
#[derive(Debug)]
pub struct MemoryUpstream {
    allowed: BTreeSet<Registry>,
    inner: Mutex<Inner>,
}

/// Chunk size of blob bodies served from memory.
const CHUNK: usize = 64 * 1024;

impl MemoryUpstream {
    /// An empty upstream that pulls through from `allowed`.
    pub fn new(allowed: impl IntoIterator<Item = Registry>) -> Self {
        Self {
            allowed: allowed.into_iter().collect(),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores content (a blob, or a manifest with its media type) in a repository and
    /// returns its descriptor.
    pub fn put(
        &self,
        registry: &Registry,
        repository: &Repository,
        media_type: &str,
        data: impl Into<Bytes>,
    ) -> Descriptor {
        let data = data.into();
        let desc = Descriptor {
            media_type: media_type.to_owned(),
            digest: Digest::sha256_of(&data),
            size: data.len() as u64,
        };
        self.lock()
            .repos
            .entry((registry.clone(), repository.clone()))
            .or_default()
            .content
            .insert(desc.digest.clone(), (media_type.to_owned(), data));
        desc
    }

    /// Points `tag` at `digest` (moving it if it pointed elsewhere).
    pub fn tag(&self, registry: &Registry, repository: &Repository, tag: &str, digest: &Digest) {
        self.lock()
            .repos
            .entry((registry.clone(), repository.clone()))
            .or_default()
            .tags
            .insert(tag.to_owned(), digest.clone());
    }

    /// Deletes `tag`.
    pub fn untag(&self, registry: &Registry, repository: &Repository, tag: &str) {
        if let Some(repo) = self
            .lock()
            .repos
            .get_mut(&(registry.clone(), repository.clone()))
        {
            repo.tags.remove(tag);
        }
    }

    /// Makes every call fail with `error` (`None` ends the outage).
    pub fn set_outage(&self, error: Option<UpstreamError>) {
        self.lock().outage = error;
    }

    /// Injects `fault` into the content `digest` (`None` removes it).
    pub fn set_fault(&self, digest: &Digest, fault: Option<Fault>) {
        let mut inner = self.lock();
        match fault {
            Some(f) => inner.faults.insert(digest.clone(), f),
            None => inner.faults.remove(digest),
        };
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<UpstreamRequest> {
        self.lock().requests.clone()
    }

    /// How many requests of `kind` were made.
    pub fn count(&self, kind: RequestKind) -> usize {
        self.lock()
            .requests
            .iter()
            .filter(|r| r.kind == kind)
            .count()
    }

    /// Logs the request and finds the content it names.
    fn find(
        &self,
        kind: RequestKind,
        registry: &Registry,
        repository: &Repository,
        reference: &Reference,
        offset: u64,
    ) -> Result<(Descriptor, Bytes, Option<Fault>), UpstreamError> {
        // Every call is logged, even those refused: a test can then see the caller asked.
        let mut inner = self.lock();
        inner.requests.push(UpstreamRequest {
            kind,
            registry: registry.clone(),
            repository: repository.clone(),
            reference: reference.to_string(),
            offset,
        });
        if !self.allowed.contains(registry) {
            return Err(UpstreamError::NotAllowed(registry.clone()));
        }
        if let Some(e) = &inner.outage {
            return Err(e.clone());
        }
        let missing = || UpstreamError::NotFound(format!("{registry}/{repository}:{reference}"));
        let repo = inner
            .repos
            .get(&(registry.clone(), repository.clone()))
            .ok_or_else(missing)?;
        let digest = match reference {
            Reference::Tag(t) => repo.tags.get(t.as_str()).ok_or_else(missing)?,
            Reference::Digest(d) => d,
        };
        let (media_type, data) = repo.content.get(digest).ok_or_else(missing)?;
        // The manifests endpoints serve manifests only; the blobs endpoint serves anything.
        if kind != RequestKind::Blob && !manifest::is_manifest_type(media_type) {
            return Err(missing());
        }
        let desc = Descriptor {
            media_type: media_type.clone(),
            digest: digest.clone(),
            size: data.len() as u64,
        };
        let fault = inner.faults.get(digest).cloned();
        Ok((desc, data.clone(), fault))
    }
}

fn corrupted(data: &Bytes) -> Bytes {
    let mut v = data.to_vec();
    if let Some(b) = v.get_mut(data.len() / 2) {
        *b ^= 0xff;
    }
    Bytes::from(v)
}

fn body(data: Bytes, offset: u64, fault: Option<Fault>) -> BlobStream {
    let data = match fault {
        Some(Fault::Corrupt) => corrupted(&data),
        _ => data,
    };
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(data.len());
    let chunk = match fault {
        Some(Fault::Slow { chunk, .. }) => chunk.max(1),
        _ => CHUNK,
    };
    let pieces: Vec<(usize, usize)> = (start..data.len())
        .step_by(chunk)
        .map(|at| (at, data.len().min(at + chunk)))
        .collect();
    stream::iter(pieces)
        .then(move |(a, b)| {
            let (data, fault) = (data.clone(), fault.clone());
            async move {
                match fault {
                    Some(Fault::Slow { delay, .. }) => tokio::time::sleep(delay).await,
                    Some(Fault::BreakAt(at)) if (a as u64) <= at && at < b as u64 => {
                        return Err(std::io::Error::other("connection reset (injected)"));
                    }
                    _ => {}
                }
                Ok(data.slice(a..b))
            }
        })
        .scan(false, |broken, item| {
            // Nothing more after a break, as on a reset connection.
            if *broken {
                return futures_util::future::ready(None);
            }
            *broken = item.is_err();
            futures_util::future::ready(Some(item))
        })
        .boxed()
}

#[async_trait::async_trait]
impl Upstream for MemoryUpstream {
    fn allows(&self, registry: &Registry) -> bool {
        self.allowed.contains(registry)
    }

    fn states(&self) -> Vec<RegistryState> {
        let outage = self.lock().outage.as_ref().map(ToString::to_string);
        self.allowed
            .iter()
            .map(|registry| RegistryState {
                registry: registry.clone(),
                endpoint: format!("memory://{registry}"),
                credentials: false,
                remaining: None,
                limit: None,
                rate_limited_for: None,
                unreachable_for: None,
                last_problem: outage
                    .clone()
                    .map(|why| (std::time::SystemTime::now(), why)),
            })
            .collect()
    }

    async fn head_manifest(
        &self,
        registry: &Registry,
        repository: &Repository,
        reference: &Reference,
        _accept: &str,
    ) -> Result<Descriptor, UpstreamError> {
        self.find(RequestKind::Head, registry, repository, reference, 0)
            .map(|(d, _, _)| d)
    }

    async fn get_manifest(
        &self,
        registry: &Registry,
        repository: &Repository,
        reference: &Reference,
        _accept: &str,
    ) -> Result<(Descriptor, Bytes), UpstreamError> {
        let (desc, data, fault) =
            self.find(RequestKind::Manifest, registry, repository, reference, 0)?;
        let data = match fault {
            Some(Fault::Corrupt) => corrupted(&data),
            _ => data,
        };
        let digest = Digest::sha256_of(&data);
        Ok((Descriptor { digest, ..desc }, data))
    }

    async fn get_blob(
        &self,
        registry: &Registry,
        repository: &Repository,
        digest: &Digest,
        offset: u64,
    ) -> Result<UpstreamBlob, UpstreamError> {
        let reference = Reference::Digest(digest.clone());
        let (desc, data, fault) =
            self.find(RequestKind::Blob, registry, repository, &reference, offset)?;
        if offset > 0 && offset >= desc.size {
            return Err(UpstreamError::Invalid(format!(
                "range from {offset} lies outside a blob of {} bytes",
                desc.size
            )));
        }
        Ok(UpstreamBlob {
            size: desc.size,
            offset,
            body: body(data, offset, fault),
        })
    }
}

//! What the agent fetched for the cluster and verified: blobs (their spool files, or memory
//! for small ones) and manifests, kept within byte budgets, least recently used first out.
//! It is a [`Store`], layered under containerd's, so the registry serves it and the
//! advertiser announces it like any content the node holds; what it evicts is withdrawn.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};
use lru::LruCache;
use mirrorlet_oci::manifest::{Descriptor, OCTET_STREAM};
use mirrorlet_oci::{
    BlobStream, ByteRange, Digest, ImageContent, ImageName, Inventory, Store, StoreError,
    StoreEvent, TagTarget,
};
use tokio::sync::broadcast;

use crate::transfer::Backing;

/// Default budget for blobs kept in spool files.
pub(crate) const DEFAULT_DISK_BUDGET: u64 = 4 << 30;
/// Budget for what is kept in memory (manifests, small blobs).
pub(crate) const MEMORY_BUDGET: u64 = 64 << 20;

enum Entry {
    Blob { backing: Arc<Backing>, size: u64 },
    Manifest { media_type: String, bytes: Bytes },
}

impl Entry {
    fn size(&self) -> u64 {
        match self {
            Self::Blob { size, .. } => *size,
            Self::Manifest { bytes, .. } => bytes.len() as u64,
        }
    }

    /// (disk, memory) bytes it takes.
    fn weight(&self) -> (u64, u64) {
        match self {
            Self::Blob { backing, size } => {
                let mem = backing.memory_bytes();
                (size - mem.min(*size), mem)
            }
            Self::Manifest { bytes, .. } => (0, bytes.len() as u64),
        }
    }
}

struct Inner {
    entries: LruCache<Digest, Entry>,
    disk: u64,
    memory: u64,
}

/// The pull-through cache.
pub struct Cache {
    inner: Mutex<Inner>,
    disk_budget: AtomicU64,
    events: broadcast::Sender<StoreEvent>,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.lock();
        f.debug_struct("Cache")
            .field("entries", &inner.entries.len())
            .field("disk", &inner.disk)
            .field("memory", &inner.memory)
            .finish()
    }
}

impl Default for Cache {
    fn default() -> Self {
        Self::new(DEFAULT_DISK_BUDGET)
    }
}

impl Cache {
    /// An empty cache keeping at most `disk_budget` bytes of spool files.
    pub fn new(disk_budget: u64) -> Self {
        Self {
            inner: Mutex::new(Inner {
                entries: LruCache::unbounded(),
                disk: 0,
                memory: 0,
            }),
            disk_budget: AtomicU64::new(disk_budget),
            events: broadcast::channel(1024).0,
        }
    }

    /// Changes the disk budget (evicting at the next insertion).
    pub fn set_disk_budget(&self, bytes: u64) {
        self.disk_budget.store(bytes, Ordering::Relaxed);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps a verified blob.
    pub(crate) fn put_blob(&self, digest: &Digest, backing: Arc<Backing>, size: u64) {
        self.insert(digest, Entry::Blob { backing, size });
    }

    /// Keeps a verified manifest.
    pub fn put_manifest(&self, descriptor: &Descriptor, bytes: Bytes) {
        self.insert(
            &descriptor.digest,
            Entry::Manifest {
                media_type: descriptor.media_type.clone(),
                bytes,
            },
        );
    }

    /// A cached manifest and its descriptor.
    pub fn manifest(&self, digest: &Digest) -> Option<(Descriptor, Bytes)> {
        let mut inner = self.lock();
        match inner.entries.get(digest)? {
            Entry::Manifest { media_type, bytes } => Some((
                Descriptor {
                    media_type: media_type.clone(),
                    digest: digest.clone(),
                    size: bytes.len() as u64,
                },
                bytes.clone(),
            )),
            Entry::Blob { .. } => None,
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, digest: &Digest, entry: Entry) {
        let budget = self.disk_budget.load(Ordering::Relaxed);
        let mut evicted = Vec::new();
        let added = {
            let mut inner = self.lock();
            let (disk, mem) = entry.weight();
            if disk > budget || mem > MEMORY_BUDGET {
                false
            } else {
                if let Some(old) = inner.entries.put(digest.clone(), entry) {
                    let (d, m) = old.weight();
                    inner.disk -= d;
                    inner.memory -= m;
                }
                inner.disk += disk;
                inner.memory += mem;
                // Out goes the least recently used entry that takes what is short.
                while inner.disk > budget || inner.memory > MEMORY_BUDGET {
                    let over_disk = inner.disk > budget;
                    let victim = inner
                        .entries
                        .iter()
                        .rev()
                        .find(|(_, e)| {
                            let (d, m) = e.weight();
                            if over_disk { d > 0 } else { m > 0 }
                        })
                        .map(|(d, _)| d.clone());
                    let Some(old) = victim.and_then(|d| inner.entries.pop_entry(&d)) else {
                        break;
                    };
                    let (dw, mw) = old.1.weight();
                    inner.disk -= dw;
                    inner.memory -= mw;
                    evicted.push(old.0);
                }
                true
            }
        };
        if added && !evicted.contains(digest) {
            let _ = self.events.send(StoreEvent::ContentAdded(digest.clone()));
        }
        for d in evicted {
            tracing::debug!(digest = %d, "evicted from the pull-through cache");
            let _ = self.events.send(StoreEvent::ContentDeleted(d));
        }
    }

    fn entry_size(&self, digest: &Digest) -> Option<u64> {
        self.lock().entries.peek(digest).map(Entry::size)
    }
}

#[async_trait::async_trait]
impl Store for Cache {
    async fn resolve(&self, _name: &ImageName) -> Result<Option<TagTarget>, StoreError> {
        Ok(None)
    }

    async fn descriptor(&self, digest: &Digest) -> Result<Option<Descriptor>, StoreError> {
        let inner = self.lock();
        Ok(inner.entries.peek(digest).map(|e| Descriptor {
            media_type: match e {
                Entry::Manifest { media_type, .. } => media_type.clone(),
                Entry::Blob { .. } => OCTET_STREAM.to_owned(),
            },
            digest: digest.clone(),
            size: e.size(),
        }))
    }

    async fn size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        Ok(self.entry_size(digest))
    }

    async fn open(&self, digest: &Digest, range: ByteRange) -> Result<BlobStream, StoreError> {
        let found = {
            let mut inner = self.lock();
            match inner.entries.get(digest) {
                Some(Entry::Blob { backing, size }) => Some((Some(backing.clone()), None, *size)),
                Some(Entry::Manifest { bytes, .. }) => {
                    Some((None, Some(bytes.clone()), bytes.len() as u64))
                }
                None => None,
            }
        };
        let (backing, bytes, size) = found.ok_or_else(|| StoreError::NotFound(digest.clone()))?;
        range.check(digest, size)?;
        match (backing, bytes) {
            (Some(b), _) => Ok(b.stream(range)),
            (None, Some(bytes)) => {
                let part = bytes.slice(
                    usize::try_from(range.start).unwrap_or(0)
                        ..usize::try_from(range.end).unwrap_or(0),
                );
                Ok(stream::once(async move { Ok(part) }).boxed())
            }
            (None, None) => Err(StoreError::NotFound(digest.clone())),
        }
    }

    async fn list(&self) -> Result<Inventory, StoreError> {
        let inner = self.lock();
        Ok(Inventory {
            images: Vec::new(),
            blobs: inner.entries.iter().map(|(d, _)| d.clone()).collect(),
        })
    }

    async fn image(&self, _name: &str) -> Result<Option<ImageContent>, StoreError> {
        Ok(None)
    }

    fn watch(&self) -> BoxStream<'static, StoreEvent> {
        mirrorlet_oci::store::broadcast_watch(&self.events)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn abort_ingests(&self, _digest: &Digest) -> Result<usize, StoreError> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest_desc(bytes: &Bytes) -> Descriptor {
        Descriptor {
            media_type: mirrorlet_oci::manifest::OCI_MANIFEST.into(),
            digest: Digest::sha256_of(bytes),
            size: bytes.len() as u64,
        }
    }

    #[tokio::test]
    async fn keeps_within_budget_and_reports_what_comes_and_goes() {
        let cache = Cache::new(1000);
        let mut events = cache.watch();
        assert_eq!(events.next().await, Some(StoreEvent::Resync));
        let m = Bytes::from_static(b"{\"manifest\":1}");
        let md = manifest_desc(&m);
        cache.put_manifest(&md, m.clone());
        assert_eq!(
            events.next().await,
            Some(StoreEvent::ContentAdded(md.digest.clone()))
        );
        assert_eq!(
            cache.descriptor(&md.digest).await.expect("d"),
            Some(md.clone())
        );
        assert_eq!(cache.manifest(&md.digest).map(|(_, b)| b), Some(m));

        // Files count against the disk budget: a third 400-byte blob evicts the oldest.
        let dir = tempfile::tempdir().expect("dir");
        let mut digests = Vec::new();
        for i in 0..3u8 {
            let data = vec![i; 400];
            let file = tempfile::tempfile_in(dir.path()).expect("file");
            std::os::unix::fs::FileExt::write_all_at(&file, &data, 0).expect("write");
            let d = Digest::sha256_of(&data);
            cache.put_blob(
                &d,
                Arc::new(Backing::File(file, mirrorlet_oci::Budget::default())),
                400,
            );
            digests.push(d);
        }
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(events.next().await.expect("event"));
        }
        assert!(
            seen.contains(&StoreEvent::ContentDeleted(digests[0].clone())),
            "{seen:?}"
        );
        assert_eq!(cache.size(&digests[0]).await.expect("size"), None);
        assert_eq!(cache.size(&digests[2]).await.expect("size"), Some(400));
        let mut s = cache
            .open(&digests[2], ByteRange { start: 10, end: 20 })
            .await
            .expect("open");
        let mut got = Vec::new();
        while let Some(c) = s.next().await {
            got.extend_from_slice(&c.expect("chunk"));
        }
        assert_eq!(got, vec![2u8; 10]);
        let listed = cache.list().await.expect("list").blobs;
        assert_eq!(listed.len(), 3, "the manifest and two blobs: {listed:?}");
        // Streams of one file run side by side without disturbing each other.
        let big: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        let file = tempfile::tempfile_in(dir.path()).expect("file");
        std::os::unix::fs::FileExt::write_all_at(&file, &big, 0).expect("write");
        let bd = Digest::sha256_of(&big);
        let cache2 = Cache::new(1 << 30);
        cache2.put_blob(
            &bd,
            Arc::new(Backing::File(file, mirrorlet_oci::Budget::default())),
            big.len() as u64,
        );
        let size = big.len() as u64;
        let mut a = cache2.open(&bd, ByteRange::full(size)).await.expect("open");
        let mut b = cache2
            .open(
                &bd,
                ByteRange {
                    start: 1000,
                    end: size,
                },
            )
            .await
            .expect("open");
        let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
        loop {
            let (x, y) = (a.next().await, b.next().await);
            if x.is_none() && y.is_none() {
                break;
            }
            got_a.extend_from_slice(&x.map(|c| c.expect("a")).unwrap_or_default());
            got_b.extend_from_slice(&y.map(|c| c.expect("b")).unwrap_or_default());
        }
        assert!(
            got_a == big && got_b == big[1000..],
            "interleaved reads are independent"
        );

        // Too large for the budget at all: not kept.
        let big = Digest::sha256_of(b"big");
        let file = tempfile::tempfile_in(dir.path()).expect("file");
        cache.put_blob(
            &big,
            Arc::new(Backing::File(file, mirrorlet_oci::Budget::default())),
            5000,
        );
        assert_eq!(cache.size(&big).await.expect("size"), None);
    }
}

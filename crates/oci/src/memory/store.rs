//! [`MemoryStore`]: the [`Store`] twin, content and tags held in memory.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{PoisonError, RwLock};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};
use tokio::sync::broadcast;

use crate::digest::Digest;
use crate::manifest::{Descriptor, Manifest, OCTET_STREAM};
use crate::reference::ImageName;
use crate::store::{
    BlobStream, ByteRange, ImageContent, Inventory, Store, StoreError, StoreEvent, TagTarget,
};
use crate::walk;

/// Chunk size of streams served from memory.
const CHUNK: usize = 64 * 1024;

#[derive(Default)]
struct Inner {
    /// Images with their targets and when they were last set.
    images: BTreeMap<String, (Descriptor, SystemTime)>,
    blobs: HashMap<Digest, Bytes>,
    /// Unfinished downloads: reference -> the digest being written.
    ingests: BTreeMap<String, Digest>,
}

/// A content store held in memory. Mutations publish the same events containerd would.
pub struct MemoryStore {
    inner: RwLock<Inner>,
    events: broadcast::Sender<StoreEvent>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("MemoryStore")
            .field("images", &inner.images.len())
            .field("blobs", &inner.blobs.len())
            .finish()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            inner: RwLock::default(),
            events: broadcast::channel(1024).0,
        }
    }

    /// Adds a blob and returns its descriptor (media type sniffed as containerd's store would).
    pub fn put_blob(&self, data: impl Into<Bytes>) -> Descriptor {
        let data = data.into();
        let digest = Digest::sha256_of(&data);
        let desc = describe(&digest, &data);
        self.write().blobs.insert(digest.clone(), data);
        let _ = self.events.send(StoreEvent::ContentAdded(digest));
        desc
    }

    /// Creates or retargets an image.
    pub fn put_image(&self, name: &str, target: Descriptor) {
        self.put_image_at(name, target, SystemTime::now());
    }

    /// Creates or retargets an image, recording it as set at `updated`.
    pub fn put_image_at(&self, name: &str, target: Descriptor, updated: SystemTime) {
        self.write()
            .images
            .insert(name.to_owned(), (target, updated));
        let _ = self.events.send(StoreEvent::ImageChanged(name.to_owned()));
    }

    /// Records an unfinished download of `digest` under `reference`, as a client's pull in
    /// progress would leave one.
    pub fn begin_ingest(&self, reference: &str, digest: &Digest) {
        self.write()
            .ingests
            .insert(reference.to_owned(), digest.clone());
    }

    /// The references of the unfinished downloads.
    pub fn ingests(&self) -> Vec<String> {
        self.read().ingests.keys().cloned().collect()
    }

    /// Deletes an image (its blobs stay, as in containerd until garbage collection).
    pub fn delete_image(&self, name: &str) {
        if self.write().images.remove(name).is_some() {
            let _ = self.events.send(StoreEvent::ImageDeleted(name.to_owned()));
        }
    }

    /// Deletes a blob.
    pub fn delete_blob(&self, digest: &Digest) {
        if self.write().blobs.remove(digest).is_some() {
            let _ = self.events.send(StoreEvent::ContentDeleted(digest.clone()));
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn blob(&self, digest: &Digest) -> Option<Bytes> {
        self.read().blobs.get(digest).cloned()
    }

    async fn content_of(&self, name: &str, target: Descriptor) -> ImageContent {
        let walked = walk::present_digests(
            &target,
            |d| self.read().blobs.contains_key(d),
            |d| async move { Ok::<_, Infallible>(self.blob(&d.digest).map(|b| b.to_vec())) },
        )
        .await;
        let digests = match walked {
            Ok(d) => d,
            Err(never) => match never {},
        };
        ImageContent {
            name: name.to_owned(),
            tag: ImageName::parse(name).ok(),
            target,
            digests,
        }
    }
}

fn describe(digest: &Digest, data: &Bytes) -> Descriptor {
    let media_type =
        Manifest::sniff(data).map_or_else(|| OCTET_STREAM.to_owned(), |m| m.media_type);
    Descriptor {
        media_type,
        digest: digest.clone(),
        size: data.len() as u64,
    }
}

#[async_trait::async_trait]
impl Store for MemoryStore {
    async fn resolve(&self, name: &ImageName) -> Result<Option<TagTarget>, StoreError> {
        let inner = self.read();
        Ok(inner
            .images
            .get(&name.to_string())
            .filter(|(target, _)| inner.blobs.contains_key(&target.digest))
            .map(|(target, updated)| TagTarget {
                descriptor: target.clone(),
                updated: Some(*updated),
            }))
    }

    async fn descriptor(&self, digest: &Digest) -> Result<Option<Descriptor>, StoreError> {
        Ok(self.blob(digest).map(|data| describe(digest, &data)))
    }

    async fn size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        Ok(self.read().blobs.get(digest).map(|b| b.len() as u64))
    }

    async fn open(&self, digest: &Digest, range: ByteRange) -> Result<BlobStream, StoreError> {
        let data = self
            .blob(digest)
            .ok_or_else(|| StoreError::NotFound(digest.clone()))?;
        let size = data.len() as u64;
        range.check(digest, size)?;
        // Bounds were checked against the blob's length, so these fit in usize.
        let slice = data.slice(range.start as usize..range.end as usize);
        let chunks: Vec<_> = (0..slice.len())
            .step_by(CHUNK)
            .map(|at| Ok(slice.slice(at..slice.len().min(at + CHUNK))))
            .collect();
        Ok(stream::iter(chunks).boxed())
    }

    async fn list(&self) -> Result<Inventory, StoreError> {
        let images: Vec<_> = self.read().images.clone().into_iter().collect();
        let mut out = Inventory::default();
        for (name, (target, _)) in images {
            out.images.push(self.content_of(&name, target).await);
        }
        Ok(out)
    }

    async fn image(&self, name: &str) -> Result<Option<ImageContent>, StoreError> {
        let target = self.read().images.get(name).map(|(t, _)| t.clone());
        match target {
            Some(t) => Ok(Some(self.content_of(name, t).await)),
            None => Ok(None),
        }
    }

    fn watch(&self) -> BoxStream<'static, StoreEvent> {
        crate::store::broadcast_watch(&self.events)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn abort_ingests(&self, digest: &Digest) -> Result<usize, StoreError> {
        let mut inner = self.write();
        let before = inner.ingests.len();
        inner.ingests.retain(|_, d| d != digest);
        Ok(before - inner.ingests.len())
    }
}

//! The content-store interface: what the registry needs from wherever images live
//! (containerd on a node, memory in tests).

use std::collections::BTreeSet;
use std::io;
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::stream::BoxStream;

use crate::digest::Digest;
use crate::manifest::Descriptor;
use crate::reference::ImageName;

/// A blob's bytes as a stream of chunks. Chunks are bounded in size, so streaming a
/// blob of any size holds only a few chunks in memory.
pub type BlobStream = BoxStream<'static, io::Result<Bytes>>;

/// A half-open byte range `[start, end)` within a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl ByteRange {
    /// The whole of a blob of `size` bytes.
    pub fn full(size: u64) -> Self {
        Self {
            start: 0,
            end: size,
        }
    }

    /// Number of bytes in the range.
    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    /// Whether the range holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks that the range lies within `digest`'s blob of `size` bytes.
    pub fn check(&self, digest: &Digest, size: u64) -> Result<(), StoreError> {
        if self.start > self.end || self.end > size {
            return Err(StoreError::RangeOutOfBounds {
                digest: digest.clone(),
                start: self.start,
                end: self.end,
                size,
            });
        }
        Ok(())
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backing store (containerd) cannot be reached right now.
    #[error("content store unavailable: {0}")]
    Unavailable(String),
    /// The blob is not in the store (or was removed while being opened).
    #[error("blob {0} not found in the content store")]
    NotFound(Digest),
    /// The range does not lie within the blob.
    #[error("range {start}-{end} is outside blob {digest} of {size} bytes")]
    RangeOutOfBounds {
        /// The blob.
        digest: Digest,
        /// Requested start.
        start: u64,
        /// Requested end (exclusive).
        end: u64,
        /// The blob's size.
        size: u64,
    },
    /// Reading content failed.
    #[error("reading {digest}: {source}")]
    Read {
        /// The blob being read.
        digest: Digest,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// One image the store holds and the content of it that is present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageContent {
    /// The image's name as the store records it.
    pub name: String,
    /// The name parsed, when it is a fully qualified `registry/repo:tag` (these are the tags
    /// the node can resolve).
    pub tag: Option<ImageName>,
    /// The image's target descriptor.
    pub target: Descriptor,
    /// Digests of the image's manifests, configs and layers present in the store, the
    /// target first. Children of an index that were never pulled (other platforms) are left out.
    pub digests: Vec<Digest>,
}

/// Everything a store can serve.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inventory {
    /// Every image with its present content.
    pub images: Vec<ImageContent>,
    /// Content held apart from any image (the pull-through cache's blobs and manifests).
    pub blobs: Vec<Digest>,
}

impl Inventory {
    /// Every distinct digest, across all images and the loose content.
    pub fn digests(&self) -> BTreeSet<Digest> {
        self.images
            .iter()
            .flat_map(|i| i.digests.iter().cloned())
            .chain(self.blobs.iter().cloned())
            .collect()
    }

    /// Every tag (as `registry/repo:tag`) across all images.
    pub fn tags(&self) -> BTreeSet<String> {
        self.images
            .iter()
            .filter_map(|i| {
                i.tag
                    .as_ref()
                    .filter(|t| t.tag().is_some())
                    .map(ToString::to_string)
            })
            .collect()
    }
}

/// What a tag resolves to in a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagTarget {
    /// The tag's target.
    pub descriptor: Descriptor,
    /// When the store last set the tag to this target (containerd's image `updated_at`),
    /// if it records that: how old this node's knowledge of the tag is, at most.
    pub updated: Option<SystemTime>,
}

/// A change in the store, as seen by [`Store::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreEvent {
    /// An image was created or its target changed.
    ImageChanged(String),
    /// An image was deleted (its content may remain until garbage collection).
    ImageDeleted(String),
    /// A blob was committed to the content store.
    ContentAdded(Digest),
    /// A blob was removed from the content store.
    ContentDeleted(Digest),
    /// Events may have been missed (the watch reconnected or fell behind): list again.
    Resync,
}

/// A [`Store::watch`] feed over a broadcast of events: `Resync` first, then the events,
/// and `Resync` again whenever the subscriber fell behind and missed some.
pub fn broadcast_watch(
    events: &tokio::sync::broadcast::Sender<StoreEvent>,
) -> BoxStream<'static, StoreEvent> {
    use futures_util::StreamExt;
    let live = tokio_stream::wrappers::BroadcastStream::new(events.subscribe())
        .map(|e| e.unwrap_or(StoreEvent::Resync));
    futures_util::stream::once(async { StoreEvent::Resync })
        .chain(live)
        .boxed()
}

/// Read access to a node's images and content, plus a feed of changes.
///
/// Implementations must be cheap to share (`Arc`) and safe to call concurrently.
#[async_trait::async_trait]
pub trait Store: Send + Sync + 'static {
    /// Resolves a tagged image name to its target; `None` if the store has no such image
    /// or its target is not present.
    async fn resolve(&self, name: &ImageName) -> Result<Option<TagTarget>, StoreError>;

    /// Describes a digest: its size and, for manifests and indexes, the media type read
    /// from the content. `None` if the content is not present.
    async fn descriptor(&self, digest: &Digest) -> Result<Option<Descriptor>, StoreError>;

    /// The size of a blob; `None` if it is not present. Cheaper than [`Store::descriptor`]
    /// (no media type is read), for serving blobs.
    async fn size(&self, digest: &Digest) -> Result<Option<u64>, StoreError>;

    /// Opens `range` of a blob. The range must lie within the blob.
    async fn open(&self, digest: &Digest, range: ByteRange) -> Result<BlobStream, StoreError>;

    /// Lists every image and the content of it that is present.
    async fn list(&self) -> Result<Inventory, StoreError>;

    /// Lists one image's present content; `None` if there is no image by that name.
    async fn image(&self, name: &str) -> Result<Option<ImageContent>, StoreError>;

    /// A never-ending feed of changes. Its first item is [`StoreEvent::Resync`], yielded once
    /// the feed is live; after any gap (reconnect, lag) it yields `Resync` again. A consumer
    /// lists the store on every `Resync`, so subscribe-then-list never misses a change.
    fn watch(&self) -> BoxStream<'static, StoreEvent>;

    /// Checks that the store can be reached now.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Aborts every unfinished download (ingest) of `digest` in the store, so that the next
    /// attempt starts from nothing instead of resuming bytes already written. Called when
    /// bytes sent to the store's client turned out not to match their digest. Returns how
    /// many were aborted.
    async fn abort_ingests(&self, digest: &Digest) -> Result<usize, StoreError>;
}

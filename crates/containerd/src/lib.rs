//! The [`Store`] backed by a node's containerd: images and content read over containerd's
//! gRPC API (in one containerd namespace, `k8s.io` for Kubernetes), blobs served from the
//! content directory's files when it is mounted, and changes followed through containerd's
//! event stream. containerd being down is an error per call, never fatal: the channel
//! reconnects and the event feed resumes with a resync.

// The workspace denies unsafe code; only the agent binary allows it, in one place.
#![forbid(unsafe_code)]

mod client;
mod content;
pub mod cri;
mod events;
mod files;
mod media;

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::version_client::VersionClient;
use containerd_client::services::v1::{GetImageRequest, Image, ListImagesRequest};
use containerd_client::tonic::transport::Channel;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use mirrorlet_oci::manifest::{self, Manifest};
use mirrorlet_oci::{
    BlobStream, ByteRange, Descriptor, Digest, ImageContent, ImageName, Inventory, Store,
    StoreError, StoreEvent, TagTarget, walk,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::client::{is_not_found, request, unavailable};
use crate::content::Content;
use crate::media::MediaTypes;

/// The subdirectory of containerd's root that holds the content store.
pub const CONTENT_SUBDIR: &str = "io.containerd.content.v1.content";

/// How long a readiness ping may take.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Where containerd is and how to read it.
#[derive(Debug, Clone)]
pub struct Config {
    /// containerd's gRPC socket, e.g. `/run/containerd/containerd.sock`.
    pub socket: PathBuf,
    /// The containerd namespace whose images are served (`k8s.io` for the CRI).
    pub namespace: String,
    /// containerd's content directory (`<root>/io.containerd.content.v1.content`), if it is
    /// readable here. Blobs are then read from its files; otherwise over gRPC.
    pub content_dir: Option<PathBuf>,
    /// Entries in the media-type cache.
    pub media_type_cache: NonZeroUsize,
    /// What the chunks of blob files being sent count against (shared with the registry's
    /// spool reads, so one bound covers every stream of the agent).
    pub stream_budget: mirrorlet_oci::Budget,
}

/// A download under way in containerd's content store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingest {
    /// Its reference (a pull's ends in the digest, e.g. `layer-sha256:...`).
    pub reference: String,
    /// Bytes written so far.
    pub offset: u64,
    /// Bytes expected (0 if unknown).
    pub total: u64,
}

/// A [`Store`] over containerd.
pub struct ContainerdStore {
    channel: Channel,
    namespace: String,
    content: Content,
    media_types: MediaTypes,
}

impl std::fmt::Debug for ContainerdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerdStore")
            .field("namespace", &self.namespace)
            .field("content_dir", &self.content.dir())
            .finish()
    }
}

impl ContainerdStore {
    /// Creates the store. Nothing is dialled until the first call, so this succeeds while
    /// containerd is down.
    pub fn new(config: Config) -> Self {
        let channel = client::channel(&config.socket);
        let content = Content::new(
            channel.clone(),
            config.namespace.clone(),
            config.content_dir,
            config.stream_budget,
        );
        Self {
            channel,
            namespace: config.namespace,
            content,
            media_types: MediaTypes::new(config.media_type_cache),
        }
    }

    /// The downloads under way in the namespace (containerd's ingests), for progress.
    pub async fn ingests(&self) -> Result<Vec<Ingest>, StoreError> {
        Ok(self
            .content
            .statuses()
            .await?
            .into_iter()
            .map(|s| Ingest {
                reference: s.r#ref,
                offset: u64::try_from(s.offset).unwrap_or(0),
                total: u64::try_from(s.total).unwrap_or(0),
            })
            .collect())
    }

    fn images(&self) -> ImagesClient<Channel> {
        ImagesClient::new(self.channel.clone()).max_decoding_message_size(64 * 1024 * 1024)
    }

    /// The image record named `name`, if there is one.
    async fn get_image(&self, name: &str) -> Result<Option<Image>, StoreError> {
        let req = request(
            &self.namespace,
            GetImageRequest {
                name: name.to_owned(),
            },
        );
        match self.images().get(req).await {
            Ok(r) => Ok(r.into_inner().image),
            Err(s) if is_not_found(&s) => Ok(None),
            Err(s) => Err(unavailable("image get", &s)),
        }
    }

    /// The media type of content of `size` bytes: a manifest type read from the content,
    /// or octet-stream. Cached.
    async fn media_type(&self, digest: &Digest, size: u64) -> Result<String, StoreError> {
        if let Some(t) = self.media_types.get(digest) {
            return Ok(t);
        }
        let mut media_type = manifest::OCTET_STREAM.to_owned();
        if size <= manifest::MAX_MANIFEST_SIZE {
            match self.content.read_all(digest, size).await? {
                Some(bytes) => {
                    if let Some(m) = Manifest::sniff(&bytes) {
                        media_type = m.media_type;
                    }
                }
                // Gone between the size and the read: nothing learnt, nothing cached.
                None => return Ok(media_type),
            }
        }
        self.media_types.put(digest.clone(), media_type.clone());
        Ok(media_type)
    }

    /// Walks one image's tree, keeping content present in `present`.
    async fn content_of(
        &self,
        image: Image,
        present: &std::collections::HashSet<Digest>,
    ) -> Result<Option<ImageContent>, StoreError> {
        let Some(target) = image.target.and_then(|t| {
            Some(Descriptor {
                media_type: t.media_type,
                digest: Digest::parse(&t.digest).ok()?,
                size: u64::try_from(t.size).ok()?,
            })
        }) else {
            return Ok(None);
        };
        let digests = walk::present_digests(
            &target,
            |d| present.contains(d),
            |d| async move {
                // The size comes from the parent's descriptor; content that does not match
                // it is simply not walked further.
                let bytes = match self.content.read_all(&d.digest, d.size).await {
                    Err(StoreError::RangeOutOfBounds { .. }) => None,
                    other => other?,
                };
                if let Some(m) = bytes.as_deref().and_then(Manifest::sniff) {
                    self.media_types.put(d.digest, m.media_type);
                }
                Ok::<_, StoreError>(bytes)
            },
        )
        .await?;
        Ok(Some(ImageContent {
            tag: ImageName::parse(&image.name).ok(),
            name: image.name,
            target,
            digests,
        }))
    }
}

#[async_trait::async_trait]
impl Store for ContainerdStore {
    async fn resolve(&self, name: &ImageName) -> Result<Option<TagTarget>, StoreError> {
        let Some(image) = self.get_image(&name.to_string()).await? else {
            return Ok(None);
        };
        let updated = image
            .updated_at
            .or(image.created_at)
            .and_then(|t| std::time::SystemTime::try_from(t).ok());
        let Some(target) = image.target else {
            return Ok(None);
        };
        let Ok(digest) = Digest::parse(&target.digest) else {
            return Ok(None);
        };
        // The tag's target must itself be present to be served.
        let Some(size) = self.content.size(&digest).await? else {
            return Ok(None);
        };
        let media_type = if manifest::is_manifest_type(&target.media_type) {
            target.media_type
        } else {
            self.media_type(&digest, size).await?
        };
        Ok(Some(TagTarget {
            descriptor: Descriptor {
                media_type,
                digest,
                size,
            },
            updated,
        }))
    }

    async fn descriptor(&self, digest: &Digest) -> Result<Option<Descriptor>, StoreError> {
        let Some(size) = self.content.size(digest).await? else {
            return Ok(None);
        };
        let media_type = self.media_type(digest, size).await?;
        Ok(Some(Descriptor {
            media_type,
            digest: digest.clone(),
            size,
        }))
    }

    async fn size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        self.content.size(digest).await
    }

    async fn open(&self, digest: &Digest, range: ByteRange) -> Result<BlobStream, StoreError> {
        self.content.open(digest, range).await
    }

    async fn list(&self) -> Result<Inventory, StoreError> {
        let req = request(&self.namespace, ListImagesRequest { filters: vec![] });
        let images = self
            .images()
            .list(req)
            .await
            .map_err(|s| unavailable("image list", &s))?
            .into_inner()
            .images;
        let present = self.content.list().await?;
        let mut out = Inventory::default();
        for image in images {
            if let Some(c) = self.content_of(image, &present).await? {
                out.images.push(c);
            }
        }
        Ok(out)
    }

    async fn image(&self, name: &str) -> Result<Option<ImageContent>, StoreError> {
        let Some(image) = self.get_image(name).await? else {
            return Ok(None);
        };
        let present = self.content.list().await?;
        self.content_of(image, &present).await
    }

    fn watch(&self) -> BoxStream<'static, StoreEvent> {
        let (tx, rx) = mpsc::channel(256);
        if let Some(dir) = self.content.dir() {
            tokio::spawn(files::follow(dir.to_owned(), tx.clone()));
        }
        tokio::spawn(events::follow(
            self.channel.clone(),
            self.namespace.clone(),
            tx,
        ));
        ReceiverStream::new(rx).boxed()
    }

    async fn abort_ingests(&self, digest: &Digest) -> Result<usize, StoreError> {
        self.content.abort_ingests(digest).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut client = VersionClient::new(self.channel.clone());
        match tokio::time::timeout(PING_TIMEOUT, client.version(())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(unavailable("version", &s)),
            Err(_) => Err(StoreError::Unavailable(
                "containerd did not answer within 2s".into(),
            )),
        }
    }
}

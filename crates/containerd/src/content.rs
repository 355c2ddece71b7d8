//! Reading content: straight from containerd's blob files when the content directory is
//! mounted (the fast path, ~10x containerd's gRPC Read), else through the content service.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};

use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::{
    AbortRequest, InfoRequest, ListContentRequest, ListStatusesRequest, ReadContentRequest, Status,
};
use containerd_client::tonic::transport::Channel;
use futures_util::{StreamExt, stream};
use mirrorlet_oci::{BlobStream, Budget, ByteRange, Digest, StoreError, filestream};

use crate::client::{is_not_found, request, unavailable};

/// The most a chunk read over gRPC holds: containerd's content service sends a blob in
/// messages of up to 1 MiB (its copy buffer).
const GRPC_CHUNK: u64 = 1 << 20;

/// Access to containerd's content store.
#[derive(Clone)]
pub(crate) struct Content {
    client: ContentClient<Channel>,
    namespace: String,
    /// `<root>/io.containerd.content.v1.content`, when mounted.
    dir: Option<PathBuf>,
    /// What chunks of blobs read to be sent count against.
    budget: Budget,
}

impl Content {
    pub(crate) fn new(
        channel: Channel,
        namespace: String,
        dir: Option<PathBuf>,
        budget: Budget,
    ) -> Self {
        let client = ContentClient::new(channel).max_decoding_message_size(16 * 1024 * 1024);
        Self {
            client,
            namespace,
            dir,
            budget,
        }
    }

    /// The blob file's path, if the content directory is configured.
    pub(crate) fn blob_path(&self, digest: &Digest) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        Some(
            dir.join("blobs")
                .join(digest.algorithm().as_str())
                .join(digest.hex()),
        )
    }

    /// The content directory, if configured.
    pub(crate) fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The size of a blob in this namespace, or `None` if absent.
    pub(crate) async fn size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let req = request(
            &self.namespace,
            InfoRequest {
                digest: digest.to_string(),
            },
        );
        match self.client.clone().info(req).await {
            Ok(resp) => Ok(resp
                .into_inner()
                .info
                .map(|i| u64::try_from(i.size).unwrap_or(0))),
            Err(s) if is_not_found(&s) => Ok(None),
            Err(s) => Err(unavailable("content info", &s)),
        }
    }

    /// Every digest present in this namespace.
    pub(crate) async fn list(&self) -> Result<HashSet<Digest>, StoreError> {
        let req = request(&self.namespace, ListContentRequest { filters: vec![] });
        let mut stream = self
            .client
            .clone()
            .list(req)
            .await
            .map_err(|s| unavailable("content list", &s))?
            .into_inner();
        let mut out = HashSet::new();
        while let Some(page) = stream
            .message()
            .await
            .map_err(|s| unavailable("content list", &s))?
        {
            out.extend(
                page.info
                    .iter()
                    .filter_map(|i| Digest::parse(&i.digest).ok()),
            );
        }
        Ok(out)
    }

    /// The unfinished downloads (ingests) in the namespace.
    pub(crate) async fn statuses(&self) -> Result<Vec<Status>, StoreError> {
        let req = request(&self.namespace, ListStatusesRequest { filters: vec![] });
        Ok(self
            .client
            .clone()
            .list_statuses(req)
            .await
            .map_err(|s| unavailable("content list statuses", &s))?
            .into_inner()
            .statuses)
    }

    /// Aborts the unfinished downloads (ingests) of `digest`: those whose expected digest it
    /// is, or whose reference names it (a pull's references end in the digest, e.g.
    /// `layer-sha256:...`). Returns how many were aborted.
    pub(crate) async fn abort_ingests(&self, digest: &Digest) -> Result<usize, StoreError> {
        let mut aborted = 0;
        for status in self.statuses().await? {
            if status.expected != digest.as_str() && !status.r#ref.ends_with(digest.as_str()) {
                continue;
            }
            let req = request(
                &self.namespace,
                AbortRequest {
                    r#ref: status.r#ref.clone(),
                },
            );
            match self.client.clone().abort(req).await {
                Ok(_) => aborted += 1,
                // Finished or aborted meanwhile: nothing left to remove.
                Err(s) if is_not_found(&s) => {}
                Err(s) => return Err(unavailable("content abort", &s)),
            }
        }
        Ok(aborted)
    }

    /// Reads a whole small blob (a manifest); `None` if absent.
    pub(crate) async fn read_all(
        &self,
        digest: &Digest,
        size: u64,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        // Small (manifests, configs: callers bound `size`) and read by the agent itself, not
        // sent: outside the stream budget, so they never wait behind clients' streams.
        let whole = ByteRange::full(size);
        let mut stream = match self.open_with(digest, whole, Budget::unlimited()).await {
            Ok(s) => s,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut out = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| StoreError::Read {
                digest: digest.clone(),
                source,
            })?;
            out.extend_from_slice(&chunk);
        }
        Ok(Some(out))
    }

    /// Opens a range of a blob to be sent: from its file when possible, else over gRPC (its
    /// chunks counted against the stream budget either way).
    pub(crate) async fn open(
        &self,
        digest: &Digest,
        range: ByteRange,
    ) -> Result<BlobStream, StoreError> {
        self.open_with(digest, range, self.budget.clone()).await
    }

    async fn open_with(
        &self,
        digest: &Digest,
        range: ByteRange,
        budget: Budget,
    ) -> Result<BlobStream, StoreError> {
        if let Some(path) = self.blob_path(digest) {
            match open_file(path, digest, range, budget.clone()).await {
                Ok(s) => return Ok(s),
                // Not on disk (or not readable): containerd may still have it.
                Err(StoreError::Read { .. } | StoreError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.open_grpc(digest, range, budget).await
    }

    /// Streams a range over containerd's content service. Each message is copied into a
    /// chunk taken from `budget` before the message is asked for, so a stream whose client
    /// stopped reading holds only what it took, and the others wait for room.
    async fn open_grpc(
        &self,
        digest: &Digest,
        range: ByteRange,
        budget: Budget,
    ) -> Result<BlobStream, StoreError> {
        let size = self
            .size(digest)
            .await?
            .ok_or_else(|| StoreError::NotFound(digest.clone()))?;
        range.check(digest, size)?;
        if range.is_empty() {
            return Ok(stream::empty().boxed());
        }
        let req = request(
            &self.namespace,
            ReadContentRequest {
                digest: digest.to_string(),
                offset: i64::try_from(range.start).unwrap_or(i64::MAX),
                size: i64::try_from(range.len()).unwrap_or(i64::MAX),
            },
        );
        let resp = match self.client.clone().read(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if is_not_found(&s) => return Err(StoreError::NotFound(digest.clone())),
            Err(s) => return Err(unavailable("content read", &s)),
        };
        let left = range.len();
        Ok(stream::unfold(Some((resp, left)), move |st| {
            let budget = budget.clone();
            async move {
                let (mut resp, left) = st?;
                if left == 0 {
                    return None;
                }
                let len = usize::try_from(left.min(GRPC_CHUNK)).unwrap_or(usize::MAX);
                let mut chunk = budget.buffer(len).await;
                match resp.next().await? {
                    Ok(m) => {
                        // (containerd sends at most 1 MiB a message: any excess is
                        // past what the chunk counts.)
                        chunk.data.extend_from_slice(&m.data);
                        let left = left.saturating_sub(m.data.len() as u64);
                        Some((Ok(chunk.freeze()), Some((resp, left))))
                    }
                    Err(s) => {
                        let e = io::Error::other(format!("containerd read: {}", s.message()));
                        Some((Err(e), None))
                    }
                }
            }
        })
        .boxed())
    }
}

/// Opens a blob file and streams `range` of it.
async fn open_file(
    path: PathBuf,
    digest: &Digest,
    range: ByteRange,
    budget: Budget,
) -> Result<BlobStream, StoreError> {
    let opened = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)?;
        let len = file.metadata()?.len();
        Ok::<_, io::Error>((file, len))
    })
    .await
    .map_err(|e| io::Error::other(e.to_string()));
    let (file, size) = match opened.and_then(|r| r) {
        Ok(v) => v,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(StoreError::NotFound(digest.clone()));
        }
        Err(source) => {
            return Err(StoreError::Read {
                digest: digest.clone(),
                source,
            });
        }
    };
    range.check(digest, size)?;
    Ok(filestream::stream(file, range, budget))
}

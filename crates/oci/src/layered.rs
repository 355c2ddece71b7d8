//! Two stores seen as one: the node's containerd first, then what the agent holds itself
//! (the pull-through cache). The registry serves from the pair and the advertiser announces
//! the pair, so content fetched for the cluster is found and served like any other.

use std::sync::Arc;

use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};

use crate::digest::Digest;
use crate::manifest::Descriptor;
use crate::reference::ImageName;
use crate::store::{
    BlobStream, ByteRange, ImageContent, Inventory, Store, StoreError, StoreEvent, TagTarget,
};

/// `first`, then `second`. Readiness is the first's; a failure of the first (containerd
/// down) does not hide what the second holds.
#[derive(Clone)]
pub struct Layered {
    first: Arc<dyn Store>,
    second: Arc<dyn Store>,
}

impl std::fmt::Debug for Layered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layered").finish_non_exhaustive()
    }
}

impl Layered {
    /// The pair.
    pub fn new(first: Arc<dyn Store>, second: Arc<dyn Store>) -> Self {
        Self { first, second }
    }
}

/// The first answer that has something; else the first error; else nothing.
fn either<T>(
    a: Result<Option<T>, StoreError>,
    b: impl FnOnce() -> Result<Option<T>, StoreError>,
) -> Result<Option<T>, StoreError> {
    match a {
        Ok(Some(v)) => Ok(Some(v)),
        Ok(None) => b(),
        Err(e) => match b() {
            Ok(Some(v)) => Ok(Some(v)),
            _ => Err(e),
        },
    }
}

#[async_trait::async_trait]
impl Store for Layered {
    async fn resolve(&self, name: &ImageName) -> Result<Option<TagTarget>, StoreError> {
        let a = self.first.resolve(name).await;
        if matches!(a, Ok(Some(_))) {
            return a;
        }
        let b = self.second.resolve(name).await;
        either(a, || b)
    }

    async fn descriptor(&self, digest: &Digest) -> Result<Option<Descriptor>, StoreError> {
        let a = self.first.descriptor(digest).await;
        if matches!(a, Ok(Some(_))) {
            return a;
        }
        let b = self.second.descriptor(digest).await;
        either(a, || b)
    }

    async fn size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        let a = self.first.size(digest).await;
        if matches!(a, Ok(Some(_))) {
            return a;
        }
        let b = self.second.size(digest).await;
        either(a, || b)
    }

    async fn open(&self, digest: &Digest, range: ByteRange) -> Result<BlobStream, StoreError> {
        match self.first.open(digest, range).await {
            Ok(s) => Ok(s),
            Err(first) => match self.second.open(digest, range).await {
                Ok(s) => Ok(s),
                Err(_) => Err(first),
            },
        }
    }

    async fn list(&self) -> Result<Inventory, StoreError> {
        let mut all = self.first.list().await?;
        let more = self.second.list().await?;
        all.images.extend(more.images);
        all.blobs.extend(more.blobs);
        Ok(all)
    }

    async fn image(&self, name: &str) -> Result<Option<ImageContent>, StoreError> {
        let a = self.first.image(name).await;
        if matches!(a, Ok(Some(_))) {
            return a;
        }
        let b = self.second.image(name).await;
        either(a, || b)
    }

    fn watch(&self) -> BoxStream<'static, StoreEvent> {
        stream::select(self.first.watch(), self.second.watch()).boxed()
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.first.ping().await
    }

    async fn abort_ingests(&self, digest: &Digest) -> Result<usize, StoreError> {
        let a = self.first.abort_ingests(digest).await?;
        let b = self.second.abort_ingests(digest).await.unwrap_or(0);
        Ok(a + b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[tokio::test]
    async fn the_second_store_fills_in_for_the_first() {
        let (a, b) = (Arc::new(MemoryStore::new()), Arc::new(MemoryStore::new()));
        let both = Layered::new(a.clone(), b.clone());
        let in_a = a.put_blob(&b"first"[..]);
        let in_b = b.put_blob(&b"second"[..]);
        let in_both = a.put_blob(&b"both"[..]);
        b.put_blob(&b"both"[..]);
        for d in [&in_a, &in_b, &in_both] {
            assert_eq!(both.size(&d.digest).await.expect("size"), Some(d.size));
            let mut s = both
                .open(&d.digest, ByteRange::full(d.size))
                .await
                .expect("open");
            let mut got = Vec::new();
            while let Some(c) = s.next().await {
                got.extend_from_slice(&c.expect("chunk"));
            }
            assert_eq!(got.len() as u64, d.size);
        }
        let gone = Digest::sha256_of(b"nowhere");
        assert_eq!(both.size(&gone).await.expect("size"), None);
        assert!(matches!(
            both.open(&gone, ByteRange::full(1)).await,
            Err(StoreError::NotFound(_))
        ));
        let inv = both.list().await.expect("list");
        assert!(inv.images.is_empty());

        a.begin_ingest("layer-x", &in_b.digest);
        b.begin_ingest("layer-y", &in_b.digest);
        assert_eq!(both.abort_ingests(&in_b.digest).await.expect("abort"), 2);
        assert!(a.ingests().is_empty() && b.ingests().is_empty());
    }
}

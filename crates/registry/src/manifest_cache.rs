//! Manifests served from the node's store, kept in memory by digest. A digest names its
//! bytes, so they never change: once read, a manifest is served again without asking the
//! store (for containerd, a gRPC call per request). Whether the node still holds it can
//! change, so the cache follows the store's feed: a deleted digest is dropped, a resync
//! (events may have been missed) drops everything, and a manifest read before a deletion
//! was heard is not kept. A manifest deleted while its event is on the way can still be
//! served for that moment: the same bytes, as its digest says.
//! Bounded by bytes, least recently used out.

use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use futures_util::StreamExt;
use lru::LruCache;
use mirrorlet_oci::{Descriptor, Digest, Store, StoreEvent};

/// Bytes of manifests kept at most.
pub(crate) const MANIFEST_CACHE_BYTES: usize = 16 << 20;

#[derive(Debug)]
struct Inner {
    entries: LruCache<Digest, (Descriptor, Bytes)>,
    bytes: usize,
    budget: usize,
    /// Deletions and resyncs heard so far.
    epoch: u64,
}

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct ManifestCache {
    inner: Arc<Mutex<Inner>>,
    /// The task following the store's feed, started with the first entry.
    follower: OnceLock<tokio::task::AbortHandle>,
}

impl Default for ManifestCache {
    fn default() -> Self {
        Self::with_budget(MANIFEST_CACHE_BYTES)
    }
}

impl Drop for ManifestCache {
    fn drop(&mut self) {
        if let Some(task) = self.follower.get() {
            task.abort();
        }
    }
}

impl ManifestCache {
    pub(crate) fn with_budget(budget: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                entries: LruCache::unbounded(),
                bytes: 0,
                budget,
                epoch: 0,
            })),
            follower: OnceLock::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The manifest `digest`, if it is here.
    pub(crate) fn get(&self, digest: &Digest) -> Option<(Descriptor, Bytes)> {
        self.lock().entries.get(digest).cloned()
    }

    /// Where the store's feed is: take it before reading a manifest, and give it to
    /// [`ManifestCache::put`].
    pub(crate) fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// Keeps `bytes`, the manifest `desc` read from `store` (whose feed the cache then
    /// follows) since `epoch`. Not kept: bytes that do not match the descriptor's size, and
    /// a manifest read before a deletion (or resync) that came since.
    pub(crate) fn put(&self, store: &Arc<dyn Store>, desc: &Descriptor, bytes: Bytes, epoch: u64) {
        if bytes.len() as u64 != desc.size {
            return;
        }
        self.follower.get_or_init(|| {
            let mut feed = store.watch();
            let inner = self.inner.clone();
            tokio::spawn(async move {
                while let Some(event) = feed.next().await {
                    let mut inner = inner.lock().unwrap_or_else(PoisonError::into_inner);
                    match event {
                        StoreEvent::ContentDeleted(d) => {
                            inner.epoch += 1;
                            if let Some((_, b)) = inner.entries.pop(&d) {
                                inner.bytes -= b.len();
                            }
                        }
                        StoreEvent::Resync => {
                            inner.epoch += 1;
                            inner.entries.clear();
                            inner.bytes = 0;
                        }
                        _ => {}
                    }
                }
            })
            .abort_handle()
        });
        let mut inner = self.lock();
        if bytes.len() > inner.budget || inner.epoch != epoch {
            return;
        }
        let len = bytes.len();
        if let Some((_, old)) = inner
            .entries
            .put(desc.digest.clone(), (desc.clone(), bytes))
        {
            inner.bytes -= old.len();
        }
        inner.bytes += len;
        while inner.bytes > inner.budget {
            match inner.entries.pop_lru() {
                Some((_, (_, b))) => inner.bytes -= b.len(),
                None => break,
            }
        }
    }

    /// Bytes held.
    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrorlet_oci::MemoryStore;
    use std::time::Duration;

    fn manifest(store: &MemoryStore, n: usize) -> (Descriptor, Bytes) {
        let bytes = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"x","digest":"sha256:{:064x}","size":{n}}},"layers":[]}}"#,
            n
        ));
        (store.put_blob(bytes.clone()), bytes)
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn keeps_manifests_within_the_budget_and_follows_deletions() {
        let memory = Arc::new(MemoryStore::new());
        let store: Arc<dyn Store> = memory.clone();
        let (a, a_bytes) = manifest(&memory, 1);
        let (b, b_bytes) = manifest(&memory, 2);
        let (c, c_bytes) = manifest(&memory, 3);
        // Room for two of them.
        let cache = ManifestCache::with_budget(a_bytes.len() * 2 + 10);
        cache.put(&store, &a, a_bytes.clone(), cache.epoch());
        // The feed starts with a resync, which empties the cache once.
        until("the first resync", || cache.get(&a.digest).is_none()).await;
        let epoch = cache.epoch();
        cache.put(&store, &a, a_bytes.clone(), epoch);
        cache.put(&store, &b, b_bytes, epoch);
        assert_eq!(cache.get(&a.digest), Some((a.clone(), a_bytes.clone())));
        cache.put(&store, &c, c_bytes.clone(), epoch);
        assert!(cache.get(&b.digest).is_none(), "least recently used out");
        assert!(cache.get(&a.digest).is_some() && cache.get(&c.digest).is_some());
        assert_eq!(cache.bytes(), a_bytes.len() + c_bytes.len());

        memory.delete_blob(&c.digest);
        until("the deletion", || cache.get(&c.digest).is_none()).await;
        assert!(cache.get(&a.digest).is_some(), "only the deleted one goes");
        assert_eq!(cache.bytes(), a_bytes.len());

        let mut short = a.clone();
        short.size += 1;
        cache.put(&store, &short, Bytes::from_static(b"{}"), cache.epoch());
        assert_eq!(
            cache.get(&a.digest),
            Some((a, a_bytes)),
            "a wrong size is not kept"
        );

        // Read before the deletion of c was heard: not kept.
        cache.put(&store, &c, c_bytes, epoch);
        assert!(
            cache.get(&c.digest).is_none(),
            "a read older than a deletion is not kept"
        );
    }
}

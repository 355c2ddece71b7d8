//! The advertiser: keeps the DHT in step with the node's content store. Everything is
//! advertised when the store's feed goes live; then each change is turned into an
//! advertise or withdraw at once (a layer is advertised as soon as it lands in the content
//! store, before its image is complete); every resync diffs the whole inventory against
//! what is advertised; on shutdown everything is withdrawn. Republishing before records
//! expire is done by Kademlia itself (see [`crate::config::DEFAULT_REPUBLISH`]).
//!
//! Following the store, it also knows what the node holds, and keeps the inventory gauges
//! (images, blobs, tags) current without listing the store again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use futures_util::StreamExt;
use mirrorlet_oci::glob::{Glob, any_match};
use mirrorlet_oci::{Digest, ImageContent, Router, RouterError, Store, StoreEvent};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Keys per advertise or withdraw call.
const BATCH: usize = 1_000;

/// What to advertise.
#[derive(Debug, Clone, Default)]
pub struct AdvertiserConfig {
    /// Tags matching any of these are not advertised (nor resolved through peers)...
    pub tag_excludes: Vec<Glob>,
    /// ...unless they belong to one of these registries, whose tags the cluster
    /// revalidates upstream (pull-through): a peer's copy is only used while upstream is
    /// down, as the last digest the cluster knew.
    pub revalidated: Vec<String>,
    /// Private repositories, whose tags are never advertised.
    pub private: mirrorlet_oci::private::Private,
}

/// Gauges of what the node holds.
#[derive(Debug, Clone, Default)]
pub struct InventoryMetrics {
    images: Gauge,
    blobs: Gauge,
    tags: Gauge,
}

impl InventoryMetrics {
    /// Creates the gauges and registers them under `mirrorlet_store_`.
    pub fn register(registry: &mut Registry) -> Self {
        let me = Self::default();
        registry.register(
            "mirrorlet_store_images",
            "Images in the containerd namespace",
            me.images.clone(),
        );
        registry.register(
            "mirrorlet_store_blobs",
            "Distinct digests of images this node can serve",
            me.blobs.clone(),
        );
        registry.register(
            "mirrorlet_store_tags",
            "Tags this node can resolve",
            me.tags.clone(),
        );
        me
    }
}

/// Follows `store` and keeps `router` in step until `shutdown`, then withdraws everything.
pub async fn run(
    store: Arc<dyn Store>,
    router: Arc<dyn Router>,
    config: AdvertiserConfig,
    metrics: InventoryMetrics,
    shutdown: CancellationToken,
) {
    let mut adv = Advertiser {
        store,
        router,
        config,
        metrics,
        advertised: HashSet::new(),
        images: HashMap::new(),
    };
    let mut events = adv.store.watch();
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            () = shutdown.cancelled() => break,
        };
        match event {
            Some(e) => adv.on_event(e).await,
            None => break,
        }
    }
    let all: Vec<String> = adv.advertised.drain().collect();
    if !all.is_empty() {
        tracing::info!(
            keys = all.len(),
            "withdrawing every advertised key before shutdown"
        );
        adv.withdraw(all).await;
    }
}

struct Advertiser {
    store: Arc<dyn Store>,
    router: Arc<dyn Router>,
    config: AdvertiserConfig,
    metrics: InventoryMetrics,
    advertised: HashSet<String>,
    /// The images the node holds, with their present content (for the gauges).
    images: HashMap<String, ImageContent>,
}

impl Advertiser {
    async fn on_event(&mut self, event: StoreEvent) {
        match event {
            StoreEvent::Resync => self.resync().await,
            StoreEvent::ImageChanged(name) => match self.store.image(&name).await {
                Ok(Some(image)) => {
                    let mut keys: Vec<String> =
                        image.digests.iter().map(ToString::to_string).collect();
                    keys.extend(self.tag_key(image.tag.as_ref().map(ToString::to_string)));
                    self.images.insert(name, image);
                    self.refresh_gauges();
                    self.advertise_new(keys).await;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(image = %name, error = %e, "reading a changed image failed; the next resync will catch up")
                }
            },
            StoreEvent::ImageDeleted(name) => {
                self.images.remove(&name);
                self.refresh_gauges();
                // The content stays until garbage collection, which the store reports.
                if self.advertised.remove(&name) {
                    self.withdraw(vec![name]).await;
                }
            }
            StoreEvent::ContentAdded(digest) => self.advertise_new(vec![digest.to_string()]).await,
            StoreEvent::ContentDeleted(digest) => {
                // Still held elsewhere in the store (the pull-through cache keeps a copy
                // containerd collected, or the other way round): keep it advertised.
                if matches!(self.store.size(&digest).await, Ok(Some(_))) {
                    return;
                }
                for image in self.images.values_mut() {
                    image.digests.retain(|d| *d != digest);
                }
                self.refresh_gauges();
                let key = digest.to_string();
                if self.advertised.remove(&key) {
                    self.withdraw(vec![key]).await;
                }
            }
        }
    }

    fn refresh_gauges(&self) {
        let blobs: BTreeSet<&Digest> = self.images.values().flat_map(|i| &i.digests).collect();
        let tags = self
            .images
            .values()
            .filter(|i| i.tag.as_ref().is_some_and(|t| t.tag().is_some()))
            .count();
        let set = |g: &Gauge, n: usize| g.set(i64::try_from(n).unwrap_or(i64::MAX));
        set(&self.metrics.images, self.images.len());
        set(&self.metrics.blobs, blobs.len());
        set(&self.metrics.tags, tags);
    }

    fn tag_key(&self, tag: Option<String>) -> Option<String> {
        tag.filter(|t| {
            let revalidated = self.config.revalidated.iter().any(|r| {
                t.strip_prefix(r.as_str())
                    .is_some_and(|rest| rest.starts_with('/'))
            });
            !self.config.private.covers_tag_key(t)
                && (revalidated || !any_match(&self.config.tag_excludes, t))
        })
    }

    async fn resync(&mut self) {
        let inventory = match self.store.list().await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(error = %e, "listing the store failed; will advertise when it is back");
                return;
            }
        };
        let mut desired: HashSet<String> = inventory
            .digests()
            .iter()
            .map(ToString::to_string)
            .collect();
        for tag in inventory.tags() {
            desired.extend(self.tag_key(Some(tag)));
        }
        let images = inventory.images.len();
        // Moved, not copied: with thousands of keys every copy made here is memory the
        // allocator keeps after the resync.
        self.images = inventory
            .images
            .into_iter()
            .map(|i| (i.name.clone(), i))
            .collect();
        self.refresh_gauges();
        let mut gone = Vec::new();
        for key in self.advertised.difference(&desired) {
            // Content that is present but not (yet) in an image, e.g. layers of a pull in
            // progress, stays advertised.
            if let Ok(d) = Digest::parse(key)
                && matches!(self.store.size(&d).await, Ok(Some(_)))
            {
                continue;
            }
            gone.push(key.clone());
        }
        let keys = desired.len();
        let new: Vec<String> = desired
            .into_iter()
            .filter(|k| !self.advertised.contains(k))
            .collect();
        tracing::info!(
            images,
            keys,
            new = new.len(),
            withdrawn = gone.len(),
            "resynced the advertised keys with containerd"
        );
        for k in &gone {
            self.advertised.remove(k);
        }
        self.withdraw(gone).await;
        self.advertise_new(new).await;
    }

    async fn advertise_new(&mut self, keys: Vec<String>) {
        let fresh: Vec<String> = keys
            .into_iter()
            .filter(|k| !self.advertised.contains(k))
            .collect();
        let mut fresh = fresh.into_iter().peekable();
        while fresh.peek().is_some() {
            let batch: Vec<String> = fresh.by_ref().take(BATCH).collect();
            match self.router.advertise(batch.clone()).await {
                Ok(()) => {
                    tracing::debug!(keys = batch.len(), first = %batch[0], "advertised");
                    self.advertised.extend(batch);
                }
                Err(RouterError::Advertise { failed, reason }) => {
                    tracing::warn!(keys = failed.len(), %reason, "some keys could not be advertised");
                    let failed: HashSet<&String> = failed.iter().collect();
                    self.advertised
                        .extend(batch.iter().filter(|k| !failed.contains(k)).cloned());
                }
                Err(e) => tracing::warn!(keys = batch.len(), error = %e, "advertising failed"),
            }
        }
    }

    async fn withdraw(&mut self, keys: Vec<String>) {
        for batch in keys.chunks(BATCH) {
            if let Err(e) = self.router.withdraw(batch.to_vec()).await {
                tracing::warn!(keys = batch.len(), error = %e, "withdrawing failed");
            }
        }
    }
}

#[cfg(test)]
mod tests;

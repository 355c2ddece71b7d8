//! Keeps track of what this node can serve by following the store's change feed: a full
//! listing at start and after every gap (containerd restarted), and again shortly after
//! changes. Exposes the counts as metrics and logs what changed.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use mirrorlet_oci::{Store, StoreEvent};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Changes within this window are folded into one listing.
const DEBOUNCE: Duration = Duration::from_millis(250);

/// Gauges of what the node can serve.
#[derive(Debug, Clone, Default)]
pub(crate) struct InventoryMetrics {
    images: Gauge,
    blobs: Gauge,
    tags: Gauge,
}

impl InventoryMetrics {
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let me = Self::default();
        registry.register(
            "mirrorlet_store_images",
            "Images in the containerd namespace",
            me.images.clone(),
        );
        registry.register(
            "mirrorlet_store_blobs",
            "Distinct digests this node can serve",
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

/// Follows `store` until `shutdown`.
pub(crate) async fn run(
    store: Arc<dyn Store>,
    metrics: InventoryMetrics,
    shutdown: CancellationToken,
) {
    let mut events = store.watch();
    let mut dirty = false;
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            () = tokio::time::sleep(DEBOUNCE), if dirty => {
                dirty = false;
                relist(store.as_ref(), &metrics, false).await;
                continue;
            }
            () = shutdown.cancelled() => return,
        };
        match event {
            Some(StoreEvent::Resync) => relist(store.as_ref(), &metrics, true).await,
            Some(change) => {
                tracing::debug!(?change, "content store changed");
                dirty = true;
            }
            None => return,
        }
    }
}

async fn relist(store: &dyn Store, metrics: &InventoryMetrics, log: bool) {
    match store.list().await {
        Ok(inv) => {
            let (images, blobs, tags) = (inv.images.len(), inv.digests().len(), inv.tags().len());
            metrics
                .images
                .set(i64::try_from(images).unwrap_or(i64::MAX));
            metrics.blobs.set(i64::try_from(blobs).unwrap_or(i64::MAX));
            metrics.tags.set(i64::try_from(tags).unwrap_or(i64::MAX));
            if log {
                tracing::info!(images, blobs, tags, "listed containerd content");
            } else {
                tracing::debug!(images, blobs, tags, "listed containerd content");
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "listing containerd content failed; will retry when containerd is back")
        }
    }
}

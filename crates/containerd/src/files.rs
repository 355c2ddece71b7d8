//! Watching the content directory's blob files (inotify), so that a layer is known the
//! moment containerd commits it (a rename into `blobs/sha256/`), before its image is
//! complete, and so that garbage collection is seen at once. containerd 1.6 publishes no
//! event for either; this needs the content directory mounted.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use inotify::{EventMask, Inotify, WatchMask};
use mirrorlet_oci::{Digest, StoreEvent};
use tokio::sync::mpsc;

/// How often to look for the blob directory while it does not exist yet.
const RETRY: Duration = Duration::from_secs(5);

/// Follows `<content_dir>/blobs/sha256`, sending content events to `tx` until it closes.
pub(crate) async fn follow(content_dir: PathBuf, tx: mpsc::Sender<StoreEvent>) {
    let dir = content_dir.join("blobs").join("sha256");
    loop {
        if tx.is_closed() {
            return;
        }
        match watch(&dir, &tx).await {
            Ok(()) => return,
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "cannot watch the blob directory yet; retrying");
                tokio::select! {
                    () = tokio::time::sleep(RETRY) => {}
                    () = tx.closed() => return,
                }
            }
        }
    }
}

/// Watches until the receiver closes (`Ok`) or the watch fails (`Err`, to retry).
async fn watch(dir: &std::path::Path, tx: &mpsc::Sender<StoreEvent>) -> std::io::Result<()> {
    let inotify = Inotify::init()?;
    inotify.watches().add(
        dir,
        WatchMask::MOVED_TO | WatchMask::CREATE | WatchMask::DELETE | WatchMask::MOVED_FROM,
    )?;
    let mut events = inotify.into_event_stream(vec![0u8; 64 * 1024])?;
    tracing::info!(dir = %dir.display(), "watching containerd's blob files for new and removed content");
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            () = tx.closed() => return Ok(()),
        };
        let event = match event {
            Some(Ok(e)) => e,
            Some(Err(e)) => return Err(e),
            None => return Err(std::io::Error::other("inotify stream ended")),
        };
        if event.mask.contains(EventMask::Q_OVERFLOW) {
            // Events were lost: have the consumer list everything again.
            tracing::warn!("inotify queue overflowed; resyncing");
            if tx.send(StoreEvent::Resync).await.is_err() {
                return Ok(());
            }
            continue;
        }
        if event.mask.contains(EventMask::IGNORED) {
            return Err(std::io::Error::other("the blob directory went away"));
        }
        let Some(name) = event.name.as_ref().and_then(|n| n.to_str()) else {
            continue;
        };
        let Ok(digest) = Digest::parse(&format!("sha256:{name}")) else {
            continue;
        };
        let change = if event
            .mask
            .intersects(EventMask::MOVED_TO | EventMask::CREATE)
        {
            StoreEvent::ContentAdded(digest)
        } else {
            StoreEvent::ContentDeleted(digest)
        };
        if tx.send(change).await.is_err() {
            return Ok(());
        }
    }
}

//! Filling a transfer: where the bytes come from, copying them in while they are hashed,
//! continuing at another source from where a broken or stalled one stopped, and the
//! verdict. Sources, in order:
//!
//! 1. peers that hold the whole blob (found by its digest in the DHT), hedged;
//! 2. its owner in the cluster, asked to fetch it for everyone (following redirects to
//!    owners closer to the digest, see [`crate::cluster`]), then the next rank; this node
//!    when it is the owner. An owner that streams the blob to as many peers as it may names
//!    the agents reading it, and this node reads from one of them (or from one of theirs),
//!    at the start of a copy;
//! 3. the upstream registry directly.
//!
//! A node asked to fetch for the cluster asks the holders, then upstream. A copy that fails before
//! any reader took a byte (a peer lied, sent wrong bytes, or disagreed about the size)
//! starts over from other sources; once readers have bytes, a failure ends the transfer.

mod sources;

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::StreamExt;
use mirrorlet_oci::{Peer, Registry, Repository};
use tokio::sync::OwnedSemaphorePermit;

use crate::error::chain;
use crate::metrics::{FetchLabels, ReasonLabels};
use crate::state::AppState;
use crate::transfer::{Backing, Origin, Outcome, Sink, Transfer};
use sources::{Opened, Sources};

/// Bytes gathered from the network before a write.
const BATCH: usize = 1 << 20;

/// One transfer to fill.
pub(crate) struct Job {
    pub(crate) state: Arc<AppState>,
    pub(crate) transfer: Arc<Transfer>,
    pub(crate) registry: Registry,
    pub(crate) repository: Repository,
    /// Asked by a peer to fetch for the cluster as the owner: from holders or upstream,
    /// never from other owners.
    pub(crate) for_cluster: bool,
}

/// Ends a transfer its filling task left running.
struct Ended {
    state: Arc<AppState>,
    transfer: Arc<Transfer>,
}

impl Drop for Ended {
    fn drop(&mut self) {
        if self.transfer.progress().outcome == Outcome::Running {
            tracing::error!(digest = %self.transfer.digest, "the transfer stopped before it ended");
            self.transfer.finish(Outcome::Failed {
                corrupt: false,
                gone: false,
                why: "the transfer stopped".into(),
            });
        }
        self.state.transfers.remove(&self.transfer);
    }
}

/// Why a copy ended without a verified blob.
struct CopyFailed {
    corrupt: bool,
    gone: bool,
    why: String,
}

impl CopyFailed {
    fn plain(why: impl Into<String>) -> Self {
        Self {
            corrupt: false,
            gone: false,
            why: why.into(),
        }
    }
}

impl Job {
    /// Fills the transfer in the background: it completes however many readers come and
    /// go, so a blob fetched for the cluster is fetched once.
    pub(crate) fn spawn(self) {
        tokio::spawn(self.run());
    }

    async fn run(self) {
        let state = self.state.clone();
        // However this task ends (a panic, the runtime shutting down), readers are told
        // and the digest is free for a new transfer: nobody waits on a dead one.
        let _ended = Ended {
            state: state.clone(),
            transfer: self.transfer.clone(),
        };
        let (outcome, kept) = self.copies().await;
        let t = &self.transfer;
        let origin = t.progress().origin;
        match &outcome {
            Outcome::Verified => {
                tracing::info!(digest = %t.digest, origin = ?origin, registry = %self.registry, "blob fetched and verified");
                // What came whole from holders is theirs to serve; what this node fetched
                // for the cluster (or followed) is kept and advertised for late arrivals.
                if let (Some((backing, size)), Some(o)) = (kept, origin)
                    && o != Origin::Holders
                {
                    state.cache.put_blob(&t.digest, backing, size);
                }
            }
            Outcome::Failed { corrupt, why, .. } => {
                if *corrupt {
                    tracing::error!(digest = %t.digest, why = %why, "blob did not match its digest; discarded");
                } else {
                    tracing::debug!(digest = %t.digest, why = %why, "blob not fetched");
                }
            }
            Outcome::Running => {}
        }
        if let Some(o) = origin
            && o != Origin::Holders
        {
            let role = match (o, outcome == Outcome::Verified) {
                (Origin::Upstream, true) => "fetched",
                (Origin::Peer, true) => "followed",
                _ => "failed",
            };
            state
                .metrics
                .fetches
                .get_or_create(&FetchLabels { kind: "blob", role })
                .inc();
        }
        t.finish(outcome);
    }

    /// Copies until one copy verifies, starting over (a bounded number of times) when a
    /// copy fails before any reader took a byte.
    async fn copies(&self) -> (Outcome, Option<(Arc<Backing>, u64)>) {
        let mut sources = Sources::new(self);
        let max = self.state.peers.max_attempts.max(1);
        let mut last = CopyFailed::plain("no source has it");
        for copy in 0..max {
            let Some(first) = sources.open(0, None).await else {
                last = CopyFailed {
                    corrupt: false,
                    gone: sources.upstream_refused.is_some(),
                    why: sources.why_none(),
                };
                break;
            };
            match self.copy(first, &mut sources).await {
                Ok(kept) => return (Outcome::Verified, Some(kept)),
                Err(e) => {
                    let retry = !self.transfer.released() && copy + 1 < max;
                    tracing::info!(digest = %self.transfer.digest, why = %e.why, retry, "a copy of the blob failed");
                    last = e;
                    if !retry {
                        break;
                    }
                    sources.restart();
                }
            }
        }
        (
            Outcome::Failed {
                corrupt: last.corrupt,
                gone: last.gone,
                why: last.why.into(),
            },
            None,
        )
    }

    /// Where a copy of `size` bytes is written, within the limits on concurrent copies.
    async fn sink(
        &self,
        size: u64,
    ) -> Result<(Sink, Arc<Backing>, OwnedSemaphorePermit), CopyFailed> {
        let state = &self.state;
        let in_memory = size <= state.peers.verify_buffer;
        let slots = if in_memory {
            &state.buffer_slots
        } else {
            &state.spool_slots
        };
        let slot =
            match tokio::time::timeout(state.peers.read_timeout, slots.clone().acquire_owned())
                .await
            {
                Ok(Ok(p)) => p,
                _ => {
                    return Err(CopyFailed::plain(
                        "too many blobs being fetched at once; try later",
                    ));
                }
            };
        if in_memory {
            let (sink, backing) = Sink::memory(&self.transfer);
            return Ok((sink, backing, slot));
        }
        match Sink::file(
            &self.transfer,
            &state.peers.spool_dir,
            state.stream_budget.clone(),
        )
        .await
        {
            Ok((sink, backing)) => Ok((sink, backing, slot)),
            Err(e) => {
                tracing::warn!(error = %e, spool = %state.peers.spool_dir.display(), "cannot create a spool file");
                state
                    .metrics
                    .peer_failures
                    .get_or_create(&ReasonLabels { reason: "spool" })
                    .inc();
                Err(CopyFailed::plain(format!(
                    "cannot create a spool file: {e}"
                )))
            }
        }
    }

    /// One copy: from `first`, continuing at other sources after a break; then verified.
    async fn copy(
        &self,
        first: Opened,
        sources: &mut Sources<'_>,
    ) -> Result<(Arc<Backing>, u64), CopyFailed> {
        let state = &self.state;
        let size = first.size;
        if size > state.peers.max_blob_size {
            tracing::warn!(
                size,
                limit = state.peers.max_blob_size,
                "blob larger than --peer-max-blob-size; not spooling it"
            );
            return Err(CopyFailed::plain("larger than --peer-max-blob-size"));
        }
        let (mut sink, backing, _slot) = self.sink(size).await?;
        self.transfer.begin(size, first.origin, backing.clone());
        sources.announcer = first.peer.clone();
        let mut contributors: Vec<Option<Peer>> = vec![first.peer.clone()];
        let mut current = first;
        let mut batch = BytesMut::with_capacity(BATCH);
        let mut pos: u64 = 0;
        let disk = |e: io::Error| {
            // Disk full and the like: the request still gets its 404 (containerd goes on
            // to the registry), but the operator must hear of it.
            tracing::warn!(digest = %self.transfer.digest, error = %e, spool = %state.peers.spool_dir.display(), "writing the spool failed");
            state
                .metrics
                .peer_failures
                .get_or_create(&ReasonLabels { reason: "spool" })
                .inc();
            CopyFailed::plain(format!("writing the spool: {e}"))
        };
        while pos < size {
            // Upstream bodies carry their own stall limit; peers get the peer read timeout.
            let stall = match current.origin {
                Origin::Upstream => Duration::from_secs(3600),
                _ => state.peers.read_timeout,
            };
            let failure = match tokio::time::timeout(stall, current.body.next()).await {
                Ok(Some(Ok(mut chunk))) => {
                    if current.skip > 0 {
                        let n = current.skip.min(chunk.len() as u64);
                        current.skip -= n;
                        chunk = chunk.slice(usize::try_from(n).unwrap_or(0)..);
                    }
                    let n = chunk.len() as u64;
                    if pos + n > size {
                        Some("sent more bytes than the blob has".to_owned())
                    } else {
                        batch.extend_from_slice(&chunk);
                        pos += n;
                        if batch.len() >= BATCH || pos == size {
                            sink.write(batch.split().freeze()).await.map_err(disk)?;
                        }
                        None
                    }
                }
                Ok(Some(Err(e))) => Some(format!("the stream broke: {}", chain(&e))),
                Ok(None) => Some("the stream ended early".to_owned()),
                Err(_) => Some("the stream stalled".to_owned()),
            };
            let Some(why) = failure else {
                continue;
            };
            match &current.peer {
                Some(p) => state
                    .failed_peers
                    .mark(p, state.peers.failure_backoff, &why),
                None => {
                    tracing::warn!(digest = %self.transfer.digest, offset = pos, why = %why, "upstream transfer broke")
                }
            }
            if !batch.is_empty() {
                sink.write(batch.split().freeze()).await.map_err(disk)?;
            }
            let Some(next) = sources.open(pos, Some(size)).await else {
                return Err(CopyFailed::plain(format!(
                    "{why} at byte {pos}, and no source could continue ({})",
                    sources.why_none()
                )));
            };
            state.metrics.resumes.inc();
            tracing::info!(peer = ?next.peer.as_ref().map(|p| p.addr), origin = ?next.origin, digest = %self.transfer.digest, offset = pos, "continuing the blob at another source");
            self.transfer.set_origin(next.origin);
            contributors.push(next.peer.clone());
            current = next;
        }
        if !batch.is_empty() {
            sink.write(batch.split().freeze()).await.map_err(disk)?;
        }
        debug_assert_eq!(sink.written(), size);
        let matches = sink.finish().await.map_err(disk)?;
        if !matches {
            let from_upstream = contributors.iter().any(Option::is_none);
            if from_upstream {
                state.metrics.upstream_digest_mismatches.inc();
            } else {
                state.metrics.digest_mismatches.inc();
            }
            for p in contributors.iter().flatten() {
                state.failed_peers.mark(
                    p,
                    state.peers.corrupt_backoff,
                    "served bytes that do not match the digest",
                );
            }
            return Err(CopyFailed {
                corrupt: true,
                gone: false,
                why: format!(
                    "the bytes from {} do not match the digest",
                    if from_upstream { "upstream" } else { "peers" }
                ),
            });
        }
        Ok((backing, size))
    }
}

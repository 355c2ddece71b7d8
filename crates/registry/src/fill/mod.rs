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

mod parts;
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
use crate::transfer::{Backing, LaneWriter, Origin, Outcome, Sink, Transfer};
use parts::{Claim, MAX_LANES, Plan};
use sources::{Opened, Sources, open_part};

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
            state.spool_budget.clone(),
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

    /// One copy: from `first`, continuing at other sources after a break; a large blob
    /// also from other holders at once, in parts; then verified.
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
        let parts_from = state.peers.parts_from;
        // Parts no smaller than a batch: a part split inside a batch not yet written
        // would be read twice.
        let plan = Arc::new(Plan::new(size, (parts_from / 8).max(BATCH as u64)));
        // Aborted when the copy ends, however it ends.
        let mut lanes = tokio::task::JoinSet::new();
        if first.origin == Origin::Holders
            && sources.parts
            && parts_from > 0
            && size >= parts_from
            && let Some(writer) = sink.lane()
        {
            for peer in sources.more_holders(MAX_LANES - 1) {
                tracing::debug!(digest = %self.transfer.digest, peer = %peer.addr, "reading a part of the blob from another holder");
                lanes.spawn(holder_lane(
                    state.clone(),
                    sources.path(),
                    peer,
                    plan.clone(),
                    writer.clone(),
                    size,
                ));
            }
        }
        let mut from_upstream = false;
        match self
            .main_lane(first, sources, &plan, &mut sink, &mut from_upstream)
            .await
        {
            Ok(()) => {}
            // The spool cannot be written: nobody can finish (the lanes are aborted).
            Err(LaneEnd::Disk(e)) => return Err(e),
            Err(LaneEnd::NoSource(e)) => {
                // Its sources are used up, but other holders may still finish the copy
                // (its part is released to them).
                while !plan.complete() && lanes.join_next().await.is_some() {}
                if !plan.complete() {
                    return Err(e);
                }
            }
        }
        lanes.shutdown().await;
        let matches = sink.finish(size).await.map_err(|e| self.disk(e))?;
        if !matches {
            if from_upstream {
                state.metrics.upstream_digest_mismatches.inc();
            } else {
                state.metrics.digest_mismatches.inc();
            }
            let contributors = plan.contributors();
            let (backoff, why) = if contributors.len() > 1 {
                // Several holders sent parts: which one lied is unknown. Each is avoided
                // for the ordinary failure backoff, and the next copy of this blob takes
                // one holder at a time, so a mismatch then names its peer.
                sources.parts = false;
                (
                    state.peers.failure_backoff,
                    "sent part of a copy (from several peers) that did not match the digest",
                )
            } else {
                (
                    state.peers.corrupt_backoff,
                    "served bytes that do not match the digest",
                )
            };
            for p in &contributors {
                state.failed_peers.mark(p, backoff, why);
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

    /// The copy's own lane: reads from `first`, continues at the next source after a
    /// break (any kind: holders, owners, upstream), and takes parts other lanes leave
    /// (from the same holder when it can). Returns once every part is read, or when no
    /// source could continue its part (released for the other lanes).
    async fn main_lane(
        &self,
        first: Opened,
        sources: &mut Sources<'_>,
        plan: &Plan,
        sink: &mut Sink,
        from_upstream: &mut bool,
    ) -> Result<(), LaneEnd> {
        let state = &self.state;
        let size = first.size;
        let mut claim = Claim { start: 0, from: 0 };
        let mut current = first;
        *from_upstream = current.peer.is_none();
        let mut pos = 0;
        loop {
            // Upstream bodies carry their own stall limit; peers get the peer read timeout.
            let stall = match current.origin {
                Origin::Upstream => Duration::from_secs(3600),
                _ => state.peers.read_timeout,
            };
            let mut out = Out::Sink(&mut *sink);
            let why = match pump(&mut current, &mut pos, claim, plan, &mut out, stall).await {
                Ok(()) => {
                    // The part is read: the next one, if any.
                    let Some(next) = wait_for_part(plan).await else {
                        return Ok(());
                    };
                    claim = next;
                    pos = next.from;
                    // From the same holder, else from wherever the copy's sources say.
                    current.body = futures_util::stream::empty().boxed();
                    let holder = current
                        .peer
                        .clone()
                        .filter(|_| current.origin == Origin::Holders);
                    if let Some(peer) = holder {
                        let end = plan.end(claim);
                        match open_part(state, &sources.path(), &peer, pos, end, size).await {
                            Ok(o) => {
                                current = o;
                                continue;
                            }
                            Err(why) => {
                                state
                                    .failed_peers
                                    .mark(&peer, state.peers.failure_backoff, &why);
                            }
                        }
                    }
                    None
                }
                Err(Pumped::Disk(e)) => {
                    plan.release(claim);
                    return Err(LaneEnd::Disk(self.disk(e)));
                }
                Err(Pumped::Source(why)) => Some(why),
            };
            if let Some(why) = &why {
                match &current.peer {
                    Some(p) => state.failed_peers.mark(p, state.peers.failure_backoff, why),
                    None => {
                        tracing::warn!(digest = %self.transfer.digest, offset = pos, why = %why, "upstream transfer broke");
                    }
                }
            }
            let Some(next) = sources.open(pos, Some(size)).await else {
                plan.release(claim);
                return Err(LaneEnd::NoSource(CopyFailed::plain(format!(
                    "{} at byte {pos}, and no source could continue ({})",
                    why.as_deref().unwrap_or("a part could not be opened"),
                    sources.why_none()
                ))));
            };
            if why.is_some() {
                state.metrics.resumes.inc();
                tracing::info!(peer = ?next.peer.as_ref().map(|p| p.addr), origin = ?next.origin, digest = %self.transfer.digest, offset = pos, "continuing the blob at another source");
            }
            self.transfer.set_origin(next.origin);
            *from_upstream |= next.peer.is_none();
            current = next;
        }
    }

    /// A spool write failed: disk full and the like. The request still gets its 404
    /// (containerd goes on to the registry), but the operator must hear of it.
    fn disk(&self, e: io::Error) -> CopyFailed {
        let state = &self.state;
        tracing::warn!(digest = %self.transfer.digest, error = %e, spool = %state.peers.spool_dir.display(), "writing the spool failed");
        state
            .metrics
            .peer_failures
            .get_or_create(&ReasonLabels { reason: "spool" })
            .inc();
        CopyFailed::plain(format!("writing the spool: {e}"))
    }
}

/// Why the copy's own lane stopped before every part was read.
enum LaneEnd {
    /// No source could continue its part (released to the other lanes).
    NoSource(CopyFailed),
    /// Writing the spool failed: the copy cannot be finished.
    Disk(CopyFailed),
}

/// Where a lane's bytes go: the copy's sink, or a writer at offsets for another lane.
enum Out<'a> {
    Sink(&'a mut Sink),
    Lane(&'a LaneWriter),
}

impl Out<'_> {
    async fn write_at(&mut self, at: u64, batch: bytes::Bytes) -> io::Result<()> {
        match self {
            Self::Sink(s) => s.write_at(at, batch).await,
            Self::Lane(l) => l.write_at(at, batch).await,
        }
    }
}

/// Why a lane stopped reading its part.
enum Pumped {
    /// The source broke, stalled or ended early.
    Source(String),
    /// Writing the spool failed.
    Disk(io::Error),
}

/// Reads `src` (positioned at `*pos`) into the copy until the part `claim` ends (its end
/// can move down while it is read: another lane took its second half). Batches are
/// written at their offsets; the part advances as they are.
async fn pump(
    src: &mut Opened,
    pos: &mut u64,
    claim: Claim,
    plan: &Plan,
    out: &mut Out<'_>,
    stall: Duration,
) -> Result<(), Pumped> {
    let mut batch = BytesMut::with_capacity(BATCH);
    let mut at = *pos;
    loop {
        let end = plan.end(claim);
        let (done, failed) = if *pos >= end {
            (true, None)
        } else {
            match tokio::time::timeout(stall, src.body.next()).await {
                Ok(Some(Ok(mut chunk))) => {
                    if src.skip > 0 {
                        let n = src.skip.min(chunk.len() as u64);
                        src.skip -= n;
                        chunk = chunk.slice(usize::try_from(n).unwrap_or(0)..);
                    }
                    // Whatever lies past the part's end is another lane's (or past the
                    // blob).
                    let n = (chunk.len() as u64).min(end - *pos);
                    batch.extend_from_slice(&chunk[..usize::try_from(n).unwrap_or(0)]);
                    *pos += n;
                    if batch.len() < BATCH && *pos < end {
                        continue;
                    }
                    (false, None)
                }
                Ok(Some(Err(e))) => (false, Some(format!("the stream broke: {}", chain(&e)))),
                Ok(None) => (false, Some("the stream ended early".to_owned())),
                Err(_) => (false, Some("the stream stalled".to_owned())),
            }
        };
        // Only a lane that wrote bytes is named as having sent them (a part's end can
        // move below what its lane had read: it then sent nothing more).
        if !batch.is_empty() {
            out.write_at(at, batch.split().freeze())
                .await
                .map_err(Pumped::Disk)?;
            at = *pos;
            plan.advance(claim, *pos, src.peer.as_ref());
        }
        if let Some(why) = failed {
            return Err(Pumped::Source(why));
        }
        if done {
            return Ok(());
        }
    }
}

/// A part for a lane whose own part is read: one nobody reads, or half of the slowest;
/// waits while the other lanes read theirs. `None` once every part is read.
async fn wait_for_part(plan: &Plan) -> Option<Claim> {
    let mut changes = plan.watch();
    loop {
        changes.borrow_and_update();
        if let Some(c) = plan.take() {
            return Some(c);
        }
        if plan.complete() {
            return None;
        }
        // The plan outlives its lanes: the sender is never gone while one waits.
        if changes.changed().await.is_err() {
            return None;
        }
    }
}

/// Another holder's lane: takes parts (at first half of the copy's own) and reads each
/// from `peer` until none is left; a peer that fails leaves its part to the other lanes.
async fn holder_lane(
    state: Arc<AppState>,
    path: String,
    peer: Peer,
    plan: Arc<Plan>,
    writer: LaneWriter,
    size: u64,
) {
    while let Some(claim) = wait_for_part(&plan).await {
        let mut pos = claim.from;
        let why = match open_part(&state, &path, &peer, pos, plan.end(claim), size).await {
            Ok(mut src) => {
                let mut out = Out::Lane(&writer);
                match pump(
                    &mut src,
                    &mut pos,
                    claim,
                    &plan,
                    &mut out,
                    state.peers.read_timeout,
                )
                .await
                {
                    Ok(()) => continue,
                    Err(Pumped::Source(why)) => why,
                    Err(Pumped::Disk(e)) => {
                        // The copy's own lane hears of it at its next write.
                        plan.release(claim);
                        tracing::debug!(error = %e, "a part could not be written");
                        return;
                    }
                }
            }
            Err(why) => why,
        };
        // The rest of its part is continued by another lane: a resume (when it had sent
        // some), as when the copy's own source breaks.
        plan.release(claim);
        if pos > claim.from {
            state.metrics.resumes.inc();
        }
        state
            .failed_peers
            .mark(&peer, state.peers.failure_backoff, &why);
        tracing::info!(peer = %peer.addr, offset = pos, why = %why, "a holder stopped sending its part of the blob; the other lanes take it");
        return;
    }
}

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

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use std::net::SocketAddr;

use http::{StatusCode, header};
use mirrorlet_oci::{Peer, Registry, Repository, UpstreamError};
use tokio::sync::OwnedSemaphorePermit;

use super::{Backing, Origin, Outcome, Sink, Transfer};
use crate::cluster::{self, BUSY_HEADER, FOLLOWERS_HEADER, Step};
use crate::metrics::{FetchLabels, ReasonLabels};
use crate::peers::{self, Candidates, PEER_HEADER};
use crate::state::AppState;

/// Bytes gathered from the network before a write.
const BATCH: usize = 1 << 20;
/// Tries at upstream per open (a reset or 5xx is retried after a pause).
const UPSTREAM_TRIES: usize = 3;
/// Pause between tries at upstream.
const UPSTREAM_PAUSE: Duration = Duration::from_millis(250);
/// Agents asked at most, per round, among those a busy owner named (and those they name
/// in turn): enough to descend a tree of copies with a fan-out of a few to any size.
const FOLLOWER_ASKS: usize = 32;

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

/// A source, opened at some offset.
struct Opened {
    origin: Origin,
    peer: Option<Peer>,
    size: u64,
    body: BoxStream<'static, io::Result<Bytes>>,
    /// Leading bytes to drop (a peer that ignored the range).
    skip: u64,
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
        match Sink::file(&self.transfer, &state.peers.spool_dir).await {
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
                Ok(Some(Err(e))) => Some(format!("the stream broke: {e}")),
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

/// What a peer said to a request for the blob.
enum Answer {
    Body(Peer, reqwest::Response),
    /// It streams the blob to as many peers as it may; these agents read it from it lately.
    Busy(Vec<SocketAddr>),
    /// Asked as the owner: it knows an agent closer to the digest.
    Redirect(Peer),
    /// Its own fetch failed this time (not its fault).
    Unavailable,
    /// It does not have it (an owner: upstream does not).
    Missing,
    /// It failed (and is marked).
    Failed,
}

/// How a peer is asked for the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Asking {
    /// For what it holds or is downloading.
    Peer,
    /// As the owner.
    Owner(cluster::Asking),
}

/// Where the owners left a request for the blob.
enum Owners {
    /// An owner (or an agent it sent this node on to) streams it.
    Opened(Opened),
    /// The owner (and its upstream) has no such blob: nobody can get it now.
    Missing,
    /// The owners are busy, and none of the agents reading from them had room.
    Busy,
    /// Sources disagree about the size: the copy cannot continue.
    Abandoned,
    /// No owner ahead of this node answered (`owners-failed`), or there is none (`owner`):
    /// this node fetches itself.
    Nobody(&'static str),
}

/// The sources of one transfer, tried in order; state carries over between opens so a
/// source that failed is not asked again.
struct Sources<'a> {
    job: &'a Job,
    holders: Candidates,
    holder_attempts: usize,
    looked_again: bool,
    /// Upstream (or the owner) said there is no such blob, or refused: do not ask again.
    upstream_refused: Option<String>,
    /// The source that announced the size of the current copy (blamed if others disagree).
    announcer: Option<Peer>,
    /// Sources disagree about the size: the current copy cannot continue.
    abandoned: bool,
    last_failure: Option<String>,
}

impl<'a> Sources<'a> {
    fn new(job: &'a Job) -> Self {
        Self {
            holders: crate::fetch::candidates(&job.state, job.transfer.digest.as_str()),
            job,
            holder_attempts: 0,
            looked_again: false,
            upstream_refused: None,
            announcer: None,
            abandoned: false,
            last_failure: None,
        }
    }

    /// Starts over for a new copy (fresh lookups; failed peers stay skipped).
    fn restart(&mut self) {
        *self = Self {
            upstream_refused: self.upstream_refused.take(),
            ..Self::new(self.job)
        };
    }

    fn why_none(&self) -> String {
        self.upstream_refused
            .clone()
            .or_else(|| self.last_failure.clone())
            .unwrap_or_else(|| "no peer has it".to_owned())
    }

    /// Whether peers that hold the blob are asked: by every node, the owner included (it
    /// stores the digest's provider records itself, so its lookup is answered at once, and
    /// a lookup that missed at the asking node costs no upstream fetch).
    fn uses_holders(&self) -> bool {
        self.job.state.peers.enabled
    }

    /// Whether the owners are asked (not by an owner fetching for the cluster).
    fn uses_owners(&self) -> bool {
        self.job.state.peers.enabled && !self.job.for_cluster
    }

    /// Opens the next source at `pos`; `size` is the blob's size once a copy has begun.
    async fn open(&mut self, pos: u64, size: Option<u64>) -> Option<Opened> {
        let state = self.job.state.clone();
        let pull = &state.pull;
        let may_pull = state.pulls_through(&self.job.registry, &self.job.repository);
        // Why this node goes upstream itself, if it does (see `UPSTREAM_REASONS`).
        let mut reason = if self.job.for_cluster {
            "asked"
        } else {
            "owner"
        };
        for round in 0..=pull.busy_rounds {
            if self.uses_holders() {
                if let Some(o) = self.holder(pos, size).await {
                    return Some(o);
                }
                if self.abandoned {
                    return None;
                }
            }
            if !may_pull || self.upstream_refused.is_some() {
                if !may_pull && self.last_failure.is_none() {
                    self.last_failure = Some(format!(
                        "no peer has it, and pulling through from {} is not enabled",
                        self.job.registry
                    ));
                }
                return None;
            }
            if !self.uses_owners() {
                break;
            }
            match self.owners(pos, size).await {
                Owners::Opened(o) => return Some(o),
                Owners::Missing | Owners::Abandoned => return None,
                Owners::Nobody(why) => {
                    reason = why;
                    break;
                }
                // Every agent asked streams to as many peers as it may: they are
                // downloading it now; ask again shortly rather than adding a download.
                Owners::Busy if pos == 0 && round < pull.busy_rounds => {
                    tokio::time::sleep(pull.busy_wait).await;
                }
                Owners::Busy => {
                    reason = "owners-busy";
                    break;
                }
            }
        }
        if pos > 0 {
            reason = "resume";
        }
        state
            .metrics
            .upstream_blob_requests
            .get_or_create(&ReasonLabels { reason })
            .inc();
        self.upstream(pos, size).await
    }

    /// The owners of the blob, and the agents a busy one names.
    async fn owners(&mut self, pos: u64, size: Option<u64>) -> Owners {
        let state = self.job.state.clone();
        let key = self.job.transfer.digest.to_string();
        let timeout = state.pull.owner_timeout;
        let mut walk = cluster::Walk::new(&state, &key).await;
        let mut asked = false;
        while let Some((peer, asking)) = walk.next() {
            asked = true;
            let step = match self.ask(&peer, pos, Asking::Owner(asking), timeout).await {
                Answer::Body(p, resp) => match self.accept(p, resp, pos, size, Origin::Peer) {
                    Some(o) => return Owners::Opened(o),
                    None if self.abandoned => return Owners::Abandoned,
                    None => Step::Failed,
                },
                Answer::Missing => {
                    self.upstream_refused =
                        Some(format!("its owner {} could not get it upstream", peer.addr));
                    return Owners::Missing;
                }
                Answer::Busy(followers) if pos == 0 => {
                    return match self.follow(followers).await {
                        Some(o) => Owners::Opened(o),
                        None if self.abandoned => Owners::Abandoned,
                        None => Owners::Busy,
                    };
                }
                Answer::Busy(_) => return Owners::Busy,
                Answer::Redirect(to) => Step::Redirect(to),
                Answer::Failed => Step::Failed,
                Answer::Unavailable => Step::Unavailable,
            };
            walk.went(step, &state, &key);
        }
        Owners::Nobody(if asked { "owners-failed" } else { "owner" })
    }

    /// The agents a busy owner named as reading the blob from it: each streams its own
    /// copy as it grows. Asked in random order (so the load spreads); one that is busy too
    /// names its own readers, who are asked first (deeper in the tree of copies, where
    /// there is room). At the start of a copy only.
    async fn follow(&mut self, named: Vec<SocketAddr>) -> Option<Opened> {
        let state = self.job.state.clone();
        let mut seen: std::collections::HashSet<SocketAddr> =
            state.router.registry_addrs().into_iter().collect();
        let mut stack: Vec<SocketAddr> = Vec::new();
        let push = |stack: &mut Vec<SocketAddr>,
                    seen: &mut std::collections::HashSet<SocketAddr>,
                    list: Vec<SocketAddr>| {
            let order = std::collections::hash_map::RandomState::new();
            let mut fresh: Vec<SocketAddr> = list.into_iter().filter(|a| seen.insert(*a)).collect();
            fresh.sort_by_key(|a| std::hash::BuildHasher::hash_one(&order, a));
            stack.extend(fresh);
        };
        push(&mut stack, &mut seen, named);
        let mut asked = 0;
        while let Some(addr) = stack.pop() {
            if asked == FOLLOWER_ASKS {
                break;
            }
            let peer = cluster::peer_at(addr);
            if state.failed_peers.is_failed(&peer) {
                continue;
            }
            asked += 1;
            // It answers once its own copy has begun, which may wait on upstream.
            match self
                .ask(&peer, 0, Asking::Peer, state.pull.owner_timeout)
                .await
            {
                Answer::Body(p, resp) => {
                    if let Some(o) = self.accept(p, resp, 0, None, Origin::Peer) {
                        return Some(o);
                    }
                    if self.abandoned {
                        return None;
                    }
                }
                Answer::Busy(more) => push(&mut stack, &mut seen, more),
                _ => {}
            }
        }
        None
    }

    /// A peer holding the whole blob (hedged; the DHT is asked once more when the first
    /// lookup's peers are used up).
    async fn holder(&mut self, pos: u64, size: Option<u64>) -> Option<Opened> {
        let state = self.job.state.clone();
        let path = self.path();
        loop {
            let opened = peers::open(
                &state,
                &mut self.holders,
                &mut self.holder_attempts,
                &|p: &Peer| {
                    let mut req = state.http.get(format!("http://{}{path}", p.addr));
                    if pos > 0 {
                        req = req.header(header::RANGE, format!("bytes={pos}-"));
                    }
                    req
                },
                &|s| {
                    s == StatusCode::OK
                        || (pos > 0
                            && (s == StatusCode::PARTIAL_CONTENT
                                || s == StatusCode::RANGE_NOT_SATISFIABLE))
                },
            )
            .await;
            let Some((peer, resp)) = opened else {
                if self.looked_again || self.holders.tried().is_empty() {
                    return None;
                }
                self.looked_again = true;
                self.holders = crate::fetch::candidates(&state, self.job.transfer.digest.as_str());
                self.holder_attempts = 0;
                continue;
            };
            if let Some(o) = self.accept(peer, resp, pos, size, Origin::Holders) {
                return Some(o);
            }
            if self.abandoned {
                return None;
            }
        }
    }

    /// Upstream, directly.
    async fn upstream(&mut self, pos: u64, size: Option<u64>) -> Option<Opened> {
        let state = self.job.state.clone();
        let (registry, repository, digest) = (
            &self.job.registry,
            &self.job.repository,
            &self.job.transfer.digest,
        );
        for attempt in 0..UPSTREAM_TRIES {
            match state
                .upstream
                .get_blob(registry, repository, digest, pos)
                .await
            {
                Ok(b) => {
                    if size.is_some_and(|s| s != b.size) {
                        self.disagree();
                        return None;
                    }
                    return Some(Opened {
                        origin: Origin::Upstream,
                        peer: None,
                        size: b.size,
                        body: b.body,
                        skip: 0,
                    });
                }
                Err(e @ (UpstreamError::Unavailable(_) | UpstreamError::Invalid(_)))
                    if attempt + 1 < UPSTREAM_TRIES =>
                {
                    tracing::debug!(%digest, error = %e, "upstream blob request failed; trying again");
                    tokio::time::sleep(UPSTREAM_PAUSE).await;
                }
                Err(e) => {
                    crate::pullthrough::log_upstream_error(registry, repository, &e);
                    match crate::pullthrough::Miss::of(&e) {
                        crate::pullthrough::Miss::Gone(why) => self.upstream_refused = Some(why),
                        crate::pullthrough::Miss::Temporary(why) => self.last_failure = Some(why),
                    }
                    return None;
                }
            }
        }
        None
    }

    /// The blob's path at another agent.
    fn path(&self) -> String {
        format!(
            "/v2/{}/blobs/{}?ns={}",
            self.job.repository, self.job.transfer.digest, self.job.registry
        )
    }

    /// Asks `peer` for the blob from `pos`, as `asking` says.
    async fn ask(&mut self, peer: &Peer, pos: u64, asking: Asking, head: Duration) -> Answer {
        let state = &self.job.state;
        let mut req = state
            .http
            .get(format!("http://{}{}", peer.addr, self.path()))
            .header(PEER_HEADER, cluster::peer_header(state));
        if let Asking::Owner(how) = asking {
            req = how.headers(req);
        }
        if pos > 0 {
            req = req.header(header::RANGE, format!("bytes={pos}-"));
        }
        let Some(resp) = peers::send_marking(state, peer, req, head).await else {
            return Answer::Failed;
        };
        match resp.status() {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT => Answer::Body(peer.clone(), resp),
            StatusCode::SERVICE_UNAVAILABLE if resp.headers().contains_key(BUSY_HEADER) => {
                state.metrics.busy_answers.inc();
                let followers = resp
                    .headers()
                    .get(FOLLOWERS_HEADER)
                    .map(cluster::addr_list)
                    .unwrap_or_default();
                Answer::Busy(followers)
            }
            StatusCode::MISDIRECTED_REQUEST if asking != Asking::Peer => {
                cluster::redirect_of(state, peer, resp.headers())
                    .map_or(Answer::Failed, Answer::Redirect)
            }
            StatusCode::SERVICE_UNAVAILABLE => Answer::Unavailable,
            StatusCode::NOT_FOUND => Answer::Missing,
            s => {
                state.failed_peers.mark(
                    peer,
                    state.peers.failure_backoff,
                    &format!("answered {s}"),
                );
                Answer::Failed
            }
        }
    }

    /// Checks a peer's answer against the position and the size known so far.
    fn accept(
        &mut self,
        peer: Peer,
        resp: reqwest::Response,
        pos: u64,
        size: Option<u64>,
        origin: Origin,
    ) -> Option<Opened> {
        let state = self.job.state.clone();
        let length = content_length(&resp);
        let (total, skip) = match resp.status() {
            StatusCode::RANGE_NOT_SATISFIABLE => {
                // Its copy ends before `pos`: whoever announced the larger size lied.
                self.disagree();
                return None;
            }
            StatusCode::PARTIAL_CONTENT => {
                let range = resp
                    .headers()
                    .get(header::CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                let total = range
                    .rsplit_once('/')
                    .and_then(|(_, t)| t.parse::<u64>().ok());
                if !range.starts_with(&format!("bytes {pos}-")) || total.is_none() {
                    state
                        .metrics
                        .peer_failures
                        .get_or_create(&ReasonLabels {
                            reason: "bad-range",
                        })
                        .inc();
                    state.failed_peers.mark(
                        &peer,
                        state.peers.failure_backoff,
                        "answered the wrong range",
                    );
                    return None;
                }
                (total?, 0)
            }
            _ => {
                let Some(total) = length else {
                    state.failed_peers.mark(
                        &peer,
                        state.peers.failure_backoff,
                        "no Content-Length",
                    );
                    return None;
                };
                (total, pos)
            }
        };
        if size.is_some_and(|s| s != total) {
            self.disagree();
            return None;
        }
        Some(Opened {
            origin,
            peer: Some(peer),
            size: total,
            body: resp.bytes_stream().map_err(io::Error::other).boxed(),
            skip,
        })
    }

    /// Another source disagrees with the size the copy began with: the one that announced
    /// it is blamed, and the copy is abandoned (to start over without it).
    fn disagree(&mut self) {
        let state = &self.job.state;
        if let Some(first) = &self.announcer {
            state.failed_peers.mark(
                first,
                state.peers.failure_backoff,
                "announced a size other sources disagree with",
            );
        }
        self.abandoned = true;
        self.last_failure = Some("sources disagree about the blob's size".to_owned());
    }
}

/// The size a peer announced (the header: a HEAD's body is empty).
pub(crate) fn content_length(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

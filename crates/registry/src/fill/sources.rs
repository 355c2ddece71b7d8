//! Where a transfer's bytes come from: holders, owners (and the agents a busy owner names),
//! upstream; each opened at an offset, and what their answers mean.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::{StatusCode, header};
use mirrorlet_oci::{Peer, UpstreamError};

use super::Job;
use crate::cluster::{self, Step};
use crate::headers::{BUSY_HEADER, FOLLOWERS_HEADER, PEER_HEADER, content_length, range_total};
use crate::metrics::ReasonLabels;
use crate::outcome::{Miss, log_upstream_error};
use crate::peers::{self, Candidates};
use crate::state::AppState;
use crate::transfer::Origin;

/// Tries at upstream per open (a reset or 5xx is retried after a pause).
const UPSTREAM_TRIES: usize = 3;
/// Pause between tries at upstream.
const UPSTREAM_PAUSE: Duration = Duration::from_millis(250);
/// Agents asked at most, per round, among those a busy owner named (and those they name
/// in turn): enough to descend a tree of copies with a fan-out of a few to any size.
const FOLLOWER_ASKS: usize = 32;

/// A source, opened at some offset.
pub(super) struct Opened {
    pub(super) origin: Origin,
    pub(super) peer: Option<Peer>,
    pub(super) size: u64,
    pub(super) body: BoxStream<'static, io::Result<Bytes>>,
    /// Leading bytes to drop (a peer that ignored the range).
    pub(super) skip: u64,
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
pub(super) struct Sources<'a> {
    job: &'a Job,
    holders: Candidates,
    holder_attempts: usize,
    looked_again: bool,
    /// Upstream (or the owner) said there is no such blob, or refused: do not ask again.
    pub(super) upstream_refused: Option<String>,
    /// The source that announced the size of the current copy (blamed if others disagree).
    pub(super) announcer: Option<Peer>,
    /// Sources disagree about the size: the current copy cannot continue.
    abandoned: bool,
    last_failure: Option<String>,
    /// Whether a large blob may come from several holders at once (not after a copy from
    /// several did not match its digest: one at a time, the next mismatch names its peer).
    pub(super) parts: bool,
}

impl<'a> Sources<'a> {
    pub(super) fn new(job: &'a Job) -> Self {
        Self {
            holders: crate::fetch::candidates(&job.state, job.transfer.digest.as_str()),
            job,
            holder_attempts: 0,
            looked_again: false,
            upstream_refused: None,
            announcer: None,
            abandoned: false,
            last_failure: None,
            parts: true,
        }
    }

    /// Starts over for a new copy (fresh lookups; failed peers stay skipped).
    pub(super) fn restart(&mut self) {
        *self = Self {
            upstream_refused: self.upstream_refused.take(),
            parts: self.parts,
            ..Self::new(self.job)
        };
    }

    pub(super) fn why_none(&self) -> String {
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
    pub(super) async fn open(&mut self, pos: u64, size: Option<u64>) -> Option<Opened> {
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
            let peer = crate::headers::peer_at(addr);
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

    /// Up to `n` more holders of the whole blob, found already (for parts of a large
    /// blob, see [`super::parts`]).
    pub(super) fn more_holders(&mut self, n: usize) -> Vec<Peer> {
        let state = &self.job.state;
        self.holders.ready(&state.failed_peers, n)
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
                    log_upstream_error(registry, repository, &e);
                    match Miss::of(&e) {
                        Miss::Gone(why) => self.upstream_refused = Some(why),
                        Miss::Temporary(why) => self.last_failure = Some(why),
                    }
                    return None;
                }
            }
        }
        None
    }

    /// The blob's path at another agent.
    pub(super) fn path(&self) -> String {
        format!(
            "/v2/{}/blobs/{}?ns={}",
            self.job.repository, self.job.transfer.digest, self.job.registry
        )
    }

    /// Asks `peer` for the blob from `pos`, as `asking` says.
    async fn ask(&mut self, peer: &Peer, pos: u64, asking: Asking, head: Duration) -> Answer {
        let state = &self.job.state;
        let mut req = request(state, peer, &self.path());
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
                    .map(crate::headers::addr_list)
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
                let total = range_total(&resp, pos);
                if total.is_none() {
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

/// A request for the blob at `path` to another agent, as an agent asks.
fn request(state: &AppState, peer: &Peer, path: &str) -> reqwest::RequestBuilder {
    state
        .http
        .get(format!("http://{}{path}", peer.addr))
        .header(PEER_HEADER, cluster::peer_header(state))
}

/// `[from, end)` of the blob (of `size` bytes) at `path` from `peer`, which holds it: a
/// part of a copy read from several holders (see [`super::parts`]).
pub(super) async fn open_part(
    state: &AppState,
    path: &str,
    peer: &Peer,
    from: u64,
    end: u64,
    size: u64,
) -> Result<Opened, String> {
    let req = request(state, peer, path).header(
        header::RANGE,
        format!("bytes={from}-{}", end.saturating_sub(1)),
    );
    let resp = peers::send(req, state.peers.read_timeout)
        .await
        .map_err(|e| crate::error::chain(&e))?;
    if resp.status() != StatusCode::PARTIAL_CONTENT || range_total(&resp, from) != Some(size) {
        return Err(format!(
            "answered {} ({:?}) to a range of the blob",
            resp.status(),
            resp.headers().get(header::CONTENT_RANGE)
        ));
    }
    Ok(Opened {
        origin: Origin::Holders,
        peer: Some(peer.clone()),
        size,
        body: resp.bytes_stream().map_err(io::Error::other).boxed(),
        skip: 0,
    })
}

//! Finding and opening content at peers: the lookup with its idle timeout, skipping
//! peers that failed recently, and opening a request with hedging (a slow first peer gets
//! a second one raced against it).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::stream::{BoxStream, FuturesUnordered};
use futures_util::{FutureExt, StreamExt};
use http::StatusCode;
use mirrorlet_oci::Peer;

use crate::error::chain;
use crate::failed::FailedPeers;
use crate::headers::PEER_HEADER;
use crate::metrics::{LOOKUP_OUTCOMES, LookupLabels, Metrics};
use crate::state::AppState;

/// The peers a lookup found, handed out one at a time, skipping failed ones. Keeps
/// reading the lookup (with the idle timeout) when it runs out, and records how long the
/// lookup took to find its first peer (or to give up).
pub(crate) struct Candidates {
    lookup: Option<BoxStream<'static, Peer>>,
    queue: VecDeque<Peer>,
    tried: Vec<Peer>,
    idle: Duration,
    metrics: Metrics,
    /// When the lookup started; `None` once its latency is recorded.
    started: Option<Instant>,
}

impl std::fmt::Debug for Candidates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Candidates")
            .field("queue", &self.queue)
            .field("tried", &self.tried)
            .finish()
    }
}

impl Candidates {
    /// Starts from a lookup stream.
    pub(crate) fn new(lookup: BoxStream<'static, Peer>, idle: Duration, metrics: Metrics) -> Self {
        Self {
            lookup: Some(lookup),
            queue: VecDeque::new(),
            tried: Vec::new(),
            idle,
            metrics,
            started: Some(Instant::now()),
        }
    }

    fn observe(&mut self, found: bool) {
        let Some(started) = self.started.take() else {
            return;
        };
        let outcome = if found {
            LOOKUP_OUTCOMES[0]
        } else {
            LOOKUP_OUTCOMES[1]
        };
        let lookup_us = started.elapsed().as_micros() as u64;
        tracing::debug!(outcome, lookup_us, "lookup");
        self.metrics
            .lookups
            .get_or_create(&LookupLabels { outcome })
            .observe(started.elapsed().as_secs_f64());
    }

    /// The next peer to try, waiting at most the idle timeout for the lookup to find one.
    pub(crate) async fn next(&mut self, failed: &FailedPeers) -> Option<Peer> {
        loop {
            while let Some(p) = self.queue.pop_front() {
                if self.tried.contains(&p) {
                    continue;
                }
                if failed.is_failed(&p) {
                    self.metrics.peers_skipped.inc();
                    continue;
                }
                self.tried.push(p.clone());
                return Some(p);
            }
            let lookup = self.lookup.as_mut()?;
            match tokio::time::timeout(self.idle, lookup.next()).await {
                Ok(Some(p)) => {
                    self.queue.push_back(p);
                    // Take whatever else is already there without waiting.
                    while let Some(Some(more)) = lookup.next().now_or_never() {
                        self.queue.push_back(more);
                    }
                    self.observe(true);
                }
                Ok(None) | Err(_) => {
                    self.observe(false);
                    self.lookup = None;
                    return None;
                }
            }
        }
    }

    /// Up to `n` more peers found already (none is waited for), handed out like
    /// [`Candidates::next`]'s.
    pub(crate) fn ready(&mut self, failed: &FailedPeers, n: usize) -> Vec<Peer> {
        if let Some(lookup) = self.lookup.as_mut() {
            while let Some(Some(more)) = lookup.next().now_or_never() {
                self.queue.push_back(more);
            }
        }
        let mut out = Vec::new();
        while out.len() < n
            && let Some(p) = self.queue.pop_front()
        {
            if self.tried.contains(&p) || failed.is_failed(&p) {
                continue;
            }
            self.tried.push(p.clone());
            out.push(p);
        }
        out
    }

    /// Peers handed out so far.
    pub(crate) fn tried(&self) -> &[Peer] {
        &self.tried
    }
}

/// Why another agent gave no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    /// The request failed (connecting, sending, reading the head).
    #[error("request failed")]
    Failed(#[source] reqwest::Error),
    /// No response head within the limit.
    #[error("no response within {0:?}")]
    Timeout(Duration),
}

/// Sends a request to another agent. A peer that accepted the connection but never
/// answers must not hold the client: the response head must come within `limit`.
pub(crate) async fn send(
    req: reqwest::RequestBuilder,
    limit: Duration,
) -> Result<reqwest::Response, SendError> {
    match tokio::time::timeout(limit, req.send()).await {
        Ok(r) => r.map_err(SendError::Failed),
        Err(_) => Err(SendError::Timeout(limit)),
    }
}

/// [`send`], marking the peer as failed if it fails.
pub(crate) async fn send_marking(
    state: &AppState,
    peer: &Peer,
    req: reqwest::RequestBuilder,
    limit: Duration,
) -> Option<reqwest::Response> {
    match send(req, limit).await {
        Ok(r) => Some(r),
        Err(e) => {
            state
                .failed_peers
                .mark(peer, state.peers.failure_backoff, &chain(&e));
            None
        }
    }
}

/// Sends `build(peer)` to peers from `candidates` until one answers with an acceptable
/// status: one at a time, but when the current one is slower than the hedge delay to
/// answer, another is raced against it. Peers that fail are marked. Returns the first
/// good response, or `None` when the attempts or candidates run out.
pub(crate) async fn open(
    state: &AppState,
    candidates: &mut Candidates,
    attempts: &mut usize,
    build: &impl Fn(&Peer) -> reqwest::RequestBuilder,
    accept: &impl Fn(StatusCode) -> bool,
) -> Option<(Peer, reqwest::Response)> {
    let (config, failed, metrics) = (&state.peers, &state.failed_peers, &state.metrics);
    let mut inflight = FuturesUnordered::new();
    let start = |peer: Peer| {
        let req = build(&peer).header(PEER_HEADER, crate::cluster::peer_header(state));
        let limit = config.read_timeout;
        async move {
            let result = send(req, limit).await;
            (peer, result)
        }
        .boxed()
    };
    loop {
        if inflight.is_empty() {
            if *attempts >= config.max_attempts {
                return None;
            }
            let peer = candidates.next(failed).await?;
            *attempts += 1;
            inflight.push(start(peer));
        }
        let can_hedge = *attempts < config.max_attempts;
        tokio::select! {
            Some((peer, result)) = inflight.next() => match result {
                Ok(resp) if accept(resp.status()) => return Some((peer, resp)),
                // The peer no longer has it (deleted since it was advertised), or the range
                // asked for lies outside its copy: not a fault of that peer.
                Ok(resp) if resp.status() == StatusCode::NOT_FOUND || resp.status() == StatusCode::RANGE_NOT_SATISFIABLE => {
                    metrics.peer_failures.get_or_create(&crate::metrics::ReasonLabels { reason: "not-found" }).inc();
                }
                Ok(resp) => {
                    metrics.peer_failures.get_or_create(&crate::metrics::ReasonLabels { reason: "bad-status" }).inc();
                    failed.mark(&peer, config.failure_backoff, &format!("answered {}", resp.status()));
                }
                Err(e) => {
                    metrics.peer_failures.get_or_create(&crate::metrics::ReasonLabels { reason: "unreachable" }).inc();
                    failed.mark(&peer, config.failure_backoff, &chain(&e));
                }
            },
            () = tokio::time::sleep(config.hedge_delay), if can_hedge && inflight.len() == 1 => {
                if let Some(peer) = candidates.next(failed).await {
                    *attempts += 1;
                    metrics.hedges.inc();
                    tracing::debug!(peer = %peer.addr, "first peer is slow; racing another");
                    inflight.push(start(peer));
                }
            }
        }
    }
}

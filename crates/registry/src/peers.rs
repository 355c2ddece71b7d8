//! Finding and opening content at peers: the lookup with its idle timeout, the cache of
//! peers that failed recently, and opening a request with hedging (a slow first peer gets
//! a second one raced against it).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use futures_util::stream::{BoxStream, FuturesUnordered};
use futures_util::{FutureExt, StreamExt};
use http::StatusCode;
use mirrorlet_oci::Peer;
use mirrorlet_oci::glob::Glob;

use crate::metrics::{LOOKUP_OUTCOMES, LookupLabels, Metrics};
use crate::state::AppState;

/// The header an agent sets on requests to another agent, naming its registry addresses
/// (see [`crate::cluster::sender`]). A request carrying it is answered from what the node
/// holds or is downloading only (unless it asks the node as an owner), so agents never
/// forward in loops.
pub const PEER_HEADER: &str = "x-mirrorlet-peer";

/// How the registry uses peers.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Whether to ask peers at all (off: a purely node-local mirror).
    pub enabled: bool,
    /// How long to wait for the lookup to yield a (next) peer.
    pub lookup_timeout: Duration,
    /// Peers tried per request at most (hedges and resumes included).
    pub max_attempts: usize,
    /// If the peer being tried has not answered after this long, race another.
    pub hedge_delay: Duration,
    /// Connect timeout to a peer.
    pub connect_timeout: Duration,
    /// A peer's stream that delivers nothing for this long is abandoned (resumed elsewhere).
    pub read_timeout: Duration,
    /// How long a peer that failed is skipped.
    pub failure_backoff: Duration,
    /// How long a peer that served wrong bytes is skipped.
    pub corrupt_backoff: Duration,
    /// Blobs up to this size are fetched whole and verified before anything is sent, so a
    /// bad peer costs a retry elsewhere instead of a failed pull.
    pub verify_buffer: u64,
    /// Tags matching these are never resolved through peers.
    pub tag_excludes: Vec<Glob>,
    /// Blobs a peer announces as larger than this are not taken from peers (a bound on the
    /// spool, against a peer lying about sizes).
    pub max_blob_size: u64,
    /// Where blobs larger than the verify buffer are spooled while they are verified
    /// (anonymous files, gone when closed).
    pub spool_dir: std::path::PathBuf,
    /// The address requests to peers come from (`None`: the system's choice). Peers take
    /// an agent's word for its registry address only where its connections come from.
    pub source_address: Option<std::net::IpAddr>,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lookup_timeout: Duration::from_millis(20),
            max_attempts: 3,
            hedge_delay: Duration::from_millis(100),
            connect_timeout: Duration::from_millis(500),
            read_timeout: Duration::from_secs(5),
            failure_backoff: Duration::from_secs(60),
            corrupt_backoff: Duration::from_secs(600),
            verify_buffer: 4 * 1024 * 1024,
            tag_excludes: vec![Glob::new("*:latest")],
            max_blob_size: 32 << 30,
            spool_dir: std::env::temp_dir(),
            source_address: None,
        }
    }
}

/// Peers that failed recently, by registry address, with when they may be tried again
/// and their last failure (shown on the status page).
#[derive(Debug, Default)]
pub struct FailedPeers {
    failures: Mutex<HashMap<SocketAddr, Failure>>,
}

/// A peer's last failure.
#[derive(Debug, Clone)]
pub struct Failure {
    /// Skipped until then.
    pub until: Instant,
    /// When it failed.
    pub at: SystemTime,
    /// Why.
    pub reason: String,
}

impl FailedPeers {
    /// Skips `peer` for `backoff`.
    pub fn mark(&self, peer: &Peer, backoff: Duration, why: &str) {
        tracing::warn!(peer = %peer.addr, id = %peer.id, reason = why, backoff = ?backoff, "peer failed; skipping it for a while");
        let mut m = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let until = Instant::now() + backoff;
        let e = m.entry(peer.addr).or_insert_with(|| Failure {
            until,
            at: SystemTime::now(),
            reason: String::new(),
        });
        e.until = e.until.max(until);
        e.at = SystemTime::now();
        why.clone_into(&mut e.reason);
        // Keep the map small: drop entries that have run out.
        if m.len() > 1024 {
            let now = Instant::now();
            m.retain(|_, f| f.until > now);
        }
    }

    /// Whether `peer` is being skipped.
    pub fn is_failed(&self, peer: &Peer) -> bool {
        let m = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        m.get(&peer.addr).is_some_and(|f| f.until > Instant::now())
    }

    /// The last failure of the peer whose registry is at `addr`, if remembered.
    pub fn last(&self, addr: &SocketAddr) -> Option<Failure> {
        let m = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        m.get(addr).cloned()
    }
}

/// The peers a lookup found, handed out one at a time, skipping failed ones. Keeps
/// reading the lookup (with the idle timeout) when it runs out, and records how long the
/// lookup took to find its first peer (or to give up).
pub struct Candidates {
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
    pub fn new(lookup: BoxStream<'static, Peer>, idle: Duration, metrics: Metrics) -> Self {
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
    pub async fn next(&mut self, failed: &FailedPeers) -> Option<Peer> {
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

    /// Peers handed out so far.
    pub fn tried(&self) -> &[Peer] {
        &self.tried
    }
}

/// Sends a request to another agent. A peer that accepted the connection but never
/// answers must not hold the client: the response head must come within `limit`.
pub(crate) async fn send(
    req: reqwest::RequestBuilder,
    limit: Duration,
) -> Result<reqwest::Response, String> {
    match tokio::time::timeout(limit, req.send()).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no response within {limit:?}")),
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
        Err(why) => {
            state
                .failed_peers
                .mark(peer, state.peers.failure_backoff, &why);
            None
        }
    }
}

/// Sends `build(peer)` to peers from `candidates` until one answers with an acceptable
/// status: one at a time, but when the current one is slower than the hedge delay to
/// answer, another is raced against it. Peers that fail are marked. Returns the first
/// good response, or `None` when the attempts or candidates run out.
pub async fn open(
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
                    failed.mark(&peer, config.failure_backoff, &e);
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

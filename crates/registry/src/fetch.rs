//! Taking content from peers: manifests (small: fetched whole and verified), blobs up to
//! the verify buffer (likewise), and larger blobs streamed through bounded buffers while
//! their digest is computed. A stream that breaks is continued at another peer with
//! `Range: bytes=<received>-`, so the client sees one uninterrupted body; a digest
//! mismatch aborts the response before its last bytes, so a client never receives a
//! complete body with wrong bytes, and the peers involved are avoided.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use http::{StatusCode, header};
use mirrorlet_oci::manifest::{self, Descriptor, Manifest};
use mirrorlet_oci::{ByteRange, Digest, Peer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::RegistryError;
use crate::metrics::{LookupLabels, ReasonLabels, Source};
use crate::mirror::content_head;
use crate::peers::{self, Candidates};
use crate::range::{self, RangeRequest};
use crate::state::AppState;

/// Chunks buffered between a peer's stream and the client.
const STREAM_BUFFER: usize = 8;

/// Starts a lookup for `key` and records its latency when the first peer is found.
fn candidates(state: &AppState, key: &str) -> Candidates {
    Candidates::new(state.router.lookup(key), state.peers.lookup_timeout)
}

fn observe_lookup(state: &AppState, started: Instant, found: bool) {
    let outcome = if found { "found" } else { "not-found" };
    state
        .metrics
        .lookups
        .get_or_create(&LookupLabels { outcome })
        .observe(started.elapsed().as_secs_f64());
}

/// Reads a whole body of at most `limit` bytes, with the read timeout between chunks.
async fn read_limited(
    state: &AppState,
    resp: reqwest::Response,
    limit: u64,
) -> Result<Bytes, String> {
    let mut body = resp.bytes_stream();
    let mut out = BytesMut::new();
    loop {
        match tokio::time::timeout(state.peers.read_timeout, body.next()).await {
            Ok(Some(Ok(chunk))) => {
                if (out.len() + chunk.len()) as u64 > limit {
                    return Err(format!("body larger than {limit} bytes"));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(Some(Err(e))) => return Err(format!("reading body: {e}")),
            Ok(None) => return Ok(out.freeze()),
            Err(_) => return Err("stalled while sending".into()),
        }
    }
}

/// A manifest taken from a peer and verified.
#[derive(Debug)]
pub struct PeerManifest {
    /// Its descriptor (media type read from the bytes).
    pub descriptor: Descriptor,
    /// The bytes.
    pub bytes: Bytes,
    /// Who served it.
    pub peer: Peer,
}

/// Fetches a manifest by tag or digest from peers. `key` is what was looked up (the tag as
/// `registry/repo:tag`, or the digest); `expect` the digest when asked by digest.
pub async fn manifest(
    state: &AppState,
    key: &str,
    path_and_query: &str,
    expect: Option<&Digest>,
    accept: &str,
) -> Option<PeerManifest> {
    let started = Instant::now();
    let mut cands = candidates(state, key);
    let mut attempts = 0;
    let mut observed = false;
    loop {
        let opened = peers::open(
            &mut cands,
            &state.peers,
            &state.failed_peers,
            &state.metrics,
            &mut attempts,
            |p| {
                state
                    .http
                    .get(format!("http://{}{path_and_query}", p.addr))
                    .header(header::ACCEPT, accept)
            },
            |s| s == StatusCode::OK,
        )
        .await;
        if !observed {
            observe_lookup(state, started, !cands.tried().is_empty());
            observed = true;
        }
        let (peer, resp) = opened?;
        let claimed = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        let bytes = match read_limited(state, resp, manifest::MAX_MANIFEST_SIZE).await {
            Ok(b) => b,
            Err(e) => {
                state
                    .failed_peers
                    .mark(&peer, state.peers.failure_backoff, &e);
                continue;
            }
        };
        let actual = Digest::sha256_of(&bytes);
        let wanted = expect.cloned().or(claimed);
        let sniffed = Manifest::sniff(&bytes);
        match (wanted, sniffed) {
            (Some(w), Some(m)) if w == actual => {
                return Some(PeerManifest {
                    descriptor: Descriptor {
                        media_type: m.media_type,
                        digest: actual,
                        size: bytes.len() as u64,
                    },
                    bytes,
                    peer,
                });
            }
            _ => {
                state.metrics.digest_mismatches.inc();
                state.failed_peers.mark(
                    &peer,
                    state.peers.corrupt_backoff,
                    "served a manifest that does not match its digest",
                );
            }
        }
    }
}

/// Serves a blob from peers; `Ok(None)` if no peer could.
pub async fn blob(
    state: &Arc<AppState>,
    digest: &Digest,
    path_and_query: &str,
    range_header: Option<&str>,
    head: bool,
) -> Result<Option<Response>, RegistryError> {
    let started = Instant::now();
    let mut cands = candidates(state, digest.as_str());
    let mut attempts = 0;
    let mut observed = false;
    let url = |p: &Peer| format!("http://{}{path_and_query}", p.addr);
    loop {
        let opened = peers::open(
            &mut cands,
            &state.peers,
            &state.failed_peers,
            &state.metrics,
            &mut attempts,
            |p| {
                if head {
                    state.http.head(url(p))
                } else {
                    state.http.get(url(p))
                }
            },
            |s| s == StatusCode::OK,
        )
        .await;
        if !observed {
            observe_lookup(state, started, !cands.tried().is_empty());
            observed = true;
        }
        let Some((peer, resp)) = opened else {
            return Ok(None);
        };
        // The header, not the body's size hint: a HEAD response has an empty body.
        let size = resp
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let Some(size) = size else {
            state
                .failed_peers
                .mark(&peer, state.peers.failure_backoff, "no Content-Length");
            continue;
        };
        let (range, partial) = match range_header.map(|h| range::parse(h, size)) {
            None | Some(RangeRequest::Full) => (ByteRange::full(size), false),
            Some(RangeRequest::Partial(r)) => (r, true),
            Some(RangeRequest::Unsatisfiable) => {
                return Err(RegistryError::RangeNotSatisfiable { size });
            }
        };
        let head_resp = |body: Body| {
            content_head(manifest::OCTET_STREAM, digest, size, range, partial)
                .body(body)
                .map(Some)
                .map_err(|e| RegistryError::StoreUnavailable(format!("building response: {e}")))
        };
        if head {
            return head_resp(Body::empty());
        }
        if size <= state.peers.verify_buffer {
            let Ok(_permit) = state.buffer_slots.acquire().await else {
                return Ok(None);
            };
            match read_limited(state, resp, size).await {
                Ok(bytes) if bytes.len() as u64 == size && Digest::sha256_of(&bytes) == *digest => {
                    let part = bytes.slice(range.start as usize..range.end as usize);
                    state
                        .metrics
                        .bytes_from(Source::Peer)
                        .inc_by(part.len() as u64);
                    return head_resp(Body::from(part));
                }
                Ok(_) => {
                    state.metrics.digest_mismatches.inc();
                    state.failed_peers.mark(
                        &peer,
                        state.peers.corrupt_backoff,
                        "served bytes that do not match the digest",
                    );
                }
                Err(e) => state
                    .failed_peers
                    .mark(&peer, state.peers.failure_backoff, &e),
            }
            continue;
        }
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let job = Streamer {
            state: state.clone(),
            digest: digest.clone(),
            path_and_query: path_and_query.to_owned(),
            size,
            range,
            candidates: cands,
            attempts,
            tx,
        };
        tokio::spawn(job.run(peer, resp));
        return head_resp(Body::from_stream(ReceiverStream::new(rx)));
    }
}

/// Copies a blob from peers to the client, verifying and resuming.
struct Streamer {
    state: Arc<AppState>,
    digest: Digest,
    path_and_query: String,
    size: u64,
    /// The part the client asked for.
    range: ByteRange,
    candidates: Candidates,
    attempts: usize,
    tx: mpsc::Sender<io::Result<Bytes>>,
}

/// The client went away.
struct Gone;

impl Streamer {
    async fn run(mut self, first_peer: Peer, first: reqwest::Response) {
        let mut verifier = self.digest.verifier();
        let mut pos: u64 = 0;
        let mut pending: Option<Bytes> = None;
        let mut contributors = vec![first_peer.clone()];
        let mut current: Option<(Peer, BoxStream<'static, reqwest::Result<Bytes>>, u64)> =
            Some((first_peer, first.bytes_stream().boxed(), 0));
        while pos < self.size {
            let Some((peer, body, skip)) = current.as_mut() else {
                match self.resume(pos).await {
                    Some((p, resp, skip)) => {
                        self.state.metrics.resumes.inc();
                        tracing::info!(peer = %p.addr, digest = %self.digest, offset = pos, "continuing the blob from another peer");
                        contributors.push(p.clone());
                        current = Some((p, resp.bytes_stream().boxed(), skip));
                        continue;
                    }
                    None => {
                        tracing::warn!(digest = %self.digest, offset = pos, "no peer could continue the blob; aborting the response");
                        let _ = self
                            .tx
                            .send(Err(io::Error::other("peers failed mid-stream")))
                            .await;
                        return;
                    }
                }
            };
            match tokio::time::timeout(self.state.peers.read_timeout, body.next()).await {
                Ok(Some(Ok(mut chunk))) => {
                    if *skip > 0 {
                        let n = (*skip).min(chunk.len() as u64);
                        *skip -= n;
                        chunk = chunk.slice(n as usize..);
                    }
                    let n = chunk.len() as u64;
                    if n == 0 {
                        continue;
                    }
                    if pos + n > self.size {
                        let peer = peer.clone();
                        self.state.failed_peers.mark(
                            &peer,
                            self.state.peers.failure_backoff,
                            "sent more bytes than the blob has",
                        );
                        current = None;
                        continue;
                    }
                    verifier.update(&chunk);
                    let (a, b) = (self.range.start.max(pos), self.range.end.min(pos + n));
                    if a < b {
                        let part = chunk.slice((a - pos) as usize..(b - pos) as usize);
                        // Hold back the latest part until more arrives: the last bytes go
                        // out only once the whole blob is verified.
                        if let Some(ready) = pending.replace(part) {
                            if self.send(ready).await.is_err() {
                                return;
                            }
                        }
                    }
                    pos += n;
                }
                Ok(Some(Err(e))) => {
                    let peer = peer.clone();
                    self.state.failed_peers.mark(
                        &peer,
                        self.state.peers.failure_backoff,
                        &format!("stream broke: {e}"),
                    );
                    current = None;
                }
                Ok(None) => {
                    let peer = peer.clone();
                    self.state.failed_peers.mark(
                        &peer,
                        self.state.peers.failure_backoff,
                        "stream ended early",
                    );
                    current = None;
                }
                Err(_) => {
                    let peer = peer.clone();
                    self.state.failed_peers.mark(
                        &peer,
                        self.state.peers.failure_backoff,
                        "stream stalled",
                    );
                    current = None;
                }
            }
        }
        if verifier.matches() {
            if let Some(last) = pending {
                let _ = self.send(last).await;
            }
        } else {
            self.state.metrics.digest_mismatches.inc();
            for p in &contributors {
                self.state.failed_peers.mark(
                    p,
                    self.state.peers.corrupt_backoff,
                    "served bytes that do not match the digest",
                );
            }
            tracing::error!(digest = %self.digest, "blob from peers does not match its digest; aborting the response");
            let _ = self.tx.send(Err(io::Error::other("digest mismatch"))).await;
        }
    }

    async fn send(&mut self, part: Bytes) -> Result<(), Gone> {
        let n = part.len() as u64;
        self.tx.send(Ok(part)).await.map_err(|_| Gone)?;
        self.state.metrics.bytes_from(Source::Peer).inc_by(n);
        Ok(())
    }

    /// Opens the blob at another peer from `pos`. Returns the peer, its response and how
    /// many leading bytes to skip (if it ignored the range).
    async fn resume(&mut self, pos: u64) -> Option<(Peer, reqwest::Response, u64)> {
        let (size, path) = (self.size, self.path_and_query.clone());
        let http = self.state.http.clone();
        loop {
            let (peer, resp) = peers::open(
                &mut self.candidates,
                &self.state.peers,
                &self.state.failed_peers,
                &self.state.metrics,
                &mut self.attempts,
                |p| {
                    http.get(format!("http://{}{path}", p.addr))
                        .header(header::RANGE, format!("bytes={pos}-"))
                },
                |s| s == StatusCode::OK || s == StatusCode::PARTIAL_CONTENT,
            )
            .await?;
            if resp.status() == StatusCode::OK {
                return Some((peer, resp, pos));
            }
            let range_ok = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| {
                    v.starts_with(&format!("bytes {pos}-")) && v.ends_with(&format!("/{size}"))
                });
            if range_ok {
                return Some((peer, resp, 0));
            }
            self.state
                .metrics
                .peer_failures
                .get_or_create(&ReasonLabels {
                    reason: "bad-range",
                })
                .inc();
            self.state.failed_peers.mark(
                &peer,
                self.state.peers.failure_backoff,
                "answered the wrong range",
            );
        }
    }
}

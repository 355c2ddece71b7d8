//! Blobs from peers: fetched whole (in memory or a spool file), verified, then served.

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::stream;
use futures_util::stream::BoxStream;
use futures_util::{StreamExt, TryStreamExt};
use http::{StatusCode, header};
use mirrorlet_oci::manifest;
use mirrorlet_oci::{ByteRange, Digest, Peer, filestream};
use tokio::sync::OwnedSemaphorePermit;

use super::{candidates, read_limited};
use crate::error::RegistryError;
use crate::metrics::{ReasonLabels, Source};
use crate::mirror::{content_head, respond};
use crate::peers::{self, Candidates};
use crate::range;
use crate::state::AppState;

/// A blob taken from peers and verified against its digest. It holds its slot (memory or
/// spool) until the response body that serves it is dropped, so the slots bound what is
/// held at once, slow clients included.
enum Verified {
    /// Small blobs, held in memory.
    Memory(Bytes, OwnedSemaphorePermit),
    /// Larger ones, in an anonymous spool file (gone when closed).
    File(std::fs::File, u64, OwnedSemaphorePermit),
}

impl Verified {
    fn size(&self) -> u64 {
        match self {
            Self::Memory(b, _) => b.len() as u64,
            Self::File(_, size, _) => *size,
        }
    }

    fn body(self, range: ByteRange, counter: prometheus_client::metrics::counter::Counter) -> Body {
        match self {
            Self::Memory(b, slot) => {
                let part = b.slice(range.start as usize..range.end as usize);
                Body::from_stream(
                    stream::iter([Ok::<_, std::io::Error>(part)]).map(move |chunk| {
                        let _held = &slot;
                        if let Ok(c) = &chunk {
                            counter.inc_by(c.len() as u64);
                        }
                        chunk
                    }),
                )
            }
            Self::File(f, _, slot) => {
                Body::from_stream(filestream::stream(f, range).inspect_ok(move |c| {
                    let _held = &slot;
                    counter.inc_by(c.len() as u64);
                }))
            }
        }
    }
}

/// Serves a blob from peers; `Ok(None)` if no peer could.
///
/// Every byte is verified before the first one is sent: containerd resumes an interrupted
/// download from what it already wrote, so a wrong byte that reached it would poison its
/// partial download for every later attempt. Small blobs are checked in memory, larger
/// ones in a spool file; meanwhile the client waits for the response head, and if no peer
/// delivers a verified copy the answer is still a 404 that sends containerd upstream.
pub async fn blob(
    state: &Arc<AppState>,
    digest: &Digest,
    path_and_query: &str,
    range_header: Option<&str>,
    head: bool,
) -> Result<Option<Response>, RegistryError> {
    let url = |p: &Peer| format!("http://{}{path_and_query}", p.addr);
    let mut fetch = Fetch {
        state: state.clone(),
        digest: digest.clone(),
        path_and_query: path_and_query.to_owned(),
        candidates: candidates(state, digest.as_str()),
        attempts: 0,
        looked_again: false,
    };
    let verified = if head {
        // The size is all a HEAD needs; no bytes are taken, so none need verifying.
        let size = loop {
            let opened = fetch
                .open(|p| state.http.head(url(p)), |s| s == StatusCode::OK)
                .await;
            let Some((peer, resp)) = opened else {
                return Ok(None);
            };
            match content_length(&resp) {
                Some(size) => break size,
                None => {
                    state
                        .failed_peers
                        .mark(&peer, state.peers.failure_backoff, "no Content-Length")
                }
            }
        };
        let head = content_head(
            manifest::OCTET_STREAM,
            digest,
            size,
            ByteRange::full(size),
            false,
        );
        return respond(head, Body::empty()).map(Some);
    } else {
        fetch.run().await
    };
    let Some(verified) = verified else {
        return Ok(None);
    };
    let size = verified.size();
    let (range, partial) = range::select(range_header, size)?;
    let body = verified.body(range, state.metrics.bytes_from(Source::Peer));
    respond(
        content_head(manifest::OCTET_STREAM, digest, size, range, partial),
        body,
    )
    .map(Some)
}

/// Batches queued between the network and the spool worker.
const SPOOL_QUEUE: usize = 4;
/// Bytes per batch handed to the spool worker.
const SPOOL_BATCH: usize = 1 << 20;

/// Starts a blocking worker that hashes and writes what it is sent to `file`; it returns
/// the file (rewound) and the verifier when the sender is dropped.
fn spool_worker(
    file: std::fs::File,
    mut verifier: mirrorlet_oci::digest::Verifier,
) -> (
    tokio::sync::mpsc::Sender<Bytes>,
    tokio::task::JoinHandle<std::io::Result<(std::fs::File, mirrorlet_oci::digest::Verifier)>>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(SPOOL_QUEUE);
    let worker = tokio::task::spawn_blocking(move || {
        use std::io::{Seek, Write};
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        while let Some(chunk) = rx.blocking_recv() {
            verifier.update(&chunk);
            out.write_all(&chunk)?;
        }
        let mut file = out.into_inner().map_err(|e| e.into_error())?;
        file.rewind()?;
        Ok((file, verifier))
    });
    (tx, worker)
}

/// The size a peer announced (the header, not the body's size hint: a HEAD's body is empty).
fn content_length(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Getting one blob from peers: attempts, resumes, verification.
struct Fetch {
    state: Arc<AppState>,
    digest: Digest,
    path_and_query: String,
    candidates: Candidates,
    attempts: usize,
    /// Whether the DHT was asked a second time after the first lookup's peers ran out.
    looked_again: bool,
}

/// A copy went wrong: the peer is marked; try another.
struct Failed;

impl Fetch {
    /// Opens a request at the next good peer; asks the DHT once more when the first
    /// lookup's peers are used up.
    async fn open(
        &mut self,
        build: impl Fn(&Peer) -> reqwest::RequestBuilder,
        accept: impl Fn(StatusCode) -> bool,
    ) -> Option<(Peer, reqwest::Response)> {
        loop {
            let opened = peers::open(
                &self.state,
                &mut self.candidates,
                &mut self.attempts,
                &build,
                &accept,
            )
            .await;
            if opened.is_some() || self.looked_again || self.candidates.tried().is_empty() {
                return opened;
            }
            self.looked_again = true;
            self.candidates = candidates(&self.state, self.digest.as_str());
            self.attempts = 0;
        }
    }

    /// Takes the whole blob from peers until a copy verifies, or no peer is left.
    async fn run(&mut self) -> Option<Verified> {
        let mut copies = 0;
        loop {
            let http = self.state.http.clone();
            let path = self.path_and_query.clone();
            let opened = self
                .open(
                    |p| http.get(format!("http://{}{path}", p.addr)),
                    |s| s == StatusCode::OK,
                )
                .await;
            let (peer, resp) = opened?;
            let Some(size) = content_length(&resp) else {
                self.state.failed_peers.mark(
                    &peer,
                    self.state.peers.failure_backoff,
                    "no Content-Length",
                );
                continue;
            };
            let copy = if size <= self.state.peers.verify_buffer {
                self.in_memory(&peer, resp, size).await
            } else {
                self.spooled(peer, resp, size).await
            };
            if let Ok(v) = copy {
                return Some(v);
            }
            // That copy failed and its culprits are marked: look again from scratch (the
            // failed peers are skipped), a bounded number of times.
            copies += 1;
            if copies >= self.state.peers.max_attempts {
                return None;
            }
            self.candidates = candidates(&self.state, self.digest.as_str());
            self.attempts = 0;
            self.looked_again = false;
        }
    }

    fn mismatch(&self, peers: &[Peer]) {
        self.state.metrics.digest_mismatches.inc();
        for p in peers {
            self.state.failed_peers.mark(
                p,
                self.state.peers.corrupt_backoff,
                "served bytes that do not match the digest",
            );
        }
    }

    async fn in_memory(
        &mut self,
        peer: &Peer,
        resp: reqwest::Response,
        size: u64,
    ) -> Result<Verified, Failed> {
        let Ok(slot) = self.state.buffer_slots.clone().acquire_owned().await else {
            return Err(Failed);
        };
        match read_limited(&self.state, resp, size).await {
            Ok(bytes) if bytes.len() as u64 == size && Digest::sha256_of(&bytes) == self.digest => {
                Ok(Verified::Memory(bytes, slot))
            }
            Ok(_) => {
                self.mismatch(std::slice::from_ref(peer));
                Err(Failed)
            }
            Err(e) => {
                self.state
                    .failed_peers
                    .mark(peer, self.state.peers.failure_backoff, &e);
                Err(Failed)
            }
        }
    }

    /// Copies the blob into a spool file, continuing at other peers (`Range: bytes=N-`)
    /// when a stream breaks or stalls, then verifies it.
    async fn spooled(
        &mut self,
        first_peer: Peer,
        first: reqwest::Response,
        size: u64,
    ) -> Result<Verified, Failed> {
        if size > self.state.peers.max_blob_size {
            tracing::warn!(peer = %first_peer.addr, size, limit = self.state.peers.max_blob_size, "blob larger than --peer-max-blob-size; not using peers for it");
            return Err(Failed);
        }
        let Ok(slot) = self.state.spool_slots.clone().acquire_owned().await else {
            return Err(Failed);
        };
        let dir = self.state.peers.spool_dir.clone();
        let file = match tokio::task::spawn_blocking(move || tempfile::tempfile_in(dir)).await {
            Ok(Ok(f)) => f,
            other => {
                tracing::warn!(error = ?other.err(), spool = %self.state.peers.spool_dir.display(), "cannot create a spool file; not using peers for this blob");
                return Err(Failed);
            }
        };
        // Hashing and writing run on a blocking thread fed through a bounded channel, so they
        // overlap with receiving from the network.
        let (sink, worker) = spool_worker(file, self.digest.verifier());
        let mut batch = BytesMut::with_capacity(SPOOL_BATCH);
        let mut pos: u64 = 0;
        let mut contributors = vec![first_peer.clone()];
        let mut current: Option<(Peer, BoxStream<'static, reqwest::Result<Bytes>>, u64)> =
            Some((first_peer, first.bytes_stream().boxed(), 0));
        while pos < size {
            let Some((peer, body, skip)) = current.as_mut() else {
                let (p, resp, skip) = self
                    .resume(pos, size, &contributors[0].clone())
                    .await
                    .ok_or(Failed)?;
                self.state.metrics.resumes.inc();
                tracing::info!(peer = %p.addr, digest = %self.digest, offset = pos, "continuing the blob at another peer");
                contributors.push(p.clone());
                current = Some((p, resp.bytes_stream().boxed(), skip));
                continue;
            };
            let failure =
                match tokio::time::timeout(self.state.peers.read_timeout, body.next()).await {
                    Ok(Some(Ok(mut chunk))) => {
                        if *skip > 0 {
                            let n = (*skip).min(chunk.len() as u64);
                            *skip -= n;
                            chunk = chunk.slice(n as usize..);
                        }
                        let n = chunk.len() as u64;
                        if pos + n > size {
                            Some("sent more bytes than the blob has".to_owned())
                        } else {
                            // Network reads are small: batch them so the worker is woken per MiB.
                            batch.extend_from_slice(&chunk);
                            pos += n;
                            if (batch.len() >= SPOOL_BATCH || pos == size)
                                && sink.send(batch.split().freeze()).await.is_err()
                            {
                                // The worker stopped: writing the spool failed.
                                return Err(Failed);
                            }
                            None
                        }
                    }
                    Ok(Some(Err(e))) => Some(format!("stream broke: {e}")),
                    Ok(None) => Some("stream ended early".to_owned()),
                    Err(_) => Some("stream stalled".to_owned()),
                };
            if let Some(why) = failure {
                let peer = peer.clone();
                self.state
                    .failed_peers
                    .mark(&peer, self.state.peers.failure_backoff, &why);
                current = None;
            }
        }
        drop(sink);
        let (file, verifier) = match worker.await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "writing the spool file failed; not using peers for this blob");
                return Err(Failed);
            }
            Err(e) => {
                tracing::warn!(error = %e, "the spool worker failed");
                return Err(Failed);
            }
        };
        if !verifier.matches() {
            tracing::error!(digest = %self.digest, "blob from peers does not match its digest; discarded");
            self.mismatch(&contributors);
            return Err(Failed);
        }
        Ok(Verified::File(file, size, slot))
    }

    /// Opens the blob at another peer from `pos`. Returns the peer, its response and how
    /// many leading bytes to skip (if it ignored the range); `None` when no peer can
    /// continue, or when the next one disagrees about the blob's size (then the copy is
    /// abandoned and the peer that announced the size is blamed).
    async fn resume(
        &mut self,
        pos: u64,
        size: u64,
        first: &Peer,
    ) -> Option<(Peer, reqwest::Response, u64)> {
        let http = self.state.http.clone();
        let path = self.path_and_query.clone();
        loop {
            let (peer, resp) = self
                .open(
                    |p| {
                        http.get(format!("http://{}{path}", p.addr))
                            .header(header::RANGE, format!("bytes={pos}-"))
                    },
                    |s| {
                        s == StatusCode::OK
                            || s == StatusCode::PARTIAL_CONTENT
                            || s == StatusCode::RANGE_NOT_SATISFIABLE
                    },
                )
                .await?;
            if resp.status() == StatusCode::RANGE_NOT_SATISFIABLE {
                // The peer's copy ends before `pos`: whoever announced the larger size lied.
                self.state.failed_peers.mark(
                    first,
                    self.state.peers.failure_backoff,
                    "announced a size other peers disagree with",
                );
                return None;
            }
            if resp.status() == StatusCode::OK {
                if content_length(&resp) != Some(size) {
                    self.state.failed_peers.mark(
                        first,
                        self.state.peers.failure_backoff,
                        "announced a size other peers disagree with",
                    );
                    return None;
                }
                return Some((peer, resp, pos));
            }
            let range = resp
                .headers()
                .get(header::CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let starts = range
                .as_deref()
                .is_some_and(|v| v.starts_with(&format!("bytes {pos}-")));
            let total_ok = range
                .as_deref()
                .is_some_and(|v| v.ends_with(&format!("/{size}")));
            if starts && total_ok {
                return Some((peer, resp, 0));
            }
            if starts {
                self.state.failed_peers.mark(
                    first,
                    self.state.peers.failure_backoff,
                    "announced a size other peers disagree with",
                );
                return None;
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

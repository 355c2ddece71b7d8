//! Asking peers that hold content: manifests (by digest, or a tag's), verified in memory
//! before anything is served, and the size of a blob for a `HEAD`. Blob bodies come
//! through [`crate::transfer`].

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{StatusCode, header};
use mirrorlet_oci::manifest::{self, Descriptor, Manifest};
use mirrorlet_oci::{Digest, Peer};

mod blob;

pub(crate) use blob::head;

use crate::error::chain;
use crate::peers::{self, Candidates};
use crate::state::AppState;

/// Starts a lookup for `key`.
pub(crate) fn candidates(state: &AppState, key: &str) -> Candidates {
    Candidates::new(
        state.router.lookup(key),
        state.peers.lookup_timeout,
        state.metrics.clone(),
    )
}

/// Why a body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// More than the limit.
    #[error("body larger than {0} bytes")]
    TooLarge(u64),
    /// The connection failed.
    #[error("reading the body")]
    Body(#[source] reqwest::Error),
    /// Nothing came for the read timeout.
    #[error("stalled while sending")]
    Stalled,
}

/// Reads a whole body of at most `limit` bytes, with the read timeout between chunks.
pub(crate) async fn read_limited(
    state: &AppState,
    resp: reqwest::Response,
    limit: u64,
) -> Result<Bytes, ReadError> {
    let mut body = resp.bytes_stream();
    let mut out = BytesMut::new();
    loop {
        match tokio::time::timeout(state.peers.read_timeout, body.next()).await {
            Ok(Some(Ok(chunk))) => {
                if (out.len() + chunk.len()) as u64 > limit {
                    return Err(ReadError::TooLarge(limit));
                }
                out.extend_from_slice(&chunk);
            }
            Ok(Some(Err(e))) => return Err(ReadError::Body(e)),
            Ok(None) => return Ok(out.freeze()),
            Err(_) => return Err(ReadError::Stalled),
        }
    }
}

/// A manifest taken from a peer and verified.
#[derive(Debug)]
pub(crate) struct PeerManifest {
    /// Its descriptor (media type read from the bytes).
    pub descriptor: Descriptor,
    /// The bytes.
    pub bytes: Bytes,
    /// Who served it.
    pub peer: Peer,
    /// For a tag: when the peer says its digest was last confirmed upstream.
    pub confirmed: Option<std::time::SystemTime>,
}

/// Fetches a manifest by tag or digest from peers. `key` is what was looked up (the tag as
/// `registry/repo:tag`, or the digest); `expect` the digest when asked by digest.
pub(crate) async fn manifest(
    state: &AppState,
    key: &str,
    path_and_query: &str,
    expect: Option<&Digest>,
    accept: &str,
) -> Option<PeerManifest> {
    let mut cands = candidates(state, key);
    let mut attempts = 0;
    loop {
        let opened = peers::open(
            state,
            &mut cands,
            &mut attempts,
            &|p: &Peer| {
                state
                    .http
                    .get(format!("http://{}{path_and_query}", p.addr))
                    .header(header::ACCEPT, accept)
            },
            &|s| s == StatusCode::OK,
        )
        .await;
        let (peer, resp) = opened?;
        let claimed = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v).ok());
        let confirmed = crate::headers::confirmed_of(resp.headers());
        let bytes = match read_limited(state, resp, manifest::MAX_MANIFEST_SIZE).await {
            Ok(b) => b,
            Err(e) => {
                state
                    .failed_peers
                    .mark(&peer, state.peers.failure_backoff, &chain(&e));
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
                    confirmed,
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

//! Manifests and tags for the cluster. A manifest by digest the node lacks comes from a
//! peer that holds it, else from its owner (which fetches it upstream once for everyone),
//! else from upstream directly; concurrent requests share one fetch. Tags: see [`tags`].

pub(crate) mod tags;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, StatusCode, header};
use mirrorlet_oci::manifest::{self, Descriptor};
use mirrorlet_oci::{Digest, Peer, Reference, Registry, Repository};

use crate::cluster::{self, Step};
use crate::error::chain;
use crate::fetch;
use crate::headers::PEER_HEADER;
use crate::metrics::{FetchLabels, Source};
use crate::outcome::{Fetched, Miss, log_upstream_error};
use crate::peers;
use crate::state::AppState;

/// What is asked of upstream for manifests, whoever asks: every type containerd takes,
/// so that the one answer the cluster shares does not depend on the first client's
/// `Accept`.
pub const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// The manifest `digest` of `repository` at `registry`, for a client of this node
/// (`for_cluster` false: peers, then owners, then upstream) or for a peer that asked this
/// node as its owner (`for_cluster`: upstream).
pub(crate) async fn manifest(
    state: &Arc<AppState>,
    registry: &Registry,
    repository: &Repository,
    digest: &Digest,
    for_cluster: bool,
) -> Result<Fetched, Miss> {
    let work = {
        let (state, registry, repository, digest) = (
            state.clone(),
            registry.clone(),
            repository.clone(),
            digest.clone(),
        );
        move || {
            async move {
                fetch_manifest(&state, &registry, &repository, &digest, for_cluster).await
            }
            .boxed()
        }
    };
    let (found, joined) = state.manifests.run(digest.clone(), work).await;
    if joined {
        count(state, "joined");
    }
    found.unwrap_or_else(|| Err(Miss::Temporary("the manifest fetch failed".into())))
}

async fn fetch_manifest(
    state: &Arc<AppState>,
    registry: &Registry,
    repository: &Repository,
    digest: &Digest,
    for_cluster: bool,
) -> Result<Fetched, Miss> {
    let path = format!("/v2/{repository}/manifests/{digest}?ns={registry}");
    // Holders are asked by the owner too: it stores the digest's provider records itself,
    // so a lookup that missed at the asking node costs no upstream fetch.
    if state.peers.enabled
        && let Some(m) =
            fetch::manifest(state, digest.as_str(), &path, Some(digest), ACCEPT_ALL).await
    {
        tracing::debug!(peer = %m.peer.addr, %digest, "manifest from a peer");
        // Peers that hold it serve it: not kept here (containerd keeps what it pulls).
        count(state, "from-holders");
        return Ok(Fetched {
            descriptor: m.descriptor,
            bytes: m.bytes,
            source: Source::Peer,
        });
    }
    if !state.pulls_through(registry, repository) {
        return Err(Miss::Gone(format!(
            "no peer has {digest}, and pulling through from {registry} is not enabled"
        )));
    }
    if state.peers.enabled && !for_cluster {
        let key = digest.as_str();
        let mut walk = cluster::Walk::new(state, key).await;
        while let Some((peer, asking)) = walk.next() {
            let step = match ask_owner(state, &peer, &path, ACCEPT_ALL, false, asking).await {
                Ok(Owned::Found(resp_headers, bytes)) => {
                    if let Some(m) = verified(&resp_headers, bytes, Some(digest)) {
                        return Ok(keep(state, m.0, m.1, Source::Peer, "followed"));
                    }
                    state.metrics.digest_mismatches.inc();
                    state.failed_peers.mark(
                        &peer,
                        state.peers.corrupt_backoff,
                        "served a manifest that does not match its digest",
                    );
                    Step::Failed
                }
                Ok(Owned::Gone) => {
                    return Err(Miss::Gone(format!(
                        "its owner {} could not get it upstream",
                        peer.addr
                    )));
                }
                Err(step) => step,
            };
            walk.went(step, state, key);
        }
    }
    let reference = Reference::Digest(digest.clone());
    match state
        .upstream
        .get_manifest(registry, repository, &reference, ACCEPT_ALL)
        .await
    {
        Ok((desc, bytes)) if desc.digest == *digest => {
            Ok(keep(state, desc, bytes, Source::Upstream, "fetched"))
        }
        Ok((desc, _)) => {
            state.metrics.upstream_digest_mismatches.inc();
            tracing::error!(%registry, %repository, asked = %digest, got = %desc.digest, "upstream sent a manifest that does not match its digest; discarded");
            Err(Miss::Temporary(format!(
                "upstream sent {} for {digest}",
                desc.digest
            )))
        }
        Err(e) => {
            log_upstream_error(registry, repository, &e);
            Err(Miss::of(&e))
        }
    }
}

/// Keeps a manifest fetched for the cluster (so the node serves and advertises it to late
/// arrivals) and counts how it came.
fn keep(
    state: &AppState,
    descriptor: Descriptor,
    bytes: Bytes,
    source: Source,
    role: &'static str,
) -> Fetched {
    state.cache.put_manifest(&descriptor, bytes.clone());
    count(state, role);
    Fetched {
        descriptor,
        bytes,
        source,
    }
}

fn count(state: &AppState, role: &'static str) {
    state
        .metrics
        .fetches
        .get_or_create(&FetchLabels {
            kind: "manifest",
            role,
        })
        .inc();
}

/// What an owner answered, when it answered.
pub(crate) enum Owned {
    /// The headers and body (empty for a `HEAD`).
    Found(HeaderMap, Bytes),
    /// It could not get it upstream (404): nobody can now.
    Gone,
}

/// Asks `peer`, as an owner (as `asking` says), for a manifest at `path` (`head`: its
/// description only); where to go next when it gave no answer.
pub(crate) async fn ask_owner(
    state: &AppState,
    peer: &Peer,
    path: &str,
    accept: &str,
    head: bool,
    asking: cluster::Asking,
) -> Result<Owned, Step> {
    let url = format!("http://{}{path}", peer.addr);
    let req = if head {
        state.http.head(url)
    } else {
        state.http.get(url)
    }
    .header(PEER_HEADER, cluster::peer_header(state))
    .header(header::ACCEPT, accept);
    let req = asking.headers(req);
    let Some(resp) = peers::send_marking(state, peer, req, state.pull.owner_timeout).await else {
        return Err(Step::Failed);
    };
    match resp.status() {
        StatusCode::OK => {
            let headers = resp.headers().clone();
            if head {
                return Ok(Owned::Found(headers, Bytes::new()));
            }
            match fetch::read_limited(state, resp, manifest::MAX_MANIFEST_SIZE).await {
                Ok(b) => Ok(Owned::Found(headers, b)),
                Err(e) => {
                    state
                        .failed_peers
                        .mark(peer, state.peers.failure_backoff, &chain(&e));
                    Err(Step::Failed)
                }
            }
        }
        StatusCode::NOT_FOUND => Ok(Owned::Gone),
        StatusCode::MISDIRECTED_REQUEST => cluster::redirect_of(state, peer, resp.headers())
            .map_or(Err(Step::Failed), |to| Err(Step::Redirect(to))),
        // Its own fetch failed this time: not its fault; the next owner or upstream.
        StatusCode::SERVICE_UNAVAILABLE => Err(Step::Unavailable),
        s => {
            state
                .failed_peers
                .mark(peer, state.peers.failure_backoff, &format!("answered {s}"));
            Err(Step::Failed)
        }
    }
}

/// The manifest in `bytes` if it is one and matches `expect` (or, without one, the digest
/// its headers claim).
pub(crate) fn verified(
    headers: &HeaderMap,
    bytes: Bytes,
    expect: Option<&Digest>,
) -> Option<(Descriptor, Bytes)> {
    let claimed = headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok());
    let want = expect.cloned().or(claimed)?;
    let actual = Digest::sha256_of(&bytes);
    let m = manifest::Manifest::sniff(&bytes)?;
    (actual == want).then(|| {
        (
            Descriptor {
                media_type: m.media_type,
                digest: actual,
                size: bytes.len() as u64,
            },
            bytes,
        )
    })
}

/// The description in a manifest `HEAD` answer.
pub(crate) fn described(headers: &HeaderMap) -> Option<Descriptor> {
    let digest = headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Digest::parse(v).ok())?;
    let size = headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    let media_type = headers
        .get(header::CONTENT_TYPE)?
        .to_str()
        .ok()
        .filter(|t| manifest::is_manifest_type(t))?
        .to_owned();
    Some(Descriptor {
        media_type,
        digest,
        size,
    })
}

//! The pull endpoints: `/v2/`, manifests by tag or digest, and blobs (with `Range`), for the
//! registry named by containerd's `?ns=` parameter (Docker Hub when absent).
//!
//! For a client of this node: content comes from the node itself, else from peers, else,
//! for registries the agent pulls through, from the cluster's one fetch of it (see
//! [`crate::transfer`] and [`crate::pullthrough`]); else the answer is a 404 that sends
//! containerd upstream. Tags of pull-through registries are resolved by their owner
//! (fresh within the revalidation window). Another agent is answered from what this node
//! holds or is downloading; asked as an owner ([`CLUSTER_HEADER`]), it fetches for the
//! cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, TryStreamExt};
use http::request::Parts;
use http::response::Builder;
use http::{HeaderValue, Method, StatusCode, header};
use mirrorlet_oci::glob::any_match;
use mirrorlet_oci::manifest::{self, Descriptor};
use mirrorlet_oci::path::Route;
use mirrorlet_oci::{
    BlobStream, ByteRange, Digest, ImageName, Reference, Registry, Repository, StoreError,
};

use crate::cluster::{self, Step};
use crate::config::PeerVerify;
use crate::error::RegistryError;
use crate::fetch;
use crate::fill::Job;
use crate::headers::{CLUSTER_HEADER, PEER_HEADER, TAG_CONFIRMED_HEADER};
use crate::metrics::{FetchLabels, Source};
use crate::negotiate;
use crate::outcome::Miss;
use crate::pullthrough::{self, Owned, tags};
use crate::range;
use crate::state::AppState;
use crate::tag_memory::TagEntry;
use crate::transfer::{Origin, Outcome, Transfer};

/// The header that carries an image's digest.
pub(crate) const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// Response extension recording what served a request, for metrics and logs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Served {
    /// Where the content came from.
    pub source: Source,
    /// `manifest`, `blob`, `base` or `other`.
    pub route: &'static str,
}

/// Handles every request under `/v2`.
pub(crate) async fn handle(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let (req, _body) = req.into_parts();
    let route_label = route_label(req.uri.path());
    let (mut resp, source) = match dispatch(&state, &req).await {
        Ok(ok) => ok,
        Err(e) => {
            let source = match e {
                RegistryError::ManifestUnknown(_)
                | RegistryError::BlobUnknown(_)
                | RegistryError::StoreUnavailable(_)
                | RegistryError::Response(_) => Source::UpstreamFallthrough,
                _ => Source::None,
            };
            match e {
                RegistryError::StoreUnavailable(_) => {
                    tracing::warn!(path = %req.uri.path(), error = %e.message(), "content store unavailable; answering 404");
                }
                RegistryError::Response(_) => {
                    tracing::error!(path = %req.uri.path(), error = %e.message(), "could not build the response; answering 404");
                }
                _ => {}
            }
            (e.into_response(), source)
        }
    };
    resp.headers_mut().insert(
        "docker-distribution-api-version",
        HeaderValue::from_static("registry/2.0"),
    );
    resp.extensions_mut().insert(Served {
        source,
        route: route_label,
    });
    resp
}

fn route_label(path: &str) -> &'static str {
    let mut it = path.rsplitn(3, '/');
    match (it.next(), it.next()) {
        _ if path == "/v2/" || path == "/v2" => "base",
        (Some(_), Some("manifests")) => "manifest",
        (Some(_), Some("blobs")) => "blob",
        _ => "other",
    }
}

/// Who is asking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Requester {
    /// containerd or another client of this node.
    Client,
    /// Another agent: answered from what this node holds or is downloading.
    Peer,
    /// Another agent asking this node, as the owner, to fetch for the cluster.
    Cluster,
}

/// One request's particulars.
struct Ask<'a> {
    state: &'a Arc<AppState>,
    parts: &'a Parts,
    head: bool,
    requester: Requester,
    /// An owner asked to fetch here, whoever it knows to be closer to the key.
    insist: bool,
    /// The registry of the agent asking, when it named one.
    sender: Option<std::net::SocketAddr>,
}

impl Ask<'_> {
    fn accept(&self) -> &str {
        self.parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            // A client that says nothing accepts every manifest type.
            .unwrap_or(pullthrough::ACCEPT_ALL)
    }

    fn range(&self) -> Option<&str> {
        self.parts
            .headers
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
    }

    fn is_agent(&self) -> bool {
        self.requester != Requester::Client
    }

    fn requester_label(&self) -> &'static str {
        crate::metrics::requester(&self.parts.headers)
    }
}

async fn dispatch(
    state: &Arc<AppState>,
    parts: &Parts,
) -> Result<(Response, Source), RegistryError> {
    let method = &parts.method;
    if method != Method::GET && method != Method::HEAD {
        return Err(RegistryError::MethodNotAllowed(method.to_string()));
    }
    let (registry, route) = Route::locate(parts.uri.path(), namespace(parts.uri.query())?)?;
    let requester = match (
        parts.headers.contains_key(PEER_HEADER),
        parts.headers.contains_key(CLUSTER_HEADER),
    ) {
        (false, _) => Requester::Client,
        (true, false) => Requester::Peer,
        (true, true) => Requester::Cluster,
    };
    let from = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    // Any value but `owner` insists (an agent of an earlier version knows no redirects).
    let insist = parts
        .headers
        .get(CLUSTER_HEADER)
        .is_some_and(|v| v != crate::headers::ASK_OWNER);
    if insist {
        cluster::check_failed(state, &parts.headers);
    }
    let ask = Ask {
        state,
        parts,
        head: method == Method::HEAD,
        requester,
        insist,
        sender: from.and_then(|ip| crate::headers::sender(&parts.headers, ip)),
    };
    match route {
        Route::Base => Ok((
            ([(header::CONTENT_TYPE, "application/json")], "{}").into_response(),
            Source::None,
        )),
        Route::Manifest {
            repository,
            reference: Reference::Digest(digest),
        } => negotiated(
            &ask,
            true,
            manifest_by_digest(&ask, &registry, &repository, &digest).await,
        ),
        Route::Manifest {
            repository,
            reference,
        } => negotiated(
            &ask,
            false,
            tag(&ask, ImageName::new(registry, repository, reference)).await,
        ),
        Route::Blob { repository, digest } => blob(&ask, &registry, &repository, &digest).await,
    }
}

/// A manifest answer for a client, unless the client does not take its media type (see
/// [`negotiate`]): then a 404 that sends it on to the next host.
fn negotiated(
    ask: &Ask<'_>,
    by_digest: bool,
    answer: Result<(Response, Source), RegistryError>,
) -> Result<(Response, Source), RegistryError> {
    let (resp, source) = answer?;
    if ask.is_agent() || !resp.status().is_success() {
        return Ok((resp, source));
    }
    let media_type = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if negotiate::accepts(&ask.parts.headers, media_type, by_digest) {
        return Ok((resp, source));
    }
    Err(RegistryError::ManifestUnknown(format!(
        "the manifest is {media_type}, which the request's Accept does not list"
    )))
}

/// The registry named by the `ns` query parameter, if any.
fn namespace(query: Option<&str>) -> Result<Option<Registry>, RegistryError> {
    let ns = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.into_owned())
    });
    ns.map(|ns| Registry::parse(&ns).map_err(RegistryError::Namespace))
        .transpose()
}

async fn manifest_by_digest(
    ask: &Ask<'_>,
    registry: &Registry,
    repository: &Repository,
    digest: &Digest,
) -> Result<(Response, Source), RegistryError> {
    let state = ask.state;
    let local_problem = match held_manifest(state, digest).await {
        Ok(Some((desc, bytes))) => {
            let resp = send_manifest(ask, &desc, bytes, Source::Local, None)?;
            return Ok((resp, Source::Local));
        }
        Ok(None) => None,
        Err(e) => Some(e),
    };
    if ask.requester != Requester::Peer {
        let for_cluster = ask.requester == Requester::Cluster;
        if for_cluster && let Some(owner) = closer_owner(ask, digest.as_str()).await {
            return Err(RegistryError::NotOwner(owner));
        }
        match pullthrough::manifest(state, registry, repository, digest, for_cluster).await {
            Ok(m) => {
                let resp = send_manifest(ask, &m.descriptor, m.bytes, m.source, None)?;
                return Ok((resp, m.source));
            }
            // An owner's fetch failed this time: the asker tries elsewhere.
            Err(Miss::Temporary(why)) if for_cluster => {
                return Err(RegistryError::FetchFailed(format!("{digest}: {why}")));
            }
            Err(miss) => {
                return Err(local_problem.unwrap_or_else(|| {
                    RegistryError::ManifestUnknown(format!("{digest}: {}", miss.why()))
                }));
            }
        }
    }
    Err(local_problem
        .unwrap_or_else(|| RegistryError::ManifestUnknown(format!("{digest} is not on this node"))))
}

/// A manifest by tag.
async fn tag(ask: &Ask<'_>, name: ImageName) -> Result<(Response, Source), RegistryError> {
    let state = ask.state;
    // A private tag is resolved by the registry alone, with the client's own credentials:
    // nobody learns it from an agent, not even an agent asking as a peer.
    if state
        .private
        .covers(name.registry.as_str(), name.repository.as_str())
    {
        state.metrics.private_tags_refused.inc();
        return Err(RegistryError::ManifestUnknown(format!(
            "{name} is private: its tags are resolved by the registry itself"
        )));
    }
    let pulls_through = state.pulls_through(&name.registry, &name.repository);
    match ask.requester {
        Requester::Cluster if pulls_through => {
            if let Some(owner) = closer_owner(ask, &name.to_string()).await {
                return Err(RegistryError::NotOwner(owner));
            }
            tag_as_owner(ask, &name).await
        }
        Requester::Peer | Requester::Cluster => local_tag(ask, &name).await,
        Requester::Client if pulls_through => tag_for_client(ask, &name).await,
        Requester::Client => held_tag(ask, &name).await,
    }
}

/// A tag as another agent asks for it: what this node knows and holds, with when it was
/// confirmed upstream.
async fn local_tag(ask: &Ask<'_>, name: &ImageName) -> Result<(Response, Source), RegistryError> {
    match tags::local(ask.state, name).await {
        Some(e) => {
            let bytes = manifest_bytes(ask.state, &e.descriptor).await?;
            let resp = send_manifest(ask, &e.descriptor, bytes, Source::Local, Some(e.confirmed))?;
            Ok((resp, Source::Local))
        }
        None => Err(RegistryError::ManifestUnknown(format!(
            "{name} is not on this node"
        ))),
    }
}

/// A tag of a registry the agent does not pull through: the node's own, else a peer's
/// (unless excluded, as moving tags must come from their registry), else 404.
async fn held_tag(ask: &Ask<'_>, name: &ImageName) -> Result<(Response, Source), RegistryError> {
    let state = ask.state;
    let local_problem = match state.store.resolve(name).await {
        Ok(Some(t)) => {
            let bytes = manifest_bytes(state, &t.descriptor).await?;
            let resp = send_manifest(ask, &t.descriptor, bytes, Source::Local, None)?;
            return Ok((resp, Source::Local));
        }
        Ok(None) => None,
        Err(e) => Some(store_error(e)),
    };
    let key = name.to_string();
    if state.peers.enabled && !any_match(&state.peers.tag_excludes, &key) {
        let path = format!(
            "/v2/{}/manifests/{}?ns={}",
            name.repository, name.reference, name.registry
        );
        if let Some(m) = fetch::manifest(state, &key, &path, None, ask.accept()).await {
            tracing::debug!(peer = %m.peer.addr, %key, "tag from a peer");
            let resp = send_manifest(ask, &m.descriptor, m.bytes, Source::Peer, None)?;
            return Ok((resp, Source::Peer));
        }
    }
    Err(local_problem.unwrap_or_else(|| {
        RegistryError::ManifestUnknown(format!("{} is not on this node", name.reference))
    }))
}

/// A tag of a pull-through registry for a client of this node: asked of its owner, so
/// that upstream is asked at most once per window for the whole cluster.
async fn tag_for_client(
    ask: &Ask<'_>,
    name: &ImageName,
) -> Result<(Response, Source), RegistryError> {
    let state = ask.state;
    let key = name.to_string();
    let path = format!(
        "/v2/{}/manifests/{}?ns={}",
        name.repository, name.reference, name.registry
    );
    let mut walk = cluster::Walk::new(state, &key).await;
    while let Some((peer, asking)) = walk.next() {
        let accept = pullthrough::ACCEPT_ALL;
        match pullthrough::ask_owner(state, &peer, &path, accept, ask.head, asking).await {
            Ok(Owned::Found(headers, bytes)) => {
                let confirmed = crate::headers::confirmed_of(&headers);
                let answer = if ask.head {
                    pullthrough::described(&headers).map(|d| (d, None))
                } else {
                    pullthrough::verified(&headers, bytes, None).map(|(d, b)| (d, Some(b)))
                };
                let (Some((descriptor, body)), Some(confirmed)) = (answer, confirmed) else {
                    state.failed_peers.mark(
                        &peer,
                        state.peers.failure_backoff,
                        "answered a tag it could not vouch for",
                    );
                    walk.went(Step::Failed, state, &key);
                    continue;
                };
                // Another clock: never later than ours.
                let confirmed = confirmed.min(std::time::SystemTime::now());
                let entry = TagEntry {
                    descriptor: descriptor.clone(),
                    confirmed,
                };
                state.tags.put(&key, entry);
                let resp = match body {
                    Some(b) => {
                        state.cache.put_manifest(&descriptor, b.clone());
                        send_manifest(ask, &descriptor, b, Source::Peer, Some(confirmed))?
                    }
                    None => manifest_head(&descriptor, Some(confirmed))?,
                };
                return Ok((resp, Source::Peer));
            }
            Ok(Owned::Gone) => {
                return Err(RegistryError::ManifestUnknown(format!(
                    "{key}: its owner {} found no such tag (or may not see it)",
                    peer.addr
                )));
            }
            Err(step) => walk.went(step, state, &key),
        }
    }
    tag_as_owner(ask, name).await
}

/// For a request asking this node as the owner of `key`: an agent closer to the key to
/// send the asker on to, unless it insists (see [`cluster`]).
async fn closer_owner(ask: &Ask<'_>, key: &str) -> Option<std::net::SocketAddr> {
    if ask.insist {
        return None;
    }
    cluster::closer_owner(ask.state, key).await.map(|p| p.addr)
}

/// A tag resolved by this node as its owner.
async fn tag_as_owner(
    ask: &Ask<'_>,
    name: &ImageName,
) -> Result<(Response, Source), RegistryError> {
    let state = ask.state;
    let resolved = tags::resolve(state, name)
        .await
        .map_err(RegistryError::ManifestUnknown)?;
    let desc = &resolved.entry.descriptor;
    let confirmed = Some(resolved.entry.confirmed);
    if ask.head {
        return Ok((manifest_head(desc, confirmed)?, resolved.source));
    }
    if let Ok(Some((desc, bytes))) = held_manifest(state, &desc.digest).await {
        let resp = send_manifest(ask, &desc, bytes, Source::Local, confirmed)?;
        return Ok((resp, Source::Local));
    }
    let m = pullthrough::manifest(state, &name.registry, &name.repository, &desc.digest, false)
        .await
        .map_err(|miss| {
            RegistryError::ManifestUnknown(format!(
                "{name} points at {}, which no node can deliver now: {}",
                desc.digest,
                miss.why()
            ))
        })?;
    let resp = send_manifest(ask, &m.descriptor, m.bytes, m.source, confirmed)?;
    Ok((resp, m.source))
}

async fn blob(
    ask: &Ask<'_>,
    registry: &Registry,
    repository: &Repository,
    digest: &Digest,
) -> Result<(Response, Source), RegistryError> {
    let state = ask.state;
    let local_problem = match state.store.size(digest).await {
        Ok(Some(size)) => {
            let (range, partial) = range::select(ask.range(), size)?;
            let desc = Descriptor {
                media_type: manifest::OCTET_STREAM.to_owned(),
                digest: digest.clone(),
                size,
            };
            let resp = send_local(ask, &desc, range, partial, None).await?;
            return Ok((resp, Source::Local));
        }
        Ok(None) => None,
        Err(e) => Some(store_error(e)),
    };
    let missing = || {
        local_problem
            .unwrap_or_else(|| RegistryError::BlobUnknown(format!("{digest} is not on this node")))
    };
    let pulls_through = state.pulls_through(registry, repository);
    let transfer = match ask.requester {
        Requester::Peer => state.transfers.get(digest),
        // A transfer under way here serves whoever asks; else an owner closer to the key
        // is the one to ask.
        Requester::Cluster if pulls_through => match state.transfers.get(digest) {
            Some(t) => Some(t),
            None => {
                if let Some(owner) = closer_owner(ask, digest.as_str()).await {
                    return Err(RegistryError::NotOwner(owner));
                }
                Some(start(ask, registry, repository, digest, true))
            }
        },
        Requester::Cluster => None,
        Requester::Client if ask.head => {
            return head_blob(ask, registry, repository, digest)
                .await?
                .ok_or_else(missing);
        }
        Requester::Client if state.peers.enabled || pulls_through => {
            Some(start(ask, registry, repository, digest, false))
        }
        Requester::Client => None,
    };
    let Some(transfer) = transfer else {
        return Err(missing());
    };
    if ask.is_agent() {
        serve_peer(ask, &transfer).await
    } else {
        serve_client(ask, &transfer).await
    }
}

/// The transfer of `digest` under way here, or a new one.
fn start(
    ask: &Ask<'_>,
    registry: &Registry,
    repository: &Repository,
    digest: &Digest,
    for_cluster: bool,
) -> Arc<Transfer> {
    let state = ask.state;
    let (transfer, new) = state.transfers.get_or_create(digest);
    if new {
        Job {
            state: state.clone(),
            transfer: transfer.clone(),
            registry: registry.clone(),
            repository: repository.clone(),
            for_cluster,
        }
        .spawn();
    } else {
        state
            .metrics
            .fetches
            .get_or_create(&FetchLabels {
                kind: "blob",
                role: "joined",
            })
            .inc();
    }
    transfer
}

/// `HEAD` of a blob this node does not hold: its size from a transfer under way, else
/// from a peer that holds it. Nothing is fetched for a `HEAD`.
async fn head_blob(
    ask: &Ask<'_>,
    registry: &Registry,
    repository: &Repository,
    digest: &Digest,
) -> Result<Option<(Response, Source)>, RegistryError> {
    let state = ask.state;
    let size = match state.transfers.get(digest).and_then(|t| t.progress().size) {
        Some(s) => Some((s, Source::Local)),
        None if state.peers.enabled => {
            let path = format!("/v2/{repository}/blobs/{digest}?ns={registry}");
            fetch::head(state, digest, &path)
                .await
                .map(|s| (s, Source::Peer))
        }
        None => None,
    };
    let Some((size, source)) = size else {
        return Ok(None);
    };
    let head = content_head(
        manifest::OCTET_STREAM,
        digest,
        size,
        ByteRange::full(size),
        false,
    );
    Ok(Some((respond(head, Body::empty())?, source)))
}

/// Where a transfer's bytes come from, the range asked for, and the response head.
fn transfer_head(
    ask: &Ask<'_>,
    transfer: &Transfer,
    size: u64,
) -> Result<(Source, ByteRange, Builder), RegistryError> {
    let source = match transfer.progress().origin {
        Some(Origin::Upstream) => Source::Upstream,
        _ => Source::Peer,
    };
    let (range, partial) = range::select(ask.range(), size)?;
    let head = content_head(
        manifest::OCTET_STREAM,
        &transfer.digest,
        size,
        range,
        partial,
    );
    Ok((source, range, head))
}

/// A client of this node reads a transfer: after it verified, when it comes from peers
/// that hold the blob whole and is small enough to verify in memory (or
/// `PeerVerify::Whole` says so for any size): a bad copy is replaced before anything is
/// sent, and a failure is a 404 that sends containerd upstream. Otherwise as it arrives,
/// with the last byte held back until the blob verified; bytes that then fail
/// verification end the stream and containerd's partial download is aborted.
async fn serve_client(
    ask: &Ask<'_>,
    transfer: &Arc<Transfer>,
) -> Result<(Response, Source), RegistryError> {
    let not_fetched = |o: Outcome| {
        let why = match o {
            Outcome::Failed { why, .. } => why.to_string(),
            _ => "not fetched".to_owned(),
        };
        RegistryError::BlobUnknown(format!("{}: {why}", transfer.digest))
    };
    let (mut size, mut generation) = transfer.begun().await.map_err(not_fetched)?;
    let peers = &ask.state.peers;
    let copied_from_holders = transfer.copied_from_holders();
    if copied_from_holders && peers.verify == PeerVerify::Stream && size > peers.verify_buffer {
        // Streamed, but only once the copy has bytes: a source that fails before its
        // first batch is replaced unseen, and none left is a 404, not a broken stream.
        (size, generation) = transfer.has_bytes().await.map_err(not_fetched)?;
    } else if copied_from_holders {
        let outcome = transfer.outcome().await;
        if outcome != Outcome::Verified {
            return Err(not_fetched(outcome));
        }
        // The copy that verified may not be the first one begun (which may have lied).
        let p = transfer.progress();
        (size, generation) = (p.size.unwrap_or(size), p.generation);
    }
    let (source, range, head) = transfer_head(ask, transfer, size)?;
    let counter = ask.state.metrics.bytes_from(source, ask.requester_label());
    let sent = Arc::new(AtomicBool::new(false));
    let (state, t) = (ask.state.clone(), transfer.clone());
    let body = transfer.read(range, generation).map(move |item| {
        match &item {
            Ok(chunk) => {
                counter.inc_by(chunk.len() as u64);
                sent.store(true, Ordering::Relaxed);
            }
            // Unverified bytes went out and the blob will not verify as sent: whatever
            // containerd wrote of it must not be resumed.
            Err(e) if sent.swap(false, Ordering::Relaxed) => {
                abort_ingests(state.clone(), t.digest.clone(), e.to_string());
            }
            Err(_) => {}
        }
        item
    });
    Ok((respond(head, Body::from_stream(body))?, source))
}

/// Bytes that failed verification reached containerd: abort its partial download of the
/// blob, so that its retry starts from nothing instead of resuming them.
fn abort_ingests(state: Arc<AppState>, digest: Digest, why: String) {
    tokio::spawn(async move {
        match state.store.abort_ingests(&digest).await {
            Ok(n) => {
                state.metrics.ingests_aborted.inc_by(n as u64);
                tracing::warn!(%digest, aborted = n, why = %why, "cut a download that failed verification and aborted containerd's partial copy, so its retry starts clean");
            }
            Err(e) => {
                tracing::error!(%digest, error = %e, "could not abort containerd's partial download of a blob that failed verification")
            }
        }
    });
}

/// Another agent reads a transfer under way here (at most the configured number at once).
async fn serve_peer(
    ask: &Ask<'_>,
    transfer: &Arc<Transfer>,
) -> Result<(Response, Source), RegistryError> {
    let state = ask.state;
    let cap = state.pull.max_peer_streams;
    let Some(guard) = transfer.admit_peer(cap, ask.sender) else {
        state.metrics.busy_refusals.inc();
        return Err(RegistryError::Busy {
            cap,
            followers: transfer.followers(),
        });
    };
    let (size, generation) = match transfer.begun().await {
        Ok(begun) => begun,
        // Upstream has no such blob (or refuses it): nobody can get it now.
        Err(Outcome::Failed {
            gone: true, why, ..
        }) => {
            return Err(RegistryError::BlobUnknown(format!(
                "{}: {why}",
                transfer.digest
            )));
        }
        Err(o) => {
            let why = match o {
                Outcome::Failed { why, .. } => why.to_string(),
                _ => "not fetched".to_owned(),
            };
            let e = format!("{}: {why}", transfer.digest);
            return Err(if ask.requester == Requester::Cluster {
                RegistryError::FetchFailed(e)
            } else {
                RegistryError::BlobUnknown(e)
            });
        }
    };
    let (source, range, head) = transfer_head(ask, transfer, size)?;
    if ask.head {
        return Ok((respond(head, Body::empty())?, source));
    }
    let stream = transfer.read(range, generation).map(move |item| {
        let _held = &guard;
        item
    });
    let body = outgoing(ask, stream.boxed(), source);
    Ok((respond(head, body)?, source))
}

fn store_error(e: StoreError) -> RegistryError {
    match e {
        StoreError::NotFound(d) => RegistryError::BlobUnknown(format!("{d} is not on this node")),
        other => RegistryError::StoreUnavailable(other),
    }
}

/// The response head for content: status, type, length, digest, ranges.
pub fn content_head(
    media_type: &str,
    digest: &Digest,
    size: u64,
    range: ByteRange,
    partial: bool,
) -> Builder {
    let mut builder = Response::builder()
        .status(if partial {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        })
        .header(header::CONTENT_TYPE, media_type)
        .header(header::CONTENT_LENGTH, range.len())
        .header(DOCKER_CONTENT_DIGEST, digest.as_str())
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::ACCEPT_RANGES, "bytes");
    if partial {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!(
                "bytes {}-{}/{}",
                range.start,
                range.end.saturating_sub(1),
                size
            ),
        );
    }
    builder
}

fn with_confirmed(builder: Builder, confirmed: Option<std::time::SystemTime>) -> Builder {
    match confirmed {
        Some(at) => builder.header(TAG_CONFIRMED_HEADER, crate::headers::confirmed_header(at)),
        None => builder,
    }
}

/// The head of a manifest answer without its body.
fn manifest_head(
    desc: &Descriptor,
    confirmed: Option<std::time::SystemTime>,
) -> Result<Response, RegistryError> {
    let head = content_head(
        &desc.media_type,
        &desc.digest,
        desc.size,
        ByteRange::full(desc.size),
        false,
    );
    respond(with_confirmed(head, confirmed), Body::empty())
}

/// The manifest `digest` if the node holds it: kept in memory once read (see
/// [`crate::manifest_cache`]), so a manifest asked for again costs no call to the store.
async fn held_manifest(
    state: &Arc<AppState>,
    digest: &Digest,
) -> Result<Option<(Descriptor, bytes::Bytes)>, RegistryError> {
    if let Some(held) = state.local_manifests.get(digest) {
        return Ok(Some(held));
    }
    let desc = state.store.descriptor(digest).await.map_err(store_error)?;
    match desc.filter(|d| manifest::is_manifest_type(&d.media_type)) {
        Some(desc) => {
            let bytes = manifest_bytes(state, &desc).await?;
            Ok(Some((desc, bytes)))
        }
        None => Ok(None),
    }
}

/// The bytes of the manifest `desc`, which the store holds: from memory if they were read
/// before, else read whole from the store and kept.
async fn manifest_bytes(
    state: &Arc<AppState>,
    desc: &Descriptor,
) -> Result<bytes::Bytes, RegistryError> {
    if let Some((_, bytes)) = state.local_manifests.get(&desc.digest) {
        return Ok(bytes);
    }
    let epoch = state.local_manifests.epoch();
    let mut stream = state
        .store
        .open(&desc.digest, ByteRange::full(desc.size))
        .await
        .map_err(store_error)?;
    let mut buf = bytes::BytesMut::with_capacity(usize::try_from(desc.size).unwrap_or(0));
    let mut check = desc.digest.verifier();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| {
            store_error(StoreError::Read {
                digest: desc.digest.clone(),
                source,
            })
        })?;
        if (buf.len() + chunk.len()) as u64 > desc.size {
            break;
        }
        check.update(&chunk);
        buf.extend_from_slice(&chunk);
    }
    let bytes = buf.freeze();
    // What is kept must be what the digest names (a damaged file would be served on).
    if bytes.len() as u64 != desc.size || !check.matches() {
        return Err(store_error(StoreError::Read {
            digest: desc.digest.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "the content read does not match its digest and size ({} bytes)",
                    desc.size
                ),
            ),
        }));
    }
    state
        .local_manifests
        .put(&state.store, desc, bytes.clone(), epoch);
    Ok(bytes)
}

/// A manifest held in memory (verified), as a response.
fn send_manifest(
    ask: &Ask<'_>,
    desc: &Descriptor,
    bytes: bytes::Bytes,
    source: Source,
    confirmed: Option<std::time::SystemTime>,
) -> Result<Response, RegistryError> {
    if ask.head {
        return manifest_head(desc, confirmed);
    }
    let metrics = &ask.state.metrics;
    metrics
        .bytes_from(source, ask.requester_label())
        .inc_by(bytes.len() as u64);
    if ask.is_agent() {
        metrics.peer_served_bytes.inc_by(bytes.len() as u64);
    }
    let head = content_head(
        &desc.media_type,
        &desc.digest,
        desc.size,
        ByteRange::full(desc.size),
        false,
    );
    respond(with_confirmed(head, confirmed), Body::from(bytes))
}

/// Builds the response for local content and, for GET, streams `range` of it from the
/// store.
async fn send_local(
    ask: &Ask<'_>,
    desc: &Descriptor,
    range: ByteRange,
    partial: bool,
    confirmed: Option<std::time::SystemTime>,
) -> Result<Response, RegistryError> {
    let head = with_confirmed(
        content_head(&desc.media_type, &desc.digest, desc.size, range, partial),
        confirmed,
    );
    let body = if ask.head {
        Body::empty()
    } else {
        let stream = ask
            .state
            .store
            .open(&desc.digest, range)
            .await
            .map_err(store_error)?;
        outgoing(ask, stream, Source::Local)
    };
    respond(head, body)
}

/// A body going out: bytes counted by source (and as served to peers when an agent asks),
/// paced by the upload limit for agents.
fn outgoing(ask: &Ask<'_>, stream: BlobStream, source: Source) -> Body {
    let state = ask.state;
    let counter = state.metrics.bytes_from(source, ask.requester_label());
    let to_peers = ask
        .is_agent()
        .then(|| state.metrics.peer_served_bytes.clone());
    let counted = stream.inspect_ok(move |chunk| {
        counter.inc_by(chunk.len() as u64);
        if let Some(c) = &to_peers {
            c.inc_by(chunk.len() as u64);
        }
    });
    match (&state.peer_upload_limit, ask.is_agent()) {
        // Serving another agent under a bandwidth cap: pace each chunk.
        (Some(_), true) => {
            let state = state.clone();
            Body::from_stream(counted.then(move |chunk| {
                let state = state.clone();
                async move {
                    if let (Ok(c), Some(limit)) = (&chunk, &state.peer_upload_limit) {
                        limit.acquire(c.len() as u64).await;
                    }
                    chunk
                }
            }))
        }
        _ => Body::from_stream(counted),
    }
}

/// Finishes a response head from [`content_head`] with its body.
pub fn respond(builder: Builder, body: Body) -> Result<Response, RegistryError> {
    builder.body(body).map_err(RegistryError::Response)
}

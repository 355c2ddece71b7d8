//! The pull endpoints: `/v2/`, manifests by tag or digest, and blobs (with `Range`), for the
//! registry named by containerd's `?ns=` parameter (Docker Hub when absent). Content comes
//! from the node itself, else from a peer (unless the request is itself from a peer),
//! else the answer is a 404 that sends containerd upstream.

use std::sync::Arc;

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
use mirrorlet_oci::{ByteRange, Digest, ImageName, Reference, Registry, Repository, StoreError};

use crate::error::RegistryError;
use crate::fetch;
use crate::metrics::Source;
use crate::peers::PEER_HEADER;
use crate::range;
use crate::state::AppState;

/// The header that carries an image's digest.
pub const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

/// What a client accepts when it says nothing: every manifest type.
const ACCEPT_ALL_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

/// Response extension recording what served a request, for metrics and logs.
#[derive(Debug, Clone, Copy)]
pub struct Served {
    /// Where the content came from.
    pub source: Source,
    /// `manifest`, `blob`, `base` or `other`.
    pub route: &'static str,
}

/// Handles every request under `/v2`.
pub async fn handle(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let (req, _body) = req.into_parts();
    let route_label = route_label(req.uri.path());
    let (mut resp, source) = match dispatch(&state, &req).await {
        Ok(ok) => ok,
        Err(e) => {
            let source = match e {
                RegistryError::ManifestUnknown(_)
                | RegistryError::BlobUnknown(_)
                | RegistryError::StoreUnavailable(_) => Source::UpstreamFallthrough,
                _ => Source::None,
            };
            if let RegistryError::StoreUnavailable(ref why) = e {
                tracing::warn!(path = %req.uri.path(), error = %why, "content store unavailable; answering 404");
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

/// One request's particulars.
struct Ask<'a> {
    state: &'a Arc<AppState>,
    parts: &'a Parts,
    head: bool,
    /// From another agent: answer from local content only.
    from_peer: bool,
}

impl Ask<'_> {
    fn may_use_peers(&self) -> bool {
        self.state.peers.enabled && !self.from_peer
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
    let registry = namespace(parts.uri.query())?;
    let ask = Ask {
        state,
        parts,
        head: method == Method::HEAD,
        from_peer: parts.headers.contains_key(PEER_HEADER),
    };
    match Route::parse(parts.uri.path(), &registry)? {
        Route::Base => Ok((
            ([(header::CONTENT_TYPE, "application/json")], "{}").into_response(),
            Source::None,
        )),
        Route::Manifest {
            repository,
            reference,
        } => manifest(&ask, registry, repository, reference).await,
        Route::Blob { repository, digest } => blob(&ask, &registry, &repository, &digest).await,
    }
}

/// The registry a request is for: the `ns` query parameter, or Docker Hub.
fn namespace(query: Option<&str>) -> Result<Registry, RegistryError> {
    let ns = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "ns")
            .map(|(_, v)| v.into_owned())
    });
    match ns {
        None => Ok(Registry::docker_hub()),
        Some(ns) => Registry::parse(&ns)
            .map_err(|e| RegistryError::NameInvalid(format!("ns parameter: {e}"))),
    }
}

async fn manifest(
    ask: &Ask<'_>,
    registry: Registry,
    repository: Repository,
    reference: Reference,
) -> Result<(Response, Source), RegistryError> {
    let state = ask.state;
    let name = ImageName::new(registry.clone(), repository.clone(), reference.clone());
    let found = match &reference {
        Reference::Tag(_) => state
            .store
            .resolve(&name)
            .await
            .map(|t| t.map(|t| t.descriptor)),
        Reference::Digest(d) => state
            .store
            .descriptor(d)
            .await
            .map(|o| o.filter(|desc| manifest::is_manifest_type(&desc.media_type))),
    };
    let local_problem = match found {
        Ok(Some(desc)) => {
            let resp = send_local(ask, &desc, ByteRange::full(desc.size), false).await?;
            return Ok((resp, Source::Local));
        }
        Ok(None) => None,
        Err(e) => Some(store_error(e)),
    };
    let (key, expect) = match &reference {
        Reference::Tag(_) => (name.to_string(), None),
        Reference::Digest(d) => (d.to_string(), Some(d)),
    };
    let excluded_tag =
        matches!(reference, Reference::Tag(_)) && any_match(&state.peers.tag_excludes, &key);
    if ask.may_use_peers() && !excluded_tag {
        let path = format!("/v2/{repository}/manifests/{reference}?ns={registry}");
        let accept = ask
            .parts
            .headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(ACCEPT_ALL_MANIFESTS);
        if let Some(m) = fetch::manifest(state, &key, &path, expect, accept).await {
            tracing::debug!(peer = %m.peer.addr, %key, "manifest from peer");
            let builder = content_head(
                &m.descriptor.media_type,
                &m.descriptor.digest,
                m.descriptor.size,
                ByteRange::full(m.descriptor.size),
                false,
            );
            let body = if ask.head {
                Body::empty()
            } else {
                state
                    .metrics
                    .bytes_from(Source::Peer)
                    .inc_by(m.bytes.len() as u64);
                Body::from(m.bytes)
            };
            return Ok((respond(builder, body)?, Source::Peer));
        }
    }
    Err(local_problem.unwrap_or_else(|| {
        RegistryError::ManifestUnknown(format!("{reference} is not on this node"))
    }))
}

async fn blob(
    ask: &Ask<'_>,
    registry: &Registry,
    repository: &Repository,
    digest: &Digest,
) -> Result<(Response, Source), RegistryError> {
    let state = ask.state;
    let range_header = ask
        .parts
        .headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let local_problem = match state.store.size(digest).await {
        Ok(Some(size)) => {
            let (range, partial) = range::select(range_header, size)?;
            let desc = Descriptor {
                media_type: manifest::OCTET_STREAM.to_owned(),
                digest: digest.clone(),
                size,
            };
            let resp = send_local(ask, &desc, range, partial).await?;
            return Ok((resp, Source::Local));
        }
        Ok(None) => None,
        Err(e) => Some(store_error(e)),
    };
    if ask.may_use_peers() {
        let path = format!("/v2/{repository}/blobs/{digest}?ns={registry}");
        if let Some(resp) = fetch::blob(state, digest, &path, range_header, ask.head).await? {
            return Ok((resp, Source::Peer));
        }
    }
    Err(local_problem
        .unwrap_or_else(|| RegistryError::BlobUnknown(format!("{digest} is not on this node"))))
}

fn store_error(e: StoreError) -> RegistryError {
    match e {
        StoreError::NotFound(d) => RegistryError::BlobUnknown(format!("{d} is not on this node")),
        other => RegistryError::StoreUnavailable(other.to_string()),
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

/// Builds the response for local content and, for GET, streams `range` of it from the
/// store (paced by the upload limit when the requester is another agent).
async fn send_local(
    ask: &Ask<'_>,
    desc: &Descriptor,
    range: ByteRange,
    partial: bool,
) -> Result<Response, RegistryError> {
    let state = ask.state;
    let builder = content_head(&desc.media_type, &desc.digest, desc.size, range, partial);
    let body = if ask.head {
        Body::empty()
    } else {
        let stream = state
            .store
            .open(&desc.digest, range)
            .await
            .map_err(store_error)?;
        let local = state.metrics.bytes_from(Source::Local);
        let to_peers = ask
            .from_peer
            .then(|| state.metrics.peer_served_bytes.clone());
        let counted = stream.inspect_ok(move |chunk| {
            local.inc_by(chunk.len() as u64);
            if let Some(c) = &to_peers {
                c.inc_by(chunk.len() as u64);
            }
        });
        match (&state.peer_upload_limit, ask.from_peer) {
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
    };
    respond(builder, body)
}

/// Finishes a response head from [`content_head`] with its body.
pub fn respond(builder: Builder, body: Body) -> Result<Response, RegistryError> {
    builder
        .body(body)
        .map_err(|e| RegistryError::StoreUnavailable(format!("building response: {e}")))
}

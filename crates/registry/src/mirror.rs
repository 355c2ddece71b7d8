//! The pull endpoints: `/v2/`, manifests by tag or digest, and blobs (with `Range`), for the
//! registry named by containerd's `?ns=` parameter (Docker Hub when absent).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use http::request::Parts;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use mirrorlet_oci::manifest::{self, Descriptor};
use mirrorlet_oci::path::Route;
use mirrorlet_oci::{ByteRange, Digest, ImageName, Reference, Registry, Repository, StoreError};

use crate::error::RegistryError;
use crate::metrics::Source;
use crate::range::{self, RangeRequest};
use crate::state::AppState;

/// The header that carries an image's digest.
pub const DOCKER_CONTENT_DIGEST: &str = "docker-content-digest";

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
    let method = req.method.clone();
    let route_label = route_label(req.uri.path());
    let result = dispatch(&state, &method, &req).await;
    let (mut resp, source) = match result {
        Ok((resp, source)) => (resp, source),
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

async fn dispatch(
    state: &AppState,
    method: &Method,
    req: &Parts,
) -> Result<(Response, Source), RegistryError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(RegistryError::MethodNotAllowed(method.to_string()));
    }
    let registry = namespace(req.uri.query())?;
    match Route::parse(req.uri.path(), &registry)? {
        Route::Base => Ok((
            ([(header::CONTENT_TYPE, "application/json")], "{}").into_response(),
            Source::None,
        )),
        Route::Manifest {
            repository,
            reference,
        } => manifest(state, method, registry, repository, reference).await,
        Route::Blob { digest, .. } => blob(state, method, &req.headers, &digest).await,
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
    state: &AppState,
    method: &Method,
    registry: Registry,
    repository: Repository,
    reference: Reference,
) -> Result<(Response, Source), RegistryError> {
    let found = match &reference {
        Reference::Tag(_) => {
            let name = ImageName::new(registry, repository, reference.clone());
            state.store.resolve(&name).await
        }
        Reference::Digest(d) => state
            .store
            .descriptor(d)
            .await
            .map(|o| o.filter(|desc| manifest::is_manifest_type(&desc.media_type))),
    };
    match found {
        Ok(Some(desc)) => {
            let resp = send(
                state,
                method,
                &desc,
                ByteRange::full(desc.size),
                false,
                Source::Local,
            )
            .await?;
            Ok((resp, Source::Local))
        }
        Ok(None) => Err(RegistryError::ManifestUnknown(format!(
            "{reference} is not on this node"
        ))),
        Err(e) => Err(store_error(e)),
    }
}

async fn blob(
    state: &AppState,
    method: &Method,
    headers: &HeaderMap,
    digest: &Digest,
) -> Result<(Response, Source), RegistryError> {
    let size = match state.store.size(digest).await {
        Ok(Some(size)) => size,
        Ok(None) => {
            return Err(RegistryError::BlobUnknown(format!(
                "{digest} is not on this node"
            )));
        }
        Err(e) => return Err(store_error(e)),
    };
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => RangeRequest::Full,
        Some(h) => range::parse(h, size),
    };
    let (range, partial) = match range {
        RangeRequest::Full => (ByteRange::full(size), false),
        RangeRequest::Partial(r) => (r, true),
        RangeRequest::Unsatisfiable => return Err(RegistryError::RangeNotSatisfiable { size }),
    };
    let desc = Descriptor {
        media_type: manifest::OCTET_STREAM.to_owned(),
        digest: digest.clone(),
        size,
    };
    let resp = send(state, method, &desc, range, partial, Source::Local).await?;
    Ok((resp, Source::Local))
}

fn store_error(e: StoreError) -> RegistryError {
    match e {
        StoreError::NotFound(d) => RegistryError::BlobUnknown(format!("{d} is not on this node")),
        other => RegistryError::StoreUnavailable(other.to_string()),
    }
}

/// Builds the response head for `desc` and, for GET, streams `range` of it from the store.
async fn send(
    state: &AppState,
    method: &Method,
    desc: &Descriptor,
    range: ByteRange,
    partial: bool,
    source: Source,
) -> Result<Response, RegistryError> {
    let mut builder = Response::builder()
        .status(if partial {
            StatusCode::PARTIAL_CONTENT
        } else {
            StatusCode::OK
        })
        .header(header::CONTENT_TYPE, &desc.media_type)
        .header(header::CONTENT_LENGTH, range.len())
        .header(DOCKER_CONTENT_DIGEST, desc.digest.as_str())
        .header(header::ETAG, format!("\"{}\"", desc.digest))
        .header(header::ACCEPT_RANGES, "bytes");
    if partial {
        builder = builder.header(
            header::CONTENT_RANGE,
            format!(
                "bytes {}-{}/{}",
                range.start,
                range.end.saturating_sub(1),
                desc.size
            ),
        );
    }
    let body = if method == Method::HEAD {
        Body::empty()
    } else {
        let stream = state
            .store
            .open(&desc.digest, range)
            .await
            .map_err(store_error)?;
        let counter = state.metrics.bytes_from(source);
        Body::from_stream(stream.inspect_ok(move |chunk| {
            counter.inc_by(chunk.len() as u64);
        }))
    };
    builder
        .body(body)
        .map_err(|e| RegistryError::StoreUnavailable(format!("building response: {e}")))
}

//! Registry errors and their OCI error bodies. Everything a mirror cannot serve is a 404
//! with an OCI error body: containerd falls through to the next host only on 404, so any
//! other status would fail the pull instead of sending it upstream.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use mirrorlet_oci::StoreError;
use mirrorlet_oci::name::NameError;
use mirrorlet_oci::path::PathError;
use mirrorlet_oci::reference::ReferenceError;

/// Why a request was not served.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No manifest for this tag or digest here (or among peers).
    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),
    /// No blob with this digest here (or among peers).
    #[error("blob unknown: {0}")]
    BlobUnknown(String),
    /// The path names no endpoint this mirror serves, or names it badly (the repository,
    /// reference or digest is invalid).
    #[error(transparent)]
    Path(#[from] PathError),
    /// The `ns` parameter names no valid registry.
    #[error("invalid ns parameter")]
    Namespace(#[source] NameError),
    /// Anything but GET or HEAD.
    #[error("method {0} is not allowed; this mirror serves GET and HEAD only")]
    MethodNotAllowed(String),
    /// A `Range` outside the blob.
    #[error("range not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable {
        /// The blob's size, for `Content-Range: bytes */<size>`.
        size: u64,
    },
    /// The store could not be read; served as a 404 so containerd goes upstream.
    #[error(transparent)]
    StoreUnavailable(StoreError),
    /// The response could not be built (a header value the content carried is not one
    /// HTTP allows); served as a 404 so containerd goes upstream.
    #[error("building the response")]
    Response(#[source] http::Error),
    /// To another agent asking this node as an owner: its fetch failed this time (not
    /// because upstream has no such thing), so the asker goes on to another source.
    #[error("{0}")]
    FetchFailed(String),
    /// To another agent: this node already streams the blob to as many peers as it may;
    /// `followers` read it from this node lately and stream their own copies.
    #[error("already streaming this blob to {cap} peers; ask one of the agents reading it")]
    Busy {
        /// Peers streamed to at once at most.
        cap: usize,
        /// The registries of agents that read the blob from this node lately.
        followers: Vec<std::net::SocketAddr>,
    },
    /// To another agent asking this node as the owner: `0` is closer to the key.
    #[error("{0} is closer to the key: ask it")]
    NotOwner(std::net::SocketAddr),
}

/// An error and its causes, `a: b: c` (a cause whose text its error already shows, as a
/// `transparent` one does, is not repeated).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

impl RegistryError {
    /// What went wrong with every cause, for the error body and logs (`a: b: c`).
    pub fn message(&self) -> String {
        chain(self)
    }

    /// The HTTP status and OCI error code.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::ManifestUnknown(_) => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            Self::BlobUnknown(_) | Self::StoreUnavailable(_) => {
                (StatusCode::NOT_FOUND, "BLOB_UNKNOWN")
            }
            Self::Path(e) => match e {
                PathError::NotFound(_) => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
                PathError::Unsupported(_) => (StatusCode::NOT_FOUND, "UNSUPPORTED"),
                PathError::Name(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
                PathError::Digest(_) | PathError::Reference(ReferenceError::Digest(_)) => {
                    (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
                }
                // A tag containerd would never send; 404 lets any client fall through.
                PathError::Reference(_) => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
            },
            Self::Namespace(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
            Self::Response(_) => (StatusCode::NOT_FOUND, "UNKNOWN"),
            Self::MethodNotAllowed(_) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
            Self::RangeNotSatisfiable { .. } => {
                (StatusCode::RANGE_NOT_SATISFIABLE, "RANGE_INVALID")
            }
            Self::Busy { .. } => (StatusCode::SERVICE_UNAVAILABLE, "TOOMANYREQUESTS"),
            Self::NotOwner(_) => (StatusCode::MISDIRECTED_REQUEST, "UNAVAILABLE"),
            Self::FetchFailed(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        }
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let body = serde_json::json!({
            "errors": [{ "code": code, "message": self.message(), "detail": null }]
        })
        .to_string();
        let mut resp = (status, body).into_response();
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            Self::MethodNotAllowed(_) => {
                headers.insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            }
            Self::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
            }
            Self::Busy { followers, .. } => {
                headers.insert(crate::headers::BUSY_HEADER, HeaderValue::from_static("1"));
                if !followers.is_empty() {
                    headers.insert(
                        crate::headers::FOLLOWERS_HEADER,
                        crate::headers::addr_header(&followers),
                    );
                }
            }
            Self::NotOwner(addr) => {
                headers.insert(
                    crate::headers::OWNER_HEADER,
                    crate::headers::addr_header(&[addr]),
                );
            }
            _ => {}
        }
        resp
    }
}

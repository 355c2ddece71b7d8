//! What fetching for the cluster yields: a verified manifest, or why there is none, and
//! how an upstream refusal is logged.

use bytes::Bytes;
use mirrorlet_oci::manifest::Descriptor;
use mirrorlet_oci::{Registry, Repository, UpstreamError};

use crate::metrics::Source;

/// A verified manifest and where it came from.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// Its descriptor.
    pub descriptor: Descriptor,
    /// Its bytes.
    pub bytes: Bytes,
    /// Where it came from.
    pub source: Source,
}

/// Why a manifest or blob could not be had for the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// Upstream says there is no such thing, refuses it, or is rate limiting (or the
    /// registry is not pulled through): nobody in the cluster can get it now.
    Gone(String),
    /// Something on the way failed (a peer, a connection, the spool): another node, or
    /// containerd itself, may still get it.
    Temporary(String),
}

impl Miss {
    /// From an upstream error.
    pub(crate) fn of(e: &UpstreamError) -> Self {
        match e {
            UpstreamError::NotFound(_)
            | UpstreamError::Denied(_)
            | UpstreamError::NotAllowed(_)
            | UpstreamError::RateLimited { .. } => Self::Gone(e.to_string()),
            UpstreamError::Unavailable(_) | UpstreamError::Invalid(_) => {
                Self::Temporary(e.to_string())
            }
        }
    }

    /// Why, for a log or an error body.
    pub fn why(&self) -> &str {
        match self {
            Self::Gone(w) | Self::Temporary(w) => w,
        }
    }
}

/// Logs why upstream did not deliver, at a level that matches: a refusal of the
/// configured credentials is a warning someone must act on.
pub(crate) fn log_upstream_error(registry: &Registry, repository: &Repository, e: &UpstreamError) {
    match e {
        UpstreamError::Denied(why) => {
            tracing::warn!(%registry, %repository, why = %why, "upstream refused the pull; containerd will try with the pod's own credentials")
        }
        UpstreamError::NotFound(_) | UpstreamError::NotAllowed(_) => {
            tracing::debug!(%registry, %repository, error = %e, "not available upstream")
        }
        UpstreamError::RateLimited { .. } => {
            tracing::debug!(%registry, %repository, error = %e, "upstream rate limited")
        }
        UpstreamError::Unavailable(_) | UpstreamError::Invalid(_) => {
            tracing::warn!(%registry, %repository, error = %e, "upstream did not deliver")
        }
    }
}

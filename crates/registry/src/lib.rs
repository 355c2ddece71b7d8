//! The OCI distribution (pull) registry containerd uses as a mirror through `hosts.toml`,
//! and the cluster's pull-through cache.
//!
//! A request is answered from the node's own content store, else from a peer found
//! through the router, else, for registries the agent pulls through, from the one fetch
//! of it the cluster makes (its owner, ranked by the router, fetches it upstream
//! and everyone streams from it), else with a 404 and an OCI error body, which makes
//! containerd go on to its next host (the upstream registry). This crate knows neither
//! containerd, libp2p nor HTTP-client details of registries: it meets them through the
//! [`Store`](mirrorlet_oci::Store), [`Router`](mirrorlet_oci::Router) and
//! [`Upstream`](mirrorlet_oci::Upstream) traits.

// The workspace denies unsafe code; only the agent binary allows it, in one place.
#![forbid(unsafe_code)]

// Modules in layers: plain types first, the shared state, then what answers requests.
// No two modules use each other, directly or round about (tests/layers.rs checks).
//
// Plain types, settings and parsers:
pub mod config;
pub mod error;
mod failed;
mod headers;
mod manifest_cache;
pub mod metrics;
mod negotiate;
mod outcome;
pub mod range;
pub mod ratelimit;
mod recent;
mod singleflight;
mod tag_memory;
mod transfer;

// What every request shares:
mod cache;
mod state;

// Answering requests, and the clients that fetch for them:
mod cluster;
mod fetch;
mod fill;
mod mirror;
mod ops;
mod peers;
mod pullthrough;
pub mod server;
pub mod status;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;

pub use config::{PeerConfig, PeerVerify, PullThroughConfig};
pub use error::RegistryError;
pub use headers::PEER_HEADER;
pub use metrics::{Metrics, Source};
pub use mirror::{content_head, respond};
pub use pullthrough::ACCEPT_ALL;
pub use recent::NodeInfo;
pub use state::{AppState, ReadyCheck};

/// Builds the HTTP application: `/v2/...` pull endpoints plus the operational endpoints of
/// [`ops_app`].
pub fn app(state: Arc<AppState>) -> Router {
    let v2 = Router::new()
        .fallback(mirror::handle)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            ops::track,
        ))
        .with_state(state.clone());
    ops_app(state).fallback_service(v2)
}

/// The operational endpoints alone (`/livez`, `/readyz`, `/metrics`, `/status`), for a listener of
/// their own: probes and scrapes that no registry client can starve, and a port that
/// exposes no content.
pub fn ops_app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/livez", get(ops::livez))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/status", get(status::status))
        .with_state(state)
}

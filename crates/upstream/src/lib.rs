//! The client of upstream registries: OCI distribution pulls over HTTP(S), implementing
//! [`mirrorlet_oci::Upstream`] for the registry's pull-through path.
//!
//! - Only the registries it is configured for are ever contacted (no open proxy).
//! - Auth: the `WWW-Authenticate` Bearer token flow (anonymous unless credentials are
//!   configured), Basic auth, tokens cached per registry and scope until they expire, one
//!   retry on `401`. Credentials come from a Docker `config.json` and go only to their own
//!   registry (and the token service its `401` names).
//! - Redirects (Docker Hub, GHCR and Quay serve blobs from CDNs) are followed without the
//!   registry's `Authorization` header when they lead to another host.
//! - Time limits on connecting, on the response head and on a stalled body.
//! - Rate limits: `ratelimit-*` headers become gauges; a `429` leaves the registry alone
//!   for its `Retry-After`.

// The workspace denies unsafe code; only the agent binary allows it, in one place.
#![forbid(unsafe_code)]

mod auth;
mod client;
pub mod config;
pub mod credentials;
mod limits;
pub mod metrics;

pub use client::{Client, ClientError};
pub use config::{UpstreamConfig, parse_endpoint};
pub use credentials::{Credentials, CredentialsError};
pub use metrics::UpstreamMetrics;
pub use reqwest::Url;

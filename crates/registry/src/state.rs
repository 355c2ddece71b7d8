//! What the registry's handlers share.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use mirrorlet_oci::Store;

use crate::metrics::Metrics;

/// Answers whether the agent is ready: `Err` carries the reason it is not.
pub type ReadyCheck = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// State shared by every request.
pub struct AppState {
    /// Where local content is read.
    pub store: Arc<dyn Store>,
    /// Request and byte metrics.
    pub metrics: Metrics,
    /// The metrics registry rendered at `/metrics`.
    pub metrics_registry: Arc<prometheus_client::registry::Registry>,
    /// What `/readyz` reports.
    pub ready: ReadyCheck,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

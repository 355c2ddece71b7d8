//! The registry's Prometheus metrics: requests by route, method, status and source, bytes
//! served by source, and request durations.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Where a response's content came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// This node's content store.
    Local,
    /// Another node's agent.
    Peer,
    /// Not found here nor at peers: the 404 sends containerd to the upstream registry.
    UpstreamFallthrough,
    /// No content involved (`/v2/`, errors in the request itself).
    None,
}

impl Source {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Peer => "peer",
            Self::UpstreamFallthrough => "upstream-fallthrough",
            Self::None => "none",
        }
    }
}

/// Labels of one request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `manifest`, `blob`, `base` or `other`.
    pub route: &'static str,
    /// `GET` or `HEAD` (anything else is `other`).
    pub method: &'static str,
    /// HTTP status code.
    pub status: u16,
    /// Where the content came from.
    pub source: &'static str,
}

/// Labels of request durations.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    /// `manifest`, `blob`, `base` or `other`.
    pub route: &'static str,
    /// Where the content came from.
    pub source: &'static str,
}

/// Labels of byte counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// Where the bytes came from.
    pub source: &'static str,
}

/// The registry's metrics. Cheap to clone (the families are shared handles).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Requests answered.
    pub requests: Family<RequestLabels, Counter>,
    /// Body bytes sent to clients, counted as they are streamed.
    pub bytes: Family<SourceLabels, Counter>,
    /// Time to the response head (the body streams after).
    pub durations: Family<DurationLabels, Histogram>,
}

impl Metrics {
    /// Creates the metrics and registers them under `mirrorlet_`.
    pub fn register(registry: &mut Registry) -> Self {
        let me = Self {
            requests: Family::default(),
            bytes: Family::default(),
            durations: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 18))
            }),
        };
        registry.register(
            "mirrorlet_registry_requests",
            "Registry requests by route, method, status and content source",
            me.requests.clone(),
        );
        registry.register(
            "mirrorlet_registry_served_bytes",
            "Body bytes served by content source",
            me.bytes.clone(),
        );
        registry.register(
            "mirrorlet_registry_request_duration_seconds",
            "Time from request to response head, by route and source",
            me.durations.clone(),
        );
        me
    }

    /// A counter of bytes served from `source`.
    pub fn bytes_from(&self, source: Source) -> Counter {
        self.bytes
            .get_or_create(&SourceLabels {
                source: source.as_str(),
            })
            .clone()
    }
}

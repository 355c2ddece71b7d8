//! Metrics of the upstream client: requests by registry, kind and status; bytes received;
//! the rate-limit budget registries report; and the 429s they answered.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of one upstream request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The registry (`docker.io`, `ghcr.io`, ...).
    pub registry: String,
    /// `manifest` (GET), `head` (HEAD of a manifest), `blob` or `token`.
    pub kind: &'static str,
    /// The HTTP status, or `error` when no response came.
    pub status: String,
}

/// Labels naming a registry.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    /// The registry.
    pub registry: String,
}

/// The upstream client's metrics. Cheap to clone (shared handles).
#[derive(Debug, Clone, Default)]
pub struct UpstreamMetrics {
    /// Requests sent upstream.
    pub requests: Family<RequestLabels, Counter>,
    /// Body bytes received from upstream (blobs and manifests).
    pub bytes: Family<RegistryLabels, Counter>,
    /// The last `ratelimit-limit` a registry reported.
    pub ratelimit_limit: Family<RegistryLabels, Gauge>,
    /// The last `ratelimit-remaining` a registry reported.
    pub ratelimit_remaining: Family<RegistryLabels, Gauge>,
    /// `429 Too Many Requests` answers.
    pub rate_limited: Family<RegistryLabels, Counter>,
}

impl UpstreamMetrics {
    /// Creates the metrics and registers them under `mirrorlet_upstream_`.
    pub fn register(registry: &mut Registry) -> Self {
        let me = Self::default();
        registry.register(
            "mirrorlet_upstream_requests",
            "Requests to upstream registries by registry, kind (manifest, head, blob, token) and status",
            me.requests.clone(),
        );
        registry.register(
            "mirrorlet_upstream_received_bytes",
            "Body bytes received from upstream registries",
            me.bytes.clone(),
        );
        registry.register(
            "mirrorlet_upstream_ratelimit_limit",
            "Pull budget a registry reports (ratelimit-limit)",
            me.ratelimit_limit.clone(),
        );
        registry.register(
            "mirrorlet_upstream_ratelimit_remaining",
            "Pulls left in the budget a registry reports (ratelimit-remaining)",
            me.ratelimit_remaining.clone(),
        );
        registry.register(
            "mirrorlet_upstream_rate_limited",
            "429 Too Many Requests answers from upstream registries",
            me.rate_limited.clone(),
        );
        me
    }

    /// Creates `registry`'s main series at zero: its 429s, bytes received and successful
    /// requests of each kind. A counter that appears with its first event shows no
    /// increase in Prometheus (a cluster's first pull is a burst within one scrape), and a
    /// quiet registry should show zero rather than no data.
    pub(crate) fn start_at_zero(&self, registry: &str) {
        let labels = RegistryLabels {
            registry: registry.to_owned(),
        };
        drop(self.rate_limited.get_or_create(&labels));
        drop(self.bytes.get_or_create(&labels));
        for kind in ["manifest", "head", "blob", "token"] {
            drop(self.requests.get_or_create(&RequestLabels {
                registry: registry.to_owned(),
                kind,
                status: "200".to_owned(),
            }));
        }
    }

    pub(crate) fn request(&self, registry: &str, kind: &'static str, status: Option<u16>) {
        self.requests
            .get_or_create(&RequestLabels {
                registry: registry.to_owned(),
                kind,
                status: status.map_or_else(|| "error".to_owned(), |s| s.to_string()),
            })
            .inc();
    }

    pub(crate) fn bytes_of(&self, registry: &str) -> Counter {
        self.bytes
            .get_or_create(&RegistryLabels {
                registry: registry.to_owned(),
            })
            .clone()
    }
}

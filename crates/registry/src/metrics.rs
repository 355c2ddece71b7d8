//! The registry's Prometheus metrics: requests by route, status and source, bytes served
//! by source, request durations, how peers were found and used, and the pull-through
//! cache's fetches.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Where a response's content came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// This node's content store.
    Local,
    /// Another node's agent.
    Peer,
    /// The upstream registry, fetched by this node (for the cluster).
    Upstream,
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
            Self::Upstream => "upstream",
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
    /// `peer` (another agent) or one of [`CLIENTS`].
    pub requester: &'static str,
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
    /// `peer` (another agent) or one of [`CLIENTS`].
    pub requester: &'static str,
}

/// Labels of lookups.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// One of [`LOOKUP_OUTCOMES`].
    pub outcome: &'static str,
}

/// The clients a request can come from, told apart by `User-Agent`: `containerd`,
/// `docker` (the Docker engine), `containers` (podman, skopeo, buildah and CRI-O, which
/// share the containers/image library) or `other`; requests from other agents are `peer`.
pub const CLIENTS: [&str; 4] = ["containerd", "docker", "containers", "other"];

/// Who sent a request with `headers`: `peer` for another agent, else one of [`CLIENTS`].
pub fn requester(headers: &http::HeaderMap) -> &'static str {
    if headers.contains_key(crate::headers::PEER_HEADER) {
        return "peer";
    }
    let agent = headers
        .get(http::header::USER_AGENT)
        .map_or(&b""[..], http::HeaderValue::as_bytes);
    let starts = |p: &str| {
        agent
            .get(..p.len())
            .is_some_and(|a| a.eq_ignore_ascii_case(p.as_bytes()))
    };
    if starts("containerd/") {
        "containerd"
    } else if starts("docker/") {
        "docker"
    } else if starts("containers/") || starts("cri-o/") || {
        let library = b"github.com/containers/image";
        agent
            .windows(library.len())
            .any(|w| w.eq_ignore_ascii_case(library))
    } {
        "containers"
    } else {
        "other"
    }
}

/// How a lookup ends: a peer found, or none within the time allowed.
pub const LOOKUP_OUTCOMES: [&str; 2] = ["found", "not-found"];

/// Labels of pull-through fetches.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FetchLabels {
    /// `blob`, `manifest` or `tag`.
    pub kind: &'static str,
    /// How this node took part: `fetched` (from upstream, for the cluster), `followed` (a
    /// peer's fetch), `from-holders` (a peer holding it), `joined` (a fetch already under
    /// way here), `revalidated` (a tag checked upstream), `failed`.
    pub role: &'static str,
}

/// The pull-through fetches' (kind, role) pairs that occur.
const FETCH_SERIES: [(&str, &str); 9] = [
    ("blob", "fetched"),
    ("blob", "followed"),
    ("blob", "joined"),
    ("blob", "failed"),
    ("manifest", "fetched"),
    ("manifest", "followed"),
    ("manifest", "from-holders"),
    ("tag", "revalidated"),
    ("tag", "joined"),
];

/// Labels of peer failures.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// One of [`PEER_FAILURE_REASONS`] (or [`UPSTREAM_REASONS`]).
    pub reason: &'static str,
}

/// Why an attempt at a peer failed (each series exists from the start, at zero, so that
/// dashboards and alerts see a rate rather than no data).
pub const PEER_FAILURE_REASONS: [&str; 5] = [
    "unreachable",
    "bad-status",
    "not-found",
    "bad-range",
    "spool",
];

/// Why a node asked upstream for a blob itself (each series exists from the start):
/// `owner` (it ranks itself first), `asked` (another agent asked it as the owner),
/// `owners-busy` (every agent asked was busy, waits included), `owners-failed` (no owner
/// ahead of it answered), `resume` (continuing a copy that broke).
pub const UPSTREAM_REASONS: [&str; 5] =
    ["owner", "asked", "owners-busy", "owners-failed", "resume"];

/// The registry's metrics. Cheap to clone (the families are shared handles).
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Requests answered.
    pub requests: Family<RequestLabels, Counter>,
    /// Body bytes sent to clients, counted as they are streamed.
    pub bytes: Family<SourceLabels, Counter>,
    /// Body bytes this node sent to other agents.
    pub peer_served_bytes: Counter,
    /// Time to the response head (the body streams after).
    pub durations: Family<DurationLabels, Histogram>,
    /// Time for a lookup to find its first peer (or give up).
    pub lookups: Family<LookupLabels, Histogram>,
    /// Peers left out because they failed recently.
    pub peers_skipped: Counter,
    /// Attempts at peers that failed, by reason.
    pub peer_failures: Family<ReasonLabels, Counter>,
    /// Content from peers that did not match its digest.
    pub digest_mismatches: Counter,
    /// Tags of private repositories asked for and not answered.
    pub private_tags_refused: Counter,
    /// Blob streams continued at another peer after a failure.
    pub resumes: Counter,
    /// Second peers raced against a slow first one.
    pub hedges: Counter,
    /// Pull-through fetches by kind and role.
    pub fetches: Family<FetchLabels, Counter>,
    /// Tags answered with the last digest the cluster knew while upstream was down.
    pub stale_tags: Counter,
    /// Content from upstream that did not match its digest (discarded, never kept).
    pub upstream_digest_mismatches: Counter,
    /// containerd downloads aborted after bytes that failed verification reached them.
    pub ingests_aborted: Counter,
    /// Peers' answers that they already stream a blob to as many peers as they may.
    pub busy_answers: Counter,
    /// Peer requests this node refused because it streams the blob to enough peers.
    pub busy_refusals: Counter,
    /// Redirects followed to an owner closer to the key than the one asked.
    pub owner_redirects: Counter,
    /// Blob requests this node sent upstream itself, by why (one of [`UPSTREAM_REASONS`]).
    pub upstream_blob_requests: Family<ReasonLabels, Counter>,
    /// Bytes held by the chunks of blobs read from files to be sent (bounded by
    /// `--stream-memory`), as of the scrape.
    pub stream_memory: Gauge,
}

impl Metrics {
    /// Creates the metrics and registers them under `mirrorlet_`.
    pub fn register(registry: &mut Registry) -> Self {
        let me = Self {
            requests: Family::default(),
            bytes: Family::default(),
            peer_served_bytes: Counter::default(),
            durations: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0001, 2.0, 18))
            }),
            lookups: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.00005, 2.0, 16))
            }),
            peers_skipped: Counter::default(),
            peer_failures: Family::default(),
            digest_mismatches: Counter::default(),
            private_tags_refused: Counter::default(),
            resumes: Counter::default(),
            hedges: Counter::default(),
            fetches: Family::default(),
            stale_tags: Counter::default(),
            upstream_digest_mismatches: Counter::default(),
            ingests_aborted: Counter::default(),
            busy_answers: Counter::default(),
            busy_refusals: Counter::default(),
            owner_redirects: Counter::default(),
            upstream_blob_requests: Family::default(),
            stream_memory: Gauge::default(),
        };
        registry.register(
            "mirrorlet_registry_requests",
            "Registry requests by route, method, status, content source and requester",
            me.requests.clone(),
        );
        registry.register(
            "mirrorlet_registry_served_bytes",
            "Body bytes served by content source and requester",
            me.bytes.clone(),
        );
        registry.register(
            "mirrorlet_registry_peer_served_bytes",
            "Body bytes this node served to other agents",
            me.peer_served_bytes.clone(),
        );
        registry.register(
            "mirrorlet_registry_request_duration_seconds",
            "Time from request to response head, by route and source",
            me.durations.clone(),
        );
        registry.register(
            "mirrorlet_lookup_duration_seconds",
            "Time for a DHT lookup to yield its first peer, or to give up",
            me.lookups.clone(),
        );
        registry.register(
            "mirrorlet_peers_skipped",
            "Peers left out because they failed recently",
            me.peers_skipped.clone(),
        );
        // Series that dashboards divide by or take quantiles of exist from the start, at
        // zero, so that their first events count in a rate (a series that appears with its
        // first event shows no increase) and a quiet node shows a value, not "no data".
        for reason in PEER_FAILURE_REASONS {
            drop(me.peer_failures.get_or_create(&ReasonLabels { reason }));
        }
        for reason in UPSTREAM_REASONS {
            drop(
                me.upstream_blob_requests
                    .get_or_create(&ReasonLabels { reason }),
            );
        }
        for outcome in LOOKUP_OUTCOMES {
            drop(me.lookups.get_or_create(&LookupLabels { outcome }));
        }
        // Pulls by containerd, as the hit ratio counts them: served (200) from each source,
        // or sent upstream (404).
        let sources = [
            (Source::Local, 200),
            (Source::Peer, 200),
            (Source::Upstream, 200),
            (Source::UpstreamFallthrough, 404),
        ];
        for route in ["manifest", "blob"] {
            for (source, status) in sources {
                let source = source.as_str();
                for requester in CLIENTS {
                    drop(me.requests.get_or_create(&RequestLabels {
                        route,
                        method: "GET",
                        status,
                        source,
                        requester,
                    }));
                }
                drop(
                    me.durations
                        .get_or_create(&DurationLabels { route, source }),
                );
            }
        }
        for (kind, role) in FETCH_SERIES {
            drop(me.fetches.get_or_create(&FetchLabels { kind, role }));
        }
        for (source, _) in &sources[..3] {
            for requester in CLIENTS.into_iter().chain(["peer"]) {
                let source = source.as_str();
                drop(me.bytes.get_or_create(&SourceLabels { source, requester }));
            }
        }
        registry.register(
            "mirrorlet_peer_failures",
            "Failed attempts at peers, by reason",
            me.peer_failures.clone(),
        );
        registry.register(
            "mirrorlet_peer_digest_mismatches",
            "Content from peers that did not match its digest (and was not delivered whole)",
            me.digest_mismatches.clone(),
        );
        registry.register(
            "mirrorlet_registry_private_tags_refused",
            "Tags of private repositories (--private) asked for and not answered",
            me.private_tags_refused.clone(),
        );
        registry.register(
            "mirrorlet_peer_resumes",
            "Blob streams continued at another peer",
            me.resumes.clone(),
        );
        registry.register(
            "mirrorlet_peer_hedges",
            "Second peers raced against a slow first one",
            me.hedges.clone(),
        );
        registry.register(
            "mirrorlet_pullthrough_fetches",
            "Pull-through fetches by kind (blob, manifest, tag) and how this node took part",
            me.fetches.clone(),
        );
        registry.register(
            "mirrorlet_stale_tags_served",
            "Tags answered with the last digest the cluster knew while upstream was unavailable",
            me.stale_tags.clone(),
        );
        registry.register(
            "mirrorlet_upstream_digest_mismatches",
            "Content from upstream that did not match its digest (discarded)",
            me.upstream_digest_mismatches.clone(),
        );
        registry.register(
            "mirrorlet_ingests_aborted",
            "containerd downloads aborted after unverified bytes that failed verification reached them",
            me.ingests_aborted.clone(),
        );
        registry.register(
            "mirrorlet_peer_busy_answers",
            "Answers from peers that already stream a blob to as many peers as they may",
            me.busy_answers.clone(),
        );
        registry.register(
            "mirrorlet_peer_busy_refusals",
            "Peer requests refused because this node streams the blob to enough peers",
            me.busy_refusals.clone(),
        );
        registry.register(
            "mirrorlet_pullthrough_owner_redirects",
            "Redirects followed from an agent asked as the owner to one closer to the key",
            me.owner_redirects.clone(),
        );
        registry.register(
            "mirrorlet_pullthrough_upstream_blob_requests",
            "Blob requests this node sent upstream itself, by why: owner, asked, owners-busy, owners-failed, resume",
            me.upstream_blob_requests.clone(),
        );
        registry.register_with_unit(
            "mirrorlet_registry_stream_memory",
            "Memory held by the chunks of blobs read from blob files and the spool to be sent, at most --stream-memory",
            prometheus_client::registry::Unit::Bytes,
            me.stream_memory.clone(),
        );
        me
    }

    /// A counter of bytes served from `source` to `requester` ([`requester`]).
    pub fn bytes_from(&self, source: Source, requester: &'static str) -> Counter {
        self.bytes
            .get_or_create(&SourceLabels {
                source: source.as_str(),
                requester,
            })
            .clone()
    }
}

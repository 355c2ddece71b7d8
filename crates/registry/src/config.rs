//! How the registry uses peers and pulls through for the cluster: plain settings, filled
//! from the agent's flags.

use std::time::Duration;

use mirrorlet_oci::glob::Glob;

/// How a blob larger than the verify buffer, taken from peers that hold it, reaches the
/// client. Either way no byte that fails verification is committed by containerd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PeerVerify {
    /// As it arrives, hashed on the way, the last byte held back until the whole matched
    /// its digest. A peer that sent wrong bytes costs that pull (the stream is cut and
    /// containerd's partial download aborted, so its retry starts clean and goes
    /// elsewhere); the first byte comes at once and the copy runs at network speed.
    #[default]
    Stream,
    /// Spooled and verified whole before the first byte is sent: a wrong copy is replaced
    /// by another source before the client sees anything, at the cost of the whole
    /// transfer's time before the first byte.
    Whole,
}

/// How the registry uses peers.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    /// Whether to ask peers at all (off: a purely node-local mirror).
    pub enabled: bool,
    /// How long to wait for the lookup to yield a (next) peer.
    pub lookup_timeout: Duration,
    /// Peers tried per request at most (hedges and resumes included).
    pub max_attempts: usize,
    /// If the peer being tried has not answered after this long, race another.
    pub hedge_delay: Duration,
    /// Connect timeout to a peer.
    pub connect_timeout: Duration,
    /// A peer's stream that delivers nothing for this long is abandoned (resumed elsewhere).
    pub read_timeout: Duration,
    /// How long a peer that failed is skipped.
    pub failure_backoff: Duration,
    /// How long a peer that served wrong bytes is skipped.
    pub corrupt_backoff: Duration,
    /// Blobs up to this size are fetched whole and verified before anything is sent, so a
    /// bad peer costs a retry elsewhere instead of a failed pull.
    pub verify_buffer: u64,
    /// How larger blobs from peers that hold them are sent (see [`PeerVerify`]).
    pub verify: PeerVerify,
    /// Tags matching these are never resolved through peers.
    pub tag_excludes: Vec<Glob>,
    /// Blobs a peer announces as larger than this are not taken from peers (a bound on the
    /// spool, against a peer lying about sizes).
    pub max_blob_size: u64,
    /// Blobs at least this large are read from up to four holders at once, in parts of at
    /// least an eighth of this (when more than one node holds them); 0: never.
    pub parts_from: u64,
    /// Where blobs larger than the verify buffer are spooled while they are verified
    /// (anonymous files, gone when closed).
    pub spool_dir: std::path::PathBuf,
    /// The address requests to peers come from (`None`: the system's choice). Peers take
    /// an agent's word for its registry address only where its connections come from.
    pub source_address: Option<std::net::IpAddr>,
}

impl Default for PeerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            lookup_timeout: Duration::from_millis(20),
            max_attempts: 3,
            hedge_delay: Duration::from_millis(100),
            connect_timeout: Duration::from_millis(500),
            read_timeout: Duration::from_secs(5),
            failure_backoff: Duration::from_secs(60),
            corrupt_backoff: Duration::from_secs(600),
            verify_buffer: 4 * 1024 * 1024,
            verify: PeerVerify::default(),
            tag_excludes: vec![Glob::new("*:latest")],
            max_blob_size: 32 << 30,
            parts_from: 64 << 20,
            spool_dir: std::env::temp_dir(),
            source_address: None,
        }
    }
}

/// How the registry pulls through from upstream for the cluster.
#[derive(Debug, Clone)]
pub struct PullThroughConfig {
    /// A tag's resolution stands this long before its owner asks upstream again.
    pub tag_revalidate: Duration,
    /// While upstream is unavailable, tags confirmed at most this long ago are served.
    pub stale_tag_max_age: Duration,
    /// Peers this node streams one blob it is downloading to at most; more are sent to
    /// other nodes that are downloading it.
    pub max_peer_streams: usize,
    /// How long an owner may take to answer (it may first have to reach upstream).
    pub owner_timeout: Duration,
    /// When an owner is busy, how long to wait before looking for other downloaders again.
    pub busy_wait: Duration,
    /// How many times to wait for a busy owner before fetching directly.
    pub busy_rounds: usize,
}

impl Default for PullThroughConfig {
    fn default() -> Self {
        Self {
            tag_revalidate: Duration::from_secs(30),
            stale_tag_max_age: Duration::from_secs(24 * 3600),
            max_peer_streams: 4,
            owner_timeout: Duration::from_secs(15),
            busy_wait: Duration::from_millis(200),
            busy_rounds: 5,
        }
    }
}

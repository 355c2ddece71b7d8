//! The scale harness (`make bench-scale`, `e2e/bench/scale.sh`, and a 60-agent check in
//! the test suite): N agents on this machine, each with its own real libp2p router and its
//! own registry (the real registry code, serving HTTP on its own loopback address
//! 127.1.x.y:5000, the port the same everywhere as on nodes) over an in-memory store,
//! pulling through with the real upstream client from an OCI registry on loopback that
//! counts requests ([`origin`]). The agents run in worker processes of up to
//! [`PER_WORKER`] each (one process may hold 20,000 descriptors here), driven over their
//! standard input and output ([`worker`], [`driver`]). Every agent knows three seeds only.
//!
//! All agents share this machine's two cores, so latencies are inflated; the shares,
//! counts and per-node resources are what it is for.

pub mod driver;
pub mod origin;
pub mod report;
pub mod worker;

use std::time::Duration;

/// Keys each node announces at once.
pub const KEYS: usize = 20;
/// Agents per worker process.
pub const PER_WORKER: usize = 25;
/// How long a lookup may take here (generous: every agent shares the cores).
pub const LOOKUP_LIMIT: Duration = Duration::from_millis(2000);
/// The registry's lookup budget (`PeerConfig::default().lookup_timeout`).
pub const BUDGET_MS: f64 = 20.0;
/// The registry port, the same on every agent.
pub const HTTP_PORT: u16 = 5000;
/// The registry pulled through.
pub const UPSTREAM: &str = "example.com";
/// The repository of the blobs every node asks for.
pub const REPO: &str = "scale/app";
/// The size of each new blob every node asks for at once.
pub const BLOB_BYTES: usize = 256 << 10;
/// New blobs: one for the whole cluster, one after 10% of it was killed.
pub const ROUNDS: u8 = 2;

/// The loopback address of agent `k`.
pub fn ip(k: usize) -> [u8; 4] {
    [127, 1, (k / 250) as u8, (k % 250 + 1) as u8]
}

/// Key `i` of node `node`.
pub fn key(node: usize, i: usize) -> String {
    format!("sha256:{node:05}{i:059}")
}

/// The `round`th blob every node asks for (the same bytes in every process).
pub fn blob(round: u8) -> bytes::Bytes {
    (0..BLOB_BYTES)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(u32::from(round)) as u8
        })
        .collect::<Vec<_>>()
        .into()
}

/// A small deterministic generator (the same choices in every run).
pub struct Lcg(pub u64);

impl Lcg {
    /// A number below `n`.
    pub fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        usize::try_from(self.0 >> 33).unwrap_or(0) % n
    }
}

/// The `p` quantile of `sorted` (NaN when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

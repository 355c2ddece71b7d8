//! The end-to-end harness: simulated nodes in network namespaces, each with a real
//! containerd and a mirrorlet agent, and a real upstream registry (Distribution 2.8)
//! holding generated test images. Pulls go through the CRI, as kubelet's do.
//!
//! Needs root. Every cluster is torn down when dropped (processes, mounts, namespaces,
//! bridge, files), and clusters left by a killed run are swept at the next start.

// The workspace denies unsafe code; only the agent binary allows it, in one place.
#![forbid(unsafe_code)]

pub mod browser;
pub mod clients;
pub mod cluster;
pub mod dashboard;
pub mod deps;
pub mod images;
pub mod net;
pub mod node;
pub mod process;
pub mod prometheus;
pub mod scale;
pub mod upstream;
pub mod wait;

pub use cluster::{Cluster, Options};
pub use images::TestImage;
pub use node::{Node, REGISTRY, sum_metric};

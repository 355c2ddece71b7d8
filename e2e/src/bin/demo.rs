//! `make demo`: a local cluster of simulated nodes (network namespaces, real containerd,
//! a mirrorlet agent each) and a local upstream registry. Pulls an image on every node
//! through the CRI and prints where each node's content came from.

use std::time::{Duration, Instant};

use anyhow::Result;
use mirrorlet_e2e::{Cluster, Options, TestImage, sum_metric};

#[tokio::main]
async fn main() -> Result<()> {
    let nodes: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let image = TestImage::single("demo/app", "v1", &[8 << 20, 4 << 20, 1 << 20]);
    println!(
        "Starting {nodes} nodes (network namespaces 198.18.x.0/24, containerd + mirrorlet each) and an upstream registry..."
    );
    let cluster = Cluster::start(Options {
        nodes,
        images: vec![image.clone()],
        ..Options::default()
    })
    .await?;
    let name = Cluster::image_ref(&image);
    println!(
        "Upstream registry at {}; image {name} (3 layers, 13 MiB)\n",
        cluster.upstream.url()
    );

    for node in &cluster.nodes {
        let started = Instant::now();
        node.cri.pull(&name, Duration::from_secs(120)).await?;
        println!(
            "node {} ({}) pulled {name} via CRI in {:?}",
            node.index,
            node.host.addr,
            started.elapsed()
        );
    }

    println!(
        "\nWhat each agent served (requests containerd made to it, and where the bytes came from):"
    );
    println!(
        "{:<8}{:>10}{:>12}{:>24}{:>16}",
        "node", "requests", "local", "upstream-fallthrough", "bytes local"
    );
    for node in &cluster.nodes {
        let m = node.metrics().await?;
        let total = sum_metric(&m, "mirrorlet_registry_requests_total", &[]);
        let local = sum_metric(
            &m,
            "mirrorlet_registry_requests_total",
            &[("source", "local")],
        );
        let miss = sum_metric(
            &m,
            "mirrorlet_registry_requests_total",
            &[("source", "upstream-fallthrough")],
        );
        let bytes = sum_metric(
            &m,
            "mirrorlet_registry_served_bytes_total",
            &[("source", "local")],
        );
        println!(
            "{:<8}{total:>10}{local:>12}{miss:>24}{bytes:>16}",
            format!("node {}", node.index)
        );
    }
    println!(
        "\nEvery node's agent answered 404 for content it did not hold, so containerd fell through to the\n\
         upstream registry: the node-local mirror never blocks a pull. Peer-to-peer serving is what turns\n\
         those 404s into local-network transfers."
    );
    let left = cluster.teardown();
    anyhow::ensure!(left.is_empty(), "teardown left {left:?}");
    println!("Cluster torn down.");
    Ok(())
}

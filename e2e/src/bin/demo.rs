//! `make demo`: a local cluster of simulated nodes (network namespaces, real containerd,
//! a mirrorlet agent each) and a local upstream registry. Node 1 pulls an image from
//! upstream; then the upstream registry is stopped and every other node pulls the same
//! image through the CRI, served by its peers. Prints where each node's bytes came from.

use std::time::{Duration, Instant};

use anyhow::Result;
use mirrorlet_e2e::{Cluster, Options, REGISTRY, TestImage, sum_metric};

const MIB: f64 = 1024.0 * 1024.0;

#[tokio::main]
async fn main() -> Result<()> {
    let nodes: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(4)
        .max(2);
    let image = TestImage::single("demo/app", "v1", &[48 << 20, 16 << 20, 1 << 20]);
    println!(
        "Starting {nodes} nodes (network namespaces on 198.18.x.0/24, containerd + mirrorlet each) and an upstream registry..."
    );
    let mut cluster = Cluster::start(Options {
        nodes,
        images: vec![image.clone()],
        ..Options::default()
    })
    .await?;
    let name = Cluster::image_ref(&image);
    println!(
        "Upstream registry: {}   image: {name} (3 layers, 65 MiB)\n",
        cluster.upstream.url()
    );

    let started = Instant::now();
    cluster
        .node(1)
        .cri
        .pull(&name, Duration::from_secs(300))
        .await?;
    println!(
        "node 1 pulled {name} from the upstream registry in {:?}",
        started.elapsed()
    );

    cluster.upstream.stop();
    println!("upstream registry STOPPED (as if Docker Hub answered 429 or went down)\n");
    // Give node 1's advertisement a moment to spread (it is usually there already).
    let url = format!(
        "{}/v2/{}/manifests/{}?ns={REGISTRY}",
        cluster.node(2).agent_url(),
        image.repo,
        image.tag
    );
    for _ in 0..100 {
        if cluster
            .http
            .head(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in &cluster.nodes[1..] {
        let started = Instant::now();
        node.cri.pull(&name, Duration::from_secs(300)).await?;
        println!(
            "node {} ({}) pulled {name} via CRI in {:?} with upstream down",
            node.index,
            node.host.addr,
            started.elapsed()
        );
    }

    println!(
        "\nWhat each node's containerd got from its agent, and what the agent served to other agents (MiB):"
    );
    println!(
        "{:<8}{:>14}{:>12}{:>22}{:>20}",
        "node", "from itself", "from peers", "upstream-fallthrough", "served to peers"
    );
    for node in &cluster.nodes {
        let m = node.metrics().await?;
        let local = sum_metric(
            &m,
            "mirrorlet_registry_served_bytes_total",
            &[("source", "local")],
        );
        let peer = sum_metric(
            &m,
            "mirrorlet_registry_served_bytes_total",
            &[("source", "peer")],
        );
        let miss = sum_metric(
            &m,
            "mirrorlet_registry_requests_total",
            &[
                ("source", "upstream-fallthrough"),
                ("requester", "containerd"),
            ],
        );
        let served = sum_metric(&m, "mirrorlet_registry_peer_served_bytes_total", &[]);
        println!(
            "{:<8}{:>14.1}{:>12.1}{:>22}{:>20.1}",
            format!("node {}", node.index),
            (local - served) / MIB,
            peer / MIB,
            format!("{miss} requests"),
            served / MIB
        );
    }
    println!(
        "\nNode 1's misses went upstream (once for the whole cluster); every other node got the\n\
         image from its peers while the upstream registry was down."
    );
    let left = cluster.teardown();
    anyhow::ensure!(left.is_empty(), "teardown left {left:?}");
    println!("Cluster torn down.");
    Ok(())
}

//! `make demo`: a local cluster of simulated nodes (network namespaces, real containerd,
//! a mirrorlet agent each) behind a Docker-Hub-like registry (bearer tokens, blobs from a
//! CDN, and a rate limit of ONE counted manifest pull). Every node but one pulls a new
//! image at the same moment: the registry sees one request per layer and one counted
//! pull. Then the limit is spent, and the last node still starts its pod from the
//! cluster. Prints what the registry saw and where each node's bytes came from.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::future::join_all;
use mirrorlet_e2e::cluster::PullThrough;
use mirrorlet_e2e::{Cluster, Options, TestImage, sum_metric};

const MIB: f64 = 1024.0 * 1024.0;

#[tokio::main]
async fn main() -> Result<()> {
    let nodes: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .max(3);
    let image = TestImage::single("demo/app", "v1", &[48 << 20, 16 << 20, 1 << 20]);
    let other = TestImage::single("demo/brand-new", "v1", &[1 << 20]);
    println!(
        "Starting {nodes} nodes (network namespaces on 198.18.x.0/24, containerd + mirrorlet each)\n\
         and an upstream registry behind a Docker-Hub-like front: bearer tokens, blobs served\n\
         from a CDN host, and a rate limit of ONE counted manifest pull..."
    );
    let cluster = Cluster::start(Options {
        nodes,
        images: vec![image.clone(), other.clone()],
        pull_through: Some(PullThrough {
            front: Some(Some(1)),
            ..PullThrough::default()
        }),
        ..Options::default()
    })
    .await?;
    cluster.wait_members().await?;
    let name = Cluster::image_ref(&image);
    let front = cluster
        .front
        .as_ref()
        .map(|(_, a)| a.clone())
        .unwrap_or_default();
    println!("Registry front: http://{front}   image: {name} (3 layers, 65 MiB)\n");

    let burst = &cluster.nodes[..nodes - 1];
    println!(
        "Nodes 1-{} pull {name} at the same moment (a rollout of a new image):",
        nodes - 1
    );
    let started = Instant::now();
    let results = join_all(burst.iter().map(|n| {
        let (cri, name) = (n.cri.clone(), name.clone());
        async move {
            let t = Instant::now();
            let r = cri.pull(&name, Duration::from_secs(300)).await;
            (r, t.elapsed())
        }
    }))
    .await;
    for (n, (r, took)) in burst.iter().zip(results) {
        r?;
        println!("  node {} pulled it in {took:.2?}", n.index);
    }
    println!("  all done in {:.2?}", started.elapsed());
    let stats = cluster.front_stats().await?;
    println!(
        "\nWhat the registry saw: {} counted manifest pull(s), {} HEAD(s) (free), {} blob download(s)\n\
         for 4 blobs (config + 3 layers), {} refused with 429, and {} request(s) carrying credentials\n\
         to the CDN. Without a pull-through cache, {} nodes would have made {} counted pulls,\n\
         and with a limit of one, all but one would have failed with 429 toomanyrequests.",
        stats["manifest_gets"],
        stats["manifest_heads"],
        stats["blob_redirects"],
        stats["rejected"],
        stats["cdn_with_auth"],
        nodes - 1,
        nodes - 1,
    );

    println!("\nThe limit is spent. Node {nodes} starts a pod with the same image:");
    let t = Instant::now();
    cluster
        .node(nodes)
        .cri
        .pull(&name, Duration::from_secs(300))
        .await?;
    println!(
        "  node {nodes} pulled {name} in {:.2?}: the tag is fresh in the cluster, every byte came from peers",
        t.elapsed()
    );
    println!("A brand-new image cannot come while the registry refuses:");
    match cluster
        .node(1)
        .cri
        .pull(&Cluster::image_ref(&other), Duration::from_secs(60))
        .await
    {
        Ok(_) => println!("  unexpectedly pulled"),
        Err(_) => {
            let stats = cluster.front_stats().await?;
            println!(
                "  node 1: the pull failed; the registry refused {} manifest GET(s) with 429 (the\n  \
                 agent's, then containerd's own). The agents leave the registry alone until its\n  \
                 Retry-After and answer from the cluster meanwhile; kubelet retries the pull later.",
                stats["rejected"]
            );
        }
    }

    println!("\nWhere each node's bytes came from (MiB), and what it served to other agents:");
    println!(
        "{:<8}{:>14}{:>12}{:>14}{:>20}",
        "node", "from itself", "from peers", "from upstream", "served to peers"
    );
    for node in &cluster.nodes {
        let m = node.metrics().await?;
        // What this node's containerd received, by where it came from.
        let bytes = |source| {
            sum_metric(
                &m,
                "mirrorlet_registry_served_bytes_total",
                &[("source", source), ("requester", "containerd")],
            )
        };
        let served = sum_metric(&m, "mirrorlet_registry_peer_served_bytes_total", &[]);
        println!(
            "{:<8}{:>14.1}{:>12.1}{:>14.1}{:>20.1}",
            format!("node {}", node.index),
            bytes("local") / MIB,
            bytes("peer") / MIB,
            bytes("upstream") / MIB,
            served / MIB
        );
    }
    println!(
        "\nOne node fetched each layer from the registry (its owner: the agent closest to it in the DHT)\n\
         and streamed it to the others while it downloaded; late arrivals were served by the cluster."
    );
    let left = cluster.teardown();
    anyhow::ensure!(left.is_empty(), "teardown left {left:?}");
    println!("Cluster torn down.");
    Ok(())
}

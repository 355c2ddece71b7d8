//! Pull-through benchmark on the namespace cluster (release build; `e2e/bench/pullthrough.sh`):
//! N nodes cold-pull one ~200 MiB 4-layer image at the same moment from a bandwidth-capped
//! upstream, three ways, each next to one node pulling alone in the same cluster:
//!
//! - `direct`: containerd straight to the upstream (no mirror configured);
//! - `p2p-only`: mirrorlet with pull-through off (a miss goes upstream from every node);
//! - `pull-through`: mirrorlet pulling through for the cluster.
//!
//! Reports the upstream's own account (manifest GETs, blob GETs, bytes sent) and the wall
//! time of the slowest pull relative to the single pull.

use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::future::join_all;
use mirrorlet_e2e::cluster::PullThrough;
use mirrorlet_e2e::upstream::Access;
use mirrorlet_e2e::{Cluster, Options, TestImage};

const MIB: f64 = 1024.0 * 1024.0;
const PULL: Duration = Duration::from_secs(900);

struct Row {
    mode: &'static str,
    single: f64,
    burst: f64,
    /// Share of the machine's CPU time busy during the burst.
    cpu: f64,
    /// CPU seconds the agents, containerds and the registry spent in the burst.
    cpu_by: [f64; 3],
    manifest_gets: usize,
    blob_gets: usize,
    bytes: u64,
}

fn image(name: &str) -> TestImage {
    TestImage::single(name, "v1", &[80 << 20, 60 << 20, 40 << 20, 20 << 20])
}

fn account(log: &[Access]) -> (usize, usize, u64) {
    let gets = log.iter().filter(|a| a.method == "GET" && a.status < 300);
    let (mut manifests, mut blobs, mut bytes) = (0, 0, 0);
    for a in gets {
        if a.path.contains("/manifests/") {
            manifests += 1;
        } else if a.path.contains("/blobs/") {
            blobs += 1;
        }
        bytes += a.bytes;
    }
    (manifests, blobs, bytes)
}

async fn run(mode: &'static str, nodes: usize, rate: &str) -> Result<Row> {
    let (single_image, burst_image) = (
        image(&format!("bench/{mode}-one")),
        image(&format!("bench/{mode}-all")),
    );
    let c = Cluster::start(Options {
        nodes,
        images: vec![single_image.clone(), burst_image.clone()],
        pull_through: (mode == "pull-through").then(PullThrough::default),
        start_agents: mode != "direct",
        ..Options::default()
    })
    .await?;
    if mode == "direct" {
        for n in &c.nodes {
            n.cleanup()?; // containerd goes straight to the registry
        }
    } else {
        c.wait_members().await?;
    }
    c.upstream.host.cap_upload(rate)?;

    let t = Instant::now();
    c.node(1)
        .cri
        .pull(&Cluster::image_ref(&single_image), PULL)
        .await?;
    let single = t.elapsed().as_secs_f64();

    let mark = c.upstream.access_log().len();
    let name = Cluster::image_ref(&burst_image);
    let cpu_before = cpu_times();
    let by_before = cpu_by_program();
    let t = Instant::now();
    let times = join_all(c.nodes.iter().map(|n| {
        let (cri, name) = (n.cri.clone(), name.clone());
        async move {
            let started = Instant::now();
            cri.pull(&name, PULL).await.map(|_| started.elapsed())
        }
    }))
    .await;
    let burst = t.elapsed().as_secs_f64();
    let cpu = busy_since(cpu_before);
    let by_after = cpu_by_program();
    let cpu_by = [0, 1, 2].map(|i| by_after[i] - by_before[i]);
    for r in times {
        r?;
    }
    let log = c.upstream.access_log().split_off(mark);
    let (manifest_gets, blob_gets, bytes) = account(&log);
    let left = c.teardown();
    anyhow::ensure!(left.is_empty(), "teardown left {left:?}");
    Ok(Row {
        mode,
        single,
        burst,
        cpu,
        cpu_by,
        manifest_gets,
        blob_gets,
        bytes,
    })
}

/// (busy, total) jiffies of all CPUs.
fn cpu_times() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// CPU seconds used so far by every `mirrorlet`, `containerd` and `docker-registry`
/// process (living ones).
fn cpu_by_program() -> [f64; 3] {
    let mut out = [0.0; 3];
    let ticks = 100.0; // USER_HZ
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let path = entry.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        let i = match comm.trim() {
            "mirrorlet" => 0,
            "containerd" => 1,
            "docker-registr" | "docker-registry" => 2,
            _ => continue,
        };
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // Fields after the command name: utime and stime are the 12th and 13th.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<f64> = rest
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if f.len() > 12 {
            out[i] += (f[11] + f[12]) / ticks;
        }
    }
    out
}

fn busy_since(before: (u64, u64)) -> f64 {
    let now = cpu_times();
    let (busy, total) = (now.0 - before.0, now.1 - before.1);
    if total == 0 {
        0.0
    } else {
        busy as f64 / total as f64
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let nodes: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(5);
    let rate = args.next().unwrap_or_else(|| "400mbit".to_owned());
    println!(
        "cluster: {nodes} nodes; image: 4 layers, 200 MiB (+config); upstream capped at {rate}"
    );
    let modes =
        std::env::var("BENCH_MODES").unwrap_or_else(|_| "direct,p2p-only,pull-through".into());
    let mut rows = Vec::new();
    for mode in ["direct", "p2p-only", "pull-through"] {
        if !modes.split(',').any(|m| m == mode) {
            continue;
        }
        let row = run(mode, nodes, &rate).await?;
        println!(
            "{mode}: single {:.2} s, burst of {nodes} {:.2} s",
            row.single, row.burst
        );
        rows.push(row);
    }
    println!(
        "\n| mode | upstream manifest GETs | upstream blob GETs | upstream bytes | one node alone | {nodes} nodes at once | ratio | CPU busy in the burst | CPU s: agents / containerd / registry |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} MiB | {:.2} s | {:.2} s | {:.2}x | {:.0}% | {:.1} / {:.1} / {:.1} |",
            r.mode,
            r.manifest_gets,
            r.blob_gets,
            r.bytes as f64 / MIB,
            r.single,
            r.burst,
            r.burst / r.single,
            r.cpu * 100.0,
            r.cpu_by[0],
            r.cpu_by[1],
            r.cpu_by[2]
        );
    }
    Ok(())
}

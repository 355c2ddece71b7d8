//! DHT scale probe (`e2e/bench/scale.sh`): N real routers in this process, each on its own
//! loopback address (127.1.x.y, the registry port the same everywhere, as on nodes), each
//! bootstrapped to three seeds only. Every node announces its keys at the same moment (a
//! DaemonSet rollout, an image pulled everywhere); then lookups of random keys from random
//! other nodes, at two moments after the announcement. Prints one table row per node
//! count: the share of keys found (by the holder's peer id), lookup latency to the first
//! holder, announcements retried and given up, connections per node, and memory.
//!
//! This is the routing layer alone (no registry, store or upstream) and N swarms share
//! this machine's cores, so times are inflated; the shares are what it is for.
//!
//! Usage: p2p-scale [NODES,...] [OUT_DIR] (default 10,40,60; with OUT_DIR, the table also
//! goes to OUT_DIR/scale.md and a plot of found share and lookup latency against node
//! count to OUT_DIR/scale.svg)

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use mirrorlet_oci::Router;
use mirrorlet_routing::{P2pConfig, P2pMetrics, P2pRouter};
use tokio_util::sync::CancellationToken;

const KEYS: usize = 20;
const LOOKUPS: usize = 200;
/// How long a lookup may take here (generous: N swarms share the cores).
const LOOKUP_LIMIT: Duration = Duration::from_millis(2000);
/// When the lookups run, after every node announced.
const AFTER: [Duration; 2] = [Duration::from_secs(15), Duration::from_secs(45)];

struct Node {
    router: P2pRouter,
    metrics: P2pMetrics,
    addr: Multiaddr,
    task: tokio::task::JoinHandle<()>,
}

async fn start(k: usize, seeds: Vec<Multiaddr>, shutdown: &CancellationToken) -> Result<Node> {
    let ip = [127, 1, u8::try_from(k / 250)?, u8::try_from(k % 250 + 1)?];
    let mut cfg = P2pConfig::new(SocketAddr::from((ip, 0)), 5000, Keypair::generate_ed25519());
    cfg.bootstrap = seeds;
    cfg.rebootstrap = Duration::from_secs(1);
    let metrics = P2pMetrics::default();
    let (router, task) =
        P2pRouter::start(cfg, metrics.clone(), shutdown.child_token()).context("router starts")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(addr) = router.listen_addrs().await?.into_iter().next() {
            return Ok(Node {
                router,
                metrics,
                addr,
                task,
            });
        }
        anyhow::ensure!(Instant::now() < deadline, "node {k} does not listen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn key(node: usize, i: usize) -> String {
    format!("sha256:{node:05}{i:059}")
}

/// A small deterministic generator (the same lookups in every run).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        usize::try_from(self.0 >> 33).unwrap_or(0) % n
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

/// What one node count measured (for the plot): found share and p99 latency, per moment.
struct Row {
    nodes: usize,
    found: [f64; 2],
    p99_ms: [f64; 2],
    line: String,
}

async fn run(n: usize) -> Result<Row> {
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let mut nodes: Vec<Node> = Vec::new();
    for k in 0..n {
        let seeds = nodes.iter().take(3).map(|s| s.addr.clone()).collect();
        nodes.push(start(k, seeds, &shutdown).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for node in &nodes {
        while node.router.status().await?.connected_peers < 3.min(n - 1) {
            anyhow::ensure!(Instant::now() < deadline, "nodes do not connect");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let start_s = started.elapsed().as_secs_f64();

    let announced = Instant::now();
    let all = nodes.iter().enumerate().map(|(k, node)| {
        node.router
            .advertise((0..KEYS).map(|i| key(k, i)).collect())
    });
    for r in futures_util::future::join_all(all).await {
        r?;
    }
    let mut rng = Lcg(7);
    let mut cells = Vec::new();
    let mut found_share = [0.0; 2];
    let mut p99 = [f64::NAN; 2];
    for (moment, after) in AFTER.into_iter().enumerate() {
        tokio::time::sleep(after.saturating_sub(announced.elapsed())).await;
        let mut found = 0;
        let mut latencies = Vec::new();
        for _ in 0..LOOKUPS {
            let holder = rng.below(n);
            let asker = (holder + 1 + rng.below(n - 1)) % n;
            let want = nodes[holder].router.peer_id().to_string();
            let t = Instant::now();
            let mut peers = nodes[asker].router.lookup(&key(holder, rng.below(KEYS)));
            let hit = tokio::time::timeout(LOOKUP_LIMIT, async {
                while let Some(p) = peers.next().await {
                    if p.id == want {
                        return true;
                    }
                }
                false
            })
            .await
            .unwrap_or(false);
            if hit {
                found += 1;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
        }
        latencies.sort_by(f64::total_cmp);
        found_share[moment] = found as f64 * 100.0 / LOOKUPS as f64;
        p99[moment] = percentile(&latencies, 0.99);
        cells.push(format!(
            "{:>5.1}% (p50 {:>5.1} ms, p99 {:>6.1} ms)",
            found as f64 * 100.0 / LOOKUPS as f64,
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.99)
        ));
    }
    let retries: u64 = nodes.iter().map(|x| x.metrics.announce_retries.get()).sum();
    let gave_up: u64 = nodes
        .iter()
        .map(|x| x.metrics.announce_failures.get())
        .sum();
    let mut conns = Vec::new();
    for node in &nodes {
        conns.push(node.router.status().await?.connected_peers);
    }
    // The whole process's memory over this count's nodes: an upper bound (what earlier,
    // smaller counts left in the allocator is included).
    let per_node_kib = rss_kib() / n as u64;
    let line = format!(
        "| {n:>5} | {} | {} | {retries:>5} / {gave_up} of {} | {:>4} / {:>4} | {per_node_kib:>6} KiB | {start_s:>5.1} s |",
        cells[0],
        cells[1],
        n * KEYS,
        conns.iter().sum::<usize>() / n,
        conns.iter().max().copied().unwrap_or(0),
    );
    println!("{line}");
    shutdown.cancel();
    for node in nodes {
        let _ = node.task.await;
    }
    Ok(Row {
        nodes: n,
        found: found_share,
        p99_ms: p99,
        line,
    })
}

/// Found share (left) and p99 lookup latency (right) against node count, at both moments.
fn plot(rows: &[Row], path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    // Each moment's points, leaving out values there are none of.
    let series = |value: fn(&Row, usize) -> f64| {
        [0, 1].map(|m| {
            rows.iter()
                .filter(|r| value(r, m).is_finite())
                .map(|r| (r.nodes as f64, value(r, m)))
                .collect::<Vec<_>>()
        })
    };
    let max_ms = rows
        .iter()
        .flat_map(|r| r.p99_ms)
        .filter(|v| v.is_finite())
        .fold(1.0, f64::max)
        * 1.1;
    panel(
        &left,
        rows,
        "keys found (every node announcing at once)",
        ("% of lookups finding the holder", 105.0),
        series(|r, m| r.found[m]),
        SeriesLabelPosition::LowerLeft,
    )?;
    panel(
        &right,
        rows,
        "lookup latency to the holder, p99",
        ("ms", max_ms),
        series(|r, m| r.p99_ms[m]),
        SeriesLabelPosition::UpperLeft,
    )?;
    root.present()?;
    Ok(())
}

/// One chart: a line per moment after the announcement, against node count.
fn panel(
    area: &plotters::drawing::DrawingArea<
        plotters::backend::SVGBackend<'_>,
        plotters::coord::Shift,
    >,
    rows: &[Row],
    caption: &str,
    (y_desc, y_max): (&str, f64),
    lines: [Vec<(f64, f64)>; 2],
    legend: plotters::chart::SeriesLabelPosition,
) -> Result<()> {
    use plotters::prelude::*;
    let max_n = rows.iter().map(|r| r.nodes).max().unwrap_or(10) as f64 * 1.05;
    let colors = [RGBColor(230, 120, 20), RGBColor(30, 110, 200)];
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..max_n, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("nodes")
        .y_desc(y_desc)
        .draw()?;
    for ((points, color), after) in lines.into_iter().zip(colors).zip(AFTER) {
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(format!("{} s after", after.as_secs()))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(legend)
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let counts: Vec<usize> = match args.next() {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().parse().context("node counts, e.g. 10,40,60"))
            .collect::<Result<_>>()?,
        None => vec![10, 40, 60],
    };
    anyhow::ensure!(
        counts.iter().all(|&n| (2..=1000).contains(&n)),
        "node counts from 2 to 1000"
    );
    let out = args.next().map(std::path::PathBuf::from);
    let head = format!(
        "{KEYS} keys per node, announced by every node at once; {LOOKUPS} lookups of a random key from a random other node, found within {LOOKUP_LIMIT:?}\n\
         | nodes | found {:?} after (latency) | found {:?} after (latency) | announcements retried / given up | connections per node (mean / max) | process RSS per node (upper bound) | start-up |\n\
         |---|---|---|---|---|---|---|",
        AFTER[0], AFTER[1]
    );
    println!("{head}");
    let mut rows = Vec::new();
    for n in counts {
        rows.push(run(n).await?);
    }
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)?;
        let table: Vec<&str> = rows.iter().map(|r| r.line.as_str()).collect();
        std::fs::write(
            dir.join("scale.md"),
            format!("{head}\n{}\n", table.join("\n")),
        )?;
        plot(&rows, &dir.join("scale.svg"))?;
        println!(
            "wrote {} and {}",
            dir.join("scale.md").display(),
            dir.join("scale.svg").display()
        );
    }
    Ok(())
}

//! Idle memory with 10,000 keys (`e2e/bench/keys-memory.sh`): two agents on the namespace
//! cluster (real containerd). Node 1's containerd is given 100 images of 98 small layers
//! each (imported with `ctr`, so 10,100 keys: 9,800 layers, 100 configs, 100 manifests,
//! 100 tags); node 1 advertises them and node 2 stores their provider records (with fewer
//! than 20 nodes every node stores every record). Resident memory of both agents is read
//! idle before the import and idle after every key is advertised and stored; then node
//! 1's agent is restarted (a node starting with the keys already in its store, without
//! the import's burst behind it) and read again, in one run.
//! Usage: keys-memory [OUT (target/keys-memory)]

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use mirrorlet_e2e::images::write_layout;
use mirrorlet_e2e::process::{resident, run};
use mirrorlet_e2e::wait::wait_until;
use mirrorlet_e2e::{Cluster, Options, TestImage, deps};

const IMAGES: usize = 100;
const LAYERS: usize = 98;
/// Layers, configs, manifests and tags.
const KEYS: usize = IMAGES * (LAYERS + 3);
const REPO: &str = "bench/keys";

/// Both agents' resident memory, after a quiet while (longer than the agent's period for
/// giving freed memory back, 10 s).
async fn idle(c: &Cluster) -> Result<[u64; 2]> {
    tokio::time::sleep(Duration::from_secs(15)).await;
    let mut rss = [0; 2];
    for (i, r) in rss.iter_mut().enumerate() {
        let pid = c.node(i + 1).agent_pid().context("the agent's pid")?;
        *r = resident(pid)?.0;
    }
    Ok(rss)
}

/// Waits until node 1 advertises every key, has no announcement left to make, and node 2
/// stores a record of each.
async fn settled(c: &Cluster) -> Result<()> {
    let (n1, n2) = (c.node(1), c.node(2));
    wait_until(
        Duration::from_secs(600),
        "every key advertised and stored",
        || async {
            let advertised = n1.metric("mirrorlet_p2p_advertised_keys", &[]).await;
            let stored = n2.metric("mirrorlet_p2p_provider_records", &[]).await;
            let pending = n1.metric("mirrorlet_p2p_announcements_pending", &[]).await;
            matches!((advertised, stored, pending), (Ok(a), Ok(s), Ok(p))
            if a as usize >= KEYS && s as usize >= KEYS && p == 0.0)
        },
    )
    .await
}

#[tokio::main]
async fn main() -> Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/keys-memory".into()),
    );
    std::fs::create_dir_all(&out)?;
    let mut c = Cluster::start(Options {
        nodes: 2,
        ..Options::default()
    })
    .await?;
    c.wait_members().await?;
    let before = idle(&c).await?;

    let images: Vec<TestImage> = (0..IMAGES)
        .map(|i| TestImage::single(REPO, &format!("t{i:03}"), &[16; LAYERS]))
        .collect();
    let cache = deps::image_cache();
    std::fs::create_dir_all(&cache)?;
    let layout = write_layout(&cache, &format!("keys-{IMAGES}x{LAYERS}"), &images)?;
    let archive = c.dir().join("keys.tar");
    let (layout_s, archive_s) = (layout.display().to_string(), archive.display().to_string());
    run("tar", &["-C", &layout_s, "-cf", &archive_s, "."])?;
    let base = format!("docker.io/{REPO}");
    c.node(1).ctr(&[
        "images",
        "import",
        "--no-unpack",
        "--base-name",
        &base,
        &archive_s,
    ])?;

    settled(&c).await?;
    let after = idle(&c).await?;
    c.node_mut(1).stop_agent();
    c.node_mut(1).start_agent().await?;
    settled(&c).await?;
    let restarted = idle(&c).await?;

    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let table = format!(
        "| agent | idle, no keys | idle, {KEYS} keys (after the import) | idle, {KEYS} keys (node 1 restarted) |\n|---|---|---|---|\n\
         | node 1 (holds and advertises the keys) | {:.1} MiB | {:.1} MiB | {:.1} MiB |\n\
         | node 2 (stores node 1's provider records) | {:.1} MiB | {:.1} MiB | {:.1} MiB |\n",
        mib(before[0]),
        mib(after[0]),
        mib(restarted[0]),
        mib(before[1]),
        mib(after[1]),
        mib(restarted[1]),
    );
    print!("{table}");
    std::fs::write(out.join("keys-memory.md"), &table)?;
    let _ = c.teardown();
    Ok(())
}

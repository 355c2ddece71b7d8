//! Stream memory (`e2e/bench/stream-memory.sh`): one agent on the namespace cluster (real
//! containerd, a 256 MiB layer on the node) measured twice in one run, with the default
//! `--stream-memory` (64 MiB) and with it out of the way (64 GiB, as before the budget):
//! resident memory idle, its peak while 16 clients read the layer at full speed, its peak
//! while 64 clients ask for it and read nothing (held 8 s, less than the 30 s send stall
//! timeout) and 16 readers read it meanwhile (their time says whether the stalled
//! clients' share starves them), and 15 s after they are gone.
//! Usage: stream-memory [OUT (target/stream-memory)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use mirrorlet_e2e::process::resident;
use mirrorlet_e2e::{Cluster, REGISTRY, TestImage};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const READERS: usize = 16;
const STALLED: usize = 64;
const LAYER: u64 = 256 << 20;

/// Peak resident memory of `pid` while `work` runs, sampled every 20 ms.
async fn peak_while<F: std::future::Future<Output = Result<()>>>(pid: u32, work: F) -> Result<u64> {
    let peak = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                if let Ok((rss, _)) = resident(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let result = work.await;
    done.store(true, Ordering::Relaxed);
    sampler.await?;
    result.map(|()| peak.load(Ordering::Relaxed))
}

struct Figures {
    idle: u64,
    readers: u64,
    read_secs: f64,
    stalled: u64,
    contended_secs: f64,
    after: u64,
}

/// `READERS` clients reading `blob` (of `size` bytes) whole at once; the seconds it took.
async fn read_all(http: &reqwest::Client, blob: &str, size: u64) -> Result<f64> {
    let started = Instant::now();
    let reads = (0..READERS).map(|_| async move {
        let mut body = http
            .get(blob)
            .send()
            .await?
            .error_for_status()?
            .bytes_stream();
        let mut got = 0_u64;
        while let Some(chunk) = body.next().await {
            got += chunk?.len() as u64;
        }
        anyhow::ensure!(got == size, "read {got} of {size} bytes");
        Ok::<_, anyhow::Error>(())
    });
    for r in futures_util::future::join_all(reads).await {
        r?;
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn measure(budget: &str) -> Result<Figures> {
    let image = TestImage::single("bench/streams", "v1", &[LAYER]);
    let args = vec!["--stream-memory".into(), budget.into()];
    let (c, body) = Cluster::holding(&image, args).await?;
    let node = c.node(1);
    let url = |what: &str| {
        format!(
            "{}/v2/{}/{what}?ns={REGISTRY}",
            node.agent_url(),
            image.repo
        )
    };
    let layer = body["layers"][0]["digest"]
        .as_str()
        .context("layer")?
        .to_owned();
    let size = body["layers"][0]["size"].as_u64().context("size")?;
    let blob = url(&format!("blobs/{layer}"));
    let pid = node.agent_pid().context("the agent's pid")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = resident(pid)?.0;

    let mut read_secs = 0.0;
    let readers = peak_while(pid, async {
        read_secs = read_all(&c.http, &blob, size).await?;
        Ok(())
    })
    .await?;

    let addr = node.agent_url().trim_start_matches("http://").to_owned();
    let path = format!("/v2/{}/blobs/{layer}?ns={REGISTRY}", image.repo);
    let mut contended_secs = 0.0;
    let stalled = peak_while(pid, async {
        let mut held = Vec::new();
        for _ in 0..STALLED {
            let mut s = TcpStream::connect(&addr).await?;
            s.write_all(
                format!(
                    "GET {path} HTTP/1.1\r\nhost: {addr}\r\nuser-agent: containerd/bench\r\n\r\n"
                )
                .as_bytes(),
            )
            .await?;
            // The head and the first bytes, then nothing more is read.
            let mut buf = [0_u8; 4096];
            let _ = s.read(&mut buf).await?;
            held.push(s);
        }
        let started = Instant::now();
        contended_secs = read_all(&c.http, &blob, size).await?;
        tokio::time::sleep(Duration::from_secs(8).saturating_sub(started.elapsed())).await;
        drop(held);
        Ok(())
    })
    .await?;
    // Longer than the agent's period for giving freed memory back (10 s).
    tokio::time::sleep(Duration::from_secs(15)).await;
    let after = resident(pid)?.0;
    Ok(Figures {
        idle,
        readers,
        read_secs,
        stalled,
        contended_secs,
        after,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "target/stream-memory".into()),
    );
    std::fs::create_dir_all(&out)?;
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    let mut table = format!(
        "| --stream-memory | idle RSS | peak, {READERS} readers of {} MiB (time) | peak, {STALLED} stalled clients and {READERS} readers (readers' time) | 15 s after |\n|---|---|---|---|---|\n",
        LAYER >> 20
    );
    for (label, budget) in [
        ("64 MiB (default)", "67108864"),
        ("64 GiB (no bound)", "68719476736"),
    ] {
        let f = measure(budget).await?;
        table.push_str(&format!(
            "| {label} | {:.0} MiB | {:.0} MiB ({:.1} s) | {:.0} MiB ({:.1} s) | {:.0} MiB |\n",
            mib(f.idle),
            mib(f.readers),
            f.read_secs,
            mib(f.stalled),
            f.contended_secs,
            mib(f.after)
        ));
        println!("{label}: done");
    }
    print!("{table}");
    std::fs::write(out.join("stream-memory.md"), &table)?;
    Ok(())
}

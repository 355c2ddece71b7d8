//! Soak (`e2e/bench/soak.sh`): one agent on the namespace cluster (real containerd, the
//! image on the node) under mixed traffic for a bounded time, its resident memory and
//! open descriptors sampled every 15 s. The traffic, each kind from a fixed number of
//! clients in a loop until the time is up:
//!
//! - well-behaved: a blob read whole, a manifest by tag and by digest, a miss;
//! - slow: a big blob read at about 160 KiB/s for up to 20 s, then hung up;
//! - stalled: a big blob asked for, the head read, then nothing read for 40 s (longer than
//!   the agent's 30 s send stall timeout);
//! - broken: garbage, a request cut in the middle, bad ranges and names, a hang-up after
//!   the first bytes of a body.
//!
//! Prints the samples as a table (also written to OUT/soak.md) and whether the last third's
//! peaks stay within 10% of the middle third's.
//! Usage: soak [SECONDS (600)] [OUT (target/soak)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mirrorlet_e2e::{Cluster, REGISTRY, TestImage};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const WELL: usize = 4;
const SLOW: usize = 4;
const STALLED: usize = 8;
const BROKEN: usize = 4;

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    slow: AtomicU64,
    stalled: AtomicU64,
    cut_by_agent: AtomicU64,
    broken: AtomicU64,
    errors: AtomicU64,
}

struct Target {
    base: String,
    addr: String,
    repo: String,
    manifest: String,
    blobs: Vec<String>,
    big: String,
}

async fn raw(addr: &str, request: &[u8]) -> Result<TcpStream> {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await??;
    s.write_all(request).await?;
    Ok(s)
}

fn get(t: &Target, path: &str, extra: &str) -> Vec<u8> {
    format!(
        "GET {path}?ns={REGISTRY} HTTP/1.1\r\nhost: {}\r\nuser-agent: containerd/soak\r\n{extra}connection: close\r\n\r\n",
        t.addr
    )
    .into_bytes()
}

async fn well_behaved(t: &Target, http: &reqwest::Client, n: &Counts, i: usize) -> Result<()> {
    let blob = &t.blobs[i % t.blobs.len()];
    let u = |p: &str| format!("{}/v2/{}/{p}?ns={REGISTRY}", t.base, t.repo);
    for url in [
        u(&format!("blobs/{blob}")),
        u("manifests/v1"),
        u(&format!("manifests/{}", t.manifest)),
    ] {
        let r = http.get(&url).send().await?;
        anyhow::ensure!(r.status().is_success(), "{url}: {}", r.status());
        r.bytes().await?;
    }
    let miss = http.get(u("manifests/nobody-has-this")).send().await?;
    anyhow::ensure!(miss.status() == 404, "a miss: {}", miss.status());
    n.ok.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn slow(t: &Target, n: &Counts) -> Result<()> {
    let mut s = raw(
        &t.addr,
        &get(t, &format!("/v2/{}/blobs/{}", t.repo, t.big), ""),
    )
    .await?;
    let mut buf = vec![0_u8; 16 * 1024];
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if s.read(&mut buf).await? == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    n.slow.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn stalled(t: &Target, n: &Counts) -> Result<()> {
    let mut s = raw(
        &t.addr,
        &get(t, &format!("/v2/{}/blobs/{}", t.repo, t.big), ""),
    )
    .await?;
    let mut head = [0_u8; 512];
    let _ = s.read(&mut head).await?;
    tokio::time::sleep(Duration::from_secs(40)).await;
    // Whatever the buffers held, then the end the agent made.
    let mut buf = vec![0_u8; 1 << 20];
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while s.read(&mut buf).await.is_ok_and(|k| k > 0) {}
    })
    .await
    .is_ok();
    if ended {
        n.cut_by_agent.fetch_add(1, Ordering::Relaxed);
    }
    n.stalled.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn broken(t: &Target, n: &Counts, round: u64) -> Result<()> {
    let blob = format!("/v2/{}/blobs/{}", t.repo, t.big);
    let requests: Vec<Vec<u8>> = vec![
        b"\x16\x03\x01garbage that is not HTTP\r\n\r\n".to_vec(),
        b"GET /v2/x/manifests/".to_vec(),
        get(t, &blob, "range: bytes=99999999999-1\r\n"),
        get(t, &blob, "range: bytes=-0\r\n"),
        get(t, "/v2/../../etc/passwd/blobs/sha256:zz", ""),
        get(t, "/v2/A/manifests/%00", ""),
        get(t, &blob, ""),
    ];
    let req = &requests[usize::try_from(round).unwrap_or(0) % requests.len()];
    let mut s = raw(&t.addr, req).await?;
    let mut buf = [0_u8; 4096];
    // Read a little, then hang up whatever the state of the answer.
    let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await;
    drop(s);
    n.broken.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut argv = std::env::args().skip(1);
    let secs: u64 = argv
        .next()
        .map_or(Ok(600), |s| s.parse())
        .context("SECONDS")?;
    let out = PathBuf::from(argv.next().unwrap_or_else(|| "target/soak".into()));
    std::fs::create_dir_all(&out)?;
    let image = TestImage::single("soak/app", "v1", &[64 << 20, 4 << 20, 300_000]);
    let (c, body) = Cluster::holding(&image, Vec::new()).await?;
    let node = c.node(1);
    let manifest = c
        .upstream_digest(&image.repo, &image.tag)
        .await?
        .to_string();
    let mut blobs = vec![
        body["config"]["digest"]
            .as_str()
            .context("config")?
            .to_owned(),
    ];
    let mut sized: Vec<(u64, String)> = Vec::new();
    for l in body["layers"].as_array().context("layers")? {
        let d = l["digest"].as_str().context("digest")?.to_owned();
        sized.push((l["size"].as_u64().unwrap_or(0), d.clone()));
        blobs.push(d);
    }
    sized.sort();
    let big = sized.last().context("a layer")?.1.clone();
    let base = node.agent_url();
    let addr = base.trim_start_matches("http://").to_owned();
    let t = Arc::new(Target {
        base,
        addr,
        repo: image.repo.clone(),
        manifest,
        blobs,
        big,
    });
    let pid = node.agent_pid().context("the agent's pid")?;
    let counts = Arc::new(Counts::default());
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for kind in 0..4 {
        let clients = [WELL, SLOW, STALLED, BROKEN][kind];
        for i in 0..clients {
            let (t, n, http) = (t.clone(), counts.clone(), c.http.clone());
            tasks.spawn(async move {
                let mut round = 0_u64;
                while Instant::now() < deadline {
                    let r = match kind {
                        0 => well_behaved(&t, &http, &n, i).await,
                        1 => slow(&t, &n).await,
                        2 => stalled(&t, &n).await,
                        _ => broken(&t, &n, round).await,
                    };
                    if let Err(e) = r {
                        n.errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!("client error: {e:#}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    round += 1;
                    if kind == 3 {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            });
        }
    }
    let started = Instant::now();
    let mut samples: Vec<(u64, u64, usize)> = Vec::new();
    let mut table = String::from(
        "| time | agent RSS | open descriptors | well-behaved rounds | slow | stalled (cut by the agent) | broken | client errors |\n|---|---|---|---|---|---|---|---|\n",
    );
    loop {
        let (rss, fds) = mirrorlet_e2e::process::resident(pid)?;
        let at = started.elapsed().as_secs();
        samples.push((at, rss, fds));
        let row = format!(
            "| {at} s | {:.1} MiB | {fds} | {} | {} | {} ({}) | {} | {} |\n",
            rss as f64 / f64::from(1 << 20),
            counts.ok.load(Ordering::Relaxed),
            counts.slow.load(Ordering::Relaxed),
            counts.stalled.load(Ordering::Relaxed),
            counts.cut_by_agent.load(Ordering::Relaxed),
            counts.broken.load(Ordering::Relaxed),
            counts.errors.load(Ordering::Relaxed),
        );
        print!("{row}");
        table.push_str(&row);
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(15).min(deadline - Instant::now())).await;
    }
    // Clients finish their current round (a stalled one takes up to 50 s).
    let _ = tokio::time::timeout(Duration::from_secs(90), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    let (rss, fds) = mirrorlet_e2e::process::resident(pid)?;
    let third = samples.len() / 3;
    let peak = |s: &[(u64, u64, usize)]| {
        (
            s.iter().map(|x| x.1).max().unwrap_or(0),
            s.iter().map(|x| x.2).max().unwrap_or(0),
        )
    };
    let (mid_rss, mid_fds) = peak(&samples[third..2 * third]);
    let (end_rss, end_fds) = peak(&samples[2 * third..]);
    let verdict = format!(
        "\npeak RSS {:.1} MiB in the middle third, {:.1} MiB in the last; descriptors {mid_fds} and {end_fds}; after the clients ended: {:.1} MiB, {fds} descriptors; {}\n",
        mid_rss as f64 / f64::from(1 << 20),
        end_rss as f64 / f64::from(1 << 20),
        rss as f64 / f64::from(1 << 20),
        if end_rss <= mid_rss + mid_rss / 10 && end_fds <= mid_fds + 8 {
            "the last third within 10% of the middle third"
        } else {
            "GROWING: the last third more than 10% above the middle third"
        }
    );
    print!("{verdict}");
    table.push_str(&verdict);
    std::fs::write(out.join("soak.md"), table)?;
    Ok(())
}

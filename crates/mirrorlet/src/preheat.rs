//! `mirrorlet preheat IMAGE...`: pulls images into this node's containerd through its CRI
//! image service, the way kubelet pulls, so the pulls go through hosts.toml to the agent
//! and the whole cluster fetches each image from its registry once. Progress comes from
//! containerd's downloads under way (its ingests): a redrawn line on a terminal, a line
//! every few seconds otherwise.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use mirrorlet_containerd::cri::Cri;
use mirrorlet_containerd::{Config as ContainerdConfig, ContainerdStore};
use mirrorlet_oci::ImageName;
use tokio::sync::Semaphore;

use crate::cli::PreheatArgs;

/// How long to wait for the agent to be ready before pulling anyway.
const AGENT_WAIT: Duration = Duration::from_secs(120);
/// Longest wait for containerd's list of downloads, for progress.
const PROGRESS_WAIT: Duration = Duration::from_secs(1);

/// Pulls the images; fails naming those that could not be pulled.
pub(crate) async fn run(args: &PreheatArgs) -> anyhow::Result<()> {
    let images: Vec<ImageName> = args.images.iter().filter_map(|i| i.0.clone()).collect();
    anyhow::ensure!(
        !images.is_empty(),
        "name at least one image, e.g. mirrorlet preheat nginx:1.25"
    );
    if !args.agent_url.is_empty() {
        wait_for_agent(&args.agent_url).await;
    }
    let cri = Cri::new(&args.containerd_socket);
    // containerd's downloads, for progress (the CRI's namespace).
    let store = ContainerdStore::new(ContainerdConfig {
        socket: args.containerd_socket.clone(),
        namespace: "k8s.io".into(),
        content_dir: None,
        media_type_cache: std::num::NonZeroUsize::MIN,
        // Preheat sends no content.
        stream_budget: mirrorlet_oci::Budget::default(),
    });
    let slots = Arc::new(Semaphore::new(args.parallel as usize));
    let started = Instant::now();
    let mut pulls: FuturesUnordered<_> = images
        .iter()
        .map(|image| {
            let (cri, slots, name) = (cri.clone(), slots.clone(), image.to_string());
            let limit = args.timeout;
            async move {
                let _slot = slots.acquire_owned().await;
                let t = Instant::now();
                let result = cri.pull(&name, limit).await;
                (name, t.elapsed(), result)
            }
        })
        .collect();
    let mut progress = Progress::new(images.len());
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut failed = Vec::new();
    while !pulls.is_empty() {
        tokio::select! {
            Some((name, took, result)) = pulls.next() => {
                progress.clear();
                match result {
                    Ok(id) => println!("pulled {name} in {:.1}s ({id})", took.as_secs_f64()),
                    Err(e) => {
                        println!("FAILED {name}: {e}");
                        failed.push(name);
                    }
                }
                progress.done += 1;
            }
            _ = tick.tick() => {
                // Bounded, so that a wedged content API cannot stop the pulls' own timeouts.
                if let Ok(Ok(ingests)) = tokio::time::timeout(PROGRESS_WAIT, store.ingests()).await {
                    progress.show(&ingests, started.elapsed());
                }
            }
        }
    }
    progress.clear();
    anyhow::ensure!(
        failed.is_empty(),
        "{} of {} images not pulled: {}",
        failed.len(),
        images.len(),
        failed.join(", ")
    );
    println!(
        "{} images on this node in {:.1}s",
        images.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Waits (bounded) until the agent answers `/readyz` with 200.
async fn wait_for_agent(url: &str) {
    let ready = format!("{}/readyz", url.trim_end_matches('/'));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap_or_default();
    let deadline = Instant::now() + AGENT_WAIT;
    loop {
        if let Ok(r) = http.get(&ready).send().await
            && r.status().is_success()
        {
            return;
        }
        if Instant::now() > deadline {
            tracing::warn!(%ready, "the agent is not ready; pulling anyway (straight from the registries)");
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The progress line.
struct Progress {
    images: usize,
    done: usize,
    terminal: bool,
    last_line: Option<Instant>,
    shown: bool,
}

impl Progress {
    fn new(images: usize) -> Self {
        Self {
            images,
            done: 0,
            terminal: std::io::stdout().is_terminal(),
            last_line: None,
            shown: false,
        }
    }

    fn show(&mut self, ingests: &[mirrorlet_containerd::Ingest], elapsed: Duration) {
        let have: u64 = ingests.iter().map(|i| i.offset).sum();
        let want: u64 = ingests.iter().map(|i| i.total).sum();
        let mib = |n: u64| n as f64 / f64::from(1u32 << 20);
        let line = format!(
            "{}/{} images, {:.0}s: {} downloads under way, {:.1} of {:.1} MiB",
            self.done,
            self.images,
            elapsed.as_secs_f64(),
            ingests.len(),
            mib(have),
            mib(want)
        );
        if self.terminal {
            print!("\r\x1b[2K{line}");
            let _ = std::io::stdout().flush();
            self.shown = true;
        } else if self
            .last_line
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
        {
            println!("{line}");
            self.last_line = Some(Instant::now());
        }
    }

    /// Clears the redrawn line before other output.
    fn clear(&mut self) {
        if self.terminal && self.shown {
            print!("\r\x1b[2K");
            let _ = std::io::stdout().flush();
            self.shown = false;
        }
    }
}

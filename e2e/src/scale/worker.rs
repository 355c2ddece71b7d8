//! A worker process of the scale harness: hosts agents FIRST..END and answers one command
//! per line on its standard input (see [`run`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{FutureExt, StreamExt};
use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use mirrorlet_oci::{MemoryStore, Registry, Router};
use mirrorlet_registry::server::{self, Limits};
use mirrorlet_registry::{AppState, Metrics, PeerConfig, PullThroughConfig};
use mirrorlet_routing::advertiser::{self, AdvertiserConfig, InventoryMetrics};
use mirrorlet_routing::{P2pConfig, P2pMetrics, P2pRouter};
use mirrorlet_upstream::{Client, UpstreamConfig, UpstreamMetrics};
use tokio_util::sync::CancellationToken;

use super::{HTTP_PORT, KEYS, LOOKUP_LIMIT, REPO, UPSTREAM, blob, ip, key};

struct Agent {
    router: P2pRouter,
    metrics: P2pMetrics,
    addr: Multiaddr,
    http: SocketAddr,
    shutdown: CancellationToken,
    router_task: tokio::task::JoinHandle<()>,
    registry: Arc<prometheus_client::registry::Registry>,
}

async fn start_agent(k: usize, seeds: Vec<Multiaddr>, upstream_url: &str) -> Result<Agent> {
    let http = SocketAddr::from((ip(k), HTTP_PORT));
    let listener = tokio::net::TcpListener::bind(http)
        .await
        .with_context(|| format!("binding {http}"))?;
    let mut cfg = P2pConfig::new(
        SocketAddr::from((ip(k), 0)),
        HTTP_PORT,
        Keypair::generate_ed25519(),
    );
    cfg.bootstrap = seeds;
    // An experiment's knob: SCALE_REPLICATION=5 (say) stores each key on 5 nodes.
    if let Some(r) = std::env::var("SCALE_REPLICATION")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.replication = r;
    }
    let shutdown = CancellationToken::new();
    let metrics = P2pMetrics::default();
    let (router, router_task) =
        P2pRouter::start(cfg, metrics.clone(), shutdown.child_token()).context("router starts")?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics_of_registry = Metrics::register(&mut registry);
    let registry = Arc::new(registry);
    let upstream_registry = Registry::parse(UPSTREAM)?;
    let upstream = Client::new(
        UpstreamConfig {
            registries: vec![upstream_registry.clone()],
            endpoints: [(upstream_registry, upstream_url.parse()?)].into(),
            ..UpstreamConfig::default()
        },
        UpstreamMetrics::default(),
    )?;
    let state = AppState::new(
        Arc::new(MemoryStore::new()),
        Arc::new(router.clone()),
        // Requests to peers come from the agent's own address, as on a node.
        PeerConfig {
            source_address: Some(ip(k).into()),
            ..PeerConfig::default()
        },
        metrics_of_registry,
        registry.clone(),
        Arc::new(|| async { Ok(()) }.boxed()),
    )?
    .with_upstream(Arc::new(upstream), PullThroughConfig::default(), 1 << 30);
    // As the agent does: what the node's store and its pull-through cache hold is
    // advertised as it arrives.
    tokio::spawn(advertiser::run(
        state.store.clone(),
        Arc::new(router.clone()),
        AdvertiserConfig {
            tag_excludes: Vec::new(),
            revalidated: vec![UPSTREAM.to_owned()],
            ..AdvertiserConfig::default()
        },
        InventoryMetrics::default(),
        shutdown.child_token(),
    ));
    tokio::spawn(server::serve(
        listener,
        mirrorlet_registry::app(Arc::new(state)),
        Limits::default(),
        shutdown.child_token(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    let addr = loop {
        if let Some(addr) = router.listen_addrs().await?.into_iter().next() {
            break addr;
        }
        anyhow::ensure!(Instant::now() < deadline, "agent {k} does not listen");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    Ok(Agent {
        router,
        metrics,
        addr,
        http,
        shutdown,
        router_task,
        registry,
    })
}

/// The sum over `agents` of the registry series named `name` (a full series, labels
/// included, as the text format writes it).
fn series_sum<'a>(agents: impl Iterator<Item = &'a Agent>, name: &str) -> f64 {
    let mut sum = 0.0;
    for a in agents {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &a.registry).is_err() {
            continue;
        }
        sum += text
            .lines()
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(n, _)| *n == name)
            .filter_map(|(_, v)| v.parse::<f64>().ok())
            .sum::<f64>();
    }
    sum
}

/// The series a `fetch` reports: how the nodes got the blob.
const FETCH_SERIES: [&str; 10] = [
    "mirrorlet_pullthrough_owner_redirects_total",
    "mirrorlet_peer_busy_answers_total",
    "mirrorlet_peer_busy_refusals_total",
    "mirrorlet_pullthrough_fetches_total{kind=\"blob\",role=\"fetched\"}",
    "mirrorlet_pullthrough_fetches_total{kind=\"blob\",role=\"followed\"}",
    "mirrorlet_pullthrough_upstream_blob_requests_total{reason=\"owner\"}",
    "mirrorlet_pullthrough_upstream_blob_requests_total{reason=\"asked\"}",
    "mirrorlet_pullthrough_upstream_blob_requests_total{reason=\"owners-busy\"}",
    "mirrorlet_pullthrough_upstream_blob_requests_total{reason=\"owners-failed\"}",
    "mirrorlet_pullthrough_upstream_blob_requests_total{reason=\"resume\"}",
];

/// Looks up `key` from `router`; whether `want` (a peer id) came back, and how fast (ms).
pub(crate) async fn lookup(router: &P2pRouter, key: &str, want: &str) -> (bool, f64) {
    let t = Instant::now();
    let mut peers = router.lookup(key);
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
    (hit, t.elapsed().as_secs_f64() * 1000.0)
}

fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The lines of `input`, read on a thread of their own (std I/O: the workspace's tokio has
/// neither `process` nor `io-std`).
pub(crate) fn lines_of(
    input: impl std::io::BufRead + Send + 'static,
) -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        for line in input.lines() {
            let Ok(line) = line else { break };
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Hosts agents `first..end`, bootstrapped to `seeds` (`-`: the first three of its own,
/// which it prints), pulling through from `upstream_url`; then answers commands:
///
/// - `announce`: every agent advertises its [`KEYS`] keys at once;
/// - `advertise K KEY`, `lookup K KEY PEER_ID` (found, and in how many ms);
/// - `findable KEY PEER_ID`: every agent here looks `KEY` up at once; how many found
///   `PEER_ID` among how many asked (the holder itself does not ask);
/// - `fetch ROUND`: every agent asks its own registry for blob `ROUND` at once; how many
///   got the right bytes, and what the [`FETCH_SERIES`] rose by;
/// - `stats`: agents, connections, routing table, memory, descriptors, announcements,
///   provider records, announcements pending;
/// - `kill K...`, `quit`.
pub async fn run(first: usize, end: usize, seeds: &str, upstream_url: &str) -> Result<()> {
    // RUST_LOG=mirrorlet_registry=debug (say) shows the agents' logs on standard error.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let digests: Vec<String> = (0..super::ROUNDS)
        .map(|r| mirrorlet_oci::Digest::sha256_of(&blob(r)).to_string())
        .collect();
    let mut seeds: Vec<Multiaddr> = if seeds == "-" {
        Vec::new()
    } else {
        seeds
            .split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .context("seed addresses")?
    };
    let own_seeds = seeds.is_empty();
    let mut agents: Vec<Option<Agent>> = Vec::new();
    for k in first..end {
        let agent = start_agent(k, seeds.clone(), upstream_url).await?;
        if own_seeds && seeds.len() < 3 {
            seeds.push(agent.addr.clone());
            if seeds.len() == 3 || k + 1 == end {
                let list: Vec<String> = seeds.iter().map(ToString::to_string).collect();
                println!("seeds {}", list.join(","));
            }
        }
        agents.push(Some(agent));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    for a in agents.iter().flatten().skip(usize::from(own_seeds)) {
        while a.metrics.routing_table_peers.get() == 0 {
            anyhow::ensure!(Instant::now() < deadline, "agents do not join");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let ids: Vec<String> = agents
        .iter()
        .flatten()
        .map(|a| a.router.peer_id().to_string())
        .collect();
    println!("ready {}", ids.join(" "));

    let http = reqwest::Client::builder().no_proxy().build()?;
    let mut lines = lines_of(std::io::BufReader::new(std::io::stdin()));
    while let Some(line) = lines.recv().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let agent = |k: &str| -> Result<&Agent> {
            let k: usize = k.parse()?;
            agents
                .get(k - first)
                .and_then(Option::as_ref)
                .with_context(|| format!("agent {k} here and alive"))
        };
        let reply = match words.as_slice() {
            ["announce"] => {
                let all = agents.iter().enumerate().filter_map(|(i, a)| {
                    let a = a.as_ref()?;
                    Some(
                        a.router
                            .advertise((0..KEYS).map(|j| key(first + i, j)).collect()),
                    )
                });
                for r in futures_util::future::join_all(all).await {
                    r?;
                }
                "ok".to_owned()
            }
            ["advertise", k, key] => {
                agent(k)?.router.advertise(vec![(*key).to_owned()]).await?;
                "ok".to_owned()
            }
            ["lookup", k, key, want] => {
                let (hit, ms) = lookup(&agent(k)?.router, key, want).await;
                format!("ok {} {ms:.3}", u8::from(hit))
            }
            ["findable", key, want] => {
                let askers: Vec<&Agent> = agents
                    .iter()
                    .flatten()
                    .filter(|a| a.router.peer_id().to_string() != *want)
                    .collect();
                let all = askers.iter().map(|a| lookup(&a.router, key, want));
                let found = futures_util::future::join_all(all)
                    .await
                    .into_iter()
                    .filter(|(hit, _)| *hit)
                    .count();
                format!("ok {found} {}", askers.len())
            }
            ["fetch", round] => {
                let round: u8 = round.parse()?;
                let digest = digests.get(usize::from(round)).context("no such round")?;
                let want = blob(round);
                let before: Vec<f64> = FETCH_SERIES
                    .iter()
                    .map(|s| series_sum(agents.iter().flatten(), s))
                    .collect();
                let all = agents.iter().flatten().map(|a| {
                    let url = format!("http://{}/v2/{REPO}/blobs/{digest}?ns={UPSTREAM}", a.http);
                    let (http, want) = (&http, &want);
                    async move {
                        let got = async {
                            http.get(url).send().await?.error_for_status()?.bytes().await
                        };
                        matches!(tokio::time::timeout(Duration::from_secs(60), got).await, Ok(Ok(b)) if b == *want)
                    }
                });
                let ok = futures_util::future::join_all(all)
                    .await
                    .into_iter()
                    .filter(|x| *x)
                    .count();
                let rose: Vec<String> = FETCH_SERIES
                    .iter()
                    .zip(before)
                    .map(|(s, b)| format!("{}", series_sum(agents.iter().flatten(), s) - b))
                    .collect();
                format!("ok {ok} {}", rose.join(" "))
            }
            ["stats"] => {
                let (mut conns, mut table) = (Vec::new(), 0);
                let (mut retries, mut gave_up, mut no_addr, mut records) = (0, 0, 0, 0);
                let mut pending = 0;
                for a in agents.iter().flatten() {
                    conns.push(a.router.status().await?.connected_peers);
                    table += a.metrics.routing_table_peers.get();
                    records += a.metrics.provider_records.get();
                    pending += a.metrics.announcements_pending.get();
                    retries += a.metrics.announce_retries.get();
                    gave_up += a.metrics.announce_failures.get();
                    no_addr += a.metrics.providers_without_address.get();
                }
                let fds = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
                format!(
                    "ok {} {} {} {table} {} {} {fds} {retries} {gave_up} {no_addr} {records} {pending}",
                    conns.len(),
                    conns.iter().sum::<usize>(),
                    conns.iter().max().copied().unwrap_or(0),
                    proc_status_kib("VmRSS:"),
                    proc_status_kib("VmHWM:"),
                )
            }
            ["kill", list @ ..] => {
                for k in list {
                    let k: usize = k.parse()?;
                    if let Some(a) = agents.get_mut(k - first).and_then(Option::take) {
                        a.shutdown.cancel();
                        let _ = a.router_task.await;
                    }
                }
                "ok".to_owned()
            }
            ["quit"] => break,
            _ => bail!("unknown command {line:?}"),
        };
        println!("{reply}");
    }
    for a in agents.into_iter().flatten() {
        a.shutdown.cancel();
        let _ = a.router_task.await;
    }
    Ok(())
}

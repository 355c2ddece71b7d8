//! Scale harness (`make bench-scale`, `e2e/bench/scale.sh`): N agents on this machine, each
//! with its own real libp2p router and its own registry (the real registry code, serving
//! HTTP on its own loopback address 127.1.x.y:5000, the port the same everywhere as on
//! nodes) over an in-memory store, pulling through from an in-memory upstream that counts
//! requests. The agents run in worker processes of up to [`PER_WORKER`] each (one process
//! may hold 20,000 descriptors here); this process drives them over the workers' stdin and
//! stdout. Every agent knows three seeds only.
//!
//! For each node count it measures, and prints as three tables (also written to
//! OUT_DIR/scale.md, with a plot of found share and lookup latency in OUT_DIR/scale.svg):
//! 1. every node announces 20 keys at the same moment (a DaemonSet rollout); 100 lookups
//!    of a random key from a random other node 15 s and 45 s later: the share found (by
//!    the holder's peer id), the share within the registry's 20 ms lookup budget, latency;
//!    then how long a key one node adds takes to be found by 20 random others;
//! 2. connections, routing-table entries, descriptors and memory per node;
//! 3. the single flight: the owners every node ranks for 10 new keys (each distinct first
//!    owner fetches upstream once), and every node asking its own registry for the same
//!    new blob at once (upstream GETs counted); the same after killing 10% of the nodes,
//!    with lookups of keys the dead nodes held (are they still offered?).
//!
//! All agents share this machine's two cores, so latencies are inflated; the shares,
//! counts and per-node resources are what it is for.
//!
//! Usage: p2p-scale [NODES,...] [OUT_DIR] (default 10,50,100)
//!        p2p-scale --worker FIRST END SEEDS (started by the above)

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{FutureExt, StreamExt};
use libp2p::Multiaddr;
use libp2p::identity::Keypair;
use mirrorlet_oci::{MemoryStore, MemoryUpstream, Owner, Registry, Repository, Router};
use mirrorlet_registry::server::{self, Limits};
use mirrorlet_registry::{AppState, Metrics, PeerConfig, PullThroughConfig};
use mirrorlet_routing::advertiser::{self, AdvertiserConfig, InventoryMetrics};
use mirrorlet_routing::{P2pConfig, P2pMetrics, P2pRouter};
use tokio_util::sync::CancellationToken;

const KEYS: usize = 20;
const LOOKUPS: usize = 100;
/// Agents per worker process.
const PER_WORKER: usize = 25;
/// How long a lookup may take here (generous: every agent shares the cores).
const LOOKUP_LIMIT: Duration = Duration::from_millis(2000);
/// The registry's lookup budget (`PeerConfig::default().lookup_timeout`).
const BUDGET_MS: f64 = 20.0;
/// When the lookups run, after every node announced.
const AFTER: [Duration; 2] = [Duration::from_secs(15), Duration::from_secs(45)];
/// The registry port, the same on every agent.
const HTTP_PORT: u16 = 5000;
const UPSTREAM: &str = "example.com";
const REPO: &str = "scale/app";
/// The size of each new blob every node asks for at once.
const BLOB_BYTES: usize = 256 << 10;
/// New keys whose owners every node ranks.
const OWNER_KEYS: usize = 10;

fn ip(k: usize) -> [u8; 4] {
    [127, 1, (k / 250) as u8, (k % 250 + 1) as u8]
}

fn key(node: usize, i: usize) -> String {
    format!("sha256:{node:05}{i:059}")
}

/// The `round`th blob every node asks for (the same bytes in every worker).
fn blob(round: u8) -> bytes::Bytes {
    (0..BLOB_BYTES)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .wrapping_add(u32::from(round)) as u8
        })
        .collect::<Vec<_>>()
        .into()
}

/// A small deterministic generator (the same choices in every run).
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

// ---------------------------------------------------------------------------------------
// Worker: hosts agents FIRST..END and answers one command per line.

struct Agent {
    router: P2pRouter,
    metrics: P2pMetrics,
    addr: Multiaddr,
    http: SocketAddr,
    shutdown: CancellationToken,
    router_task: tokio::task::JoinHandle<()>,
    registry: Arc<prometheus_client::registry::Registry>,
}

async fn start_agent(
    k: usize,
    seeds: Vec<Multiaddr>,
    upstream: Arc<MemoryUpstream>,
) -> Result<Agent> {
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
    let shutdown = CancellationToken::new();
    let metrics = P2pMetrics::default();
    let (router, router_task) =
        P2pRouter::start(cfg, metrics.clone(), shutdown.child_token()).context("router starts")?;
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics_of_registry = Metrics::register(&mut registry);
    let registry = Arc::new(registry);
    let state = AppState::new(
        Arc::new(MemoryStore::new()),
        Arc::new(router.clone()),
        PeerConfig::default(),
        metrics_of_registry,
        registry.clone(),
        Arc::new(|| async { Ok(()) }.boxed()),
    )?
    .with_upstream(upstream, PullThroughConfig::default(), 1 << 30);
    // As the agent does: what the node's store and its pull-through cache hold is
    // advertised as it arrives.
    tokio::spawn(advertiser::run(
        state.store.clone(),
        Arc::new(router.clone()),
        AdvertiserConfig {
            tag_excludes: Vec::new(),
            revalidated: vec![UPSTREAM.to_owned()],
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

/// The registry series about pull-through and peers, summed over `agents`, one per line
/// (for the worker's standard error: why a fetch went where it went).
fn registry_series<'a>(agents: impl Iterator<Item = &'a Agent>) -> String {
    let mut sums: std::collections::BTreeMap<String, f64> = std::collections::BTreeMap::new();
    for a in agents {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &a.registry).is_err() {
            continue;
        }
        for line in text.lines().filter(|l| {
            l.starts_with("mirrorlet_pullthrough_fetches")
                || l.starts_with("mirrorlet_peer_busy")
                || l.starts_with("mirrorlet_peer_failures")
        }) {
            if let Some((name, v)) = line.rsplit_once(' ')
                && let Ok(v) = v.parse::<f64>()
                && v > 0.0
            {
                *sums.entry(name.to_owned()).or_default() += v;
            }
        }
    }
    sums.iter().map(|(k, v)| format!("  {k} {v}\n")).collect()
}

/// Looks up `key` from `router`; whether `want` (a peer id) came back, and how fast.
async fn lookup(router: &P2pRouter, key: &str, want: &str) -> (bool, f64) {
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

async fn worker(first: usize, end: usize, seeds: &str) -> Result<()> {
    // RUST_LOG=mirrorlet_registry=debug (say) shows the agents' logs on standard error.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let (r, p) = (Registry::parse(UPSTREAM)?, Repository::parse(REPO)?);
    let upstream = Arc::new(MemoryUpstream::new([r.clone()]));
    let mut digests = Vec::new();
    for round in 0..2u8 {
        digests.push(
            upstream
                .put(&r, &p, "application/octet-stream", blob(round))
                .digest,
        );
    }
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
        let agent = start_agent(k, seeds.clone(), upstream.clone()).await?;
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
            ["owners", key] => {
                let all = agents.iter().flatten().map(|a| async move {
                    match a.router.owners(key).await {
                        Ok(list) => match list.first() {
                            Some(Owner::Peer(p)) => p.id.clone(),
                            _ => a.router.peer_id().to_string(),
                        },
                        Err(_) => "error".to_owned(),
                    }
                });
                let firsts = futures_util::future::join_all(all).await;
                format!("ok {}", firsts.join(" "))
            }
            ["fetch", round] => {
                let round: usize = round.parse()?;
                let digest = digests.get(round).context("round 0 or 1")?;
                let want = blob(u8::try_from(round)?);
                let before = upstream.count(mirrorlet_oci::upstream::RequestKind::Blob);
                let all = agents.iter().flatten().map(|a| {
                    let url = format!("http://{}/v2/{REPO}/blobs/{digest}?ns={UPSTREAM}", a.http);
                    let (http, want) = (&http, &want);
                    async move {
                        let got = async { http.get(url).send().await?.error_for_status()?.bytes().await };
                        matches!(tokio::time::timeout(Duration::from_secs(60), got).await, Ok(Ok(b)) if b == *want)
                    }
                });
                let ok = futures_util::future::join_all(all)
                    .await
                    .into_iter()
                    .filter(|x| *x)
                    .count();
                let gets = upstream.count(mirrorlet_oci::upstream::RequestKind::Blob) - before;
                eprint!(
                    "worker {first}: fetch {round}: {gets} upstream GETs\n{}",
                    registry_series(agents.iter().flatten())
                );
                format!("ok {ok} {gets}")
            }
            ["stats"] => {
                let (mut conns, mut table) = (Vec::new(), 0);
                let (mut retries, mut gave_up, mut no_addr) = (0, 0, 0);
                for a in agents.iter().flatten() {
                    conns.push(a.router.status().await?.connected_peers);
                    table += a.metrics.routing_table_peers.get();
                    retries += a.metrics.announce_retries.get();
                    gave_up += a.metrics.announce_failures.get();
                    no_addr += a.metrics.providers_without_address.get();
                }
                let fds = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
                format!(
                    "ok {} {} {} {table} {} {} {fds} {retries} {gave_up} {no_addr}",
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

// ---------------------------------------------------------------------------------------
// Driver.

/// The lines of `input`, read on a thread of their own (std I/O: the workspace's tokio has
/// neither `process` nor `io-std`).
fn lines_of(input: impl std::io::BufRead + Send + 'static) -> tokio::sync::mpsc::Receiver<String> {
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

struct Worker {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: tokio::sync::mpsc::Receiver<String>,
}

impl Worker {
    fn spawn(first: usize, end: usize, seeds: &str) -> Result<Self> {
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["--worker", &first.to_string(), &end.to_string(), seeds])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting a worker")?;
        let stdin = child.stdin.take().context("stdin")?;
        let lines = lines_of(std::io::BufReader::new(
            child.stdout.take().context("stdout")?,
        ));
        Ok(Self {
            child,
            stdin,
            lines,
        })
    }

    async fn line(&mut self) -> Result<String> {
        tokio::time::timeout(Duration::from_secs(300), self.lines.recv())
            .await
            .context("a worker took over 300 s to answer")?
            .context("a worker ended")
    }

    async fn send(&mut self, cmd: &str) -> Result<()> {
        writeln!(self.stdin, "{cmd}")?;
        Ok(self.stdin.flush()?)
    }

    /// Sends a command and returns the words of its answer after `ok`.
    async fn ask(&mut self, cmd: &str) -> Result<Vec<String>> {
        self.send(cmd).await?;
        self.answer(cmd).await
    }

    async fn answer(&mut self, cmd: &str) -> Result<Vec<String>> {
        let line = self.line().await?;
        let mut words = line.split_whitespace().map(str::to_owned);
        anyhow::ensure!(words.next().as_deref() == Some("ok"), "{cmd}: {line}");
        Ok(words.collect())
    }
}

struct Cluster {
    workers: Vec<Worker>,
    ids: Vec<String>,
    dead: HashSet<usize>,
}

impl Cluster {
    async fn start(n: usize) -> Result<Self> {
        let mut first = Worker::spawn(0, n.min(PER_WORKER), "-")?;
        let line = first.line().await?;
        let seeds = line
            .strip_prefix("seeds ")
            .with_context(|| format!("seeds from the first worker: {line}"))?
            .to_owned();
        let mut workers = vec![first];
        let mut k = PER_WORKER;
        while k < n {
            workers.push(Worker::spawn(k, (k + PER_WORKER).min(n), &seeds)?);
            k += PER_WORKER;
        }
        let mut ids = Vec::new();
        for w in &mut workers {
            let line = w.line().await?;
            let list = line
                .strip_prefix("ready ")
                .with_context(|| format!("a worker starts: {line}"))?;
            ids.extend(list.split_whitespace().map(str::to_owned));
        }
        anyhow::ensure!(ids.len() == n, "{} of {n} agents started", ids.len());
        Ok(Self {
            workers,
            ids,
            dead: HashSet::new(),
        })
    }

    fn worker_of(&mut self, k: usize) -> &mut Worker {
        &mut self.workers[k / PER_WORKER]
    }

    /// Sends `cmd` to every worker at once, then collects the answers.
    async fn everyone(&mut self, cmd: &str) -> Result<Vec<Vec<String>>> {
        for w in &mut self.workers {
            w.send(cmd).await?;
        }
        let mut out = Vec::new();
        for w in &mut self.workers {
            out.push(w.answer(cmd).await?);
        }
        Ok(out)
    }

    fn alive(&self, rng: &mut Lcg) -> usize {
        loop {
            let k = rng.below(self.ids.len());
            if !self.dead.contains(&k) {
                return k;
            }
        }
    }

    async fn lookup(&mut self, asker: usize, key: &str, want: usize) -> Result<(bool, f64)> {
        let cmd = format!("lookup {asker} {key} {}", self.ids[want]);
        let a = self.worker_of(asker).ask(&cmd).await?;
        Ok((a[0] == "1", a[1].parse()?))
    }

    /// Lookups of random keys of random holders (`dead` ones or live ones) from random
    /// live nodes: (found share %, share within the budget %, sorted latencies of hits).
    async fn lookups(
        &mut self,
        count: usize,
        rng: &mut Lcg,
        dead: bool,
    ) -> Result<(f64, f64, Vec<f64>)> {
        let holders: Vec<usize> = (0..self.ids.len())
            .filter(|k| self.dead.contains(k) == dead)
            .collect();
        let (mut found, mut within, mut ms) = (0, 0, Vec::new());
        for _ in 0..count {
            let holder = holders[rng.below(holders.len())];
            let asker = loop {
                let a = self.alive(rng);
                if a != holder {
                    break a;
                }
            };
            let (hit, t) = self
                .lookup(asker, &key(holder, rng.below(KEYS)), holder)
                .await?;
            if hit {
                found += 1;
                within += usize::from(t <= BUDGET_MS);
                ms.push(t);
            }
        }
        ms.sort_by(f64::total_cmp);
        let share = |x: usize| x as f64 * 100.0 / count as f64;
        Ok((share(found), share(within), ms))
    }

    /// How many distinct first owners the live nodes rank for each of `OWNER_KEYS` new
    /// keys (mean, max), and how many of those firsts are dead nodes.
    async fn owners(&mut self, tag: &str) -> Result<(f64, usize, usize)> {
        let dead: HashSet<String> = self.dead.iter().map(|k| self.ids[*k].clone()).collect();
        let (mut total, mut max, mut on_dead) = (0, 0, 0);
        for i in 0..OWNER_KEYS {
            let answers = self
                .everyone(&format!("owners sha256:{tag}-owner-{i}"))
                .await?;
            let firsts: HashSet<String> = answers
                .into_iter()
                .flatten()
                .filter(|a| a != "error")
                .collect();
            on_dead += firsts.iter().filter(|f| dead.contains(*f)).count();
            total += firsts.len();
            max = max.max(firsts.len());
        }
        Ok((total as f64 / OWNER_KEYS as f64, max, on_dead))
    }

    /// Every live node asks its registry for blob `round` at once: (nodes served the
    /// right bytes, upstream GETs).
    async fn fetch(&mut self, round: usize) -> Result<(usize, usize)> {
        let mut ok = 0;
        let mut gets = 0;
        for a in self.everyone(&format!("fetch {round}")).await? {
            ok += a[0].parse::<usize>()?;
            gets += a[1].parse::<usize>()?;
        }
        Ok((ok, gets))
    }

    /// Seconds until 20 random live nodes find a key one node just added.
    async fn findable(&mut self, rng: &mut Lcg, tag: &str) -> Result<Option<f64>> {
        let holder = self.alive(rng);
        let key = format!("sha256:{tag}-fresh");
        let askers: Vec<usize> = (0..20)
            .map(|_| {
                loop {
                    let a = self.alive(rng);
                    if a != holder {
                        break a;
                    }
                }
            })
            .collect();
        let t = Instant::now();
        self.worker_of(holder)
            .ask(&format!("advertise {holder} {key}"))
            .await?;
        let mut waiting: Vec<usize> = askers;
        while !waiting.is_empty() {
            if t.elapsed() > Duration::from_secs(60) {
                return Ok(None);
            }
            let mut still = Vec::new();
            for a in waiting {
                if !self.lookup(a, &key, holder).await?.0 {
                    still.push(a);
                }
            }
            waiting = still;
        }
        Ok(Some(t.elapsed().as_secs_f64()))
    }

    async fn stats(&mut self) -> Result<Stats> {
        let mut s = Stats::default();
        for a in self.everyone("stats").await? {
            let v: Vec<u64> = a.iter().map(|w| w.parse()).collect::<Result<_, _>>()?;
            s.nodes += v[0];
            s.conns += v[1];
            s.conns_max = s.conns_max.max(v[2]);
            s.table += v[3];
            s.rss_kib += v[4];
            s.hwm_kib += v[5];
            s.fds += v[6];
            s.retries += v[7];
            s.gave_up += v[8];
            s.no_addr += v[9];
        }
        Ok(s)
    }

    async fn kill(&mut self, victims: &[usize]) -> Result<()> {
        let mut by_worker: HashMap<usize, Vec<String>> = HashMap::new();
        for k in victims {
            by_worker
                .entry(k / PER_WORKER)
                .or_default()
                .push(k.to_string());
            self.dead.insert(*k);
        }
        for (w, list) in by_worker {
            self.workers[w]
                .ask(&format!("kill {}", list.join(" ")))
                .await?;
        }
        Ok(())
    }

    async fn stop(mut self) {
        for w in &mut self.workers {
            let _ = w.send("quit").await;
        }
        for w in &mut self.workers {
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(w.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = w.child.kill();
            let _ = w.child.wait();
        }
    }
}

#[derive(Default)]
struct Stats {
    nodes: u64,
    conns: u64,
    conns_max: u64,
    table: u64,
    rss_kib: u64,
    hwm_kib: u64,
    fds: u64,
    retries: u64,
    gave_up: u64,
    no_addr: u64,
}

/// What one node count measured: the three table rows and the plot's points.
struct Row {
    nodes: usize,
    found: [f64; 2],
    p99_ms: [f64; 2],
    lines: [String; 3],
}

fn ms_cell(found: f64, within: f64, ms: &[f64]) -> String {
    format!(
        "{found:>5.1}% ({within:.1}% in {BUDGET_MS} ms; p50 {:.1}, p99 {:.1}, max {:.1} ms)",
        percentile(ms, 0.5),
        percentile(ms, 0.99),
        ms.last().copied().unwrap_or(f64::NAN)
    )
}

async fn run(n: usize) -> Result<Row> {
    let started = Instant::now();
    let phase = |what: &str| {
        eprintln!(
            "[{n} nodes, {:>4.0} s] {what}",
            started.elapsed().as_secs_f64()
        )
    };
    let mut c = Cluster::start(n).await?;
    let start_s = started.elapsed().as_secs_f64();
    phase("started; every node announces");
    let mut rng = Lcg(7);

    let announced = Instant::now();
    c.everyone("announce").await?;
    let announce_s = announced.elapsed().as_secs_f64();
    let mut cells = Vec::new();
    let (mut found, mut p99) = ([0.0; 2], [f64::NAN; 2]);
    for (m, after) in AFTER.into_iter().enumerate() {
        tokio::time::sleep(after.saturating_sub(announced.elapsed())).await;
        phase(&format!("lookups {} s after announcing", after.as_secs()));
        let (share, within, ms) = c.lookups(LOOKUPS, &mut rng, false).await?;
        found[m] = share;
        p99[m] = percentile(&ms, 0.99);
        cells.push(ms_cell(share, within, &ms));
    }
    phase("a new key");
    let findable = c.findable(&mut rng, "a").await?;
    let stats = c.stats().await?;
    phase("owners and a blob every node asks for");
    let (owners_mean, owners_max, _) = c.owners("a").await?;
    let (served, gets) = c.fetch(0).await?;
    let after_fetch = c.stats().await?;

    // Kill every tenth node, then look again.
    let victims: Vec<usize> = (0..n).filter(|k| k % 10 == 5).collect();
    phase("killing 10%");
    c.kill(&victims).await?;
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(killed.elapsed())).await;
    let (live_found, _, _) = c.lookups(100, &mut rng, false).await?;
    let (dead_10s, _, _) = if victims.is_empty() {
        (f64::NAN, 0.0, Vec::new())
    } else {
        c.lookups(100, &mut rng, true).await?
    };
    let (k_owners_mean, k_owners_max, k_on_dead) = c.owners("b").await?;
    let (k_served, k_gets) = c.fetch(1).await?;
    tokio::time::sleep(Duration::from_secs(40).saturating_sub(killed.elapsed())).await;
    let (dead_40s, _, _) = if victims.is_empty() {
        (f64::NAN, 0.0, Vec::new())
    } else {
        c.lookups(100, &mut rng, true).await?
    };
    // Connections once nothing has happened for longer than the idle timeout.
    phase("resting");
    tokio::time::sleep(Duration::from_secs(35)).await;
    let at_rest = c.stats().await?;
    c.stop().await;

    let per = |x: u64| x as f64 / stats.nodes.max(1) as f64;
    let lines = [
        format!(
            "| {n:>5} | {} | {} | {} |",
            cells[0],
            cells[1],
            findable.map_or("not within 60 s".to_owned(), |s| format!("{s:.1} s")),
        ),
        format!(
            "| {n:>5} | {start_s:.0} s / {announce_s:.0} s | {:.1} / {} | {:.1} / {} | {:.1} / {} | {:.0} | {:.1} | {:.0} MiB ({:.1} MiB peak) | {} / {} of {} | {} |",
            per(stats.conns),
            stats.conns_max,
            per(after_fetch.conns),
            after_fetch.conns_max,
            at_rest.conns as f64 / at_rest.nodes.max(1) as f64,
            at_rest.conns_max,
            per(stats.table),
            per(stats.fds),
            per(after_fetch.rss_kib) / 1024.0,
            per(after_fetch.hwm_kib) / 1024.0,
            stats.retries,
            stats.gave_up,
            n * KEYS,
            after_fetch.no_addr,
        ),
        format!(
            "| {n:>5} | {owners_mean:.1} / {owners_max} | {gets} ({served} of {n} served) | {live_found:.0}% | {dead_10s:.0}% / {dead_40s:.0}% | {k_owners_mean:.1} / {k_owners_max} ({k_on_dead} dead) | {k_gets} ({k_served} of {} served) |",
            n - victims.len(),
        ),
    ];
    for l in &lines {
        println!("{l}");
    }
    Ok(Row {
        nodes: n,
        found,
        p99_ms: p99,
        lines,
    })
}

const HEADS: [&str; 3] = [
    "| nodes | found 15 s after every node announced | found 45 s after | a new key found by 20 random nodes after |\n|---|---|---|---|",
    "| nodes | start-up / announcing | connections per node during lookups (mean / max) | after every node fetched a blob | at rest (35 s later) | routing-table entries per node | descriptors per node | memory per agent | announcements retried / given up | providers without an address |\n|---|---|---|---|---|---|---|---|---|---|",
    "| nodes | owners ranked per new key (mean / max) | upstream GETs when every node asks for a new blob at once | after killing 10%: live holders found | dead holders still offered 10 s / 40 s after | owners per new key | upstream GETs for a new blob |\n|---|---|---|---|---|---|---|",
];

/// Found share (left) and p99 lookup latency (right) against node count, at both moments.
fn plot(rows: &[Row], path: &std::path::Path) -> Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
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
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worker") {
        let [_, first, end, seeds] = args.as_slice() else {
            bail!("usage: p2p-scale --worker FIRST END SEEDS");
        };
        return worker(first.parse()?, end.parse()?, seeds).await;
    }
    let counts: Vec<usize> = match args.first() {
        Some(list) => list
            .split(',')
            .map(|s| s.trim().parse().context("node counts, e.g. 10,100,1000"))
            .collect::<Result<_>>()?,
        None => vec![10, 50, 100],
    };
    anyhow::ensure!(
        counts.iter().all(|&n| (2..=1000).contains(&n)),
        "node counts from 2 to 1000"
    );
    let out = args.get(1).map(std::path::PathBuf::from);
    println!(
        "{KEYS} keys per node, announced by every node at once; {LOOKUPS} lookups of a random key from a random other node, found within {LOOKUP_LIMIT:?}"
    );
    let mut rows = Vec::new();
    for n in counts {
        rows.push(run(n).await?);
    }
    let tables: Vec<String> = (0..3)
        .map(|t| {
            let body: Vec<&str> = rows.iter().map(|r| r.lines[t].as_str()).collect();
            format!("{}\n{}\n", HEADS[t], body.join("\n"))
        })
        .collect();
    let text = tables.join("\n");
    println!("\n{text}");
    std::io::stdout().flush()?;
    if let Some(dir) = out {
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("scale.md"), &text)?;
        plot(&rows, &dir.join("scale.svg"))?;
        println!(
            "wrote {} and {}",
            dir.join("scale.md").display(),
            dir.join("scale.svg").display()
        );
    }
    Ok(())
}

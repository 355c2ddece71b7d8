//! The scale harness's driver: starts the upstream and the worker processes, sends them
//! commands, and measures ([`measure`] for `make bench-scale`, [`check`] for the test
//! suite).

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::origin::Origin;
use super::worker::lines_of;
use super::{BUDGET_MS, KEYS, Lcg, PER_WORKER, ROUNDS, blob, key, percentile};

struct Worker {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: tokio::sync::mpsc::Receiver<String>,
}

impl Worker {
    fn spawn(exe: &Path, first: usize, end: usize, seeds: &str, upstream: &str) -> Result<Self> {
        let mut child = std::process::Command::new(exe)
            .args([
                "--worker",
                &first.to_string(),
                &end.to_string(),
                seeds,
                upstream,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting a worker ({})", exe.display()))?;
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

    fn send(&mut self, cmd: &str) -> Result<()> {
        writeln!(self.stdin, "{cmd}")?;
        Ok(self.stdin.flush()?)
    }

    /// Sends a command and returns the words of its answer after `ok`.
    async fn ask(&mut self, cmd: &str) -> Result<Vec<String>> {
        self.send(cmd)?;
        self.answer(cmd).await
    }

    async fn answer(&mut self, cmd: &str) -> Result<Vec<String>> {
        let line = self.line().await?;
        let mut words = line.split_whitespace().map(str::to_owned);
        anyhow::ensure!(words.next().as_deref() == Some("ok"), "{cmd}: {line}");
        Ok(words.collect())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// N agents in worker processes, and their upstream.
pub struct Cluster {
    workers: Vec<Worker>,
    ids: Vec<String>,
    dead: HashSet<usize>,
    origin: Origin,
}

/// How the nodes got one new blob they all asked for at once.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fetch {
    /// Nodes that got the right bytes (within 60 s).
    pub served: usize,
    /// Nodes asked.
    pub asked: usize,
    /// GETs of the blob the upstream registry answered.
    pub upstream_gets: usize,
    /// Redirects followed to an owner closer to the digest.
    pub redirects: f64,
    /// Busy answers (an agent streaming to as many peers as it may named its readers).
    pub busy: f64,
    /// Nodes that fetched it from upstream for the cluster.
    pub fetched: f64,
    /// Nodes that read it from another agent's copy.
    pub followed: f64,
    /// Why nodes asked upstream themselves: as owner, asked as owner, owners busy, owners
    /// failed, resuming (`mirrorlet_pullthrough_upstream_blob_requests_total`).
    pub why: [f64; 5],
}

/// Per-node resources, summed over the live agents.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Live agents.
    pub nodes: u64,
    /// Open connections, summed.
    pub conns: u64,
    /// The most any agent had open.
    pub conns_max: u64,
    /// Routing-table entries, summed.
    pub table: u64,
    /// Resident memory of the worker processes, KiB.
    pub rss_kib: u64,
    /// Their peak resident memory, KiB.
    pub hwm_kib: u64,
    /// Their open descriptors.
    pub fds: u64,
    /// Announcements retried.
    pub retries: u64,
    /// Announcements given up.
    pub gave_up: u64,
    /// Providers found but left out for want of an address.
    pub no_addr: u64,
    /// Provider records held, summed.
    pub records: u64,
    /// Announcements queued or running, summed.
    pub pending: u64,
}

impl Stats {
    /// `x` per live agent.
    pub fn per(&self, x: u64) -> f64 {
        x as f64 / self.nodes.max(1) as f64
    }
}

impl Cluster {
    /// Starts `n` agents in worker processes of `exe` (the `p2p-scale` binary), pulling
    /// through from an upstream of this process.
    pub async fn start(n: usize, exe: &Path) -> Result<Self> {
        let origin = Origin::start((0..ROUNDS).map(blob)).await?;
        let up = origin.url();
        let mut first = Worker::spawn(exe, 0, n.min(PER_WORKER), "-", &up)?;
        let line = first.line().await?;
        let seeds = line
            .strip_prefix("seeds ")
            .with_context(|| format!("seeds from the first worker: {line}"))?
            .to_owned();
        let mut workers = vec![first];
        let mut k = PER_WORKER;
        while k < n {
            workers.push(Worker::spawn(exe, k, (k + PER_WORKER).min(n), &seeds, &up)?);
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
            origin,
        })
    }

    fn worker_of(&mut self, k: usize) -> &mut Worker {
        &mut self.workers[k / PER_WORKER]
    }

    /// Sends `cmd` to every worker at once, then collects the answers.
    async fn everyone(&mut self, cmd: &str) -> Result<Vec<Vec<String>>> {
        for w in &mut self.workers {
            w.send(cmd)?;
        }
        let mut out = Vec::new();
        for w in &mut self.workers {
            out.push(w.answer(cmd).await?);
        }
        Ok(out)
    }

    /// Every node announces its keys at once.
    pub async fn announce(&mut self) -> Result<()> {
        self.everyone("announce").await.map(drop)
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
    pub async fn lookups(
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

    /// Every live node asks its registry for blob `round` at once.
    pub async fn fetch(&mut self, round: u8) -> Result<Fetch> {
        let digest = mirrorlet_oci::Digest::sha256_of(&blob(round)).to_string();
        let before = self.origin.gets(&digest);
        let mut f = Fetch {
            asked: self.ids.len() - self.dead.len(),
            ..Fetch::default()
        };
        for a in self.everyone(&format!("fetch {round}")).await? {
            let v: Vec<f64> = a.iter().map(|w| w.parse()).collect::<Result<_, _>>()?;
            f.served += v[0] as usize;
            f.redirects += v[1];
            f.busy += v[2];
            f.fetched += v[4];
            f.followed += v[5];
            for (w, x) in f.why.iter_mut().zip(&v[6..11]) {
                *w += x;
            }
        }
        f.upstream_gets = self.origin.gets(&digest) - before;
        Ok(f)
    }

    /// Seconds until every other live node finds a key one node just added (`None`: not
    /// within 60 s), and the share that found it at the first try.
    pub async fn findable(&mut self, rng: &mut Lcg, tag: &str) -> Result<(Option<f64>, f64)> {
        let holder = self.alive(rng);
        let key = format!("sha256:{tag}-fresh");
        let t = Instant::now();
        self.worker_of(holder)
            .ask(&format!("advertise {holder} {key}"))
            .await?;
        let want = self.ids[holder].clone();
        let mut first_share = None;
        loop {
            let (mut found, mut asked) = (0, 0);
            for a in self.everyone(&format!("findable {key} {want}")).await? {
                found += a[0].parse::<usize>()?;
                asked += a[1].parse::<usize>()?;
            }
            let share = found as f64 * 100.0 / asked.max(1) as f64;
            let first = *first_share.get_or_insert(share);
            if found == asked {
                return Ok((Some(t.elapsed().as_secs_f64()), first));
            }
            if t.elapsed() > Duration::from_secs(60) {
                return Ok((None, first));
            }
        }
    }

    /// Resources per node.
    pub async fn stats(&mut self) -> Result<Stats> {
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
            s.records += v[10];
            s.pending += v[11];
        }
        Ok(s)
    }

    /// Waits until no node has an announcement queued or running (at most `limit`); how
    /// long that took, if it happened.
    pub async fn settle(&mut self, limit: Duration) -> Result<Option<f64>> {
        let t = Instant::now();
        while self.stats().await?.pending > 0 {
            if t.elapsed() > limit {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Ok(Some(t.elapsed().as_secs_f64()))
    }

    /// Kills the agents `victims` (their routers and registries stop at once).
    pub async fn kill(&mut self, victims: &[usize]) -> Result<()> {
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

    /// Stops every worker (killed if one does not end within 30 s).
    pub async fn stop(mut self) {
        for w in &mut self.workers {
            let _ = w.send("quit");
        }
        for w in &mut self.workers {
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(w.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Every tenth node (those killed to see what the rest do without them).
pub fn victims(n: usize) -> Vec<usize> {
    (0..n).filter(|k| k % 10 == 5).collect()
}

/// What [`check`] measured.
#[derive(Debug)]
pub struct Check {
    /// Share of lookups that found the holder 20 s after every node announced, %.
    pub found: f64,
    /// Seconds until every other node found a key one node added.
    pub findable_s: Option<f64>,
    /// Every node asking for one new blob at once.
    pub fetch: Fetch,
    /// Share of lookups of live holders that found them after 10% were killed, %.
    pub found_after_kill: f64,
    /// Every live node asking for another new blob after 10% were killed.
    pub fetch_after_kill: Fetch,
    /// Providers found but left out for want of an address.
    pub without_address: u64,
}

/// The suite's scale check: `n` agents announce at once; lookups 20 s later; a new key
/// until every node finds it; every node asking for one new blob at once; the same after
/// killing 10%.
pub async fn check(n: usize, exe: &Path) -> Result<Check> {
    let mut c = Cluster::start(n, exe).await?;
    let mut rng = Lcg(11);
    let announced = Instant::now();
    c.announce().await?;
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(announced.elapsed())).await;
    let (found, _, _) = c.lookups(50, &mut rng, false).await?;
    let (findable_s, _) = c.findable(&mut rng, "check").await?;
    let fetch = c.fetch(0).await?;
    c.kill(&victims(n)).await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let (found_after_kill, _, _) = c.lookups(50, &mut rng, false).await?;
    let fetch_after_kill = c.fetch(1).await?;
    let without_address = c.stats().await?.no_addr;
    c.stop().await;
    Ok(Check {
        found,
        findable_s,
        fetch,
        found_after_kill,
        fetch_after_kill,
        without_address,
    })
}

/// What [`measure`] found for one node count: the three table rows and the plot's points.
pub struct Row {
    /// Node count.
    pub nodes: usize,
    /// Found share 15 s and 45 s after announcing, and once every announcement ended, %.
    pub found: [f64; 3],
    /// p99 lookup latency then, ms.
    pub p99_ms: [f64; 3],
    /// The rows of [`super::report::HEADS`].
    pub lines: [String; 3],
}

/// When the first lookups run, after every node announced.
pub const AFTER: [Duration; 2] = [Duration::from_secs(15), Duration::from_secs(45)];
/// How long the announcements may take to end before the last lookups run anyway.
pub const SETTLE_LIMIT: Duration = Duration::from_secs(20 * 60);

/// `make bench-scale` for `n` agents.
pub async fn measure(n: usize, exe: &Path) -> Result<Row> {
    use super::report::ms_cell;
    let started = Instant::now();
    let phase = |what: &str| {
        eprintln!(
            "[{n} nodes, {:>4.0} s] {what}",
            started.elapsed().as_secs_f64()
        );
    };
    let mut c = Cluster::start(n, exe).await?;
    let start_s = started.elapsed().as_secs_f64();
    phase("started; every node announces");
    let mut rng = Lcg(7);

    let announced = Instant::now();
    c.announce().await?;
    let announce_s = announced.elapsed().as_secs_f64();
    let mut cells = Vec::new();
    let (mut found, mut p99) = ([0.0; 3], [f64::NAN; 3]);
    for (m, after) in AFTER.into_iter().enumerate() {
        tokio::time::sleep(after.saturating_sub(announced.elapsed())).await;
        phase(&format!("lookups {} s after announcing", after.as_secs()));
        let (share, within, ms) = c.lookups(100, &mut rng, false).await?;
        found[m] = share;
        p99[m] = percentile(&ms, 0.99);
        cells.push(ms_cell(share, within, &ms));
    }
    phase("waiting for every announcement to end");
    let settled = c.settle(SETTLE_LIMIT).await?;
    let settled_cell = match settled {
        // Already over when first asked, after the second lookups.
        Some(waited) if waited < 1.0 => format!("within {} s", AFTER[1].as_secs()),
        Some(_) => format!("{:.0} s", announced.elapsed().as_secs_f64()),
        None => format!("not within {} s", SETTLE_LIMIT.as_secs()),
    };
    phase("lookups once settled");
    let (share, within, ms) = c.lookups(100, &mut rng, false).await?;
    found[2] = share;
    p99[2] = percentile(&ms, 0.99);
    cells.push(ms_cell(share, within, &ms));
    phase("a new key, until every node finds it");
    let (findable, first_share) = c.findable(&mut rng, "a").await?;
    let stats = c.stats().await?;
    phase("a blob every node asks for at once");
    let fetch = c.fetch(0).await?;
    let after_fetch = c.stats().await?;

    let victims = victims(n);
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
    let k_fetch = c.fetch(1).await?;
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

    let fetch_cell = |f: &Fetch| {
        let why: Vec<String> = [
            "as owner",
            "asked",
            "owners busy",
            "owners failed",
            "resume",
        ]
        .iter()
        .zip(f.why)
        .filter(|(_, n)| *n > 0.0)
        .map(|(w, n)| format!("{n:.0} {w}"))
        .collect();
        format!(
            "{} ({} of {} served; {:.0} redirects, {:.0} busy answers; upstream: {})",
            f.upstream_gets,
            f.served,
            f.asked,
            f.redirects,
            f.busy,
            why.join(", ")
        )
    };
    let lines = [
        format!(
            "| {n:>5} | {} | {} | {settled_cell} | {} | {} ({first_share:.0}% at once) |",
            cells[0],
            cells[1],
            cells[2],
            findable.map_or("not within 60 s".to_owned(), |s| format!("{s:.1} s")),
        ),
        format!(
            "| {n:>5} | {start_s:.0} s / {announce_s:.0} s | {:.1} / {} | {:.1} / {} | {:.1} / {} | {:.0} | {:.0} | {:.1} | {:.0} MiB ({:.1} MiB peak) | {} / {} of {} | {} |",
            stats.per(stats.conns),
            stats.conns_max,
            after_fetch.per(after_fetch.conns),
            after_fetch.conns_max,
            at_rest.per(at_rest.conns),
            at_rest.conns_max,
            stats.per(stats.table),
            stats.per(stats.records),
            stats.per(stats.fds),
            after_fetch.per(after_fetch.rss_kib) / 1024.0,
            after_fetch.per(after_fetch.hwm_kib) / 1024.0,
            stats.retries,
            stats.gave_up,
            n * KEYS,
            after_fetch.no_addr,
        ),
        format!(
            "| {n:>5} | {} | {live_found:.0}% | {dead_10s:.0}% / {dead_40s:.0}% | {} |",
            fetch_cell(&fetch),
            fetch_cell(&k_fetch),
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

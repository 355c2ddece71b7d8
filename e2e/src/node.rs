//! One simulated Kubernetes node: a network namespace with its own containerd (CRI plugin
//! on, `config_path` pointing at its own certs.d) and a mirrorlet agent.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::deps;
use crate::net::Host;
use crate::process::{Proc, run};
use crate::wait::wait_until;
use mirrorlet_containerd::cri::Cri;

/// The agent's port on every node.
pub const AGENT_PORT: u16 = 5000;
/// The agents' libp2p port.
pub const P2P_PORT: u16 = 5001;
/// The agents' operational port (`/metrics`, `/livez`, `/readyz`).
pub const METRICS_PORT: u16 = 5002;
/// The DNS name that resolves to every node (like the chart's headless Service); each
/// namespace gets it in its own /etc/hosts.
pub const PEERS_NAME: &str = "mirrorlet-peers.e2e.test";
/// The registry name test images are pulled under.
pub const REGISTRY: &str = "registry.e2e.test";

/// A node.
#[derive(Debug)]
pub struct Node {
    /// 1-based index.
    pub index: usize,
    /// Its host (namespace, address).
    pub host: Host,
    /// Its working directory.
    pub dir: PathBuf,
    /// CRI client for its containerd.
    pub cri: Cri,
    agent_args: Vec<String>,
    /// IPv6-only: the agent listens on `[::]`, is reached at the node's IPv6 address, and
    /// that address (given bare, as Kubernetes gives it) is the mirror URL in hosts.toml.
    pub ipv6: bool,
    // Declared before `containerd` so that dropping a node stops the agent first.
    agent: Option<Proc>,
    containerd: Option<Proc>,
}

impl Node {
    /// Prepares the node's directories and containerd config (nothing started yet).
    pub fn new(index: usize, host: Host, dir: &Path, agent_args: Vec<String>) -> Result<Self> {
        for d in ["containerd", "certs.d", "cni/bin", "cni/conf", "opt"] {
            std::fs::create_dir_all(dir.join(d))?;
        }
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"

[grpc]
  address = "{d}/containerd/containerd.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    discard_unpacked_layers = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
"#
        );
        std::fs::write(dir.join("containerd/config.toml"), config)?;
        let cri = Cri::new(&dir.join("containerd/containerd.sock"));
        Ok(Self {
            index,
            host,
            dir: dir.to_owned(),
            cri,
            agent_args,
            ipv6: false,
            agent: None,
            containerd: None,
        })
    }

    /// containerd's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    /// containerd's content directory.
    pub fn content_dir(&self) -> PathBuf {
        self.dir
            .join("containerd/root/io.containerd.content.v1.content")
    }

    /// The certs.d directory (containerd's `config_path`).
    pub fn certs_d(&self) -> PathBuf {
        self.dir.join("certs.d")
    }

    /// The agent's base URL as other hosts reach it.
    pub fn agent_url(&self) -> String {
        format!(
            "http://{}",
            std::net::SocketAddr::new(self.host.ip(self.ipv6), AGENT_PORT)
        )
    }

    /// Starts containerd and waits until its socket answers.
    pub async fn start_containerd(&mut self) -> Result<()> {
        if self.containerd.is_some() {
            return Ok(());
        }
        let _ = std::fs::remove_file(self.socket());
        let args = vec![
            "--config".to_owned(),
            self.dir
                .join("containerd/config.toml")
                .display()
                .to_string(),
        ];
        let log = self.dir.join("containerd.log");
        self.containerd = Some(Proc::spawn(
            &format!("containerd-{}", self.index),
            Some(&self.host.netns),
            Path::new("/usr/bin/containerd"),
            &args,
            &log,
        )?);
        let socket = self.socket();
        let sock = socket.display().to_string();
        wait_until(Duration::from_secs(30), "containerd to start", || {
            let sock = sock.clone();
            async move { run("ctr", &["--address", &sock, "version"]).is_ok() }
        })
        .await
        .with_context(|| {
            format!(
                "containerd log:\n{}",
                self.containerd
                    .as_ref()
                    .map(|p| p.log_tail(30))
                    .unwrap_or_default()
            )
        })
    }

    /// Stops containerd (SIGTERM).
    pub fn stop_containerd(&mut self) {
        if let Some(mut p) = self.containerd.take() {
            p.stop(Duration::from_secs(10));
        }
    }

    /// Starts the agent and waits until it answers `/livez`.
    pub async fn start_agent(&mut self) -> Result<()> {
        if self.agent.is_some() {
            return Ok(());
        }
        let bin = deps::mirrorlet_bin()?;
        let any = if self.ipv6 { "[::]" } else { "0.0.0.0" };
        let mut args: Vec<String> = vec![
            "run".into(),
            "--listen".into(),
            format!("{any}:{AGENT_PORT}"),
            "--metrics-listen".into(),
            format!("{any}:{METRICS_PORT}"),
            "--containerd-socket".into(),
            self.socket().display().to_string(),
            "--containerd-content-dir".into(),
            self.content_dir().display().to_string(),
            "--shutdown-grace".into(),
            "5s".into(),
            "--p2p-listen".into(),
            format!("{any}:{P2P_PORT}"),
            "--data-dir".into(),
            self.dir.join("data").display().to_string(),
            "--spool-dir".into(),
            self.dir.join("spool").display().to_string(),
            "--bootstrap-dns".into(),
            format!("{PEERS_NAME}:{P2P_PORT}"),
        ];
        args.extend(self.agent_args.iter().cloned());
        let log = self.dir.join("agent.log");
        self.agent = Some(Proc::spawn(
            &format!("agent-{}", self.index),
            Some(&self.host.netns),
            &bin,
            &args,
            &log,
        )?);
        let url = format!("{}/livez", self.agent_url());
        crate::process::wait_http_ok(&url, Duration::from_secs(20), "the agent to answer /livez")
            .await
            .with_context(|| format!("agent log:\n{}", self.agent_log_tail(30)))
    }

    /// Restarts the agent (gracefully) with `args` as the flags it gets besides the
    /// harness's own.
    pub async fn restart_agent_with(&mut self, args: Vec<String>) -> Result<()> {
        self.stop_agent();
        self.agent_args = args;
        self.start_agent().await
    }

    /// Stops the agent with SIGTERM (graceful); returns whether it exited in time.
    pub fn stop_agent(&mut self) -> bool {
        self.agent
            .take()
            .is_none_or(|mut p| p.stop(Duration::from_secs(10)))
    }

    /// Kills the agent with SIGKILL.
    pub fn kill_agent(&mut self) {
        if let Some(mut p) = self.agent.take() {
            p.kill();
        }
    }

    /// The agent's process id, while it runs.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Proc::pid)
    }

    /// Whether the agent process is running.
    pub fn agent_running(&mut self) -> bool {
        self.agent.as_mut().is_some_and(Proc::is_running)
    }

    /// The agent's peer id (from its start-up log line).
    pub fn peer_id(&self) -> Option<String> {
        let log = std::fs::read_to_string(self.dir.join("agent.log")).ok()?;
        log.lines().rev().find_map(|l| {
            let (_, rest) = l.split_once("peer_id=")?;
            let id = rest
                .trim_start_matches('"')
                .split(|c: char| c == '"' || c.is_whitespace())
                .next()?;
            Some(id.to_owned())
        })
    }

    /// The whole agent log.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The end of the agent's log.
    pub fn agent_log_tail(&self, lines: usize) -> String {
        self.agent
            .as_ref()
            .map(|p| p.log_tail(lines))
            .unwrap_or_else(|| crate::process::tail_file(&self.dir.join("agent.log"), lines))
    }

    /// The end of containerd's log.
    pub fn containerd_log_tail(&self, lines: usize) -> String {
        self.containerd
            .as_ref()
            .map(|p| p.log_tail(lines))
            .unwrap_or_default()
    }

    /// Writes the user's own hosts.toml (upstream as `server` and as a host) for the test
    /// registry and Docker Hub, as a cluster would have before mirrorlet is installed.
    /// (containerd 1.6 rejects a hosts.toml without a `[host]` table.)
    pub fn write_user_hosts(&self, upstream: &str) -> Result<()> {
        for registry in [REGISTRY, "docker.io"] {
            let dir = self.certs_d().join(registry);
            std::fs::create_dir_all(&dir)?;
            let text = user_hosts_toml(upstream);
            std::fs::write(dir.join("hosts.toml"), text)?;
        }
        Ok(())
    }

    /// Runs `mirrorlet configure` for this node's containerd.
    pub fn configure(&self) -> Result<()> {
        let bin = deps::mirrorlet_bin()?;
        let certs = self.certs_d().display().to_string();
        let registries = format!("{REGISTRY},docker.io");
        let mirror = if self.ipv6 {
            format!("http://{}:{AGENT_PORT}", self.host.addr6)
        } else {
            format!("http://127.0.0.1:{AGENT_PORT}")
        };
        run(
            &bin.display().to_string(),
            &[
                "configure",
                "--config-path",
                &certs,
                "--registries",
                &registries,
                "--mirror-url",
                &mirror,
            ],
        )
        .map(drop)
    }

    /// Runs `mirrorlet cleanup`.
    pub fn cleanup(&self) -> Result<()> {
        let bin = deps::mirrorlet_bin()?;
        let certs = self.certs_d().display().to_string();
        run(
            &bin.display().to_string(),
            &["cleanup", "--config-path", &certs],
        )
        .map(drop)
    }

    /// Pulls with `ctr images pull --hosts-dir` inside the node's namespace.
    pub fn ctr_pull(&self, image: &str) -> Result<()> {
        let sock = self.socket().display().to_string();
        let certs = self.certs_d().display().to_string();
        run(
            "ip",
            &[
                "netns",
                "exec",
                &self.host.netns,
                "timeout",
                "120",
                "ctr",
                "--address",
                &sock,
                "-n",
                "k8s.io",
                "images",
                "pull",
                "--hosts-dir",
                &certs,
                image,
            ],
        )
        .map(drop)
    }

    /// Runs `ctr` (no network) against this node's containerd.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let sock = self.socket().display().to_string();
        let mut all = vec!["--address", &sock, "-n", "k8s.io"];
        all.extend(args);
        run("ctr", &all)
    }

    /// The agent's operational listener (`/metrics`, `/livez`, `/readyz`, `/status`).
    pub fn ops_url(&self) -> String {
        format!(
            "http://{}",
            std::net::SocketAddr::new(self.host.ip(self.ipv6), METRICS_PORT)
        )
    }

    /// The agent's `/metrics` text.
    pub async fn metrics(&self) -> Result<String> {
        let url = format!("{}/metrics", self.agent_url());
        Ok(reqwest::get(&url).await?.error_for_status()?.text().await?)
    }

    /// Sum of the samples of `name` whose labels include every `(label, value)` in `filter`.
    pub async fn metric(&self, name: &str, filter: &[(&str, &str)]) -> Result<f64> {
        Ok(sum_metric(&self.metrics().await?, name, filter))
    }
}

/// The user's hosts.toml that [`Node::write_user_hosts`] writes.
pub fn user_hosts_toml(upstream: &str) -> String {
    format!(
        "# upstream for the e2e cluster\nserver = \"http://{upstream}\"\n\n[host.\"http://{upstream}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
    )
}

/// Sums samples of `name` (exact metric name, e.g. `x_total`) matching `filter`.
pub fn sum_metric(text: &str, name: &str, filter: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let ok = filter
                .iter()
                .all(|(k, v)| labels.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .fold(0.0, |a, b| a + b)
}

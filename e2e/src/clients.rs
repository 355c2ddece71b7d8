//! Other registry clients on a node: a Docker engine (`dockerd` with its own data root and
//! `--registry-mirror` pointing at the node's agent) and podman with a private
//! `registries.conf` naming the agent as each registry's mirror. Both run in the node's
//! network namespace, so they reach the agent as the node's own clients would.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::node::{AGENT_PORT, Node};
use crate::process::{Proc, run};
use crate::wait::wait_until;

/// A command's outcome: its output, or its error output, and how long it took.
#[derive(Debug)]
pub struct Outcome {
    /// Whether it exited 0.
    pub ok: bool,
    /// Standard output and error.
    pub output: String,
    /// How long it ran.
    pub took: Duration,
}

/// Runs `program args` in `netns` with `env`, for at most `limit`.
fn run_in(
    netns: &str,
    env: &[(&str, &str)],
    program: &str,
    args: &[&str],
    limit: Duration,
) -> Result<Outcome> {
    let started = Instant::now();
    let secs = limit.as_secs().max(1).to_string();
    let mut cmd = std::process::Command::new("timeout");
    cmd.args([
        "--kill-after=5",
        &secs,
        "ip",
        "netns",
        "exec",
        netns,
        program,
    ])
    .args(args)
    .envs(env.iter().copied());
    let out = cmd.output().with_context(|| format!("running {program}"))?;
    let mut output = String::from_utf8_lossy(&out.stdout).into_owned();
    output.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(Outcome {
        ok: out.status.success(),
        output,
        took: started.elapsed(),
    })
}

/// A Docker engine of its own on a node, whose registry mirror is the node's agent.
pub struct Dockerd {
    proc: Proc,
    netns: String,
    sock: String,
    dir: PathBuf,
}

impl Dockerd {
    /// Starts `dockerd` in `node`'s namespace (no iptables, no bridge), mirroring Docker
    /// Hub through the node's agent.
    pub async fn start(node: &Node) -> Result<Self> {
        let dir = node.dir.join("docker");
        std::fs::create_dir_all(&dir)?;
        let sock = format!("unix://{}", dir.join("docker.sock").display());
        let path = |p: &str| dir.join(p).display().to_string();
        // `nsenter --net` rather than `ip netns exec`, which mounts a fresh /sys and so
        // hides the cgroup hierarchies dockerd needs.
        let netns = format!("--net=/run/netns/{}", node.host.netns);
        let args: Vec<String> = [
            &netns,
            "/usr/sbin/dockerd",
            "--data-root",
            &path("data"),
            "--exec-root",
            &path("exec"),
            "--pidfile",
            &path("docker.pid"),
            "-H",
            &sock,
            "--registry-mirror",
            &format!("http://127.0.0.1:{AGENT_PORT}"),
            "--iptables=false",
            "--ip-masq=false",
            "--bridge=none",
            "--log-level=warn",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let proc = Proc::spawn(
            &format!("dockerd-{}", node.index),
            None,
            Path::new("nsenter"),
            &args,
            &dir.join("dockerd.log"),
        )?;
        let me = Self {
            proc,
            netns: node.host.netns.clone(),
            sock,
            dir,
        };
        let probe = me.sock.clone();
        wait_until(Duration::from_secs(60), "dockerd to start", || {
            let probe = probe.clone();
            async move { run("/usr/bin/docker", &["-H", &probe, "version"]).is_ok() }
        })
        .await
        .with_context(|| format!("dockerd log:\n{}", me.proc.log_tail(30)))?;
        Ok(me)
    }

    /// `docker pull image`, within `limit`.
    pub fn pull(&self, image: &str, limit: Duration) -> Result<Outcome> {
        run_in(
            &self.netns,
            &[],
            "/usr/bin/docker",
            &["-H", &self.sock, "pull", image],
            limit,
        )
    }

    /// The repository digests Docker recorded for `image`.
    pub fn repo_digests(&self, image: &str) -> Result<String> {
        run(
            "/usr/bin/docker",
            &[
                "-H",
                &self.sock,
                "image",
                "inspect",
                "--format",
                "{{json .RepoDigests}}",
                image,
            ],
        )
    }

    /// The daemon's log, for failures.
    pub fn log_tail(&self) -> String {
        self.proc.log_tail(30)
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        self.proc.stop(Duration::from_secs(15));
        // Its overlay and network mounts live under the data and exec roots.
        let _ = run(
            "sh",
            &[
                "-c",
                &format!(
                    "grep -o ' {}[^ ]*' /proc/mounts | sort -r | xargs -r -n1 umount -l",
                    self.dir.display()
                ),
            ],
        );
    }
}

/// podman on a node, with a `registries.conf` that makes the node's agent the mirror of
/// each registry given, named in the mirror's location (`127.0.0.1:5000/<registry>`).
pub struct Podman {
    netns: String,
    dir: PathBuf,
    conf: PathBuf,
}

impl Podman {
    /// podman for `node`, mirroring `registries` through its agent.
    pub fn new(node: &Node, registries: &[&str]) -> Result<Self> {
        let dir = node.dir.join("podman");
        std::fs::create_dir_all(&dir)?;
        let mut conf = String::from("unqualified-search-registries = []\n");
        for r in registries {
            conf.push_str(&format!(
                "\n[[registry]]\nlocation = \"{r}\"\ninsecure = true\n\n[[registry.mirror]]\nlocation = \"127.0.0.1:{AGENT_PORT}/{r}\"\ninsecure = true\n"
            ));
        }
        let path = dir.join("registries.conf");
        std::fs::write(&path, conf)?;
        Ok(Self {
            netns: node.host.netns.clone(),
            dir,
            conf: path,
        })
    }

    /// `podman pull image`, within `limit`.
    pub fn pull(&self, image: &str, limit: Duration) -> Result<Outcome> {
        let (root, runroot) = (self.dir.join("root"), self.dir.join("run"));
        let conf = self.conf.display().to_string();
        let (root, runroot) = (root.display().to_string(), runroot.display().to_string());
        run_in(
            &self.netns,
            &[("CONTAINERS_REGISTRIES_CONF", &conf)],
            "/usr/bin/podman",
            &[
                "--root",
                &root,
                "--runroot",
                &runroot,
                "--storage-driver",
                "vfs",
                "--events-backend",
                "file",
                "--cgroup-manager",
                "cgroupfs",
                "pull",
                "--quiet",
                image,
            ],
            limit,
        )
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Fails with `what` and the outcome unless it succeeded.
pub fn expect_ok(outcome: &Outcome, what: &str) -> Result<()> {
    if !outcome.ok {
        bail!(
            "{what} failed after {:?}:\n{}",
            outcome.took,
            outcome.output
        );
    }
    Ok(())
}

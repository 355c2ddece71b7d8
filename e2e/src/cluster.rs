//! A whole test cluster: a bridge, an upstream registry holding the test images, and N
//! nodes, each with containerd and an agent, configured the way the Helm chart does it.
//! Dropping the cluster tears everything down, on failure too (and prints the logs then).

use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine as _;
use mirrorlet_oci::Digest;

use crate::deps;
use crate::images::TestImage;
use crate::net::{Slot, leftovers};
use crate::node::{Node, REGISTRY};
use crate::upstream::Upstream;

/// How to build a cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// Number of nodes.
    pub nodes: usize,
    /// Images pushed to the upstream registry.
    pub images: Vec<TestImage>,
    /// Extra flags for every agent.
    pub agent_args: Vec<String>,
    /// Start the agents (else only containerd, configured).
    pub start_agents: bool,
    /// The agents pull through from the upstream (else pull-through is off, the agents
    /// serve what nodes hold, and containerd fetches the rest itself).
    pub pull_through: Option<PullThrough>,
    /// The upstream wants this user and password (htpasswd) for everything.
    pub upstream_login: Option<(String, String)>,
    /// IPv6-only nodes: they have no IPv4 address, the mirror URL in hosts.toml, the peers'
    /// DNS name and the upstream endpoint are IPv6 addresses, and the agents listen on `[::]`.
    pub ipv6: bool,
}

/// How the agents pull through.
#[derive(Debug, Clone, Default)]
pub struct PullThrough {
    /// Put a Docker-Hub-like front (bearer tokens, rate-limit headers, blobs redirected
    /// to another host) between everyone and the registry; `Some(n)`: it answers 429 after
    /// `n` manifest GETs.
    pub front: Option<Option<u64>>,
    /// Credentials the agents are given (written as a Docker config.json).
    pub credentials: Option<(String, String)>,
}

/// An HTTP client that asks as containerd does (every manifest type accepted), for the
/// tests' own requests to agents and to the registry.
pub fn client() -> Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::ACCEPT,
        reqwest::header::HeaderValue::from_static(ACCEPT),
    );
    Ok(reqwest::Client::builder()
        .user_agent("containerd/e2e")
        .default_headers(headers)
        .build()?)
}

/// Port of the Docker-Hub-like front.
pub const FRONT_PORT: u16 = 6000;
/// Port of its "CDN".
pub const CDN_PORT: u16 = 6001;

/// The number of nodes a scenario uses unless it needs a specific count:
/// `MIRRORLET_E2E_NODES`, at least 3 (default 3).
pub fn default_nodes() -> usize {
    std::env::var("MIRRORLET_E2E_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(3)
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: default_nodes(),
            images: Vec::new(),
            agent_args: Vec::new(),
            start_agents: true,
            pull_through: None,
            upstream_login: None,
            ipv6: false,
        }
    }
}

/// A running test cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The nodes, `nodes[0]` is node 1.
    pub nodes: Vec<Node>,
    /// The upstream registry.
    pub upstream: Upstream,
    /// HTTP client for the test process.
    pub http: reqwest::Client,
    /// The Docker-Hub-like front, if there is one, and its `host:port`.
    pub front: Option<(crate::process::Proc, String)>,
    /// The login the upstream wants, if any.
    pub upstream_login: Option<(String, String)>,
    // Dropped last: removes namespaces, bridge and directory.
    slot: Slot,
}

impl Cluster {
    /// Builds and starts a cluster.
    pub async fn start(opts: Options) -> Result<Self> {
        deps::ensure()?;
        deps::mirrorlet_bin()?;
        let slot = Slot::claim()?;
        let up_host = slot.add_host("up", 254)?;
        let upstream = Upstream::start(
            up_host.clone(),
            &slot.dir.join("upstream"),
            opts.upstream_login.as_ref(),
        )
        .await?;
        let cache = deps::image_cache();
        std::fs::create_dir_all(&cache)?;
        for image in &opts.images {
            image.push(&cache, &upstream.authority(), opts.upstream_login.as_ref())?;
        }
        let front = match opts.pull_through.as_ref().and_then(|p| p.front) {
            Some(budget) => Some(start_front(&slot, &up_host, &upstream, budget).await?),
            None => None,
        };
        // Where nodes and agents reach the registry: the front if there is one.
        let registry_at = match &front {
            Some((_, a)) => a.clone(),
            None => upstream.authority_at(opts.ipv6),
        };
        let mut agent_args = opts.agent_args.clone();
        match &opts.pull_through {
            Some(p) => {
                agent_args.extend([
                    "--upstream-registries".to_owned(),
                    REGISTRY.to_owned(),
                    "--upstream-endpoint".to_owned(),
                    format!("{REGISTRY}=http://{registry_at}"),
                ]);
                if let Some((user, password)) = &p.credentials {
                    let path = slot.dir.join("credentials.json");
                    let auth = format!("{user}:{password}");
                    let json = serde_json::json!({"auths": {REGISTRY: {"auth": base64::engine::general_purpose::STANDARD.encode(auth)}}});
                    std::fs::write(&path, json.to_string())?;
                    agent_args.extend([
                        "--upstream-credentials".to_owned(),
                        path.display().to_string(),
                    ]);
                }
            }
            None => agent_args.extend(["--upstream-registries".to_owned(), String::new()]),
        }
        let mut hosts = Vec::new();
        for i in 1..=opts.nodes {
            let octet = u8::try_from(10 + i).context("too many nodes")?;
            hosts.push(slot.add_host(&format!("n{i}"), octet)?);
        }
        let names: Vec<&str> = hosts.iter().map(|h| h.netns.as_str()).collect();
        let addrs: Vec<_> = hosts.iter().map(|h| h.ip(opts.ipv6)).collect();
        slot.set_hosts(&names, crate::node::PEERS_NAME, &addrs)?;
        let mut nodes = Vec::new();
        for (i, host) in (1..=opts.nodes).zip(hosts) {
            if opts.ipv6 {
                host.drop_ipv4()?;
            }
            let mut node = Node::new(i, host, &slot.dir.join(format!("n{i}")), agent_args.clone())?;
            node.ipv6 = opts.ipv6;
            node.write_user_hosts(&registry_at)?;
            node.configure()?;
            node.start_containerd().await?;
            nodes.push(node);
        }
        let mut cluster = Self {
            nodes,
            upstream,
            http: client()?,
            front,
            upstream_login: opts.upstream_login.clone(),
            slot,
        };
        if opts.start_agents {
            for node in &mut cluster.nodes {
                node.start_agent().await?;
            }
        }
        Ok(cluster)
    }

    /// Adds a host that is not a node (e.g. a misbehaving peer) at `.octet`, with the
    /// peers' DNS name in its /etc/hosts.
    pub fn extra_host(&self, name: &str, octet: u8) -> Result<crate::net::Host> {
        let host = self.slot.add_host(name, octet)?;
        let addrs: Vec<_> = self.nodes.iter().map(|n| n.host.ip(n.ipv6)).collect();
        self.slot
            .set_hosts(&[host.netns.as_str()], crate::node::PEERS_NAME, &addrs)?;
        Ok(host)
    }

    /// The working directory of the cluster.
    pub fn dir(&self) -> &std::path::Path {
        &self.slot.dir
    }

    /// Node `i` (1-based).
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    /// Node `i` (1-based), mutably.
    pub fn node_mut(&mut self, i: usize) -> &mut Node {
        &mut self.nodes[i - 1]
    }

    /// The cluster number.
    pub fn k(&self) -> u8 {
        self.slot.k
    }

    /// The name nodes pull `image` by: `registry.e2e.test/<repo>:<tag>`.
    pub fn image_ref(image: &TestImage) -> String {
        format!("{REGISTRY}/{}:{}", image.repo, image.tag)
    }

    /// GETs `path` (e.g. `/v2/<repo>/manifests/<ref>`) from the upstream registry with
    /// every manifest type accepted.
    pub async fn upstream_get(&self, path: &str) -> Result<reqwest::Response> {
        let mut req = self
            .http
            .get(format!("{}{path}", self.upstream.url()))
            .header("accept", ACCEPT);
        if let Some((user, password)) = &self.upstream_login {
            req = req.basic_auth(user, Some(password));
        }
        Ok(req.send().await?)
    }

    /// Waits (20 s at most) until node `i`'s agent can serve `image` as `registry`'s (from
    /// itself or a peer).
    pub async fn wait_servable(&self, i: usize, registry: &str, image: &TestImage) -> Result<()> {
        let url = format!(
            "{}/v2/{}/manifests/{}?ns={registry}",
            self.node(i).agent_url(),
            image.repo,
            image.tag
        );
        let http = self.http.clone();
        crate::wait::wait_until(
            Duration::from_secs(20),
            "the image to be advertised",
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    http.head(&url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success())
                }
            },
        )
        .await
    }

    /// The digest upstream gives `repo:tag`.
    pub async fn upstream_digest(&self, repo: &str, tag: &str) -> Result<Digest> {
        let resp = self
            .upstream_get(&format!("/v2/{repo}/manifests/{tag}"))
            .await?
            .error_for_status()?;
        let d = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .context("upstream sent no Docker-Content-Digest")?;
        Ok(Digest::parse(d)?)
    }

    /// A cluster of one node holding `image` (pulled through the CRI), its agent started
    /// with `agent_args`, and the image's manifest as that agent serves it: the setup of
    /// the one-agent benchmarks.
    pub async fn holding(
        image: &TestImage,
        agent_args: Vec<String>,
    ) -> Result<(Self, serde_json::Value)> {
        let c = Self::start(Options {
            nodes: 1,
            images: vec![image.clone()],
            agent_args,
            ..Options::default()
        })
        .await?;
        let node = c.node(1);
        node.cri
            .pull(&Self::image_ref(image), Duration::from_secs(300))
            .await?;
        let manifest = c.upstream_digest(&image.repo, &image.tag).await?;
        let body = c
            .http
            .get(format!(
                "{}/v2/{}/manifests/{manifest}?ns={REGISTRY}",
                node.agent_url(),
                image.repo
            ))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok((c, body))
    }

    /// The front's counts (see `hub-front`).
    pub async fn front_stats(&self) -> Result<serde_json::Value> {
        let (_, addr) = self.front.as_ref().context("no front")?;
        Ok(self
            .http
            .get(format!("http://{addr}/admin/stats"))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Makes the front's CDN flip one byte of the next download of `digest`.
    pub async fn front_corrupt_next(&self, digest: &str) -> Result<()> {
        let (_, addr) = self.front.as_ref().context("no front")?;
        self.http
            .post(format!("http://{addr}/admin/corrupt/{digest}"))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Waits until every agent has every other in its routing table (connections close
    /// when idle, so being connected is not the test), so that all agree on the owners of
    /// what they fetch.
    pub async fn wait_members(&self) -> Result<()> {
        let want = (self.nodes.len() - 1) as f64;
        for n in &self.nodes {
            crate::wait::wait_until(
                Duration::from_secs(30),
                "the agents to know each other",
                || async {
                    n.metric("mirrorlet_p2p_routing_table_peers", &[])
                        .await
                        .unwrap_or(0.0)
                        >= want
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Tears down now and returns whatever was left behind (should be nothing).
    pub fn teardown(self) -> Vec<String> {
        let k = self.slot.k;
        drop(self);
        leftovers(k)
    }

    /// The logs of every process, for a failing test.
    pub fn dump_logs(&self) -> String {
        let mut out = String::new();
        for n in &self.nodes {
            out.push_str(&format!(
                "\n--- node {} agent ---\n{}\n",
                n.index,
                n.agent_log_tail(40)
            ));
            out.push_str(&format!(
                "--- node {} containerd ---\n{}\n",
                n.index,
                n.containerd_log_tail(15)
            ));
        }
        out.push_str(&format!("--- upstream ---\n{}\n", self.upstream.log_tail()));
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("e2e cluster {} logs:{}", self.slot.k, self.dump_logs());
        }
        for n in &mut self.nodes {
            n.stop_agent();
        }
        for n in &mut self.nodes {
            n.stop_containerd();
        }
        self.front = None;
        self.upstream.stop();
        // Give the kernel a moment to release the namespaces' sockets before deleting them.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts the Docker-Hub-like front on the upstream's host (and a second address of it
/// for the CDN).
async fn start_front(
    slot: &Slot,
    host: &crate::net::Host,
    upstream: &Upstream,
    budget: Option<u64>,
) -> Result<(crate::process::Proc, String)> {
    let cdn = host.add_addr(253)?;
    let addr = format!("{}:{FRONT_PORT}", host.addr);
    let args = vec![
        addr.clone(),
        format!("{cdn}:{CDN_PORT}"),
        upstream.url(),
        budget.map_or_else(|| "none".to_owned(), |b| b.to_string()),
    ];
    let proc = crate::process::Proc::spawn(
        "hub-front",
        Some(&host.netns),
        &deps::e2e_bin("hub-front")?,
        &args,
        &slot.dir.join("hub-front.log"),
    )?;
    crate::process::wait_http_ok(
        &format!("http://{addr}/admin/stats"),
        Duration::from_secs(20),
        "the hub front to answer",
    )
    .await?;
    Ok((proc, addr))
}

/// Accept header a client sends to get any manifest type.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

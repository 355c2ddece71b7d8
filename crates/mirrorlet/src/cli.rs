//! Command-line interface: one clap `Args` per subcommand. Every flag has a
//! `MIRRORLET_...` environment variable and a default, and converts into a validated config.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use mirrorlet_registry::PeerVerify;

use crate::hosts::{self, ConfigureOptions};

/// mirrorlet: a peer-to-peer, node-local container image mirror for Kubernetes.
#[derive(Debug, Parser)]
#[command(name = "mirrorlet", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Log output format.
    #[arg(
        long,
        global = true,
        env = "MIRRORLET_LOG_FORMAT",
        default_value = "text",
        value_enum
    )]
    pub(crate) log_format: LogFormat,
    /// Log filter: a level (`info`) or tracing directives (`info,mirrorlet_registry=debug`).
    #[arg(long, global = true, env = "MIRRORLET_LOG_LEVEL", default_value = "info", value_parser = parse_filter)]
    pub(crate) log_level: String,
    /// What to do.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run the agent: serve this node's containerd content as a registry mirror.
    Run(Box<RunArgs>),
    /// Write containerd's hosts.toml files so pulls try the agent first.
    Configure(ConfigureArgs),
    /// Restore the hosts.toml files `configure` changed.
    Cleanup(CleanupArgs),
    /// Wait until a DaemonSet is ready on every node (the chart's uninstall hook).
    WaitDaemonset(WaitDaemonsetArgs),
    /// Print a running agent's status page (its peers, what it served, upstream state).
    Status(StatusArgs),
    /// Pull images into this node's containerd through the agent (so the whole cluster
    /// fetches each once), with progress.
    Preheat(PreheatArgs),
    /// Print the version.
    Version,
}

/// Flags of `mirrorlet run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Address the registry (and /metrics, /livez, /readyz) listens on; `[::]:PORT` takes
    /// IPv6 and IPv4 (IPv4 only on a node without IPv6).
    #[arg(long, env = "MIRRORLET_LISTEN", default_value = "0.0.0.0:5000")]
    pub(crate) listen: SocketAddr,
    /// containerd's gRPC socket.
    #[arg(
        long,
        env = "MIRRORLET_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub(crate) containerd_socket: PathBuf,
    /// containerd namespace whose images are served (`k8s.io` is the CRI's).
    #[arg(long, env = "MIRRORLET_CONTAINERD_NAMESPACE", default_value = "k8s.io", value_parser = parse_namespace)]
    pub(crate) containerd_namespace: String,
    /// containerd's content directory; blobs are read from its files when it exists.
    /// Empty: always read through containerd's gRPC API.
    #[arg(
        long,
        env = "MIRRORLET_CONTAINERD_CONTENT_DIR",
        default_value = "/var/lib/containerd/io.containerd.content.v1.content",
        value_parser = parse_optional_path
    )]
    pub(crate) containerd_content_dir: OptionalPath,
    /// Entries in the cache of manifest media types read from content.
    #[arg(long, env = "MIRRORLET_MEDIA_TYPE_CACHE", default_value = "10000")]
    pub(crate) media_type_cache: NonZeroUsize,
    /// Address of the operational listener: `/livez`, `/readyz` and `/metrics` only (probes
    /// and scrapes that registry clients cannot starve, and no content exposed).
    #[arg(long, env = "MIRRORLET_METRICS_LISTEN", default_value = "0.0.0.0:5002")]
    pub(crate) metrics_listen: SocketAddr,
    /// `/livez` fails once containerd has not answered for this long (the kubelet then
    /// restarts the agent); shorter outages only make it not ready.
    #[arg(long, env = "MIRRORLET_LIVENESS_CONTAINERD_TIMEOUT", default_value = "5m", value_parser = parse_positive_duration)]
    pub(crate) liveness_containerd_timeout: Duration,
    /// Connections served at once; further connections are closed.
    #[arg(long, env = "MIRRORLET_MAX_CONNECTIONS", default_value = "1024", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_connections: u32,
    /// Time a client has to send its request head.
    #[arg(long, env = "MIRRORLET_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub(crate) header_read_timeout: Duration,
    /// Time a response may wait for a client that takes no bytes before its connection
    /// is closed.
    #[arg(long, env = "MIRRORLET_SEND_STALL_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub(crate) send_stall_timeout: Duration,
    /// Bytes that the chunks of all blobs being sent (read from containerd's blob files,
    /// over gRPC or from the spool) and the batches of blobs being spooled may hold at
    /// once (a quarter is kept for the batches); a stream that finds its part spent waits
    /// for its next chunk, a copy for room for its next batch. With the stall timeout,
    /// this bounds the agent's memory for content whatever the number of clients and
    /// transfers.
    #[arg(long, env = "MIRRORLET_STREAM_MEMORY", default_value = "67108864", value_parser = clap::value_parser!(u64).range(1_048_576..))]
    pub(crate) stream_memory: u64,
    /// On SIGTERM, time allowed for in-flight responses to finish.
    #[arg(long, env = "MIRRORLET_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub(crate) shutdown_grace: Duration,
    /// Peer-to-peer flags.
    #[command(flatten)]
    pub(crate) p2p: P2pArgs,
    /// Pull-through flags.
    #[command(flatten)]
    pub(crate) upstream: UpstreamArgs,
}

/// Pull-through flags of `mirrorlet run`: the agents fetch what no node holds from the
/// upstream registry once for the whole cluster.
#[derive(Debug, Args)]
pub(crate) struct UpstreamArgs {
    /// Registries the agent pulls through, comma-separated. Empty: pull-through off (a
    /// miss goes back to containerd, which fetches it itself). Any other registry is never
    /// contacted by the agent.
    #[arg(
        long,
        env = "MIRRORLET_UPSTREAM_REGISTRIES",
        value_delimiter = ',',
        default_value = hosts::DEFAULT_UPSTREAM_REGISTRIES,
        value_parser = parse_upstream_registry
    )]
    pub(crate) upstream_registries: Vec<OptionalRegistry>,
    /// Where a registry is reached, `REGISTRY=URL`, repeatable or comma-separated
    /// (default `https://REGISTRY`; Docker Hub at https://registry-1.docker.io).
    /// `http://` is used only when given here (air-gapped or test registries).
    #[arg(
        long,
        env = "MIRRORLET_UPSTREAM_ENDPOINT",
        value_delimiter = ',',
        default_value = "",
        value_parser = parse_upstream_endpoint
    )]
    pub(crate) upstream_endpoint: Vec<OptionalEndpoint>,
    /// Credentials for upstream registries: a Docker config.json (a mounted
    /// `kubernetes.io/dockerconfigjson` Secret). Each goes only to its own registry.
    /// Empty: anonymous pulls.
    #[arg(long, env = "MIRRORLET_UPSTREAM_CREDENTIALS", default_value = "", value_parser = parse_optional_path)]
    pub(crate) upstream_credentials: OptionalPath,
    /// How long a tag's digest stands before its owner asks upstream again (with a HEAD,
    /// which Docker Hub does not count).
    #[arg(long, env = "MIRRORLET_TAG_REVALIDATE", default_value = "30s", value_parser = parse_duration)]
    pub(crate) tag_revalidate: Duration,
    /// While upstream is unreachable or rate limiting, tags whose digest was confirmed at
    /// most this long ago are served from what the cluster holds. 0s: never.
    #[arg(long, env = "MIRRORLET_STALE_TAG_MAX_AGE", default_value = "24h", value_parser = parse_duration)]
    pub(crate) stale_tag_max_age: Duration,
    /// Time to connect to an upstream registry.
    #[arg(long, env = "MIRRORLET_UPSTREAM_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_positive_duration)]
    pub(crate) upstream_connect_timeout: Duration,
    /// Time for an upstream registry to answer a request (its response head).
    #[arg(long, env = "MIRRORLET_UPSTREAM_RESPONSE_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub(crate) upstream_response_timeout: Duration,
    /// An upstream body that delivers nothing for this long is continued elsewhere.
    #[arg(long, env = "MIRRORLET_UPSTREAM_READ_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub(crate) upstream_read_timeout: Duration,
    /// Bytes of fetched blobs kept on disk (in --spool-dir) to serve the cluster;
    /// least recently used first out.
    #[arg(long, env = "MIRRORLET_CACHE_SIZE", default_value = "4294967296")]
    pub(crate) cache_size: u64,
    /// Peers one node streams a blob it is downloading to at most; further peers read
    /// it from nodes that are downloading it too.
    #[arg(long, env = "MIRRORLET_MAX_PEER_STREAMS", default_value = "4", value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub(crate) max_peer_streams: u32,
    /// Private repositories, comma-separated: a registry (all its repositories) or
    /// `registry/repository` with `*` for any run of characters. Their tags are never
    /// answered (containerd resolves them at the registry with the pod's pull secret) nor
    /// advertised; their content is served by digest from this node and its peers.
    #[arg(long, env = "MIRRORLET_PRIVATE", value_delimiter = ',', default_value = "", value_parser = parse_private)]
    pub(crate) private: Vec<String>,
    /// Let the agents still pull private repositories through, by digest, with the
    /// cluster's credentials (--upstream-credentials).
    #[arg(long, env = "MIRRORLET_PRIVATE_PULL_THROUGH", default_value = "false", action = clap::ArgAction::Set)]
    pub(crate) private_pull_through: bool,
}

fn parse_private(s: &str) -> Result<String, String> {
    mirrorlet_oci::private::Private::new(&[s], false)?;
    Ok(s.to_owned())
}

/// A registry flag entry (empty entries are ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OptionalRegistry(pub(crate) Option<mirrorlet_oci::Registry>);

fn parse_upstream_registry(s: &str) -> Result<OptionalRegistry, String> {
    if s.trim().is_empty() {
        return Ok(OptionalRegistry(None));
    }
    if s == "_default" {
        return Err("_default is for configure; name the registries to pull through".into());
    }
    parse_registry(s.trim()).and_then(|r| {
        mirrorlet_oci::Registry::parse(&r)
            .map(|r| OptionalRegistry(Some(r)))
            .map_err(|e| e.to_string())
    })
}

/// An endpoint flag entry (empty entries are ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OptionalEndpoint(
    pub(crate) Option<(mirrorlet_oci::Registry, mirrorlet_upstream::Url)>,
);

fn parse_upstream_endpoint(s: &str) -> Result<OptionalEndpoint, String> {
    if s.trim().is_empty() {
        return Ok(OptionalEndpoint(None));
    }
    mirrorlet_upstream::parse_endpoint(s).map(|e| OptionalEndpoint(Some(e)))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// Peer-to-peer flags of `mirrorlet run`.
#[derive(Debug, Args)]
pub(crate) struct P2pArgs {
    /// Serve and fetch through peers (false: a node-local mirror only).
    #[arg(long = "p2p", env = "MIRRORLET_P2P", default_value = "true", action = clap::ArgAction::Set)]
    pub(crate) enabled: bool,
    /// Address the libp2p (DHT) listener binds; `[::]:PORT` listens on IPv6 and IPv4.
    #[arg(long, env = "MIRRORLET_P2P_LISTEN", default_value = "0.0.0.0:5001")]
    pub(crate) p2p_listen: SocketAddr,
    /// Directory for the node's persistent peer identity.
    #[arg(long, env = "MIRRORLET_DATA_DIR", default_value = "/var/lib/mirrorlet")]
    pub(crate) data_dir: PathBuf,
    /// File holding a pre-shared key (64 hex characters or a libp2p swarm.key): only nodes
    /// with the same key can join. Empty: no key.
    #[arg(long, env = "MIRRORLET_PSK_FILE", default_value = "", value_parser = parse_optional_path)]
    pub(crate) psk_file: OptionalPath,
    /// Peers to bootstrap from, comma-separated multiaddrs (`/ip4/10.0.0.5/tcp/5001`).
    #[arg(long, env = "MIRRORLET_BOOTSTRAP", value_delimiter = ',', default_value = "", value_parser = parse_multiaddr)]
    pub(crate) bootstrap: Vec<OptionalMultiaddr>,
    /// A DNS name and port resolving to peers (the chart's headless Service), e.g.
    /// `mirrorlet.kube-system.svc.cluster.local:5001`. Empty: none.
    #[arg(long, env = "MIRRORLET_BOOTSTRAP_DNS", default_value = "", value_parser = parse_host_port)]
    pub(crate) bootstrap_dns: OptionalHostPort,
    /// How long provider records live at other nodes (see the README on the choice).
    #[arg(long, env = "MIRRORLET_PROVIDER_TTL", default_value = "20m", value_parser = parse_duration)]
    pub(crate) provider_ttl: Duration,
    /// How often this node re-announces what it holds; must be well under the TTL.
    #[arg(long, env = "MIRRORLET_REPUBLISH_INTERVAL", default_value = "6m", value_parser = parse_duration)]
    pub(crate) republish_interval: Duration,
    /// How long a lookup may wait for a (next) peer before the request falls through.
    #[arg(long, env = "MIRRORLET_LOOKUP_TIMEOUT", default_value = "20ms", value_parser = parse_duration)]
    pub(crate) lookup_timeout: Duration,
    /// Peers tried per request at most (hedges and resumes included).
    #[arg(long, env = "MIRRORLET_PEER_MAX_ATTEMPTS", default_value = "3", value_parser = clap::value_parser!(u32).range(1..=20))]
    pub(crate) peer_max_attempts: u32,
    /// Race a second peer if the first has not answered after this long.
    #[arg(long, env = "MIRRORLET_PEER_HEDGE_DELAY", default_value = "100ms", value_parser = parse_duration)]
    pub(crate) peer_hedge_delay: Duration,
    /// Abandon (and resume elsewhere) a peer stream that delivers nothing for this long.
    #[arg(long, env = "MIRRORLET_PEER_READ_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub(crate) peer_read_timeout: Duration,
    /// How long a peer that failed is skipped.
    #[arg(long, env = "MIRRORLET_PEER_FAILURE_BACKOFF", default_value = "60s", value_parser = parse_duration)]
    pub(crate) peer_failure_backoff: Duration,
    /// How blobs larger than --peer-verify-buffer, from peers that hold them, are sent:
    /// `stream` (as they arrive, the last byte held back until verified; a peer with wrong
    /// bytes costs that pull, whose retry starts clean) or `whole` (spooled and verified
    /// before the first byte; a wrong copy is replaced unseen, at the cost of latency).
    #[arg(long, env = "MIRRORLET_PEER_VERIFY", default_value = "stream", value_parser = parse_peer_verify)]
    pub(crate) peer_verify: PeerVerify,
    /// Blobs up to this many bytes are verified whole before being sent.
    #[arg(long, env = "MIRRORLET_PEER_VERIFY_BUFFER", default_value = "4194304")]
    pub(crate) peer_verify_buffer: u64,
    /// Largest blob (bytes) taken from peers; larger ones come from upstream. Bounds the
    /// spool against a peer lying about sizes.
    #[arg(
        long,
        env = "MIRRORLET_PEER_MAX_BLOB_SIZE",
        default_value = "34359738368"
    )]
    pub(crate) peer_max_blob_size: u64,
    /// Blobs of at least this many bytes are read from up to four nodes that hold them at
    /// once, in parts of at least an eighth of it (a slow holder sends less instead of
    /// setting the pace). 0: one holder at a time; otherwise at least 8388608 (8 MiB).
    #[arg(long, env = "MIRRORLET_PEER_PARTS_FROM", default_value = "67108864", value_parser = parse_parts_from)]
    pub(crate) peer_parts_from: u64,
    /// Where blobs from peers larger than the verify buffer are held while being verified
    /// (anonymous temporary files). Created if missing.
    #[arg(
        long,
        env = "MIRRORLET_SPOOL_DIR",
        default_value = "/var/lib/mirrorlet/spool"
    )]
    pub(crate) spool_dir: PathBuf,
    /// Tag patterns (`*` wildcard, comma-separated) never resolved through peers.
    #[arg(
        long,
        env = "MIRRORLET_PEER_TAG_EXCLUDE",
        value_delimiter = ',',
        default_value = "*:latest"
    )]
    pub(crate) peer_tag_exclude: Vec<String>,
    /// Bandwidth (bytes per second) this node may spend serving other agents; 0: no limit.
    #[arg(long, env = "MIRRORLET_PEER_UPLOAD_LIMIT", default_value = "0")]
    pub(crate) peer_upload_limit: u64,
}

/// A multiaddr flag entry (empty entries are ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OptionalMultiaddr(pub(crate) Option<libp2p::Multiaddr>);

fn parse_multiaddr(s: &str) -> Result<OptionalMultiaddr, String> {
    if s.trim().is_empty() {
        return Ok(OptionalMultiaddr(None));
    }
    s.trim()
        .parse::<libp2p::Multiaddr>()
        .map(|m| OptionalMultiaddr(Some(m)))
        .map_err(|e| format!("not a multiaddr like /ip4/10.0.0.5/tcp/5001: {e}"))
}

/// `host:port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HostPort(pub(crate) String, pub(crate) u16);

/// A `host:port` flag that may be empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OptionalHostPort(pub(crate) Option<HostPort>);

fn parse_host_port(s: &str) -> Result<OptionalHostPort, String> {
    if s.is_empty() {
        return Ok(OptionalHostPort(None));
    }
    let (host, port) = s.rsplit_once(':').ok_or("expected host:port")?;
    let port = port
        .parse::<u16>()
        .map_err(|_| "the port must be a number from 1 to 65535".to_owned())?;
    if host.is_empty() || port == 0 {
        return Err("expected host:port".into());
    }
    Ok(OptionalHostPort(Some(HostPort(host.to_owned(), port))))
}

/// Flags of `mirrorlet configure`.
#[derive(Debug, Args)]
pub(crate) struct ConfigureArgs {
    /// containerd's registry `config_path`.
    #[arg(
        long,
        env = "MIRRORLET_CONFIG_PATH",
        default_value = "/etc/containerd/certs.d"
    )]
    pub(crate) config_path: PathBuf,
    /// Registries to mirror, comma-separated; `_default` covers every other registry.
    #[arg(
        long,
        env = "MIRRORLET_REGISTRIES",
        value_delimiter = ',',
        default_value = hosts::DEFAULT_REGISTRIES,
        value_parser = parse_registry
    )]
    pub(crate) registries: Vec<String>,
    /// The agent's URL(s) as containerd on this node reaches it, comma-separated, tried in order.
    #[arg(
        long,
        env = "MIRRORLET_MIRROR_URL",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:5000",
        value_parser = parse_mirror_url
    )]
    pub(crate) mirror_url: Vec<String>,
    /// How long containerd waits to connect to the agent before going on to the next host.
    #[arg(long, env = "MIRRORLET_DIAL_TIMEOUT", default_value = "200ms", value_parser = parse_dial_timeout)]
    pub(crate) dial_timeout: String,
}

/// Flags of `mirrorlet cleanup`.
#[derive(Debug, Args)]
pub(crate) struct CleanupArgs {
    /// containerd's registry `config_path`.
    #[arg(
        long,
        env = "MIRRORLET_CONFIG_PATH",
        default_value = "/etc/containerd/certs.d"
    )]
    pub(crate) config_path: PathBuf,
    /// After restoring, keep running until terminated: the chart's uninstall DaemonSet,
    /// whose pods are ready once their node is restored.
    #[arg(long, env = "MIRRORLET_CLEANUP_HOLD", default_value = "false", action = clap::ArgAction::Set)]
    pub(crate) hold: bool,
}

/// Flags of `mirrorlet wait-daemonset`.
#[derive(Debug, Args)]
pub(crate) struct WaitDaemonsetArgs {
    /// The DaemonSet to wait for.
    #[arg(long, env = "MIRRORLET_WAIT_DAEMONSET", default_value = "", value_parser = parse_object_name)]
    pub(crate) daemonset: String,
    /// Its namespace. Empty: the pod's own.
    #[arg(long, env = "MIRRORLET_WAIT_NAMESPACE", default_value = "")]
    pub(crate) namespace: String,
    /// How long to wait before failing with the nodes not done.
    #[arg(long, env = "MIRRORLET_WAIT_TIMEOUT", default_value = "4m", value_parser = parse_positive_duration)]
    pub(crate) timeout: Duration,
    /// The Kubernetes API server URL. Empty: the in-cluster one.
    #[arg(long, env = "MIRRORLET_KUBE_API_SERVER", default_value = "")]
    pub(crate) api_server: String,
    /// The mounted service account (token, ca.crt, namespace).
    #[arg(
        long,
        env = "MIRRORLET_SERVICE_ACCOUNT_DIR",
        default_value = "/var/run/secrets/kubernetes.io/serviceaccount"
    )]
    pub(crate) service_account_dir: PathBuf,
}

/// Flags of `mirrorlet preheat`.
#[derive(Debug, Args)]
pub(crate) struct PreheatArgs {
    /// Images to pull, as `docker pull` takes them (`nginx:1.25`, `ghcr.io/org/app`,
    /// `name@sha256:...`); comma-separated in the environment variable.
    #[arg(env = "MIRRORLET_PREHEAT_IMAGES", value_delimiter = ',', default_value = "", value_parser = parse_image)]
    pub(crate) images: Vec<OptionalImage>,
    /// containerd's gRPC socket (its CRI image service pulls, as kubelet's pulls do).
    #[arg(
        long,
        env = "MIRRORLET_CONTAINERD_SOCKET",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub(crate) containerd_socket: PathBuf,
    /// Wait until the agent at this URL (its operational listener) is ready before pulling,
    /// so the pulls go through it. Empty: do not wait.
    #[arg(long, env = "MIRRORLET_PREHEAT_AGENT", default_value = "")]
    pub(crate) agent_url: String,
    /// Time allowed for each image.
    #[arg(long, env = "MIRRORLET_PREHEAT_TIMEOUT", default_value = "30m", value_parser = parse_positive_duration)]
    pub(crate) timeout: Duration,
    /// Images pulled at once.
    #[arg(long, env = "MIRRORLET_PREHEAT_PARALLEL", default_value = "2", value_parser = clap::value_parser!(u32).range(1..=16))]
    pub(crate) parallel: u32,
    /// After pulling, keep running until terminated (the chart runs it beside the agent).
    #[arg(long, env = "MIRRORLET_PREHEAT_HOLD", default_value = "false", action = clap::ArgAction::Set)]
    pub(crate) hold: bool,
}

/// An image flag entry (empty entries are ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OptionalImage(pub(crate) Option<mirrorlet_oci::ImageName>);

fn parse_image(s: &str) -> Result<OptionalImage, String> {
    if s.trim().is_empty() {
        return Ok(OptionalImage(None));
    }
    mirrorlet_oci::ImageName::parse_familiar(s.trim())
        .map(|i| OptionalImage(Some(i)))
        .map_err(|e| {
            format!("not an image reference like nginx:1.25 or ghcr.io/org/app@sha256:...: {e}")
        })
}

/// Flags of `mirrorlet status`.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The agent's operational listener (`--metrics-listen`), e.g. `http://10.0.0.5:5002`
    /// (`kubectl port-forward` to a pod's 5002 works too).
    #[arg(long, env = "MIRRORLET_STATUS_URL", default_value = "http://127.0.0.1:5002", value_parser = parse_status_url)]
    pub(crate) url: String,
    /// `text` for a terminal, `json` as the agent gives it.
    #[arg(
        long,
        env = "MIRRORLET_STATUS_OUTPUT",
        default_value = "text",
        value_enum
    )]
    pub(crate) output: StatusOutput,
}

/// Output of `mirrorlet status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum StatusOutput {
    /// Readable sections.
    Text,
    /// The agent's JSON.
    Json,
}

fn parse_status_url(s: &str) -> Result<String, String> {
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    if rest.is_empty() || rest.contains(['?', '#', ' ']) {
        return Err("must be http://host:port".into());
    }
    Ok(s.trim_end_matches('/').to_owned())
}

/// A Kubernetes object name (RFC 1123 label).
fn parse_object_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b))
        && !s.starts_with(['-', '.'])
        && !s.ends_with(['-', '.']);
    ok.then(|| s.to_owned())
        .ok_or_else(|| "not a Kubernetes object name (lower-case letters, digits, '-', '.')".into())
}

impl ConfigureArgs {
    /// The validated options.
    pub(crate) fn options(&self) -> ConfigureOptions {
        ConfigureOptions {
            config_path: self.config_path.clone(),
            registries: self.registries.clone(),
            mirrors: self.mirror_url.clone(),
            dial_timeout: self.dial_timeout.clone(),
        }
    }
}

/// A path flag that may be set to the empty string to turn a feature off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OptionalPath(pub(crate) Option<PathBuf>);

fn parse_optional_path(s: &str) -> Result<OptionalPath, String> {
    Ok(OptionalPath((!s.is_empty()).then(|| PathBuf::from(s))))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("not a duration like 10s or 250ms: {e}"))
}

fn parse_dial_timeout(s: &str) -> Result<String, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(s.to_owned())
}

fn parse_filter(s: &str) -> Result<String, String> {
    tracing_subscriber::EnvFilter::try_new(s)
        .map(|_| s.to_owned())
        .map_err(|e| format!("not a log level or filter: {e}"))
}

fn parse_peer_verify(s: &str) -> Result<PeerVerify, String> {
    match s {
        "stream" => Ok(PeerVerify::Stream),
        "whole" => Ok(PeerVerify::Whole),
        _ => Err("must be 'stream' or 'whole'".into()),
    }
}

fn parse_parts_from(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n == 0 || n >= 8 << 20 => Ok(n),
        Ok(_) => Err("must be 0 (off) or at least 8388608 (8 MiB: parts of 1 MiB)".into()),
        Err(e) => Err(format!("not a number of bytes: {e}")),
    }
}

fn parse_namespace(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 76
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    ok.then(|| s.to_owned())
        .ok_or_else(|| "not a containerd namespace (letters, digits, '.', '_', '-')".into())
}

fn parse_registry(s: &str) -> Result<String, String> {
    if s == "_default" {
        return Ok(s.to_owned());
    }
    let r = mirrorlet_oci::Registry::parse(s).map_err(|e| e.to_string())?;
    if r.as_str() != s {
        return Err(format!("write it as {}", r.as_str()));
    }
    Ok(s.to_owned())
}

fn parse_mirror_url(s: &str) -> Result<String, String> {
    let scheme = if s.starts_with("https://") {
        "https://"
    } else if s.starts_with("http://") {
        "http://"
    } else {
        return Err("must start with http:// or https://".into());
    };
    let rest = &s[scheme.len()..];
    const SHAPE: &str = "must be scheme://host[:port] with no path (a host name, an IPv4 address or an IPv6 address in brackets)";
    // A bare IPv6 address, as Kubernetes gives a node's address (`$(NODE_IP):30020`), with
    // the port last: containerd needs it in brackets.
    if !rest.starts_with('[') && rest.matches(':').count() >= 2 {
        let bracketed = rest.rsplit_once(':').and_then(|(host, port)| {
            let ok = host.parse::<std::net::Ipv6Addr>().is_ok() && valid_port(port);
            ok.then(|| format!("{scheme}[{host}]:{port}"))
        });
        return bracketed
            .ok_or_else(|| "an IPv6 address needs its port last: http://[addr]:port".into());
    }
    // It goes into hosts.toml as a table name: nothing but a host and a port may pass.
    let (host_ok, port) = match rest.strip_prefix('[') {
        Some(v6) => {
            let (addr, after) = v6.split_once(']').ok_or(SHAPE)?;
            let port = if after.is_empty() {
                None
            } else {
                Some(after.strip_prefix(':').ok_or(SHAPE)?)
            };
            (addr.parse::<std::net::Ipv6Addr>().is_ok(), port)
        }
        None => {
            let (host, port) = rest
                .split_once(':')
                .map_or((rest, None), |(h, p)| (h, Some(p)));
            let ok = !host.is_empty()
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            (ok, port)
        }
    };
    let port_ok = port.is_none_or(valid_port);
    if !host_ok || !port_ok {
        return Err(SHAPE.into());
    }
    Ok(s.to_owned())
}

fn valid_port(p: &str) -> bool {
    p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_flag_has_an_env_var_and_a_default() {
        let cmd = Cli::command();
        let mut checked = 0;
        for sub in std::iter::once(&cmd).chain(cmd.get_subcommands()) {
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                assert!(
                    env.as_deref().is_some_and(|e| e.starts_with("MIRRORLET_")),
                    "--{id} needs a MIRRORLET_ env var"
                );
                assert!(
                    !arg.get_default_values().is_empty(),
                    "--{id} needs a default"
                );
                checked += 1;
            }
        }
        assert!(checked > 10);
    }

    #[test]
    fn parts_are_off_or_at_least_a_mebibyte_each() {
        assert_eq!(parse_parts_from("0"), Ok(0));
        assert_eq!(parse_parts_from("8388608"), Ok(8 << 20));
        for bad in ["1", "8388607", "-1", "64Mi"] {
            assert!(parse_parts_from(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn defaults_parse() {
        let cli = Cli::try_parse_from(["mirrorlet", "configure"]).expect("defaults parse");
        let Command::Configure(args) = cli.command else {
            panic!("configure")
        };
        assert_eq!(args.registries.join(","), hosts::DEFAULT_REGISTRIES);
        assert_eq!(args.registries[0], "docker.io");
        assert_eq!(args.mirror_url, ["http://127.0.0.1:5000"]);
        let cli = Cli::try_parse_from(["mirrorlet", "run"]).expect("defaults parse");
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        assert_eq!(args.listen.port(), 5000);
        let cli = Cli::try_parse_from(["mirrorlet", "run", "--containerd-content-dir", ""])
            .expect("empty disables");
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        assert_eq!(args.containerd_content_dir, OptionalPath(None));
    }

    fn run_args(args: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["mirrorlet", "run"].iter().chain(args)).expect("parses");
        let Command::Run(args) = cli.command else {
            panic!("run")
        };
        *args
    }

    #[test]
    fn pull_through_flags() {
        // On by default for the public registries, anonymous.
        let c = crate::run::upstream_config(&run_args(&[]).upstream).expect("valid");
        assert_eq!(c.registries.len(), 7);
        assert_eq!(c.registries[0].as_str(), "docker.io");
        // Empty: off.
        let c = crate::run::upstream_config(&run_args(&["--upstream-registries", ""]).upstream)
            .expect("valid");
        assert!(c.registries.is_empty());
        // An endpoint for a listed registry; plain HTTP when asked for.
        let args = run_args(&[
            "--upstream-registries",
            "registry.e2e.test,docker.io",
            "--upstream-endpoint",
            "registry.e2e.test=http://198.18.0.254:5000,docker.io=https://mirror.example",
        ]);
        let c = crate::run::upstream_config(&args.upstream).expect("valid");
        let e2e = mirrorlet_oci::Registry::parse("registry.e2e.test").expect("registry");
        assert_eq!(c.endpoint(&e2e).as_str(), "http://198.18.0.254:5000/");
        // An endpoint for a registry not pulled through is a mistake worth stopping for.
        let args = run_args(&[
            "--upstream-registries",
            "docker.io",
            "--upstream-endpoint",
            "ghcr.io=https://x",
        ]);
        let err = crate::run::upstream_config(&args.upstream).expect_err("refused");
        assert!(
            format!("{err:#}").contains("--upstream-endpoint ghcr.io"),
            "{err:#}"
        );
        // A credentials file that cannot be read names the flag and the file.
        let args = run_args(&["--upstream-credentials", "/nonexistent/config.json"]);
        let err = crate::run::upstream_config(&args.upstream).expect_err("refused");
        let text = format!("{err:#}");
        assert!(
            text.contains("--upstream-credentials /nonexistent/config.json"),
            "{text}"
        );
        let dir = tempfile::tempdir().expect("dir");
        let bad = dir.path().join("config.json");
        std::fs::write(&bad, "{not json").expect("write");
        let args = run_args(&["--upstream-credentials", bad.to_str().expect("utf-8")]);
        let err = crate::run::upstream_config(&args.upstream).expect_err("refused");
        assert!(
            format!("{err:#}").contains("not a Docker config.json"),
            "{err:#}"
        );
    }

    #[test]
    fn mirror_urls_that_are_not_a_host_and_port_are_refused_with_exit_2() {
        for ok in [
            "http://127.0.0.1:5000",
            "https://mirror.example",
            "http://node-1.internal:30020",
        ] {
            assert_eq!(parse_mirror_url(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "http://127.0.0.1:5000\n[host.\"http://evil\"]",
            "http://a\"b:5000",
            "http://a b",
            "http://host:5000/path",
            "http://host:0",
            "http://host:99999",
            "http://host:+80",
            "http://:5000",
            "http://a..b",
            "http://[fd00::1]x",
            "http://[nope]:1",
            "http://h\\x",
            "ftp://host",
        ] {
            assert!(parse_mirror_url(bad).is_err(), "{bad:?} accepted");
        }
        let err = Cli::try_parse_from(["mirrorlet", "configure", "--mirror-url", "http://a\"b"])
            .expect_err("refused");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--mirror-url"), "{err}");
    }

    #[test]
    fn ipv6_node_addresses_are_bracketed_in_mirror_urls() {
        for (given, want) in [
            ("http://fd00::1:30020", "http://[fd00::1]:30020"),
            ("http://[fd00::1]:30020", "http://[fd00::1]:30020"),
            ("https://2001:db8::7:443", "https://[2001:db8::7]:443"),
            ("http://10.0.0.1:30020", "http://10.0.0.1:30020"),
        ] {
            assert_eq!(parse_mirror_url(given).as_deref(), Ok(want), "{given}");
        }
        assert!(parse_mirror_url("http://fd00::zz:1").is_err());
        let cli = Cli::try_parse_from([
            "mirrorlet",
            "configure",
            "--mirror-url",
            "http://fd00::1:30020",
        ])
        .expect("parses");
        let Command::Configure(args) = cli.command else {
            panic!("configure")
        };
        assert_eq!(args.mirror_url, ["http://[fd00::1]:30020"]);
    }

    #[test]
    fn bad_values_name_the_flag_and_the_value() {
        for (args, flag, value) in [
            (vec!["run", "--listen", "nope:x"], "--listen", "nope:x"),
            (
                vec!["run", "--shutdown-grace", "soon"],
                "--shutdown-grace",
                "soon",
            ),
            (
                vec!["run", "--max-connections", "0"],
                "--max-connections",
                "0",
            ),
            (
                vec!["run", "--containerd-namespace", "a/b"],
                "--containerd-namespace",
                "a/b",
            ),
            (vec!["--log-format", "xml", "run"], "--log-format", "xml"),
            (
                vec!["configure", "--registries", "docker.io,Bad Host"],
                "--registries",
                "Bad Host",
            ),
            (
                vec!["configure", "--mirror-url", "127.0.0.1:5000"],
                "--mirror-url",
                "127.0.0.1:5000",
            ),
            (
                vec!["configure", "--dial-timeout", "0s"],
                "--dial-timeout",
                "0s",
            ),
            (
                vec!["run", "--upstream-endpoint", "docker.io"],
                "--upstream-endpoint",
                "docker.io",
            ),
            (
                vec!["run", "--upstream-endpoint", "ghcr.io=ftp://x"],
                "--upstream-endpoint",
                "ftp://x",
            ),
            (
                vec!["run", "--upstream-registries", "docker.io,Bad Host"],
                "--upstream-registries",
                "Bad Host",
            ),
            (
                vec!["run", "--upstream-registries", "_default"],
                "--upstream-registries",
                "_default",
            ),
            (
                vec!["run", "--tag-revalidate", "soon"],
                "--tag-revalidate",
                "soon",
            ),
            (
                vec!["run", "--upstream-read-timeout", "0s"],
                "--upstream-read-timeout",
                "0s",
            ),
            (
                vec!["run", "--max-peer-streams", "0"],
                "--max-peer-streams",
                "0",
            ),
            (vec!["preheat", "nginx", "Nginx:1"], "IMAGES", "Nginx:1"),
            (
                vec!["preheat", "--parallel", "0", "nginx"],
                "--parallel",
                "0",
            ),
            (
                vec!["status", "--url", "127.0.0.1:5002"],
                "--url",
                "127.0.0.1:5002",
            ),
            (
                vec!["wait-daemonset", "--daemonset", "Bad_Name"],
                "--daemonset",
                "Bad_Name",
            ),
        ] {
            let err = Cli::try_parse_from(std::iter::once("mirrorlet").chain(args.iter().copied()))
                .expect_err("bad value rejected")
                .to_string();
            assert!(err.contains(flag) && err.contains(value), "{args:?}: {err}");
        }
    }
}

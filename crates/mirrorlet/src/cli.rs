//! Command-line interface: one clap `Args` per subcommand. Every flag has a
//! `MIRRORLET_...` environment variable and a default, and converts into a validated config.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

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
    /// Print the version.
    Version,
}

/// Flags of `mirrorlet run`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// Address the registry (and /metrics, /livez, /readyz) listens on.
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
    /// Connections served at once; further connections are closed.
    #[arg(long, env = "MIRRORLET_MAX_CONNECTIONS", default_value = "1024", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_connections: u32,
    /// Time a client has to send its request head.
    #[arg(long, env = "MIRRORLET_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub(crate) header_read_timeout: Duration,
    /// On SIGTERM, time allowed for in-flight responses to finish.
    #[arg(long, env = "MIRRORLET_SHUTDOWN_GRACE", default_value = "20s", value_parser = parse_duration)]
    pub(crate) shutdown_grace: Duration,
    /// Peer-to-peer flags.
    #[command(flatten)]
    pub(crate) p2p: P2pArgs,
}

/// Peer-to-peer flags of `mirrorlet run`.
#[derive(Debug, Args)]
pub(crate) struct P2pArgs {
    /// Serve and fetch through peers (false: a node-local mirror only).
    #[arg(long = "p2p", env = "MIRRORLET_P2P", default_value = "true", action = clap::ArgAction::Set)]
    pub(crate) enabled: bool,
    /// Address the libp2p (DHT) listener binds.
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
    let rest = s
        .strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .ok_or("must start with http:// or https://")?;
    if rest.is_empty() || rest.contains(['/', '?', '#', ' ']) {
        return Err("must be scheme://host[:port] with no path".into());
    }
    Ok(s.to_owned())
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
        ] {
            let err = Cli::try_parse_from(std::iter::once("mirrorlet").chain(args.iter().copied()))
                .expect_err("bad value rejected")
                .to_string();
            assert!(err.contains(flag) && err.contains(value), "{args:?}: {err}");
        }
    }
}

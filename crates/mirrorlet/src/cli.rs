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
    Run(RunArgs),
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

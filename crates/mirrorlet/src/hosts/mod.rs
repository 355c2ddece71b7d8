//! `configure` and `cleanup`: containerd's registry host configuration
//! (`<config_path>/<registry>/hosts.toml`) pointing at the mirrorlet agent first and at the
//! real upstream as the `server`, so a dead agent never blocks a pull.
//!
//! A file mirrorlet writes starts with a marker line recording what was there before, so
//! configuring twice gives the same bytes and `cleanup` restores the original exactly: the
//! user's file (kept as `hosts.toml.mirrorlet-orig`, a hard link to the very file or
//! symbolic link that was there), or nothing.
//!
//! Both run as root on every node, so they write only inside the registry directories
//! under `config_path`: a registry directory that is a symbolic link is refused, and one
//! that is not is opened once and worked in through that handle (swapping it for a link
//! afterwards sends nothing elsewhere); temporary files are created exclusively and never
//! through a link, and an existing hosts.toml is read only if it is a regular file of
//! reasonable size. Every registry directory is
//! attempted; every failure is reported.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use toml_edit::{Array, DocumentMut, Item, Table, value};

mod dir;
#[cfg(test)]
mod tests;

use dir::RegistryDir;

/// The first line of every file mirrorlet writes.
const MARKER: &str = "# Written by mirrorlet configure; `mirrorlet cleanup` restores the original.";
/// The second line: the state to restore, e.g. `# mirrorlet-state: original=backup dir=existed`.
const STATE_PREFIX: &str = "# mirrorlet-state:";
const HOSTS: &str = "hosts.toml";
const BACKUP: &str = "hosts.toml.mirrorlet-orig";
const TEMP: &str = "hosts.toml.mirrorlet-tmp";

/// The default registries to mirror, comma-separated.
pub(crate) const DEFAULT_REGISTRIES: &str =
    "docker.io,ghcr.io,quay.io,registry.k8s.io,mcr.microsoft.com,public.ecr.aws,gcr.io";
/// The registries the agent pulls through unless told otherwise: the same public ones.
pub(crate) const DEFAULT_UPSTREAM_REGISTRIES: &str = DEFAULT_REGISTRIES;

/// What `configure` writes.
#[derive(Debug, Clone)]
pub(crate) struct ConfigureOptions {
    /// containerd's `config_path`, e.g. `/etc/containerd/certs.d`.
    pub(crate) config_path: PathBuf,
    /// Registry hosts to mirror (`_default` for every registry without its own directory).
    pub(crate) registries: Vec<String>,
    /// The agent's URLs, tried first in this order.
    pub(crate) mirrors: Vec<String>,
    /// containerd's `dial_timeout` for the agent, e.g. `200ms`.
    pub(crate) dial_timeout: String,
}

/// Why configuring or cleaning up failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HostsError {
    /// Reading or writing a file failed.
    #[error("{action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An existing hosts.toml is not valid TOML.
    #[error("existing {path} is not valid TOML (fix or remove it)")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: toml_edit::TomlError,
    },
    /// A path mirrorlet would write through is not what it must be.
    #[error("{path}: {why}; mirrorlet writes only inside the registry directories of config_path")]
    Refused {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// Some registry directories could not be configured or restored; the others were.
#[derive(Debug, thiserror::Error)]
#[error("{} of the registry directories under config_path failed", errors.len())]
pub(crate) struct Failed {
    /// What was done nonetheless.
    pub(crate) done: Vec<PathBuf>,
    /// Every failure.
    pub(crate) errors: Vec<HostsError>,
}

fn outcome(done: Vec<PathBuf>, errors: Vec<HostsError>) -> Result<Vec<PathBuf>, Failed> {
    if errors.is_empty() {
        Ok(done)
    } else {
        Err(Failed { done, errors })
    }
}

/// The largest hosts.toml read (they are a few hundred bytes).
const MAX_FILE: u64 = 1 << 20;

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> HostsError {
    let path = path.to_owned();
    move |source| HostsError::Io {
        action,
        path,
        source,
    }
}

/// What a registry directory held before mirrorlet touched it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    /// A user hosts.toml existed (and is kept in the backup file).
    had_file: bool,
    /// The directory existed.
    had_dir: bool,
}

impl State {
    fn line(self) -> String {
        let original = if self.had_file { "backup" } else { "none" };
        let dir = if self.had_dir { "existed" } else { "created" };
        format!("{STATE_PREFIX} original={original} dir={dir}")
    }

    /// Reads the state from a file mirrorlet wrote; `None` if the file is not ours.
    fn from_managed(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        if lines.next()? != MARKER {
            return None;
        }
        let state = lines.next()?.strip_prefix(STATE_PREFIX)?;
        let mut had_file = None;
        let mut had_dir = None;
        for kv in state.split_whitespace() {
            match kv {
                "original=backup" => had_file = Some(true),
                "original=none" => had_file = Some(false),
                "dir=existed" => had_dir = Some(true),
                "dir=created" => had_dir = Some(false),
                _ => {}
            }
        }
        Some(Self {
            had_file: had_file?,
            had_dir: had_dir?,
        })
    }
}

/// The real upstream for a registry, used as `server` when the user's file names none.
pub(crate) fn default_server(registry: &str) -> Option<String> {
    match registry {
        "_default" => None,
        "docker.io" => Some("https://registry-1.docker.io".to_owned()),
        other => Some(format!("https://{other}")),
    }
}

/// Writes hosts.toml for every registry in `opts`, and restores those it wrote before for
/// registries no longer listed (an upgrade that narrows the list leaves nothing pointing
/// at the agent). Returns the files written or already up to date; a registry that fails
/// leaves the others configured, and every failure is returned.
pub(crate) fn configure(opts: &ConfigureOptions) -> Result<Vec<PathBuf>, Failed> {
    let (mut done, mut errors) = (Vec::new(), Vec::new());
    for registry in &opts.registries {
        match configure_one(opts, registry) {
            Ok(file) => done.push(file),
            Err(e) => errors.push(e),
        }
    }
    match managed_dirs(&opts.config_path) {
        Ok(dirs) => {
            for dir in dirs {
                let listed = dir
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| opts.registries.iter().any(|r| r == n));
                if !listed && let Err(e) = restore(&dir) {
                    errors.push(e);
                }
            }
        }
        Err(e) => errors.push(e),
    }
    outcome(done, errors)
}

/// The registry's directory under `config_path`: one plain path component, and a real
/// directory if it exists (not a symbolic link, which would take our writes elsewhere),
/// opened (`None` if it does not exist yet).
fn registry_dir(
    config_path: &Path,
    registry: &str,
) -> Result<(PathBuf, Option<RegistryDir>), HostsError> {
    let dir = config_path.join(registry);
    let mut parts = Path::new(registry).components();
    if !matches!(
        (parts.next(), parts.next()),
        (Some(Component::Normal(_)), None)
    ) {
        return Err(HostsError::Refused {
            path: dir,
            why: "a registry name must be one path component",
        });
    }
    let opened = RegistryDir::open(&dir)?;
    Ok((dir, opened))
}

fn configure_one(opts: &ConfigureOptions, registry: &str) -> Result<PathBuf, HostsError> {
    let (path, opened) = registry_dir(&opts.config_path, registry)?;
    let file = path.join(HOSTS);
    let current = match &opened {
        Some(dir) => dir.read_optional(HOSTS)?,
        None => None,
    };
    let managed = current.as_deref().and_then(State::from_managed);
    let (state, original) = match (managed, &opened) {
        // Ours already: regenerate from the recorded original so the bytes stay the same.
        (Some(state), Some(dir)) => {
            let original = if state.had_file {
                dir.read_optional(BACKUP)?
            } else {
                None
            };
            (state, original)
        }
        _ => {
            let state = State {
                had_file: current.is_some(),
                had_dir: opened.is_some(),
            };
            (state, current.clone())
        }
    };
    // Rendered before anything is changed: a file refused leaves the directory as it was.
    let rendered = render(opts, registry, state, original.as_deref(), &file)?;
    let dir = match opened {
        Some(dir) => dir,
        None => {
            fs::create_dir_all(&opts.config_path).map_err(io_err("creating", &opts.config_path))?;
            fs::create_dir(&path).map_err(io_err("creating", &path))?;
            RegistryDir::open(&path)?.ok_or_else(|| HostsError::Refused {
                path: path.clone(),
                why: "removed while being configured",
            })?
        }
    };
    // The user's file keeps its permissions in ours (a 0600 original stays 0600), except
    // that nobody but the owner may write a file that steers containerd's pulls.
    let original_name = if managed.is_some() { BACKUP } else { HOSTS };
    let mode = dir.mode(original_name).unwrap_or(0o644) & !0o022;
    if managed.is_none() && state.had_file {
        dir.link(HOSTS, BACKUP)?;
    }
    if current.as_deref() != Some(rendered.as_str()) {
        dir.write_atomic(TEMP, HOSTS, &rendered, mode)?;
    }
    Ok(file)
}

/// Renders the managed file: marker, state, then the original's settings with the mirrors
/// as the first hosts.
fn render(
    opts: &ConfigureOptions,
    registry: &str,
    state: State,
    original: Option<&str>,
    path: &Path,
) -> Result<String, HostsError> {
    let orig: DocumentMut = original
        .unwrap_or("")
        .parse()
        .map_err(|source| HostsError::Parse {
            path: path.to_owned(),
            source,
        })?;
    let mut doc = DocumentMut::new();
    let root = orig.as_table();
    match root.get_key_value("server") {
        Some((key, server)) => {
            doc.insert_formatted(key, server.clone());
        }
        None => {
            if let Some(server) = default_server(registry) {
                doc.insert("server", value(server));
            }
        }
    }
    for (key, _) in orig.iter() {
        if let Some((k, item)) = root.get_key_value(key)
            && key != "server"
            && key != "host"
            && !item.is_table_like()
        {
            doc.insert_formatted(k, item.clone());
        }
    }
    // Other top-level tables (rare) keep their place after the plain keys.
    for (key, _) in orig.iter() {
        if let Some((k, item)) = root.get_key_value(key)
            && key != "host"
            && item.is_table_like()
        {
            doc.insert_formatted(k, item.clone());
        }
    }
    // The mirrors first, then the original's hosts in their order.
    let mut entries: Vec<(String, Item)> = Vec::new();
    for mirror in &opts.mirrors {
        let mut t = Table::new();
        let mut caps = Array::new();
        caps.push("pull");
        caps.push("resolve");
        t.insert("capabilities", value(caps));
        t.insert("dial_timeout", value(opts.dial_timeout.clone()));
        entries.push((mirror.clone(), Item::Table(t)));
    }
    if let Some(orig_hosts) = orig.get("host").and_then(Item::as_table_like) {
        for (url, item) in orig_hosts.iter() {
            if !opts.mirrors.iter().any(|m| m == url) {
                entries.push((url.to_owned(), item.clone()));
            }
        }
    }
    // containerd before 2.0 reads hosts.toml with a TOML parser that refuses `]` in a table
    // header, so `[host."http://[fd00::1]:30020"]` (an IPv6 address) breaks the whole file.
    // It orders hosts by the line their table starts on, and inline tables have none; but a
    // table made by dotted keys under `[host]` starts on its first key's line. So when one
    // host needs it, every host is written as dotted keys, in order.
    let dotted = entries.iter().any(|(url, _)| url.contains(['[', ']']));
    let mut hosts = Table::new();
    hosts.set_implicit(!dotted);
    for (url, mut item) in entries {
        if let Some(t) = item.as_table_mut() {
            t.set_position(None);
            if dotted {
                make_dotted(t);
            }
        }
        hosts.insert(&url, item);
    }
    doc.insert("host", Item::Table(hosts));
    let body = doc.to_string();
    Ok(format!(
        "{MARKER}\n{}\n{}{body}",
        state.line(),
        if body.starts_with('\n') { "" } else { "\n" }
    ))
}

/// Writes `table` (and the tables in it) as dotted keys of its parent.
fn make_dotted(table: &mut Table) {
    table.set_dotted(true);
    table.fmt();
    for (mut key, item) in table.iter_mut() {
        key.leaf_decor_mut().clear();
        if let Some(t) = item.as_table_mut() {
            make_dotted(t);
        }
    }
}

/// Restores every registry directory under `config_path` that mirrorlet configured.
/// Returns the directories restored; one that fails leaves the others restored, and every
/// failure is returned.
pub(crate) fn cleanup(config_path: &Path) -> Result<Vec<PathBuf>, Failed> {
    let (mut restored, mut errors) = (Vec::new(), Vec::new());
    match managed_dirs(config_path) {
        Ok(dirs) => {
            for dir in dirs {
                match restore(&dir) {
                    Ok(true) => restored.push(dir),
                    Ok(false) => {}
                    Err(e) => errors.push(e),
                }
            }
        }
        Err(e) => errors.push(e),
    }
    outcome(restored, errors)
}

/// The registry directories under `config_path`, sorted (none if it does not exist);
/// symbolic links are not followed.
fn managed_dirs(config_path: &Path) -> Result<Vec<PathBuf>, HostsError> {
    let entries = match fs::read_dir(config_path) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", config_path)(e)),
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// Puts back what a registry directory held before mirrorlet wrote its hosts.toml; `false`
/// if the file there is not mirrorlet's.
fn restore(path: &Path) -> Result<bool, HostsError> {
    let Some(dir) = RegistryDir::open(path)? else {
        return Ok(false);
    };
    let Some(state) = dir
        .read_optional(HOSTS)?
        .as_deref()
        .and_then(State::from_managed)
    else {
        return Ok(false);
    };
    if state.had_file {
        dir.rename(BACKUP, HOSTS, "restoring")?;
    } else {
        dir.remove_if_present(HOSTS)?;
        if !state.had_dir {
            // Only if nothing else was put there since.
            dir.remove_if_empty();
        }
    }
    Ok(true)
}

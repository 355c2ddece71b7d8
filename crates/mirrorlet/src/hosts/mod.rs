//! `configure` and `cleanup`: containerd's registry host configuration
//! (`<config_path>/<registry>/hosts.toml`) pointing at the mirrorlet agent first and at the
//! real upstream as the `server`, so a dead agent never blocks a pull.
//!
//! A file mirrorlet writes starts with a marker line recording what was there before, so
//! configuring twice gives the same bytes and `cleanup` restores the original exactly: the
//! user's file (kept byte for byte in `hosts.toml.mirrorlet-orig`), or nothing.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use toml_edit::{Array, DocumentMut, Item, Table, value};

#[cfg(test)]
mod tests;

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
    #[error("{action} {path}: {source}")]
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
    #[error("existing {path} is not valid TOML (fix or remove it): {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: toml_edit::TomlError,
    },
}

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
/// at the agent). Returns the files written or already up to date.
pub(crate) fn configure(opts: &ConfigureOptions) -> Result<Vec<PathBuf>, HostsError> {
    let mut done = Vec::new();
    for registry in &opts.registries {
        done.push(configure_one(opts, registry)?);
    }
    for dir in managed_dirs(&opts.config_path)? {
        let listed = dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| opts.registries.iter().any(|r| r == n));
        if !listed {
            restore(&dir)?;
        }
    }
    Ok(done)
}

fn read_optional(path: &Path) -> Result<Option<String>, HostsError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("reading", path)(e)),
    }
}

fn configure_one(opts: &ConfigureOptions, registry: &str) -> Result<PathBuf, HostsError> {
    let dir = opts.config_path.join(registry);
    let file = dir.join(HOSTS);
    let backup = dir.join(BACKUP);
    let current = read_optional(&file)?;
    let (state, original) = match current.as_deref().and_then(State::from_managed) {
        // Ours already: regenerate from the recorded original so the bytes stay the same.
        Some(state) => {
            let original = if state.had_file {
                read_optional(&backup)?
            } else {
                None
            };
            (state, original)
        }
        None => {
            let state = State {
                had_file: current.is_some(),
                had_dir: dir.is_dir(),
            };
            fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
            if let Some(text) = &current {
                write_atomic(&dir, &backup, text)?;
            }
            (state, current.clone())
        }
    };
    let rendered = render(opts, registry, state, original.as_deref(), &file)?;
    if current.as_deref() != Some(rendered.as_str()) {
        write_atomic(&dir, &file, &rendered)?;
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

fn write_atomic(dir: &Path, path: &Path, text: &str) -> Result<(), HostsError> {
    let tmp = dir.join(TEMP);
    fs::write(&tmp, text).map_err(io_err("writing", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("renaming into place", path))
}

/// Restores every registry directory under `config_path` that mirrorlet configured.
/// Returns the directories restored.
pub(crate) fn cleanup(config_path: &Path) -> Result<Vec<PathBuf>, HostsError> {
    let mut restored = Vec::new();
    for dir in managed_dirs(config_path)? {
        if restore(&dir)? {
            restored.push(dir);
        }
    }
    Ok(restored)
}

/// The registry directories under `config_path`, sorted (none if it does not exist).
fn managed_dirs(config_path: &Path) -> Result<Vec<PathBuf>, HostsError> {
    let entries = match fs::read_dir(config_path) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing", config_path)(e)),
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// Puts back what a registry directory held before mirrorlet wrote its hosts.toml; `false`
/// if the file there is not mirrorlet's.
fn restore(dir: &Path) -> Result<bool, HostsError> {
    let file = dir.join(HOSTS);
    let Some(state) = read_optional(&file)?
        .as_deref()
        .and_then(State::from_managed)
    else {
        return Ok(false);
    };
    if state.had_file {
        let backup = dir.join(BACKUP);
        fs::rename(&backup, &file).map_err(io_err("restoring", &backup))?;
    } else {
        fs::remove_file(&file).map_err(io_err("removing", &file))?;
        if !state.had_dir {
            // Only if nothing else was put there since.
            let _ = fs::remove_dir(dir);
        }
    }
    Ok(true)
}

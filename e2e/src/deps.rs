//! What the end-to-end tests need on the machine: root, Debian packages (installed when
//! missing), and an up-to-date `mirrorlet` binary.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};

use crate::process::run;

/// Binaries and the Debian packages that provide them.
const TOOLS: &[(&str, &str)] = &[
    ("/usr/bin/containerd", "containerd"),
    ("/usr/bin/ctr", "containerd"),
    ("/usr/bin/docker-registry", "docker-registry"),
    ("/usr/bin/skopeo", "skopeo"),
    ("/usr/sbin/ip", "iproute2"),
    ("/usr/sbin/tc", "iproute2"),
    ("/usr/bin/htpasswd", "apache2-utils"),
    ("/usr/sbin/dockerd", "docker.io"),
    ("/usr/bin/podman", "podman"),
];

/// Checks for root and installs missing packages (once per process).
pub fn ensure() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| install().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn install() -> Result<()> {
    anyhow::ensure!(
        nix::unistd::Uid::effective().is_root(),
        "the end-to-end tests need root (network namespaces, containerd)"
    );
    let mut missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(bin, _)| !Path::new(bin).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("e2e: installing {}", missing.join(" "));
    run("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    run("apt-get", &args).context("installing the e2e packages")?;
    Ok(())
}

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .unwrap_or_default()
}

/// The `mirrorlet` binary: `$MIRRORLET_BIN`, else built now with cargo (debug profile).
pub fn mirrorlet_bin() -> Result<PathBuf> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build() -> Result<PathBuf> {
    if let Ok(bin) = std::env::var("MIRRORLET_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let manifest = workspace().join("Cargo.toml");
    let manifest = manifest.display().to_string();
    run(
        &cargo,
        &[
            "build",
            "--quiet",
            "--manifest-path",
            &manifest,
            "-p",
            "mirrorlet",
            "--bin",
            "mirrorlet",
        ],
    )
    .context("building the mirrorlet binary")?;
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace().join("target"));
    Ok(target.join("debug").join("mirrorlet"))
}

/// One of this crate's own programs (`hub-front`, `corrupt-peer`), built beside the
/// running test or tool.
pub fn e2e_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the running program")?;
    let dirs = exe.ancestors().skip(1).take(2);
    for dir in dirs {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    anyhow::bail!(
        "{name} not found beside {}; build it with `cargo build -p mirrorlet-e2e --bins`",
        exe.display()
    )
}

/// Where generated test images are cached.
pub fn image_cache() -> PathBuf {
    workspace().join("target").join("e2e-images")
}

//! Headless Chromium (Debian's `chromium`), for tests of the pages the agent renders: the
//! DOM as the browser built it, and a screenshot.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Where Debian puts it.
const CHROMIUM: &str = "/usr/bin/chromium";
/// Longest a render may take.
const LIMIT: Duration = Duration::from_secs(60);

/// A page as Chromium rendered it.
#[derive(Debug)]
pub struct Rendered {
    /// The DOM after rendering (`--dump-dom`).
    pub dom: String,
    /// A PNG screenshot of the first `height` pixels.
    pub png: PathBuf,
}

/// Renders `url` at `width`x`height` into `dir` (`page.png`, and a profile directory).
pub fn render(url: &str, dir: &Path, width: u32, height: u32) -> Result<Rendered> {
    anyhow::ensure!(
        Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: install Debian's chromium (e2e/setup.sh does)"
    );
    std::fs::create_dir_all(dir)?;
    let png = dir.join("page.png");
    let _ = std::fs::remove_file(&png);
    let dom = run(
        dir,
        &["--dump-dom".to_owned(), url.to_owned()],
        "dumping the DOM",
    )?;
    run(
        dir,
        &[
            format!("--window-size={width},{height}"),
            format!("--screenshot={}", png.display()),
            url.to_owned(),
        ],
        "taking a screenshot",
    )?;
    anyhow::ensure!(png.exists(), "chromium wrote no screenshot");
    Ok(Rendered { dom, png })
}

/// Runs chromium headless (as root, with no background traffic: this machine's network is
/// closed) with `args`, bounded by [`LIMIT`]; returns its stdout.
fn run(dir: &Path, args: &[String], what: &str) -> Result<String> {
    let profile = dir.join("profile");
    let out_path = dir.join("chromium.out");
    let err_path = dir.join("chromium.err");
    let mut child = Command::new(CHROMIUM)
        .process_group(0)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("starting chromium for {what}"))?;
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            // Chromium's own children (renderer, GPU, zygote) are in its process group.
            let _ = kill(Pid::from_raw(-(child.id() as i32)), Signal::SIGKILL);
            let _ = child.wait();
            anyhow::bail!("chromium {what}: no result within {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&err_path).unwrap_or_default();
    anyhow::ensure!(
        status.success(),
        "chromium {what}: {status}: {}",
        err.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
    );
    Ok(std::fs::read_to_string(&out_path)?)
}

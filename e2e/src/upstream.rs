//! The upstream registry: Debian's `docker-registry` (CNCF Distribution 2.8) on its own
//! simulated host, plain HTTP on port 5000.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::net::Host;
use crate::process::Proc;

/// Port the registry listens on.
pub const PORT: u16 = 5000;

/// A running (or stopped) upstream registry.
#[derive(Debug)]
pub struct Upstream {
    /// Its host.
    pub host: Host,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Upstream {
    /// Starts a registry with its storage under `dir`.
    pub async fn start(host: Host, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir.join("storage"))?;
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {}:{PORT}\n",
            dir.join("storage").display(),
            host.addr
        );
        std::fs::write(dir.join("config.yml"), config)?;
        let mut me = Self {
            host,
            dir: dir.to_owned(),
            proc: None,
        };
        me.resume().await?;
        Ok(me)
    }

    /// `host:port`.
    pub fn authority(&self) -> String {
        format!("{}:{PORT}", self.host.addr)
    }

    /// `http://host:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.authority())
    }

    /// Stops the registry (pulls that reach it now fail fast with connection refused).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.stop(Duration::from_secs(3));
        }
    }

    /// Starts it again on the same storage.
    pub async fn resume(&mut self) -> Result<()> {
        if self.proc.is_some() {
            return Ok(());
        }
        let args = vec![
            "serve".to_owned(),
            self.dir.join("config.yml").display().to_string(),
        ];
        let log = self.dir.join("registry.log");
        self.proc = Some(Proc::spawn(
            "upstream",
            Some(&self.host.netns),
            Path::new("/usr/bin/docker-registry"),
            &args,
            &log,
        )?);
        let url = format!("{}/v2/", self.url());
        crate::process::wait_http_ok(
            &url,
            Duration::from_secs(20),
            "the upstream registry to answer",
        )
        .await
        .with_context(|| format!("registry log:\n{}", self.log_tail()))
    }

    /// The end of the registry's log.
    pub fn log_tail(&self) -> String {
        self.proc
            .as_ref()
            .map(|p| p.log_tail(30))
            .unwrap_or_default()
    }
}

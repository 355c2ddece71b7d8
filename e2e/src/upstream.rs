//! The upstream registry: Debian's `docker-registry` (CNCF Distribution 2.8) on its own
//! simulated host, plain HTTP on port 5000.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::net::Host;
use crate::process::Proc;

/// Port the registry listens on.
pub const PORT: u16 = 5000;

/// One request in the registry's access log (combined log format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// The client's address.
    pub client: String,
    /// `GET`, `HEAD`, ...
    pub method: String,
    /// The path (and query).
    pub path: String,
    /// The status answered.
    pub status: u16,
    /// Body bytes sent.
    pub bytes: u64,
    /// The client's User-Agent.
    pub user_agent: String,
}

impl Access {
    /// Reads `1.2.3.4 - - [date] "GET /v2/... HTTP/1.1" 200 123 "" "agent"`.
    pub fn parse(line: &str) -> Option<Self> {
        let (client, rest) = line.split_once(" - - [")?;
        let (_, rest) = rest.split_once("] \"")?;
        let (request, rest) = rest.split_once('"')?;
        let mut req = request.split(' ');
        let (method, path) = (req.next()?, req.next()?);
        let mut fields = rest.trim_start().splitn(3, ' ');
        let status = fields.next()?.parse().ok()?;
        let bytes = fields.next()?.parse().unwrap_or(0);
        let user_agent = fields
            .next()?
            .rsplit('"')
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        Some(Self {
            client: client.to_owned(),
            method: method.to_owned(),
            path: path.to_owned(),
            status,
            bytes,
            user_agent,
        })
    }

    /// Whether this is a GET of a blob or of a manifest by digest.
    pub fn is_content_get(&self) -> bool {
        self.method == "GET"
            && (self.path.contains("/blobs/sha256:") || self.path.contains("/manifests/sha256:"))
    }
}

/// A running (or stopped) upstream registry.
#[derive(Debug)]
pub struct Upstream {
    /// Its host.
    pub host: Host,
    dir: PathBuf,
    proc: Option<Proc>,
}

impl Upstream {
    /// Starts a registry with its storage under `dir`; with a `login`, it wants that user
    /// and password (htpasswd, Basic auth) for everything.
    pub async fn start(host: Host, dir: &Path, login: Option<&(String, String)>) -> Result<Self> {
        std::fs::create_dir_all(dir.join("storage"))?;
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: \":{PORT}\"\n",
            dir.join("storage").display(),
        );
        if let Some((user, password)) = login {
            let htpasswd = crate::process::run("htpasswd", &["-Bbn", user, password])?;
            let path = dir.join("htpasswd");
            std::fs::write(&path, htpasswd)?;
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: e2e\n    path: {}\n",
                path.display()
            ));
        }
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
        self.authority_at(false)
    }

    /// `host:port` at its IPv6 address if `ipv6` (the registry listens on both).
    pub fn authority_at(&self, ipv6: bool) -> String {
        std::net::SocketAddr::new(self.host.ip(ipv6), PORT).to_string()
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
        // Up when it answers /v2/, with 200 or (wanting a login) 401.
        let url = format!("{}/v2/", self.url());
        let http = reqwest::Client::new();
        crate::wait::wait_until(
            Duration::from_secs(20),
            "the upstream registry to answer",
            || {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    http.get(&url)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success() || r.status() == 401)
                }
            },
        )
        .await
        .with_context(|| format!("registry log:\n{}", self.log_tail()))
    }

    /// Every request in the registry's access log so far.
    pub fn access_log(&self) -> Vec<Access> {
        std::fs::read_to_string(self.dir.join("registry.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(Access::parse)
            .collect()
    }

    /// The end of the registry's log.
    pub fn log_tail(&self) -> String {
        self.proc
            .as_ref()
            .map(|p| p.log_tail(30))
            .unwrap_or_default()
    }
}

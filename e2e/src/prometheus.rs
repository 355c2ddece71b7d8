//! A real Prometheus (Debian's `prometheus`) scraping the test agents, for tests of the
//! chart's dashboard: its queries are evaluated by Prometheus itself, as Grafana would
//! have them evaluated.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::process::Proc;
use crate::wait::wait_until;

/// Where Debian puts it.
const PROMETHEUS: &str = "/usr/bin/prometheus";
/// How often the agents are scraped.
pub const SCRAPE_EVERY: Duration = Duration::from_secs(1);

/// A Prometheus server on a loopback port, stopped when dropped.
#[derive(Debug)]
pub struct Prometheus {
    url: String,
    _proc: Proc,
}

/// One series of a range query: its labels and its (unix seconds, value) points.
#[derive(Debug, Clone)]
pub struct Series {
    /// The series' labels.
    pub labels: serde_json::Map<String, Value>,
    /// The points, oldest first; NaN where Prometheus said so.
    pub points: Vec<(f64, f64)>,
}

impl Prometheus {
    /// Starts Prometheus in `dir`, scraping `targets` (`host:port` of the agents'
    /// operational listeners) every [`SCRAPE_EVERY`], and waits until it has scraped them
    /// all once.
    pub async fn start(dir: &Path, targets: &[String]) -> Result<Self> {
        anyhow::ensure!(
            Path::new(PROMETHEUS).exists(),
            "{PROMETHEUS} is missing: install Debian's prometheus (e2e/setup.sh does)"
        );
        std::fs::create_dir_all(dir)?;
        let quoted: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: {s}s\n  scrape_timeout: {s}s\nscrape_configs:\n  - job_name: mirrorlet\n    static_configs:\n      - targets: [{}]\n",
            quoted.join(", "),
            s = SCRAPE_EVERY.as_secs()
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let port = free_port()?;
        let url = format!("http://127.0.0.1:{port}");
        let data: PathBuf = dir.join("data");
        let args = vec![
            format!("--config.file={}", config_path.display()),
            format!("--storage.tsdb.path={}", data.display()),
            format!("--web.listen-address=127.0.0.1:{port}"),
            "--log.level=warn".to_owned(),
        ];
        let proc = Proc::spawn(
            "prometheus",
            None,
            Path::new(PROMETHEUS),
            &args,
            &dir.join("prometheus.log"),
        )?;
        let me = Self { url, _proc: proc };
        let want = targets.len();
        wait_until(
            Duration::from_secs(60),
            "Prometheus to scrape every agent",
            || {
                let me = &me;
                async move {
                    me.query_instant("sum(up)")
                        .await
                        .ok()
                        .and_then(|v| v.first().and_then(|s| s.points.last().map(|p| p.1)))
                        .is_some_and(|up| up >= want as f64)
                }
            },
        )
        .await
        .with_context(|| format!("log: {}", dir.join("prometheus.log").display()))?;
        Ok(me)
    }

    /// Evaluates `query` now.
    pub async fn query_instant(&self, query: &str) -> Result<Vec<Series>> {
        let url = format!("{}/api/v1/query", self.url);
        self.get(&url, &[("query", query.to_owned())]).await
    }

    /// Evaluates `query` from `start` to `end` (unix seconds) every `step`.
    pub async fn query_range(
        &self,
        query: &str,
        start: f64,
        end: f64,
        step: Duration,
    ) -> Result<Vec<Series>> {
        let url = format!("{}/api/v1/query_range", self.url);
        let params = [
            ("query", query.to_owned()),
            ("start", format!("{start:.3}")),
            ("end", format!("{end:.3}")),
            ("step", format!("{}s", step.as_secs_f64())),
        ];
        self.get(&url, &params).await
    }

    async fn get(&self, url: &str, params: &[(&str, String)]) -> Result<Vec<Series>> {
        let url = reqwest::Url::parse_with_params(url, params)?;
        let body: Value = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(10))
            .send()
            .await?
            .json()
            .await?;
        anyhow::ensure!(
            body["status"] == "success",
            "Prometheus refused {:?}: {} {}",
            params.first().map(|p| &p.1),
            body["errorType"],
            body["error"]
        );
        let data = &body["data"];
        let result = data["result"].as_array().cloned().unwrap_or_default();
        Ok(result
            .into_iter()
            .map(|r| {
                let mut raw: Vec<Value> = r["values"].as_array().cloned().unwrap_or_default();
                if let Some(v) = r.get("value") {
                    raw.push(v.clone());
                }
                let points = raw
                    .iter()
                    .filter_map(|p| {
                        let t = p[0].as_f64()?;
                        let v = p[1].as_str()?.parse::<f64>().ok()?;
                        Some((t, v))
                    })
                    .collect();
                Series {
                    labels: r["metric"].as_object().cloned().unwrap_or_default(),
                    points,
                }
            })
            .collect())
    }
}

/// Seconds since the epoch.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

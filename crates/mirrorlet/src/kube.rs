//! `mirrorlet wait-daemonset`: waits until a DaemonSet's pod is ready on every node it is
//! scheduled to. The chart's uninstall hook runs `cleanup` on every node in a DaemonSet and
//! uses this (in a Job, which Helm waits for) to hold `helm uninstall` until each node's
//! hosts.toml files are restored. It reads two objects from the Kubernetes API with the pod's
//! service account; the agent itself never talks to the API.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

/// A reader of the Kubernetes API as the pod's service account.
pub(crate) struct Api {
    http: reqwest::Client,
    base: String,
    token_file: PathBuf,
}

/// Where to reach the API and as whom.
pub(crate) struct ApiConfig {
    /// `https://host:port`; empty: from `KUBERNETES_SERVICE_HOST` and `_PORT`.
    pub(crate) server: String,
    /// The mounted service account: `token`, `ca.crt` and `namespace`.
    pub(crate) service_account_dir: PathBuf,
}

impl ApiConfig {
    /// The namespace the pod runs in.
    pub(crate) fn own_namespace(&self) -> anyhow::Result<String> {
        let file = self.service_account_dir.join("namespace");
        let ns = std::fs::read_to_string(&file)
            .with_context(|| format!("reading the pod's namespace from {}", file.display()))?;
        Ok(ns.trim().to_owned())
    }
}

impl Api {
    /// A client for `config`. TLS trusts only the cluster's CA (`ca.crt`).
    pub(crate) fn new(config: &ApiConfig) -> anyhow::Result<Self> {
        let base = if config.server.is_empty() {
            let host = std::env::var("KUBERNETES_SERVICE_HOST").context(
                "KUBERNETES_SERVICE_HOST is not set: not in a pod? (or pass --api-server)",
            )?;
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            // An IPv6 service address needs brackets in a URL.
            if host.contains(':') {
                format!("https://[{host}]:{port}")
            } else {
                format!("https://{host}:{port}")
            }
        } else {
            config.server.trim_end_matches('/').to_owned()
        };
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15));
        if base.starts_with("https://") {
            let file = config.service_account_dir.join("ca.crt");
            let pem = std::fs::read(&file)
                .with_context(|| format!("reading the cluster CA from {}", file.display()))?;
            let ca = reqwest::Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|certs| !certs.is_empty())
                .with_context(|| format!("{} is not a PEM certificate", file.display()))?;
            builder = builder.tls_certs_only(ca);
        }
        Ok(Self {
            http: builder.build().context("building the API client")?,
            base,
            token_file: config.service_account_dir.join("token"),
        })
    }

    /// GET `path` as JSON. The token is read each time: Kubernetes rotates it.
    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        let token = read_token(&self.token_file)?;
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .get(&url)
            .bearer_auth(token)
            .header("accept", "application/json")
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .with_context(|| format!("GET {url}"))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).chars().take(200).collect());
            bail!("GET {url}: {status}: {message}");
        }
        serde_json::from_slice(&body).with_context(|| format!("GET {url}: not JSON"))
    }
}

fn read_token(file: &Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(file)
        .with_context(|| format!("reading the service account token {}", file.display()))?;
    Ok(token.trim().to_owned())
}

/// How far a DaemonSet's rollout is, from its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rollout {
    /// The controller has seen the current spec.
    observed: bool,
    desired: u64,
    ready: u64,
    updated: u64,
}

impl Rollout {
    fn of(ds: &Value) -> Self {
        let n = |v: &Value| v.as_u64().unwrap_or(0);
        let status = &ds["status"];
        Self {
            observed: n(&status["observedGeneration"]) >= n(&ds["metadata"]["generation"])
                && !status["observedGeneration"].is_null(),
            desired: n(&status["desiredNumberScheduled"]),
            ready: n(&status["numberReady"]),
            updated: n(&status["updatedNumberScheduled"]),
        }
    }

    fn done(self) -> bool {
        self.observed && self.ready == self.desired && self.updated == self.desired
    }
}

/// Waits until DaemonSet `name` in `namespace` is ready on every node it is scheduled to,
/// logging progress, for `timeout` at most. On timeout the error names the nodes whose pod
/// is not ready and why.
pub(crate) async fn wait_daemonset(
    api: &Api,
    namespace: &str,
    name: &str,
    timeout: Duration,
    poll: Duration,
) -> anyhow::Result<()> {
    let path = format!("/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}");
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last: Option<Rollout> = None;
    loop {
        match api.get(&path).await {
            Ok(ds) => {
                let now = Rollout::of(&ds);
                if last != Some(now) && now.observed {
                    tracing::info!(
                        daemonset = name,
                        ready = now.ready,
                        nodes = now.desired,
                        "{}/{} nodes done",
                        now.ready,
                        now.desired
                    );
                }
                last = Some(now);
                if now.done() {
                    return Ok(());
                }
                if tokio::time::Instant::now() + poll > deadline {
                    let pending = not_ready(api, namespace, &ds)
                        .await
                        .unwrap_or_else(|e| format!("(the pods could not be listed: {e:#})"));
                    bail!(
                        "daemonset {namespace}/{name}: {} of {} nodes done after {}; not done: {pending}",
                        now.ready,
                        now.desired,
                        humantime::format_duration(timeout)
                    );
                }
            }
            Err(e) if tokio::time::Instant::now() + poll > deadline => {
                return Err(e.context(format!("daemonset {namespace}/{name}")));
            }
            // Transient API errors are retried until the deadline.
            Err(e) => tracing::warn!("{e:#}"),
        }
        tokio::time::sleep(poll).await;
    }
}

/// The DaemonSet's pods that are not ready: `node (phase: reason)`, comma-separated.
async fn not_ready(api: &Api, namespace: &str, ds: &Value) -> anyhow::Result<String> {
    let selector = ds["spec"]["selector"]["matchLabels"]
        .as_object()
        .context("the daemonset has no matchLabels")?
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(",");
    let pods = api
        .get(&format!(
            "/api/v1/namespaces/{namespace}/pods?labelSelector={}",
            form_urlencoded::byte_serialize(selector.as_bytes()).collect::<String>()
        ))
        .await?;
    let mut pending: Vec<String> = pods["items"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|pod| !is_ready(pod))
        .map(|pod| {
            let node = pod["spec"]["nodeName"].as_str().unwrap_or("(unscheduled)");
            let phase = pod["status"]["phase"].as_str().unwrap_or("Unknown");
            match waiting_reason(pod) {
                Some(reason) => format!("{node} ({phase}: {reason})"),
                None => format!("{node} ({phase})"),
            }
        })
        .collect();
    pending.sort();
    Ok(if pending.is_empty() {
        "(no pod yet on the remaining nodes)".into()
    } else {
        pending.join(", ")
    })
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// Why the pod's first waiting container (init containers first) is waiting.
fn waiting_reason(pod: &Value) -> Option<String> {
    let status = &pod["status"];
    [
        &status["initContainerStatuses"],
        &status["containerStatuses"],
    ]
    .into_iter()
    .filter_map(Value::as_array)
    .flatten()
    .find_map(|c| {
        let waiting = &c["state"]["waiting"];
        let reason = waiting["reason"].as_str()?;
        Some(match waiting["message"].as_str() {
            Some(m) => format!("{reason}, {}", m.chars().take(120).collect::<String>()),
            None => reason.to_owned(),
        })
    })
}

#[cfg(test)]
mod tests;

//! `mirrorlet status`: a running agent's status page (`GET /status?format=json` on its
//! operational listener), printed for a terminal.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context;
use mirrorlet_registry::status::{
    bytes, hit_ratio_text, human, peer_rows, text as value, upstream_rows,
};
use serde_json::Value;

use crate::cli::{StatusArgs, StatusOutput};

/// Fetches and prints the status.
pub(crate) async fn print(args: &StatusArgs) -> anyhow::Result<()> {
    let url = format!("{}/status?format=json", args.url);
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .build()?;
    let response = http
        .get(&url)
        .send()
        .await
        .with_context(|| format!("GET {url} (is the agent's --metrics-listen there?)"))?;
    let status = response.status();
    let body = response
        .text()
        .await
        .with_context(|| format!("GET {url}"))?;
    anyhow::ensure!(status.is_success(), "GET {url}: {status}: {}", body.trim());
    let report: Value = serde_json::from_str(&body)
        .with_context(|| format!("GET {url}: not a mirrorlet status report"))?;
    match args.output {
        StatusOutput::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        StatusOutput::Text => print!("{}", text(&report)),
    }
    Ok(())
}

/// Left-aligned columns, two spaces apart, indented by two.
fn table(out: &mut String, head: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = head.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = String>| {
        let cells: Vec<String> = cells.collect();
        let last = cells.len().saturating_sub(1);
        let mut text = String::from("  ");
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(out, &mut head.iter().map(|h| (*h).to_owned()));
    if rows.is_empty() {
        out.push_str("  (none)\n");
    }
    for row in rows {
        line(out, &mut row.iter().cloned());
    }
}

/// The report as text.
pub(crate) fn text(r: &Value) -> String {
    let node = &r["node"];
    let mut out = String::new();
    let state = |ok: &Value, yes: &str, why: &Value| {
        if ok.as_bool() == Some(true) {
            yes.to_owned()
        } else {
            format!("NOT {yes} ({})", value(why))
        }
    };
    let _ = writeln!(
        out,
        "mirrorlet {} on {}: {}, {}, up {}",
        value(&node["version"]),
        value(&node["id"]),
        state(&node["ready"], "ready", &node["not_ready"]),
        state(&node["live"], "live", &node["not_live"]),
        human(&node["uptime_seconds"]),
    );
    let listen = &node["listen"];
    let p2p: Vec<String> = listen["p2p"]
        .as_array()
        .into_iter()
        .flatten()
        .map(value)
        .collect();
    let _ = writeln!(
        out,
        "listening: registry {}, operations {}, peer-to-peer {}",
        value(&listen["registry"]),
        value(&listen["operations"]),
        if node["p2p"].as_bool() == Some(true) {
            p2p.join(" ")
        } else {
            "off".to_owned()
        },
    );
    let served = &r["served"];
    let ratio = hit_ratio_text(r);
    let by_source: Vec<String> = served["content_gets_by_source"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k} {}", value(v)))
        .collect();
    let _ = writeln!(
        out,
        "serving: hit ratio {ratio} ({}); {} peers connected, {} keys advertised",
        if by_source.is_empty() {
            "nothing yet".to_owned()
        } else {
            by_source.join(", ")
        },
        value(&r["connected_peers"]),
        value(&r["advertised_keys"]),
    );
    if !r["router_error"].is_null() {
        let _ = writeln!(out, "router: {}", value(&r["router_error"]));
    }

    out.push_str("\npeers\n");
    let rows: Vec<Vec<String>> = peer_rows(r)
        .into_iter()
        .map(|p| vec![p.id, p.registry, p.state, p.failure])
        .collect();
    table(
        &mut out,
        &["PEER", "REGISTRY", "STATE", "LAST FAILURE"],
        &rows,
    );

    out.push_str("\nupstream registries\n");
    let rows: Vec<Vec<String>> = upstream_rows(r)
        .into_iter()
        .map(|u| {
            vec![
                u.registry,
                u.endpoint,
                u.credentials.to_owned(),
                u.budget,
                u.trouble.unwrap_or_else(|| "ok".to_owned()),
                u.problem,
            ]
        })
        .collect();
    table(
        &mut out,
        &[
            "REGISTRY",
            "ENDPOINT",
            "CREDENTIALS",
            "RATE LIMIT LEFT",
            "STATE",
            "LAST PROBLEM",
        ],
        &rows,
    );

    out.push_str("\nrecently served (newest first)\n");
    let rows: Vec<Vec<String>> = served["recent"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|q| {
            vec![
                human(&q["seconds_ago"]),
                value(&q["status"]),
                value(&q["source"]),
                value(&q["requester"]),
                bytes(&q["bytes"]),
                format!(
                    "{} {} ({})",
                    value(&q["method"]),
                    value(&q["path"]),
                    value(&q["registry"])
                ),
            ]
        })
        .collect();
    table(
        &mut out,
        &["AGO", "STATUS", "FROM", "FOR", "SIZE", "REQUEST"],
        &rows,
    );
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn a_report_reads_as_aligned_sections() {
        let report = json!({
            "node": {"id": "12D3KooWabc", "version": "0.1.0", "uptime_seconds": 3725.0,
                     "ready": false, "not_ready": "containerd: connection refused", "live": true,
                     "not_live": null, "listen": {"registry": "[::]:5000", "operations": "[::]:5002",
                     "p2p": ["/ip4/10.0.0.5/tcp/5001"]}, "p2p": true, "containerd_namespace": "k8s.io"},
            "router_error": null, "connected_peers": 1, "advertised_keys": 42,
            "peers": [{"id": "12D3KooWxyz", "registry": "10.0.0.6:5000", "address": "/ip4/10.0.0.6/tcp/5001",
                       "state": "connected", "last_failure": {"seconds_ago": 12.0, "reason": "reset"},
                       "skipped_for_seconds": 48.0}],
            "served": {"hit_ratio": 0.75, "content_gets_by_source": {"local": 2, "peer": 1, "upstream-fallthrough": 1},
                       "recent": [{"seconds_ago": 0.2, "method": "GET", "path": "/v2/library/nginx/blobs/sha256:aa",
                                   "registry": "docker.io", "status": 200, "source": "peer", "requester": "containerd",
                                   "bytes": 3_145_728, "ms": 4.2}]},
            "upstream": [{"registry": "docker.io", "endpoint": "https://registry-1.docker.io/", "credentials": true,
                          "ratelimit_remaining": 97, "ratelimit_limit": 100, "rate_limited_for_seconds": null,
                          "unreachable_for_seconds": 3.0, "last_problem": {"seconds_ago": 2.0, "what": "unreachable: timeout"}}]
        });
        let text = text(&report);
        for want in [
            "mirrorlet 0.1.0 on 12D3KooWabc: NOT ready (containerd: connection refused), live, up 1h 2m 5s",
            "serving: hit ratio 75.0% (local 2, peer 1, upstream-fallthrough 1); 1 peers connected, 42 keys advertised",
            "  12D3KooWxyz  10.0.0.6:5000  connected  12s ago: reset (skipped for 48s more)",
            "  docker.io  https://registry-1.docker.io/  yes          97 of 100        unreachable, retrying in 3s  2s ago: unreachable: timeout",
            "  now  200     peer  containerd  3.0 MiB  GET /v2/library/nginx/blobs/sha256:aa (docker.io)",
        ] {
            assert!(text.contains(want), "{want:?} in:\n{text}");
        }
    }
}

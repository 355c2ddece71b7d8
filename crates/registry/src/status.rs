//! The status page, `GET /status` on the operational listener: this node, its peers, what
//! it served recently and from where, and how each upstream registry stands. HTML rendered
//! here (no JavaScript), or JSON with `?format=json` (for scripts and `mirrorlet status`).
//! Read-only; it shows no credentials or tokens, only whether a registry has some.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::{RawQuery, State};
use axum::response::{Html, IntoResponse, Response};
use http::{StatusCode, header};
use serde_json::{Value, json};

use crate::state::AppState;

/// `GET /status`: HTML, or JSON with `?format=json`.
pub async fn status(State(state): State<Arc<AppState>>, RawQuery(query): RawQuery) -> Response {
    let format = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "format")
        .map(|(_, v)| v.into_owned());
    let report = report(&state).await;
    match format.as_deref() {
        Some("json") => (
            [(header::CONTENT_TYPE, "application/json")],
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        )
            .into_response(),
        None | Some("html") => Html(html(&report)).into_response(),
        Some(other) => (
            StatusCode::BAD_REQUEST,
            format!("unknown format {other:?}: use format=json or format=html\n"),
        )
            .into_response(),
    }
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

fn ago(at: SystemTime) -> f64 {
    secs(SystemTime::now().duration_since(at).unwrap_or_default())
}

/// Everything the page shows, as JSON.
pub async fn report(state: &AppState) -> Value {
    let bounded = Duration::from_secs(2);
    let router = tokio::time::timeout(bounded, state.router.status()).await;
    let (router_error, router) = match router {
        Ok(Ok(s)) => (None, s),
        Ok(Err(e)) => (Some(e.to_string()), Default::default()),
        Err(_) => (
            Some("the router did not answer".to_owned()),
            Default::default(),
        ),
    };
    let check = |r: Result<Result<(), String>, _>| match r {
        Ok(Ok(())) => Value::Null,
        Ok(Err(why)) => Value::String(why),
        Err(_) => Value::String("the check did not finish in 2s".into()),
    };
    let not_ready = check(tokio::time::timeout(bounded, (state.ready)()).await);
    let not_live = check(tokio::time::timeout(bounded, (state.live)()).await);
    let peers: Vec<Value> = router
        .peers
        .iter()
        .map(|p| {
            let failure = p.registry.and_then(|a| state.failed_peers.last(&a));
            let skipped = failure
                .as_ref()
                .map(|f| f.until.saturating_duration_since(std::time::Instant::now()))
                .filter(|d| !d.is_zero());
            json!({
                "id": p.id,
                "registry": p.registry.map(|a| a.to_string()),
                "address": p.address,
                "state": p.state.as_str(),
                "last_failure": failure.map(|f| json!({"seconds_ago": ago(f.at), "reason": f.reason})),
                "skipped_for_seconds": skipped.map(secs),
            })
        })
        .collect();
    let (recent, by_source) = state.recent.snapshot();
    let total: u64 = by_source
        .iter()
        .filter(|(s, _)| **s != "none")
        .map(|(_, n)| n)
        .sum();
    let misses = by_source.get("upstream-fallthrough").copied().unwrap_or(0);
    #[allow(clippy::cast_precision_loss)]
    let hit_ratio = (total > 0).then(|| 1.0 - misses as f64 / total as f64);
    let recent: Vec<Value> = recent
        .iter()
        .map(|s| {
            json!({
                "seconds_ago": ago(s.at),
                "method": s.method,
                "path": s.path,
                "registry": s.registry,
                "status": s.status,
                "source": s.source,
                "requester": s.requester,
                "bytes": s.bytes,
                "ms": (s.elapsed.as_secs_f64() * 10_000.0).round() / 10.0,
            })
        })
        .collect();
    let upstream: Vec<Value> = state
        .upstream
        .states()
        .into_iter()
        .map(|u| {
            json!({
                "registry": u.registry.to_string(),
                "endpoint": u.endpoint,
                "credentials": u.credentials,
                "ratelimit_remaining": u.remaining,
                "ratelimit_limit": u.limit,
                "rate_limited_for_seconds": u.rate_limited_for.map(secs),
                "unreachable_for_seconds": u.unreachable_for.map(secs),
                "last_problem": u.last_problem.map(|(at, what)| json!({"seconds_ago": ago(at), "what": what})),
            })
        })
        .collect();
    let node = &state.node;
    json!({
        "node": {
            "id": state.router.local_id(),
            "version": node.version,
            "uptime_seconds": ago(state.started).round(),
            "ready": not_ready.is_null(),
            "not_ready": not_ready,
            "live": not_live.is_null(),
            "not_live": not_live,
            "containerd_namespace": node.containerd_namespace,
            "listen": {
                "registry": node.registry_listen,
                "operations": node.operations_listen,
                "p2p": router.listen,
            },
            "p2p": node.p2p,
        },
        "router_error": router_error,
        "connected_peers": router.connected_peers,
        "advertised_keys": router.advertised_keys,
        "peers": peers,
        "served": {
            "hit_ratio": hit_ratio,
            "content_gets_by_source": by_source,
            "recent": recent,
        },
        "upstream": upstream,
    })
}

/// A JSON value as text (`–` for none).
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => "–".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn esc(v: &Value) -> String {
    escape(&text(v))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The hit ratio of a report as text (`75.0%`, `–` before any pull).
pub fn hit_ratio_text(report: &Value) -> String {
    report["served"]["hit_ratio"]
        .as_f64()
        .map_or_else(|| "–".to_owned(), |x| format!("{:.1}%", x * 100.0))
}

/// One peer of a report, as the page and the terminal show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRow {
    /// Its peer id.
    pub id: String,
    /// Where its registry listens.
    pub registry: String,
    /// Its connection's address.
    pub address: String,
    /// `connected`, `idle` (connections close when idle) or `unreachable`.
    pub state: String,
    /// Its last failure, how long ago, and how long it is still skipped (`–` if none).
    pub failure: String,
}

/// The peers of a report.
pub fn peer_rows(report: &Value) -> Vec<PeerRow> {
    report["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| PeerRow {
            id: text(&p["id"]),
            registry: text(&p["registry"]),
            address: text(&p["address"]),
            state: text(&p["state"]),
            failure: match &p["last_failure"] {
                Value::Null => "–".to_owned(),
                f => format!(
                    "{} ago: {}{}",
                    human(&f["seconds_ago"]),
                    text(&f["reason"]),
                    if p["skipped_for_seconds"].is_number() {
                        format!(" (skipped for {} more)", human(&p["skipped_for_seconds"]))
                    } else {
                        String::new()
                    }
                ),
            },
        })
        .collect()
}

/// One upstream registry of a report, as the page and the terminal show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamRow {
    /// The registry's name.
    pub registry: String,
    /// Where it is reached.
    pub endpoint: String,
    /// `yes` if the agent has credentials for it.
    pub credentials: &'static str,
    /// What is left of its rate-limit budget (`3 of 100`, `–` when it reports none).
    pub budget: String,
    /// Why it is left alone for now (rate limited, unreachable), if it is.
    pub trouble: Option<String>,
    /// Its last problem and how long ago.
    pub problem: String,
}

/// The upstream registries of a report.
pub fn upstream_rows(report: &Value) -> Vec<UpstreamRow> {
    report["upstream"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|u| UpstreamRow {
            registry: text(&u["registry"]),
            endpoint: text(&u["endpoint"]),
            credentials: if u["credentials"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            budget: match (&u["ratelimit_remaining"], &u["ratelimit_limit"]) {
                (Value::Null, _) => "–".to_owned(),
                (left, Value::Null) => text(left),
                (left, limit) => format!("{} of {}", text(left), text(limit)),
            },
            trouble: if u["rate_limited_for_seconds"].is_number() {
                Some(format!(
                    "rate limited, {} more",
                    human(&u["rate_limited_for_seconds"])
                ))
            } else if u["unreachable_for_seconds"].is_number() {
                Some(format!(
                    "unreachable, retrying in {}",
                    human(&u["unreachable_for_seconds"])
                ))
            } else {
                None
            },
            problem: match &u["last_problem"] {
                Value::Null => "–".to_owned(),
                p => format!("{} ago: {}", human(&p["seconds_ago"]), text(&p["what"])),
            },
        })
        .collect()
}

/// A JSON number of seconds as text (`12s`, `3m 4s`; `now` under a second; `–` if none).
pub fn human(seconds: &Value) -> String {
    match seconds.as_f64() {
        Some(s) if s < 1.0 => "now".into(),
        Some(s) => {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let d = Duration::from_secs(s as u64);
            humantime::format_duration(d).to_string()
        }
        None => "–".into(),
    }
}

/// A JSON byte count as text (`1.5 MiB`; `–` if none).
pub fn bytes(v: &Value) -> String {
    match v.as_u64() {
        #[allow(clippy::cast_precision_loss)]
        Some(n) if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20)),
        #[allow(clippy::cast_precision_loss)]
        Some(n) if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        Some(n) => format!("{n} B"),
        None => "–".into(),
    }
}

fn badge(ok: bool, yes: &str, no: &str) -> String {
    if ok {
        format!("<span class=\"ok\">{yes}</span>")
    } else {
        format!("<span class=\"bad\">{no}</span>")
    }
}

/// A peer's state: unreachable in red, the others plain (idle is normal: connections close
/// when they have nothing to do).
fn state_badge(state: &str) -> String {
    match state {
        "unreachable" => badge(false, "", state),
        "connected" => badge(true, state, ""),
        other => escape(other),
    }
}

/// Renders the report as a page.
fn html(r: &Value) -> String {
    let node = &r["node"];
    let mut out = String::with_capacity(16 * 1024);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"10\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>mirrorlet · {id}</title><style>{STYLE}</style></head><body>\
         <header><h1>mirrorlet</h1><p class=\"id\">{id}</p><p>version {version} · up {up} · \
         {ready} {live}</p></header>",
        id = esc(&node["id"]),
        version = esc(&node["version"]),
        up = human(&node["uptime_seconds"]),
        ready = badge(
            node["ready"].as_bool() == Some(true),
            "ready",
            &format!("not ready: {}", esc(&node["not_ready"]))
        ),
        live = badge(
            node["live"].as_bool() == Some(true),
            "live",
            &format!("not live: {}", esc(&node["not_live"]))
        ),
    );

    let served = &r["served"];
    let ratio = hit_ratio_text(r);
    let _ = write!(
        out,
        "<section><h2>Serving</h2><div class=\"cards\"><div><b>{ratio}</b>hit ratio</div>"
    );
    if let Some(map) = served["content_gets_by_source"].as_object() {
        for (source, n) in map {
            let _ = write!(out, "<div><b>{}</b>{}</div>", esc(n), esc(&json!(source)));
        }
    }
    let _ = write!(
        out,
        "<div><b>{}</b>connected peers</div><div><b>{}</b>advertised keys</div></div>\
         <p class=\"note\">Hit ratio: containerd's manifest and blob GETs answered by the agents \
         (from this node, a peer, or upstream once for the cluster) rather than sent on to the registry.</p></section>",
        esc(&r["connected_peers"]),
        esc(&r["advertised_keys"])
    );

    out.push_str("<section><h2>Recently served</h2><table><tr><th>ago</th><th>request</th><th>registry</th><th>status</th><th>from</th><th>for</th><th>size</th><th>ms</th></tr>");
    for s in served["recent"].as_array().into_iter().flatten() {
        let _ = write!(
            out,
            "<tr><td>{}</td><td class=\"path\">{} {}</td><td>{}</td><td>{}</td><td class=\"src-{}\">{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            human(&s["seconds_ago"]),
            esc(&s["method"]),
            esc(&s["path"]),
            esc(&s["registry"]),
            esc(&s["status"]),
            esc(&s["source"]),
            esc(&s["source"]),
            esc(&s["requester"]),
            bytes(&s["bytes"]),
            esc(&s["ms"]),
        );
    }
    out.push_str("</table></section>");

    out.push_str("<section><h2>Peers</h2><table><tr><th>peer</th><th>registry</th><th>connection</th><th>state</th><th>last failure</th></tr>");
    for p in peer_rows(r) {
        let _ = write!(
            out,
            "<tr><td class=\"id\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&p.id),
            escape(&p.registry),
            escape(&p.address),
            state_badge(&p.state),
            escape(&p.failure),
        );
    }
    out.push_str("</table></section>");

    out.push_str("<section><h2>Upstream registries</h2><table><tr><th>registry</th><th>endpoint</th><th>credentials</th><th>rate limit left</th><th>state</th><th>last problem</th></tr>");
    for u in upstream_rows(r) {
        let state = match &u.trouble {
            Some(why) => format!("<span class=\"bad\">{}</span>", escape(why)),
            None => badge(true, "ok", ""),
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{state}</td><td>{}</td></tr>",
            escape(&u.registry),
            escape(&u.endpoint),
            u.credentials,
            escape(&u.budget),
            escape(&u.problem),
        );
    }
    out.push_str("</table></section>");

    let listen = &node["listen"];
    let p2p: Vec<String> = listen["p2p"]
        .as_array()
        .into_iter()
        .flatten()
        .map(esc)
        .collect();
    let _ = write!(
        out,
        "<section><h2>This node</h2><table>\
         <tr><th>registry</th><td>{}</td></tr><tr><th>operations</th><td>{}</td></tr>\
         <tr><th>peer-to-peer</th><td>{}</td></tr><tr><th>containerd namespace</th><td>{}</td></tr>\
         </table></section><footer>Refreshes every 10 s · <a href=\"?format=json\">JSON</a> · \
         <a href=\"/metrics\">metrics</a></footer></body></html>",
        esc(&listen["registry"]),
        esc(&listen["operations"]),
        if node["p2p"].as_bool() == Some(true) {
            p2p.join("<br>")
        } else {
            "off".to_owned()
        },
        esc(&node["containerd_namespace"]),
    );
    out
}

const STYLE: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:0 auto;max-width:1200px;padding:16px;color:#1d2330;background:#f6f7f9}\
header h1{margin:0;font-size:22px}.id{font-family:monospace;color:#56607a;margin:2px 0}\
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:12px 16px;margin:14px 0}\
h2{font-size:15px;margin:0 0 10px}table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid #eef0f4;vertical-align:top}th{color:#56607a;font-weight:600}\
td.path{font-family:monospace;font-size:12px;word-break:break-all}td.id{font-family:monospace;font-size:12px}\
.cards{display:flex;gap:12px;flex-wrap:wrap}.cards div{border:1px solid #dde1e8;border-radius:6px;padding:8px 14px;min-width:110px;color:#56607a}\
.cards b{display:block;font-size:22px;color:#1d2330}.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}\
.note{color:#56607a;font-size:12px}.src-local,.src-peer,.src-upstream{color:#1a7f37}.src-upstream-fallthrough{color:#9a6700}\
footer{color:#56607a;font-size:12px}";

//! What an operator looks at, against real agents after real pulls (through a
//! Docker-Hub-like front whose budget runs out): the status page over HTTP, in the
//! terminal (`mirrorlet status`) and in a real browser (headless Chromium, with a
//! screenshot), and every query of the chart's Grafana dashboard checked against the
//! metrics the agents export and evaluated by a real Prometheus scraping them (with a
//! screenshot of the dashboard's panels drawn from the results).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use mirrorlet_e2e::cluster::PullThrough;
use mirrorlet_e2e::dashboard;
use mirrorlet_e2e::prometheus::{self, Prometheus};
use mirrorlet_e2e::{Cluster, Options, REGISTRY, TestImage};
use serde_json::Value;

const PULL: Duration = Duration::from_secs(180);

/// Three nodes behind a front that allows one counted pull, and two images there.
async fn ops_cluster(tag: &str) -> (Cluster, TestImage, TestImage) {
    let image = TestImage::single(&format!("e2e/ops-{tag}"), "v1", &[2_000_000, 1_000_000]);
    let other = TestImage::single(&format!("e2e/ops-{tag}-other"), "v1", &[500_000]);
    let c = Cluster::start(Options {
        nodes: 3,
        images: vec![image.clone(), other.clone()],
        pull_through: Some(PullThrough {
            front: Some(Some(1)),
            ..PullThrough::default()
        }),
        ..Options::default()
    })
    .await
    .expect("cluster starts");
    c.wait_members().await.expect("agents see each other");
    (c, image, other)
}

/// Node 1 pulls `image` through the cluster, node 2 pulls it from the nodes, and `other`
/// meets the 429.
async fn busy(c: &Cluster, image: &TestImage, other: &TestImage) {
    let name = Cluster::image_ref(image);
    c.node(1).cri.pull(&name, PULL).await.expect("node 1 pulls");
    c.node(2).cri.pull(&name, PULL).await.expect("node 2 pulls");
    c.node(1)
        .cri
        .pull(&Cluster::image_ref(other), Duration::from_secs(60))
        .await
        .expect_err("the budget is spent");
}

/// [`ops_cluster`] after [`busy`].
async fn busy_cluster(tag: &str) -> Cluster {
    let (c, image, other) = ops_cluster(tag).await;
    busy(&c, &image, &other).await;
    c
}

/// Keeps a screenshot when `MIRRORLET_SCREENSHOTS=DIR` is set (the README's pictures come
/// from here).
fn keep_screenshot(png: &std::path::Path, name: &str) {
    if let Ok(keep) = std::env::var("MIRRORLET_SCREENSHOTS") {
        std::fs::create_dir_all(&keep).expect("dir");
        std::fs::copy(png, PathBuf::from(keep).join(name)).expect("copy");
    }
}

/// A real PNG of some substance.
fn assert_screenshot(png: &std::path::Path) {
    let bytes = std::fs::read(png).expect("screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 20_000,
        "a real screenshot ({} bytes)",
        bytes.len()
    );
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url)
        .await
        .and_then(reqwest::Response::error_for_status)
        .expect(url)
        .json()
        .await
        .expect("json")
}

#[tokio::test]
async fn a_the_status_page_over_http_in_a_terminal_and_in_a_browser() {
    let c = busy_cluster("status").await;
    let n1 = c.node(1);
    let ids: Vec<String> = c
        .nodes
        .iter()
        .map(|n| n.peer_id().expect("peer id"))
        .collect();

    let json = get_json(&format!("{}/status?format=json", n1.ops_url())).await;
    assert_eq!(json["node"]["id"], ids[0].as_str(), "{json:#}");
    assert_eq!(json["node"]["ready"], true);
    assert_eq!(json["node"]["live"], true);
    for id in &ids[1..] {
        let peer = json["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .find(|p| p["id"] == id.as_str())
            .unwrap_or_else(|| panic!("{id} listed: {json:#}"));
        // Connected, or idle if their connection closed for want of use; never unreachable.
        assert!(
            peer["state"] == "connected" || peer["state"] == "idle",
            "{peer:#}"
        );
        assert!(
            peer["registry"]
                .as_str()
                .is_some_and(|r| r.ends_with(":5000"))
        );
    }
    let recent = json["served"]["recent"].as_array().expect("recent");
    assert!(
        recent.iter().any(|r| r["path"]
            .as_str()
            .is_some_and(|p| p.contains("e2e/ops-status/blobs/"))
            && r["status"] == 200
            && r["registry"] == REGISTRY),
        "node 1's pull is listed: {json:#}"
    );
    assert!(json["served"]["hit_ratio"].as_f64().is_some(), "{json:#}");
    assert_eq!(json["upstream"][0]["registry"], REGISTRY);
    // The budget and the 429 were met by whichever nodes owned the tags and manifests
    // (only owners ask upstream).
    let mut saw_budget = false;
    let mut saw_429 = false;
    for n in &c.nodes {
        let j = get_json(&format!("{}/status?format=json", n.ops_url())).await;
        let upstream = &j["upstream"][0];
        saw_budget |= upstream["ratelimit_limit"] == 1;
        saw_429 |= upstream["last_problem"]["what"]
            .as_str()
            .is_some_and(|w| w.contains("429"));
        // Nothing but these: no credentials or tokens (the front's tokens are `t-...`).
        let keys: BTreeSet<&str> = upstream
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from([
                "registry",
                "endpoint",
                "credentials",
                "ratelimit_remaining",
                "ratelimit_limit",
                "rate_limited_for_seconds",
                "unreachable_for_seconds",
                "last_problem",
            ]),
            "{j:#}"
        );
        let text = j.to_string();
        assert!(
            !text.contains("Bearer") && !text.contains("\"t-"),
            "no secrets: {j:#}"
        );
    }
    assert!(
        saw_budget,
        "one node's status shows the front's budget of 1"
    );
    assert!(saw_429, "one node's status names the 429");

    // The terminal view of the same.
    let bin = mirrorlet_e2e::deps::mirrorlet_bin().expect("binary");
    let out = mirrorlet_e2e::process::run(
        &bin.display().to_string(),
        &["status", "--url", &n1.ops_url()],
    )
    .expect("mirrorlet status");
    for want in [
        ids[0].as_str(),
        ids[1].as_str(),
        REGISTRY,
        "recently served",
        "e2e/ops-status",
    ] {
        assert!(out.contains(want), "{want:?} in:\n{out}");
    }
    let err = mirrorlet_e2e::process::run(
        &bin.display().to_string(),
        &["status", "--url", "http://127.0.0.1:9"],
    )
    .expect_err("nothing listens there");
    assert!(format!("{err:#}").contains("127.0.0.1:9"), "{err:#}");

    // In a real browser: the page renders, with the same content, and looks like it.
    let dir = c.dir().join("browser");
    let page =
        mirrorlet_e2e::browser::render(&format!("{}/status", n1.ops_url()), &dir, 1280, 1500)
            .expect("chromium renders the status page");
    for want in [
        "Recently served",
        "Peers",
        "Upstream registries",
        ids[1].as_str(),
        REGISTRY,
    ] {
        assert!(page.dom.contains(want), "{want:?} in the rendered DOM");
    }
    assert_screenshot(&page.png);
    keep_screenshot(&page.png, "status-page.png");
}

/// A vector selector in a query: a metric name and the label names it matches on.
#[derive(Debug)]
struct Selector {
    metric: String,
    labels: Vec<String>,
}

/// The selectors of `expr` and the labels it groups by (`by (a, b)`).
fn parse_query(expr: &str) -> (Vec<Selector>, Vec<String>) {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut selectors = Vec::new();
    let mut grouping = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !ident(bytes[i]) || (i > 0 && ident(bytes[i - 1])) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && ident(bytes[i]) {
            i += 1;
        }
        let word = &expr[start..i];
        let rest = expr[i..].trim_start();
        if word == "by" && rest.starts_with('(') {
            let close = rest.find(')').expect("closing parenthesis");
            grouping.extend(rest[1..close].split(',').map(|l| l.trim().to_owned()));
            i += expr[i..].find(')').expect("closing parenthesis") + 1;
        } else if word.starts_with("mirrorlet_") {
            let mut labels = Vec::new();
            if rest.starts_with('{') {
                let close = rest.find('}').expect("closing brace");
                for matcher in rest[1..close].split(',') {
                    let name: String = matcher
                        .trim()
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    labels.push(name);
                }
                i += expr[i..].find('}').expect("closing brace") + 1;
            }
            selectors.push(Selector {
                metric: word.to_owned(),
                labels,
            });
        }
    }
    (selectors, grouping)
}

/// From OpenMetrics text: each family's type, and the label names each sample name carries.
fn exported(text: &str) -> (BTreeMap<String, String>, BTreeMap<String, BTreeSet<String>>) {
    let mut types = BTreeMap::new();
    let mut samples: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                types.insert(name.to_owned(), kind.to_owned());
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let series = line.rsplit_once(' ').map_or(line, |(s, _)| s);
        let (name, labels) = series.split_once('{').unwrap_or((series, ""));
        let entry = samples.entry(name.to_owned()).or_default();
        for pair in labels.trim_end_matches('}').split(',') {
            if let Some((label, _)) = pair.split_once('=') {
                entry.insert(label.to_owned());
            }
        }
    }
    (types, samples)
}

/// Whether the sample name `name` belongs to a family of the right type.
fn declared(types: &BTreeMap<String, String>, name: &str) -> bool {
    let family = |suffix: &str, kind: &str| {
        name.strip_suffix(suffix)
            .and_then(|f| types.get(f))
            .is_some_and(|t| t == kind)
    };
    types.get(name).is_some_and(|t| t == "gauge")
        || family("_total", "counter")
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|s| family(s, "histogram"))
}

#[tokio::test]
async fn b_every_dashboard_query_names_metrics_and_labels_the_agents_export() {
    let c = busy_cluster("dash").await;
    let mut text = String::new();
    for n in &c.nodes {
        let url = format!("{}/metrics", n.ops_url());
        text.push_str(
            &reqwest::get(&url)
                .await
                .and_then(reqwest::Response::error_for_status)
                .expect(&url)
                .text()
                .await
                .expect("metrics"),
        );
    }
    let (types, samples) = exported(&text);
    let dashboard = dashboard::load().expect("the chart's dashboard");
    let mut checked = BTreeSet::new();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let title = panel["title"].as_str().unwrap_or_default();
            queries += 1;
            let (selectors, grouping) = parse_query(expr);
            assert!(
                !selectors.is_empty(),
                "{title}: no mirrorlet metric in {expr}"
            );
            let mut labels_here = BTreeSet::from(["instance".to_owned(), "job".to_owned()]);
            for sel in &selectors {
                assert!(
                    declared(&types, &sel.metric),
                    "{title}: {} is not exported by the agents ({expr})",
                    sel.metric
                );
                // With samples, the labels matched on must be the metric's.
                if let Some(have) = samples.get(&sel.metric) {
                    for label in &sel.labels {
                        assert!(
                            label == "instance" || have.contains(label),
                            "{title}: {} has no label {label} (has {have:?})",
                            sel.metric
                        );
                    }
                    labels_here.extend(have.iter().cloned());
                    checked.insert(sel.metric.clone());
                }
            }
            for label in &grouping {
                assert!(
                    labels_here.contains(label),
                    "{title}: groups by {label}, which none of its metrics carries ({expr})"
                );
            }
        }
    }
    // The pulls above gave most queries samples to check labels against.
    for must in [
        "mirrorlet_registry_requests_total",
        "mirrorlet_registry_served_bytes_total",
        "mirrorlet_registry_request_duration_seconds_bucket",
        "mirrorlet_pullthrough_fetches_total",
        "mirrorlet_upstream_requests_total",
        "mirrorlet_upstream_ratelimit_remaining",
        "mirrorlet_upstream_rate_limited_total",
        "mirrorlet_lookup_duration_seconds_bucket",
        "mirrorlet_p2p_connected_peers",
    ] {
        assert!(checked.contains(must), "{must} had samples: {checked:?}");
    }
    assert!(queries >= 20, "{queries} queries");
    eprintln!(
        "{queries} dashboard queries checked; labels verified on {} metrics with samples",
        checked.len()
    );
}

#[tokio::test]
async fn c_the_dashboard_evaluated_by_prometheus_has_data_in_every_panel() {
    let (c, image, other) = ops_cluster("prom").await;
    let targets: Vec<String> = c
        .nodes
        .iter()
        .map(|n| n.ops_url().trim_start_matches("http://").to_owned())
        .collect();
    let dir = c.dir().join("prometheus");
    let prom = Prometheus::start(&dir, &targets)
        .await
        .expect("Prometheus scrapes the agents");
    let start = prometheus::now();
    // Quiet, pulls, quiet, one more node, quiet: long enough for rates over a few scrapes
    // to take in each.
    tokio::time::sleep(Duration::from_secs(3)).await;
    busy(&c, &image, &other).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    c.node(3)
        .cri
        .pull(&Cluster::image_ref(&image), PULL)
        .await
        .expect("node 3 pulls from the nodes");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let end = prometheus::now();

    let json = dashboard::load().expect("the chart's dashboard");
    let panels = dashboard::panels(&json);
    // Grafana's $__rate_interval is at least four scrape intervals.
    let rate_interval = 4 * prometheus::SCRAPE_EVERY.as_secs() + 1;
    let range = (end - start).ceil() as u64;
    let mut results = Vec::new();
    let mut empty = Vec::new();
    for panel in &panels {
        let mut per_target = Vec::new();
        for (expr, _) in &panel.targets {
            let query = dashboard::expand(expr, rate_interval, range);
            // Prometheus itself parses and evaluates every query.
            let series = prom
                .query_range(&query, start, end, prometheus::SCRAPE_EVERY)
                .await
                .unwrap_or_else(|e| panic!("{}: {e:#}", panel.title));
            per_target.push(series);
        }
        let has_data = per_target
            .iter()
            .flatten()
            .any(|s| s.points.iter().any(|p| p.1.is_finite()));
        if panel.kind != "row" && !has_data {
            empty.push(panel.title.clone());
        }
        results.push(per_target);
    }
    assert!(
        empty.is_empty(),
        "panels without data after real pulls: {empty:?}"
    );
    // Counters that appear with their first event show no increase in a rate: the pulls
    // above must show in every panel about pulls (the agents create these series at zero).
    let peak = |title: &str| {
        let i = panels
            .iter()
            .position(|p| p.title == title)
            .unwrap_or_else(|| panic!("a panel {title:?}"));
        results[i]
            .iter()
            .flatten()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max)
    };
    for title in [
        "Pulls by source",
        "Bytes served by source",
        "Served to other nodes",
        "Request latency (p99)",
        "Pull-through fetches",
        "Upstream requests",
        "Downloaded from upstream",
        "429 answers",
        "Lookup latency",
    ] {
        assert!(peak(title) > 0.0, "{title} shows the pulls");
    }
    let hit_ratio = results[panels
        .iter()
        .position(|p| p.title == "Hit ratio")
        .expect("hit ratio")][0]
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|v| v.is_finite())
        .fold(f64::NAN, f64::max);
    assert!(
        hit_ratio > 0.0 && hit_ratio <= 1.0,
        "nodes 2 and 3 pulled from the cluster: hit ratio {hit_ratio}"
    );

    // The preview of the dashboard with these results, in a real browser.
    let title = json["title"].as_str().unwrap_or("mirrorlet");
    let html = dashboard::preview(title, &panels, &results, start, end);
    let page_path = dir.join("dashboard.html");
    std::fs::write(&page_path, html).expect("preview");
    let bottom = panels
        .iter()
        .map(|p| p.grid.1 + p.grid.3)
        .max()
        .unwrap_or(0);
    let page = mirrorlet_e2e::browser::render(
        &format!("file://{}", page_path.display()),
        &dir.join("browser"),
        1600,
        bottom * 30 + 70,
    )
    .expect("chromium renders the preview");
    for panel in &panels {
        assert!(page.dom.contains(&panel.title), "{} drawn", panel.title);
    }
    assert_screenshot(&page.png);
    keep_screenshot(&page.png, "dashboard.png");
}

#[test]
fn the_query_scanner_reads_selectors_and_groupings() {
    let (sel, by) = parse_query(
        r#"histogram_quantile(0.99, sum by (le, route) (rate(mirrorlet_x_bucket{instance=~"$instance", route!="a"}[$__rate_interval]))) / mirrorlet_y"#,
    );
    assert_eq!(by, ["le", "route"]);
    assert_eq!(sel.len(), 2);
    assert_eq!(sel[0].metric, "mirrorlet_x_bucket");
    assert_eq!(sel[0].labels, ["instance", "route"]);
    assert_eq!(sel[1].metric, "mirrorlet_y");
    assert!(sel[1].labels.is_empty());
}

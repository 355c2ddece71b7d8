//! End-to-end scenarios for the node-local mirror (no peers involved): real containerd per
//! node in its own network namespace, a real upstream registry, pulls through the CRI.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use mirrorlet_e2e::wait::wait_until;
use mirrorlet_e2e::{Cluster, Options, REGISTRY, TestImage};
use mirrorlet_oci::Digest;
use serde_json::Value;

const PULL: Duration = Duration::from_secs(120);

fn multi_layer() -> TestImage {
    TestImage::single(
        "e2e/multi-layer",
        "v1",
        &[300_000, 1_000_000, 50_000, 2_000_000],
    )
}
fn multi_arch() -> TestImage {
    TestImage::multi_arch("e2e/multi-arch", "v1", &[200_000, 400_000])
}
fn by_digest() -> TestImage {
    TestImage::single("e2e/by-digest", "v1", &[500_000])
}
fn hub() -> TestImage {
    TestImage::docker("library/e2e-hub", "1", &[250_000])
}

async fn cluster(nodes: usize, images: Vec<TestImage>) -> Cluster {
    Cluster::start(Options {
        nodes,
        images,
        ..Options::default()
    })
    .await
    .expect("cluster starts")
}

#[tokio::test]
async fn a_pull_of_an_image_not_on_the_node_falls_through_to_upstream() {
    let c = cluster(
        mirrorlet_e2e::cluster::default_nodes(),
        vec![multi_layer(), multi_arch()],
    )
    .await;
    let image = Cluster::image_ref(&multi_layer());
    c.node(1)
        .cri
        .pull(&image, PULL)
        .await
        .expect("CRI pull succeeds through the fall-through");
    assert!(c.node(1).cri.has(&image).await.expect("status"));
    c.node(2)
        .ctr_pull(&Cluster::image_ref(&multi_arch()))
        .expect("ctr pull succeeds");

    let manifest_misses = c
        .node(1)
        .metric(
            "mirrorlet_registry_requests_total",
            &[
                ("route", "manifest"),
                ("status", "404"),
                ("source", "upstream-fallthrough"),
            ],
        )
        .await
        .expect("metrics");
    let blob_misses = c
        .node(1)
        .metric(
            "mirrorlet_registry_requests_total",
            &[
                ("route", "blob"),
                ("status", "404"),
                ("source", "upstream-fallthrough"),
            ],
        )
        .await
        .expect("metrics");
    assert!(
        manifest_misses >= 1.0,
        "manifest miss counted: {manifest_misses}"
    );
    assert!(
        blob_misses >= 5.0,
        "config and 4 layers counted as misses: {blob_misses}"
    );
    assert!(
        c.node(2)
            .metric("mirrorlet_registry_requests_total", &[("status", "404")])
            .await
            .expect("metrics")
            >= 1.0
    );
}

/// One fetched object: status, selected headers, body.
struct Fetched {
    status: u16,
    headers: BTreeMap<&'static str, String>,
    body: bytes::Bytes,
}

async fn fetch(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    range: Option<&str>,
) -> Result<Fetched> {
    let mut req = http
        .request(method, url)
        .header("accept", mirrorlet_e2e::cluster::ACCEPT);
    if let Some(r) = range {
        req = req.header("range", r);
    }
    let resp = req.send().await.with_context(|| format!("GET {url}"))?;
    let status = resp.status().as_u16();
    let mut headers = BTreeMap::new();
    for h in [
        "content-type",
        "content-length",
        "docker-content-digest",
        "content-range",
    ] {
        if let Some(v) = resp.headers().get(h).and_then(|v| v.to_str().ok()) {
            headers.insert(h, v.to_owned());
        }
    }
    let body = resp.bytes().await?;
    Ok(Fetched {
        status,
        headers,
        body,
    })
}

/// Checks one manifest (by `reference`) is served by the agent exactly as upstream serves it,
/// and returns the upstream body.
async fn check_manifest(
    c: &Cluster,
    agent: &str,
    repo: &str,
    reference: &str,
    ns: &str,
) -> bytes::Bytes {
    let http = &c.http;
    let up = fetch(
        http,
        reqwest::Method::GET,
        &format!("{}/v2/{repo}/manifests/{reference}", c.upstream.url()),
        None,
    )
    .await
    .expect("upstream manifest");
    assert_eq!(up.status, 200, "upstream has {repo}:{reference}");
    let url = format!("{agent}/v2/{repo}/manifests/{reference}?ns={ns}");
    for method in [reqwest::Method::GET, reqwest::Method::HEAD] {
        let got = fetch(http, method.clone(), &url, None)
            .await
            .expect("agent manifest");
        assert_eq!(got.status, 200, "{method} {url}");
        for h in ["content-type", "content-length", "docker-content-digest"] {
            assert_eq!(
                got.headers.get(h),
                up.headers.get(h),
                "{method} {url}: header {h}"
            );
        }
        if method == reqwest::Method::GET {
            assert_eq!(got.body, up.body, "GET {url}: body differs from upstream");
        }
    }
    up.body
}

/// Checks a blob is served byte-identical to upstream, with matching HEAD headers and ranges.
async fn check_blob(c: &Cluster, agent: &str, repo: &str, digest: &str, ns: &str) {
    let http = &c.http;
    let up_url = format!("{}/v2/{repo}/blobs/{digest}", c.upstream.url());
    let up = fetch(http, reqwest::Method::GET, &up_url, None)
        .await
        .expect("upstream blob");
    let up_head = fetch(http, reqwest::Method::HEAD, &up_url, None)
        .await
        .expect("upstream blob head");
    let url = format!("{agent}/v2/{repo}/blobs/{digest}?ns={ns}");
    let got = fetch(http, reqwest::Method::GET, &url, None)
        .await
        .expect("agent blob");
    assert_eq!(got.status, 200, "GET {url}");
    assert_eq!(
        Digest::sha256_of(&got.body).as_str(),
        digest,
        "GET {url}: digest of the body"
    );
    assert_eq!(got.body, up.body);
    let head = fetch(http, reqwest::Method::HEAD, &url, None)
        .await
        .expect("agent blob head");
    assert_eq!(head.status, 200);
    for h in ["content-length", "docker-content-digest"] {
        assert_eq!(
            head.headers.get(h),
            up_head.headers.get(h),
            "HEAD {url}: header {h}"
        );
    }
    let n = up.body.len();
    let (a, b) = (n / 4, n / 2);
    for (range, start, end) in [
        (format!("bytes={a}-{}", b - 1), a, b),
        ("bytes=-10".to_owned(), n - 10, n),
        (format!("bytes={}-", n - 5), n - 5, n),
    ] {
        let part = fetch(http, reqwest::Method::GET, &url, Some(&range))
            .await
            .expect("range");
        assert_eq!(part.status, 206, "{range} on {url}");
        assert_eq!(part.body, up.body.slice(start..end), "{range} on {url}");
        assert_eq!(
            part.headers.get("content-range").map(String::as_str),
            Some(format!("bytes {start}-{}/{n}", end - 1).as_str())
        );
    }
}

fn children(manifest: &[u8]) -> (Vec<String>, Vec<String>) {
    let v: Value = serde_json::from_slice(manifest).expect("manifest JSON");
    let digests = |key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d["digest"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut blobs = digests("layers");
    if let Some(cfg) = v["config"]["digest"].as_str() {
        blobs.insert(0, cfg.to_owned());
    }
    (digests("manifests"), blobs)
}

#[tokio::test]
async fn b_content_on_the_node_is_served_byte_identical_to_upstream() {
    let c = cluster(
        mirrorlet_e2e::cluster::default_nodes(),
        vec![multi_layer(), multi_arch(), by_digest(), hub()],
    )
    .await;
    let node = c.node(1);
    let pinned = by_digest();
    let pinned_digest = c
        .upstream_digest(&pinned.repo, &pinned.tag)
        .await
        .expect("digest");
    node.cri
        .pull(&Cluster::image_ref(&multi_layer()), PULL)
        .await
        .expect("pull multi-layer");
    node.cri
        .pull(&Cluster::image_ref(&multi_arch()), PULL)
        .await
        .expect("pull multi-arch");
    node.cri
        .pull(&format!("{REGISTRY}/{}@{pinned_digest}", pinned.repo), PULL)
        .await
        .expect("pull by digest");
    node.cri
        .pull("docker.io/library/e2e-hub:1", PULL)
        .await
        .expect("pull from Docker Hub name");
    let agent = node.agent_url();

    // Single-platform images by tag, then everything below them by digest.
    for (image, ns) in [(multi_layer(), REGISTRY), (hub(), "docker.io")] {
        let body = check_manifest(&c, &agent, &image.repo, &image.tag, ns).await;
        let digest = Digest::sha256_of(&body).to_string();
        check_manifest(&c, &agent, &image.repo, &digest, ns).await;
        for blob in children(&body).1 {
            check_blob(&c, &agent, &image.repo, &blob, ns).await;
        }
    }

    // The multi-platform index: the amd64 image is on the node, the arm64 one is not.
    let arch = multi_arch();
    let index = check_manifest(&c, &agent, &arch.repo, &arch.tag, REGISTRY).await;
    let (manifests, _) = children(&index);
    assert_eq!(manifests.len(), 2);
    let amd = check_manifest(&c, &agent, &arch.repo, &manifests[0], REGISTRY).await;
    for blob in children(&amd).1 {
        check_blob(&c, &agent, &arch.repo, &blob, REGISTRY).await;
    }
    let arm = fetch(
        &c.http,
        reqwest::Method::GET,
        &format!(
            "{agent}/v2/{}/manifests/{}?ns={REGISTRY}",
            arch.repo, manifests[1]
        ),
        None,
    )
    .await
    .expect("arm64 manifest");
    assert_eq!(
        arm.status, 404,
        "the arm64 manifest was never pulled on this amd64 node"
    );

    // Pulled by digest only: served by digest; its tag is not on the node.
    let body = check_manifest(&c, &agent, &pinned.repo, pinned_digest.as_str(), REGISTRY).await;
    for blob in children(&body).1 {
        check_blob(&c, &agent, &pinned.repo, &blob, REGISTRY).await;
    }
    let tag = fetch(
        &c.http,
        reqwest::Method::GET,
        &format!("{agent}/v2/{}/manifests/v1?ns={REGISTRY}", pinned.repo),
        None,
    )
    .await
    .expect("tag");
    assert_eq!(tag.status, 404);

    // No ns parameter means Docker Hub, with library/ added (Docker's registry-mirrors use).
    let plain = fetch(
        &c.http,
        reqwest::Method::GET,
        &format!("{agent}/v2/e2e-hub/manifests/1"),
        None,
    )
    .await
    .expect("no ns");
    assert_eq!(plain.status, 200);
    assert_eq!(
        plain.headers.get("content-type").map(String::as_str),
        Some("application/vnd.docker.distribution.manifest.v2+json")
    );
    let served = node
        .metric(
            "mirrorlet_registry_served_bytes_total",
            &[("source", "local")],
        )
        .await
        .expect("metrics");
    assert!(
        served > 4_000_000.0,
        "bytes served locally are counted: {served}"
    );
}

#[tokio::test]
async fn c_pulls_succeed_with_the_agent_stopped_or_killed() {
    let mut c = cluster(
        mirrorlet_e2e::cluster::default_nodes(),
        vec![multi_layer(), multi_arch()],
    )
    .await;
    assert!(
        c.node_mut(2).stop_agent(),
        "agent exits on SIGTERM within its grace period"
    );
    c.node_mut(3).kill_agent();
    for i in [2, 3] {
        c.node(i)
            .cri
            .pull(&Cluster::image_ref(&multi_layer()), PULL)
            .await
            .expect("CRI pull without an agent");
        c.node(i)
            .ctr_pull(&Cluster::image_ref(&multi_arch()))
            .expect("ctr pull without an agent");
    }
}

fn snapshot(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    try_snapshot(root).expect("snapshot")
}

/// Every file under `root` with its bytes, and every directory; an error if something
/// vanished while it was read (another process is changing the tree).
fn try_snapshot(root: &Path) -> std::io::Result<BTreeMap<String, Option<Vec<u8>>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)?.flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(root)
                .expect("under root")
                .display()
                .to_string();
            if p.is_dir() {
                out.insert(rel, None);
                stack.push(p);
            } else {
                out.insert(rel, Some(std::fs::read(&p)?));
            }
        }
    }
    Ok(out)
}

#[tokio::test]
async fn d_configure_then_cleanup_leave_certs_d_as_it_was() {
    let c = cluster(2, vec![multi_layer()]).await;
    let node = c.node(1);
    // The cluster was configured at start; cleanup first gives the user's own files back.
    node.cleanup().expect("cleanup");
    let certs = node.certs_d();
    let before = snapshot(&certs);
    let expected_user = mirrorlet_e2e::node::user_hosts_toml(&c.upstream.authority());
    assert_eq!(
        before.get("registry.e2e.test/hosts.toml"),
        Some(&Some(expected_user.into_bytes()))
    );
    assert_eq!(
        before.len(),
        4,
        "two registry dirs with the user's hosts.toml: {:?}",
        before.keys()
    );

    // Configure with the default registry list plus the test registry, twice.
    let bin = mirrorlet_e2e::deps::mirrorlet_bin().expect("binary");
    let certs_s = certs.display().to_string();
    let registries = "docker.io,ghcr.io,quay.io,registry.k8s.io,mcr.microsoft.com,public.ecr.aws,gcr.io,_default,registry.e2e.test";
    for _ in 0..2 {
        mirrorlet_e2e::process::run(
            &bin.display().to_string(),
            &[
                "configure",
                "--config-path",
                &certs_s,
                "--registries",
                registries,
            ],
        )
        .expect("configure");
    }
    let configured = snapshot(&certs);
    let hosts = String::from_utf8(
        configured["registry.e2e.test/hosts.toml"]
            .clone()
            .expect("file"),
    )
    .expect("utf8");
    let mirror_at = hosts
        .find("[host.\"http://127.0.0.1:5000\"]")
        .expect("mirror host present");
    let user_host_at = hosts
        .find(&format!("[host.\"http://{}\"]", c.upstream.authority()))
        .expect("user's host kept");
    assert!(
        hosts.contains(&format!("server = \"http://{}\"", c.upstream.authority())),
        "{hosts}"
    );
    assert!(
        hosts.find("server =").expect("server") < mirror_at && mirror_at < user_host_at,
        "{hosts}"
    );
    assert!(
        configured.contains_key("ghcr.io/hosts.toml")
            && configured.contains_key("_default/hosts.toml")
    );

    // containerd accepts the written configuration: a pull goes through the agent's miss path.
    node.cri
        .pull(&Cluster::image_ref(&multi_layer()), PULL)
        .await
        .expect("pull with configured hosts");
    assert!(
        node.metric("mirrorlet_registry_requests_total", &[("status", "404")])
            .await
            .expect("metrics")
            >= 1.0
    );

    // The chart's uninstall DaemonSet: restores, then holds (ready) until terminated.
    let log = certs.with_file_name("cleanup-hold.log");
    let mut hold = mirrorlet_e2e::process::Proc::spawn(
        "cleanup --hold",
        None,
        &bin,
        &["cleanup", "--config-path", &certs_s, "--hold", "true"].map(String::from),
        &log,
    )
    .expect("spawn cleanup --hold");
    wait_until(Duration::from_secs(10), "cleanup --hold restores", || {
        // The cleanup runs meanwhile: a file may go between listing and reading.
        std::future::ready(try_snapshot(&certs).is_ok_and(|now| now == before))
    })
    .await
    .expect("cleanup restored certs.d exactly");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        hold.is_running(),
        "holds after restoring: {}",
        hold.log_tail(5)
    );
    assert!(hold.stop(Duration::from_secs(5)), "exits on SIGTERM");
    node.cri
        .remove(&Cluster::image_ref(&multi_layer()))
        .await
        .expect("remove");
    c.node(1)
        .ctr_pull(&Cluster::image_ref(&multi_layer()))
        .expect("pull straight from upstream after cleanup");
}

#[tokio::test]
async fn e_agent_recovers_when_containerd_restarts() {
    let mut c = cluster(2, vec![multi_layer(), multi_arch()]).await;
    let image = multi_layer();
    c.node(1)
        .cri
        .pull(&Cluster::image_ref(&image), PULL)
        .await
        .expect("pull");
    let agent = c.node(1).agent_url();
    let manifest_url = format!(
        "{agent}/v2/{}/manifests/{}?ns={REGISTRY}",
        image.repo, image.tag
    );
    let http = c.http.clone();
    let status = |url: String| {
        let http = http.clone();
        async move {
            http.get(&url)
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(status(manifest_url.clone()).await, 200);
    // Serving reads containerd directly; the inventory follows its events a moment later
    // (a CRI pull makes several image records, one event each). Wait for it to match
    // containerd's own list, so a late event cannot pass for the reconnected feed below.
    let images_before = inventory_in_step(&c, 1)
        .await
        .expect("the inventory matches containerd's image list");
    c.node_mut(1).stop_containerd();
    // Stay down long enough for several failed reconnection attempts.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        status(format!("{agent}/readyz")).await,
        503,
        "not ready without containerd"
    );
    assert_eq!(
        status(manifest_url.clone()).await,
        404,
        "falls through while containerd is down"
    );
    assert!(c.node_mut(1).agent_running(), "the agent keeps running");

    c.node_mut(1)
        .start_containerd()
        .await
        .expect("containerd restarts");
    wait_until(
        Duration::from_secs(30),
        "the agent to be ready again",
        || status(format!("{agent}/readyz")).map_ready(200),
    )
    .await
    .expect("ready again");
    assert_eq!(status(manifest_url).await, 200, "serves again");

    // The event feed resumed: a new image shows up in the agent's inventory.
    c.node(1)
        .cri
        .pull(&Cluster::image_ref(&multi_arch()), PULL)
        .await
        .expect("pull after restart");
    let images_after = inventory_in_step(&c, 1)
        .await
        .expect("inventory updated after reconnect");
    assert!(
        images_after > images_before,
        "the image pulled after the restart is counted ({images_before} -> {images_after})"
    );
    assert!(
        c.node_mut(1).agent_running(),
        "the agent was never restarted"
    );
    let log = c.node(1).agent_log_tail(400);
    assert!(
        log.contains("reconnected"),
        "the agent logs the reconnection:\n{log}"
    );
}

/// Waits until node `i`'s agent counts as many images as its containerd lists, and returns
/// the count.
async fn inventory_in_step(c: &Cluster, i: usize) -> Result<f64> {
    let node = c.node(i);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let listed = node.ctr(&["images", "ls", "-q"])?;
        let listed = listed.lines().filter(|l| !l.trim().is_empty()).count() as f64;
        let counted = node.metric("mirrorlet_store_images", &[]).await?;
        if counted == listed {
            return Ok(counted);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("the agent counts {counted} images, containerd lists {listed}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

trait MapReady {
    fn map_ready(self, want: u16) -> impl std::future::Future<Output = bool>;
}

impl<F: std::future::Future<Output = u16>> MapReady for F {
    async fn map_ready(self, want: u16) -> bool {
        self.await == want
    }
}

#[tokio::test]
async fn teardown_leaves_no_process_mount_or_namespace() {
    let c = cluster(2, vec![multi_layer()]).await;
    let k = c.k();
    c.node(1)
        .cri
        .pull(&Cluster::image_ref(&multi_layer()), PULL)
        .await
        .expect("pull");
    let left = c.teardown();
    assert!(left.is_empty(), "cluster {k} left behind: {left:?}");
}

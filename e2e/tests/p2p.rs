//! End-to-end scenarios for peer-to-peer serving: N >= 3 nodes (network namespaces, real
//! containerd, an agent each) joined through DNS bootstrap, a real upstream registry that
//! is stopped to prove content came from peers, and every pull through the CRI.

use std::path::Path;
use std::time::{Duration, Instant};

use mirrorlet_e2e::process::Proc;
use mirrorlet_e2e::wait::wait_until;
use mirrorlet_e2e::{Cluster, Options, REGISTRY, TestImage};

const PULL: Duration = Duration::from_secs(180);

fn app() -> TestImage {
    TestImage::single("e2e/p2p-app", "v1", &[3_000_000, 600_000, 9_000_000])
}

fn big() -> TestImage {
    TestImage::single("e2e/big", "v1", &[256 << 20])
}

/// Agent flags for the failure scenarios: serve peers at a bounded rate (so a transfer
/// lasts long enough to break it midway) and give up on a stalled peer after a second.
fn slow_serving() -> Vec<String> {
    [
        "--peer-upload-limit",
        "134217728",
        "--peer-read-timeout",
        "1s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect()
}

async fn cluster(nodes: usize, images: Vec<TestImage>, agent_args: Vec<String>) -> Cluster {
    Cluster::start(Options {
        nodes,
        images,
        agent_args,
        ..Options::default()
    })
    .await
    .expect("cluster starts")
}

#[tokio::test]
async fn a_nodes_pull_from_a_peer_by_tag_and_by_digest_with_upstream_down() {
    let mut c = cluster(mirrorlet_e2e::cluster::default_nodes(), vec![app()], vec![]).await;
    let image = app();
    let digest = c
        .upstream_digest(&image.repo, &image.tag)
        .await
        .expect("digest");
    c.node(1)
        .cri
        .pull(&Cluster::image_ref(&image), PULL)
        .await
        .expect("node 1 pulls from upstream");
    c.upstream.stop();
    c.wait_servable(2, REGISTRY, &image)
        .await
        .expect("advertised");

    c.node(2)
        .cri
        .pull(&Cluster::image_ref(&image), PULL)
        .await
        .expect("node 2 pulls by tag from peers");
    c.node(3)
        .cri
        .pull(&format!("{REGISTRY}/{}@{digest}", image.repo), PULL)
        .await
        .expect("node 3 pulls by digest from peers");

    // Node 1 served at least one whole copy; node 3 may have taken parts from node 2.
    let served = c
        .node(1)
        .metric("mirrorlet_registry_peer_served_bytes_total", &[])
        .await
        .expect("metrics");
    assert!(served >= 12_600_000.0, "node 1 served the layers: {served}");
    let by_2 = c
        .node(2)
        .metric("mirrorlet_registry_peer_served_bytes_total", &[])
        .await
        .expect("metrics");
    assert!(
        served + by_2 >= 2.0 * 12_600_000.0,
        "two copies went node to node: {served} + {by_2}"
    );
    for i in [2, 3] {
        let from_peer = c
            .node(i)
            .metric(
                "mirrorlet_registry_served_bytes_total",
                &[("source", "peer")],
            )
            .await
            .expect("metrics");
        assert!(
            from_peer >= 12_600_000.0,
            "node {i} got its layers from a peer: {from_peer}"
        );
        let found = c
            .node(i)
            .metric(
                "mirrorlet_lookup_duration_seconds_count",
                &[("outcome", "found")],
            )
            .await
            .expect("metrics");
        assert!(found >= 4.0, "node {i} found peers by lookup");
    }
    let _ = c.node_mut(1);
}

#[tokio::test]
async fn b_an_image_nobody_has_fails_fast_with_upstream_down() {
    let mut c = cluster(mirrorlet_e2e::cluster::default_nodes(), vec![app()], vec![]).await;
    c.upstream.stop();
    let started = Instant::now();
    let err = c
        .node(2)
        .cri
        .pull(
            &format!("{REGISTRY}/e2e/nobody-has-this:v1"),
            Duration::from_secs(5),
        )
        .await
        .expect_err("the pull fails");
    let text = format!("{err:#}");
    assert!(!text.contains("did not finish within"), "no hang: {text}");
    assert!(
        text.contains("connection refused") || text.contains("not found"),
        "a clear error: {text}"
    );
    eprintln!("failed after {:?}: {text}", started.elapsed());
    let misses = c
        .node(2)
        .metric(
            "mirrorlet_registry_requests_total",
            &[("source", "upstream-fallthrough")],
        )
        .await
        .expect("metrics");
    assert!(misses >= 1.0);
    let _ = c.node_mut(1);
}

#[tokio::test]
async fn c_a_removed_image_is_withdrawn() {
    let c = cluster(mirrorlet_e2e::cluster::default_nodes(), vec![app()], vec![]).await;
    let image = app();
    c.node(1)
        .cri
        .pull(&Cluster::image_ref(&image), PULL)
        .await
        .expect("pull");
    c.wait_servable(2, REGISTRY, &image)
        .await
        .expect("advertised");
    let manifest = c
        .upstream_digest(&image.repo, &image.tag)
        .await
        .expect("digest");
    let blob_url = |i: usize| {
        format!(
            "{}/v2/{}/manifests/{manifest}?ns={REGISTRY}",
            c.node(i).agent_url(),
            image.repo
        )
    };
    assert_eq!(
        c.http
            .head(blob_url(2))
            .send()
            .await
            .expect("head")
            .status(),
        200,
        "node 2 finds it at node 1"
    );

    // Delete the image on node 1; containerd's garbage collection removes its content.
    c.node(1)
        .cri
        .remove(&Cluster::image_ref(&image))
        .await
        .expect("remove");
    let _ = c.node(1).ctr(&[
        "images",
        "rm",
        &format!("{REGISTRY}/{}@{manifest}", image.repo),
    ]);
    let node1 = c.node(1);
    wait_until(
        Duration::from_secs(15),
        "the content to be garbage-collected",
        || async {
            !node1
                .ctr(&["content", "ls", "-q"])
                .unwrap_or_default()
                .contains(manifest.as_str())
        },
    )
    .await
    .expect("collected");

    let http = c.http.clone();
    let url = blob_url(2);
    wait_until(
        Duration::from_secs(20),
        "lookups to stop returning node 1",
        || {
            let (http, url) = (http.clone(), url.clone());
            async move {
                http.head(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == 404)
            }
        },
    )
    .await
    .expect("withdrawn");
    let withdrawn = c
        .node(2)
        .metric("mirrorlet_p2p_withdrawals_received_total", &[])
        .await
        .expect("metrics");
    let withdrawn3 = c
        .node(3)
        .metric("mirrorlet_p2p_withdrawals_received_total", &[])
        .await
        .expect("metrics");
    assert!(
        withdrawn + withdrawn3 >= 1.0,
        "node 1 told its peers to forget it"
    );
    assert_eq!(
        c.http
            .head(blob_url(3))
            .send()
            .await
            .expect("head")
            .status(),
        404
    );
}

/// Starts node 2's pull of the big image in the background, waits until one of the peers
/// holding it has served `threshold` bytes to it, and returns that peer's index and what
/// each holder had served before the pull.
async fn pull_and_catch_server(
    c: &Cluster,
    holders: [usize; 2],
) -> (
    tokio::task::JoinHandle<Result<String, mirrorlet_containerd::cri::CriError>>,
    usize,
    [f64; 2],
) {
    let mut before = [0.0; 2];
    for (b, i) in before.iter_mut().zip(holders) {
        *b = c
            .node(i)
            .metric("mirrorlet_registry_peer_served_bytes_total", &[])
            .await
            .expect("metrics");
    }
    let cri = c.node(2).cri.clone();
    let name = Cluster::image_ref(&big());
    let pull = tokio::spawn(async move { cri.pull(&name, PULL).await });
    let threshold = 32.0 * 1024.0 * 1024.0;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for (b, i) in before.iter().zip(holders) {
            let served = c
                .node(i)
                .metric("mirrorlet_registry_peer_served_bytes_total", &[])
                .await
                .unwrap_or(0.0);
            if served - b >= threshold {
                return (pull, i, before);
            }
        }
        assert!(
            Instant::now() < deadline,
            "node 2 never streamed from a peer"
        );
        assert!(
            !pull.is_finished(),
            "the pull finished before it could be interrupted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn big_image_on_nodes_1_and_3(c: &mut Cluster) {
    let name = Cluster::image_ref(&big());
    c.node(1)
        .cri
        .pull(&name, PULL)
        .await
        .expect("node 1 pulls the big image");
    c.node(3)
        .cri
        .pull(&name, PULL)
        .await
        .expect("node 3 pulls the big image");
    c.upstream.stop();
    c.wait_servable(2, REGISTRY, &big())
        .await
        .expect("advertised");
}

#[tokio::test]
async fn d_the_serving_agent_killed_mid_blob_and_the_pull_completes_from_another() {
    let mut c = cluster(
        mirrorlet_e2e::cluster::default_nodes(),
        vec![big()],
        slow_serving(),
    )
    .await;
    big_image_on_nodes_1_and_3(&mut c).await;
    let (pull, serving, before) = pull_and_catch_server(&c, [1, 3]).await;
    c.node_mut(serving).kill_agent();
    pull.await.expect("join").expect("node 2's pull completes");
    let (other, other_before) = if serving == 1 {
        (3, before[1])
    } else {
        (1, before[0])
    };
    let resumed = c
        .node(2)
        .metric("mirrorlet_peer_resumes_total", &[])
        .await
        .expect("metrics");
    assert!(
        resumed >= 1.0,
        "node 2's agent continued the blob elsewhere"
    );
    let rest = c
        .node(other)
        .metric("mirrorlet_registry_peer_served_bytes_total", &[])
        .await
        .expect("metrics");
    // Counted from the start of node 2's pull: node 1 had already served node 3.
    assert!(rest - other_before > 0.0, "node {other} served the rest");
}

#[tokio::test]
async fn f_a_peers_link_cut_mid_pull_and_the_pull_completes_from_others() {
    let mut c = cluster(
        mirrorlet_e2e::cluster::default_nodes(),
        vec![big()],
        slow_serving(),
    )
    .await;
    big_image_on_nodes_1_and_3(&mut c).await;
    let (pull, serving, _) = pull_and_catch_server(&c, [1, 3]).await;
    c.node(serving).host.link_down().expect("cut the link");
    pull.await.expect("join").expect("node 2's pull completes");
    c.node(serving).host.link_up().expect("restore the link");
    let resumed = c
        .node(2)
        .metric("mirrorlet_peer_resumes_total", &[])
        .await
        .expect("metrics");
    assert!(
        resumed >= 1.0,
        "node 2's agent continued the blob elsewhere"
    );
}

fn corrupt_peer_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_corrupt-peer"))
}

/// Starts the corrupt peer on host `.octet`, corrupting blobs of at least `min_size` bytes.
async fn corrupt_peer(
    c: &Cluster,
    name: &str,
    octet: u8,
    min_size: usize,
    blob_urls: &[String],
) -> Proc {
    let host = c.extra_host(name, octet).expect("host");
    let mut args = vec![
        host.addr.to_string(),
        format!("{}:5001", mirrorlet_e2e::node::PEERS_NAME),
        min_size.to_string(),
    ];
    args.extend(blob_urls.iter().cloned());
    let log = c.dir().join(format!("{name}.log"));
    let bad = Proc::spawn(name, Some(&host.netns), corrupt_peer_bin(), &args, &log).expect("spawn");
    wait_until(
        Duration::from_secs(20),
        "the corrupt peer to advertise",
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("advertised")
            }
        },
    )
    .await
    .expect("advertised");
    bad
}

/// Pulls like kubelet: a failed pull is retried (up to three times in all).
async fn pull_with_retries(c: &Cluster, i: usize, name: &str) -> usize {
    for attempt in 1..=3 {
        match c.node(i).cri.pull(name, PULL).await {
            Ok(_) => return attempt,
            Err(e) => eprintln!("node {i}: pull attempt {attempt} failed: {e:#}"),
        }
        // The kubelet backs off before pulling again (10 s at first). Retrying at once
        // can race containerd's own clean-up of the failed pull's snapshots ("parent
        // snapshot ... does not exist"), which is no fault of what was served.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    panic!("node {i}: the pull never completed");
}

/// The blob URLs (config and layers) of `image` at the upstream registry.
async fn blob_urls(c: &Cluster, image: &TestImage) -> (Vec<String>, Vec<String>) {
    let manifest: serde_json::Value = c
        .upstream_get(&format!("/v2/{}/manifests/{}", image.repo, image.tag))
        .await
        .expect("manifest")
        .json()
        .await
        .expect("json");
    let mut blobs: Vec<String> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_owned())
        .collect();
    blobs.push(
        manifest["config"]["digest"]
            .as_str()
            .expect("config")
            .to_owned(),
    );
    let urls = blobs
        .iter()
        .map(|d| format!("{}/v2/{}/blobs/{d}", c.upstream.url(), image.repo))
        .collect();
    (blobs, urls)
}

#[tokio::test]
async fn e_a_peer_serving_corrupt_bytes_never_gets_a_wrong_byte_accepted() {
    let other = TestImage::single("e2e/p2p-other", "v1", &[2_000_000, 500_000]);
    let c = cluster(
        mirrorlet_e2e::cluster::default_nodes(),
        vec![app(), other.clone()],
        vec![],
    )
    .await;

    // A peer that corrupts only the 9 MB layer of one image (too large to check in
    // memory): node 2's agent streams it to containerd as it arrives (--peer-verify
    // stream), holding back the last byte; the digest does not match, so the stream is
    // cut and containerd's partial download aborted (containerd resumes partial downloads:
    // without the abort the bytes already written would poison every retry). That pull
    // fails; the retry starts clean, avoids the peer, and completes.
    let (blobs, urls) = blob_urls(&c, &app()).await;
    let bad = corrupt_peer(&c, "bad1", 98, 5_000_000, &urls).await;
    let attempts = pull_with_retries(&c, 2, &Cluster::image_ref(&app())).await;
    assert!(attempts <= 2, "the retry completes: {attempts} attempts");
    let mismatches = c
        .node(2)
        .metric("mirrorlet_peer_digest_mismatches_total", &[])
        .await
        .expect("metrics");
    assert_eq!(mismatches, 1.0, "the corrupt layer was detected");
    let aborted = c
        .node(2)
        .metric("mirrorlet_ingests_aborted_total", &[])
        .await
        .expect("metrics");
    assert!(
        aborted >= 1.0,
        "containerd's partial copy was aborted: {aborted}"
    );
    drop(bad);

    // A peer that corrupts every blob of another image (nobody else holds it): node 3's
    // first blob from it fails verification in memory, and the peer is avoided from then on.
    let (other_blobs, other_urls) = blob_urls(&c, &other).await;
    let bad = corrupt_peer(&c, "bad2", 97, 0, &other_urls).await;
    assert_eq!(
        pull_with_retries(&c, 3, &Cluster::image_ref(&other)).await,
        1,
        "the first pull completes"
    );
    let mismatches = c
        .node(3)
        .metric("mirrorlet_peer_digest_mismatches_total", &[])
        .await
        .expect("metrics");
    assert!(mismatches >= 1.0, "the corrupt bytes were detected");
    drop(bad);

    // containerd commits content only under its verified digest: every blob is there.
    for (i, digests) in [(2, &blobs), (3, &other_blobs)] {
        let content = c.node(i).ctr(&["content", "ls", "-q"]).expect("content");
        for d in digests {
            assert!(
                content.contains(d.as_str()),
                "node {i}: {d} stored after verification"
            );
        }
    }
}

/// A tmpfs mounted for a test, unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Self {
        std::fs::create_dir_all(at).expect("mount point");
        mirrorlet_e2e::process::run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                &at.display().to_string(),
            ],
        )
        .expect("mount tmpfs");
        Self(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = mirrorlet_e2e::process::run("umount", &["-l", &self.0.display().to_string()]);
    }
}

/// Node 2's spool disk is full: a blob from node 1 cannot be written, the agent answers
/// 404 before sending a byte, containerd takes the blob from the registry, and the
/// failure is a warning in the log and counted.
#[tokio::test]
async fn g_a_full_spool_disk_is_logged_and_counted_and_the_pull_completes() {
    let image = TestImage::single("e2e/spool-full", "v1", &[12 << 20]);
    let mut c = cluster(2, vec![image.clone()], vec![]).await;
    c.node(1)
        .cri
        .pull(&Cluster::image_ref(&image), PULL)
        .await
        .expect("node 1 pulls");
    assert!(c.node_mut(2).stop_agent(), "node 2's agent stops");
    let spool = Tmpfs::mount(&c.node(2).dir.join("spool"), "4k");
    c.node_mut(2)
        .start_agent()
        .await
        .expect("node 2's agent restarts");
    c.wait_members().await.expect("members");
    c.wait_servable(2, REGISTRY, &image)
        .await
        .expect("advertised");
    c.node(2)
        .cri
        .pull(&Cluster::image_ref(&image), PULL)
        .await
        .expect("node 2's pull completes from the registry");
    let failures = c
        .node(2)
        .metric("mirrorlet_peer_failures_total", &[("reason", "spool")])
        .await
        .expect("metrics");
    assert!(failures >= 1.0, "counted: {failures}");
    let log = c.node(2).agent_log();
    assert!(
        log.contains("writing the spool failed"),
        "logged: {}",
        c.node(2).agent_log_tail(20)
    );
    c.node_mut(2).stop_agent();
    drop(spool);
}

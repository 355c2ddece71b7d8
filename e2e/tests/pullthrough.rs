//! End-to-end scenarios for the cluster-wide pull-through cache: nodes in network
//! namespaces with real containerd, agents pulling through from a real Distribution
//! registry (behind a Docker-Hub-like front where a scenario needs tokens, rate limits,
//! CDN redirects or a corrupt CDN), every pull through the CRI.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use mirrorlet_e2e::cluster::{PullThrough, default_nodes};
use mirrorlet_e2e::wait::wait_until;
use mirrorlet_e2e::{Cluster, Options, REGISTRY, TestImage};
use mirrorlet_routing::closest_first;

const PULL: Duration = Duration::from_secs(180);

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

async fn cluster(
    nodes: usize,
    images: Vec<TestImage>,
    pull_through: PullThrough,
    upstream_login: Option<(String, String)>,
    agent_args: Vec<String>,
) -> Cluster {
    let c = Cluster::start(Options {
        nodes,
        images,
        agent_args,
        pull_through: Some(pull_through),
        upstream_login,
        ..Options::default()
    })
    .await
    .expect("cluster starts");
    c.wait_members().await.expect("agents see each other");
    c
}

/// Every node pulls `image` through the CRI at the same moment.
async fn pull_everywhere(
    c: &Cluster,
    image: &TestImage,
) -> Vec<Result<String, mirrorlet_containerd::cri::CriError>> {
    let name = Cluster::image_ref(image);
    join_all(c.nodes.iter().map(|n| {
        let (cri, name) = (n.cri.clone(), name.clone());
        async move { cri.pull(&name, PULL).await }
    }))
    .await
}

/// The manifest digest and the blob digests (config and layers) of `image` upstream.
async fn digests(c: &Cluster, image: &TestImage) -> (String, Vec<String>) {
    let manifest = c
        .upstream_digest(&image.repo, &image.tag)
        .await
        .expect("digest")
        .to_string();
    // Straight from the registry (behind any front): the test is not the cluster.
    let body: serde_json::Value = c
        .upstream_get(&format!("/v2/{}/manifests/{manifest}", image.repo))
        .await
        .expect("manifest")
        .json()
        .await
        .expect("json");
    let mut blobs = vec![
        body["config"]["digest"]
            .as_str()
            .expect("config")
            .to_owned(),
    ];
    blobs.extend(
        body["layers"]
            .as_array()
            .expect("layers")
            .iter()
            .map(|l| l["digest"].as_str().expect("digest").to_owned()),
    );
    (manifest, blobs)
}

/// The node (1-based) that owns `key` in the cluster, as the agents compute it.
fn owner_of(c: &Cluster, key: &str) -> usize {
    let ids: Vec<(usize, String)> = c
        .nodes
        .iter()
        .map(|n| (n.index, n.peer_id().expect("peer id in the agent log")))
        .collect();
    closest_first(key, ids, |(_, id)| id.parse().expect("a peer id"))[0].0
}

async fn sum(c: &Cluster, metric: &str, filter: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for n in &c.nodes {
        total += n.metric(metric, filter).await.unwrap_or(0.0);
    }
    total
}

#[tokio::test]
async fn a_nodes_pulling_a_new_image_at_once_cost_one_upstream_get_per_blob_and_manifest() {
    let image = TestImage::single(
        "e2e/pt-burst",
        "v1",
        &[4_000_000, 8_000_000, 2_000_000, 6_000_000],
    );
    let c = cluster(
        default_nodes().max(5),
        vec![image.clone()],
        PullThrough::default(),
        None,
        vec![],
    )
    .await;
    let (manifest, blobs) = digests(&c, &image).await;
    let mark = c.upstream.access_log().len();
    for (i, r) in pull_everywhere(&c, &image).await.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("node {} pulls: {e:#}", i + 1));
    }
    let log: Vec<_> = c.upstream.access_log().split_off(mark);
    let gets: Vec<_> = log.iter().filter(|a| a.is_content_get()).collect();
    for d in std::iter::once(&manifest).chain(&blobs) {
        let n = gets.iter().filter(|a| a.path.ends_with(d.as_str())).count();
        assert_eq!(n, 1, "one GET of {d} for the whole cluster: {log:#?}");
    }
    assert_eq!(
        gets.len(),
        1 + blobs.len(),
        "nothing else fetched: {gets:#?}"
    );
    assert!(
        log.iter().all(|a| a.user_agent.starts_with("mirrorlet/")),
        "containerd never had to go upstream itself: {log:#?}"
    );
    let heads = log.iter().filter(|a| a.method == "HEAD").count();
    eprintln!(
        "upstream saw {} requests: {} content GETs, {heads} HEADs",
        log.len(),
        gets.len()
    );
    assert!(
        sum(
            &c,
            "mirrorlet_registry_served_bytes_total",
            &[("source", "upstream")]
        )
        .await
            > 0.0
    );
}

#[tokio::test]
async fn b_the_owner_killed_mid_layer_and_every_pull_completes() {
    let image = TestImage::single("e2e/pt-owner-dies", "v1", &[160 << 20]);
    let mut c = cluster(
        default_nodes(),
        vec![image.clone()],
        PullThrough::default(),
        None,
        vec![],
    )
    .await;
    let (_, blobs) = digests(&c, &image).await;
    let layer = blobs.last().expect("layer").clone();
    let owner = owner_of(&c, &layer);
    // A realistic upstream: the layer takes seconds to come.
    c.upstream.host.cap_upload("300mbit").expect("cap");
    let name = Cluster::image_ref(&image);
    let pulls: Vec<_> = c
        .nodes
        .iter()
        .map(|n| {
            let (cri, name) = (n.cri.clone(), name.clone());
            tokio::spawn(async move { cri.pull(&name, PULL).await })
        })
        .collect();
    wait_until(
        Duration::from_secs(60),
        "the owner to be downloading the layer",
        || async {
            c.node(owner)
                .metric("mirrorlet_upstream_received_bytes_total", &[])
                .await
                .unwrap_or(0.0)
                >= 32.0 * 1024.0 * 1024.0
        },
    )
    .await
    .expect("owner downloads");
    c.node_mut(owner).kill_agent();
    for (i, p) in pulls.into_iter().enumerate() {
        p.await
            .expect("join")
            .unwrap_or_else(|e| panic!("node {} pulls despite the dead owner: {e:#}", i + 1));
    }
    c.upstream.host.uncap_upload().expect("uncap");
    let mut resumed = 0.0;
    for n in c.nodes.iter().filter(|n| n.index != owner) {
        resumed += n
            .metric("mirrorlet_peer_resumes_total", &[])
            .await
            .expect("metrics");
    }
    assert!(
        resumed >= 1.0,
        "the followers continued the layer elsewhere"
    );
}

#[tokio::test]
async fn c_a_rate_limited_hub_with_a_budget_of_one_serves_every_node() {
    let image = TestImage::single("e2e/pt-hub", "v1", &[3_000_000, 5_000_000]);
    let other = TestImage::single("e2e/pt-hub-other", "v1", &[1_000_000]);
    let pt = PullThrough {
        front: Some(Some(1)),
        ..PullThrough::default()
    };
    let n = default_nodes().max(5);
    let c = cluster(n, vec![image.clone(), other.clone()], pt, None, vec![]).await;
    let name = Cluster::image_ref(&image);
    // All but the last node pull at once.
    let results = join_all(c.nodes[..n - 1].iter().map(|node| {
        let (cri, name) = (node.cri.clone(), name.clone());
        async move { cri.pull(&name, PULL).await }
    }))
    .await;
    for (i, r) in results.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("node {} pulls: {e:#}", i + 1));
    }
    let stats = c.front_stats().await.expect("stats");
    eprintln!("front after the burst: {stats}");
    assert_eq!(
        stats["manifest_gets"], 1,
        "one counted pull for the cluster"
    );
    assert_eq!(stats["rejected"], 0);
    assert_eq!(
        stats["blob_redirects"], 3,
        "each blob fetched once, through the CDN"
    );
    assert_eq!(stats["cdn_with_auth"], 0, "no credentials went to the CDN");
    assert!(
        stats["tokens"].as_u64().unwrap_or(0) >= 1,
        "the agents used tokens"
    );

    // The budget is spent: the last node still starts its pod, from the cluster.
    c.node(n)
        .cri
        .pull(&name, PULL)
        .await
        .expect("the last node pulls with the budget spent");
    let stats = c.front_stats().await.expect("stats");
    assert_eq!(
        (stats["manifest_gets"].as_u64(), stats["rejected"].as_u64()),
        (Some(1), Some(0))
    );

    // An image nobody has cannot come: the 429 is seen, counted, and the pull fails
    // cleanly rather than hanging.
    let err = c
        .node(1)
        .cri
        .pull(&Cluster::image_ref(&other), Duration::from_secs(60))
        .await
        .expect_err("over the limit");
    eprintln!("over the limit: {err:#}");
    assert!(!format!("{err:#}").contains("did not finish within"));
    let mut limited = 0;
    for node in &c.nodes {
        if node
            .metric("mirrorlet_upstream_rate_limited_total", &[])
            .await
            .expect("metrics")
            >= 1.0
        {
            limited += 1;
            // The 429 carried the registry's budget: visible on the dashboard.
            let gauge = |name| node.metric(name, &[("registry", REGISTRY)]);
            assert_eq!(
                gauge("mirrorlet_upstream_ratelimit_remaining")
                    .await
                    .expect("m"),
                0.0
            );
            assert_eq!(
                gauge("mirrorlet_upstream_ratelimit_limit")
                    .await
                    .expect("m"),
                1.0
            );
        }
    }
    assert!(limited >= 1, "the 429 was seen and counted");
}

#[tokio::test]
async fn d_a_private_upstream_with_the_right_and_the_wrong_credentials() {
    let login = ("alice".to_owned(), "s3cret".to_owned());
    let first = TestImage::single("e2e/pt-private", "v1", &[2_000_000]);
    let second = TestImage::single("e2e/pt-private-2", "v1", &[1_500_000]);
    let pt = PullThrough {
        credentials: Some(login.clone()),
        ..PullThrough::default()
    };
    let mut c = cluster(
        default_nodes(),
        vec![first.clone(), second.clone()],
        pt,
        Some(login.clone()),
        vec![],
    )
    .await;
    // containerd has no credentials for the registry: only the agents' can get it.
    for (i, r) in pull_everywhere(&c, &first).await.into_iter().enumerate() {
        r.unwrap_or_else(|e| panic!("node {} pulls with the agents' credentials: {e:#}", i + 1));
    }

    // The agents get a wrong password: the refusal is logged clearly, and containerd's own
    // attempt with the pod's pull secret still works.
    let file = c.dir().join("credentials.json");
    let wrong = std::fs::read_to_string(&file)
        .expect("credentials")
        .replace(&base64_of("alice:s3cret"), &base64_of("alice:wrong"));
    std::fs::write(&file, wrong).expect("rewrite");
    for i in 1..=c.nodes.len() {
        c.node_mut(i).stop_agent();
        c.node_mut(i).start_agent().await.expect("agent restarts");
    }
    c.wait_members().await.expect("members");
    let name = Cluster::image_ref(&second);
    let err = c
        .node(1)
        .cri
        .pull(&name, Duration::from_secs(60))
        .await
        .expect_err("no one has credentials that work");
    eprintln!("without a pull secret: {err:#}");
    c.node(2)
        .cri
        .pull_with(&name, PULL, Some(("alice", "s3cret")))
        .await
        .expect("containerd pulls with the pod's own pull secret");
    let logs: String = c.nodes.iter().map(mirrorlet_e2e::Node::agent_log).collect();
    assert!(
        logs.contains("refused the configured credentials"),
        "a clear log line about the wrong password"
    );
}

fn base64_of(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

#[tokio::test]
async fn e_a_tag_moved_upstream_is_pulled_anew_by_every_node_after_the_window() {
    let v1 = TestImage::single("e2e/pt-moving", "stable", &[1_000_000]);
    let c = cluster(
        default_nodes(),
        vec![v1.clone()],
        PullThrough::default(),
        None,
        args(&["--tag-revalidate", "2s"]),
    )
    .await;
    for r in pull_everywhere(&c, &v1).await {
        r.expect("first pull");
    }
    let old = c.upstream_digest(&v1.repo, &v1.tag).await.expect("digest");
    // Another image pushed under the same tag.
    let v2 = TestImage::single("e2e/pt-moving", "stable", &[1_200_000, 300_000]);
    v2.push(
        &mirrorlet_e2e::deps::image_cache(),
        &c.upstream.authority(),
        None,
    )
    .expect("push");
    let new = c.upstream_digest(&v2.repo, &v2.tag).await.expect("digest");
    assert_ne!(old, new);
    tokio::time::sleep(Duration::from_secs(3)).await;
    for r in pull_everywhere(&c, &v2).await {
        r.expect("pull after the move");
    }
    let name = Cluster::image_ref(&v2);
    for n in &c.nodes {
        let listed = n
            .ctr(&["images", "ls", &format!("name=={name}")])
            .expect("ctr");
        assert!(
            listed.contains(new.as_str()),
            "node {} has the new digest: {listed}",
            n.index
        );
    }
}

#[tokio::test]
async fn f_with_upstream_stopped_held_tags_pull_and_new_images_fail_cleanly() {
    let held = TestImage::single("e2e/pt-held", "v1", &[2_000_000, 700_000]);
    let never = TestImage::single("e2e/pt-never", "v1", &[500_000]);
    let mut c = cluster(
        default_nodes(),
        vec![held.clone(), never.clone()],
        PullThrough::default(),
        None,
        args(&["--tag-revalidate", "1s"]),
    )
    .await;
    c.node(1)
        .cri
        .pull(&Cluster::image_ref(&held), PULL)
        .await
        .expect("node 1 pulls");
    c.upstream.stop();
    tokio::time::sleep(Duration::from_millis(1500)).await; // past the revalidation window
    for i in 2..=c.nodes.len() {
        c.node(i)
            .cri
            .pull(&Cluster::image_ref(&held), PULL)
            .await
            .unwrap_or_else(|e| panic!("node {i} pulls a held tag with upstream down: {e:#}"));
    }
    assert!(sum(&c, "mirrorlet_stale_tags_served_total", &[]).await >= 1.0);
    let started = Instant::now();
    let err = c
        .node(2)
        .cri
        .pull(&Cluster::image_ref(&never), Duration::from_secs(60))
        .await
        .expect_err("nobody has it");
    let text = format!("{err:#}");
    eprintln!(
        "new image, upstream down, failed after {:?}: {text}",
        started.elapsed()
    );
    assert!(!text.contains("did not finish within"), "no hang: {text}");
    let _ = c.node_mut(1);
}

#[tokio::test]
async fn g_a_big_layer_flows_to_containerd_while_it_downloads() {
    let image = TestImage::single("e2e/pt-flowing", "v1", &[128 << 20]);
    let c = cluster(
        default_nodes(),
        vec![image.clone()],
        PullThrough::default(),
        None,
        vec![],
    )
    .await;
    let (_, blobs) = digests(&c, &image).await;
    let layer = blobs.last().expect("layer").clone();
    c.upstream.host.cap_upload("200mbit").expect("cap");
    // As containerd would: node 2's agent, for a blob no node holds.
    let url = format!(
        "{}/v2/{}/blobs/{layer}?ns={REGISTRY}",
        c.node(2).agent_url(),
        image.repo
    );
    let resp = c.http.get(&url).send().await.expect("get");
    assert_eq!(resp.status(), 200);
    let size: f64 = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a length");
    let mut body = resp.bytes_stream();
    use futures_util::StreamExt;
    let first = body.next().await.expect("a first chunk").expect("bytes");
    let fetched = sum(&c, "mirrorlet_upstream_received_bytes_total", &[]).await;
    assert!(
        fetched < size / 2.0,
        "the first bytes arrived while the layer was still downloading ({fetched} of {size})"
    );
    let mut got = first.len();
    while let Some(chunk) = body.next().await {
        got += chunk.expect("chunk").len();
    }
    assert_eq!(got as f64, size);
    // And a real pull of it works alongside.
    c.node(3)
        .cri
        .pull(&Cluster::image_ref(&image), PULL)
        .await
        .expect("CRI pull");
    c.upstream.host.uncap_upload().expect("uncap");
}

#[tokio::test]
async fn h_wrong_bytes_from_the_registry_never_reach_containerds_store() {
    let image = TestImage::single("e2e/pt-corrupt", "v1", &[16 << 20]);
    let pt = PullThrough {
        front: Some(None),
        ..PullThrough::default()
    };
    let c = cluster(default_nodes(), vec![image.clone()], pt, None, vec![]).await;
    let (_, blobs) = digests(&c, &image).await;
    let layer = blobs.last().expect("layer").clone();
    c.front_corrupt_next(&layer).await.expect("corrupt");
    // Slow enough that containerd is sure to be reading the layer as it arrives (on a fast
    // link the whole copy can fail verification before anyone read it, and is then
    // quietly fetched again: correct, but not this scenario).
    c.upstream.host.cap_upload("200mbit").expect("cap");
    let name = Cluster::image_ref(&image);
    let first = c.node(1).cri.pull(&name, PULL).await;
    let err = first.expect_err("the first attempt cannot complete");
    eprintln!("first attempt: {err:#}");
    let content = c.node(1).ctr(&["content", "ls", "-q"]).expect("content");
    assert!(!content.contains(&layer), "nothing wrong was committed");
    assert!(sum(&c, "mirrorlet_upstream_digest_mismatches_total", &[]).await >= 1.0);
    assert!(
        c.node(1)
            .metric("mirrorlet_ingests_aborted_total", &[])
            .await
            .expect("metrics")
            >= 1.0,
        "containerd's partial download was aborted"
    );
    c.upstream.host.uncap_upload().expect("uncap");
    // The retry starts clean and completes (kubelet retries a failed pull).
    c.node(1)
        .cri
        .pull(&name, PULL)
        .await
        .expect("the retry completes");
    let content = c.node(1).ctr(&["content", "ls", "-q"]).expect("content");
    assert!(content.contains(&layer), "the verified layer is there");
}

#[tokio::test]
async fn i_ipv6_only_nodes_pull_through_their_agents_and_from_each_other() {
    let image = TestImage::single("e2e/pt-ipv6", "v1", &[3_000_000, 1_000_000]);
    let c = Cluster::start(Options {
        nodes: 3,
        images: vec![image.clone()],
        pull_through: Some(PullThrough::default()),
        ipv6: true,
        ..Options::default()
    })
    .await
    .expect("cluster starts");
    c.wait_members().await.expect("agents meet over IPv6");
    // configure was given the node's bare IPv6 address, as Kubernetes gives it; it is
    // written bracketed, as dotted keys (containerd 1.6 refuses `]` in a table header).
    let n1 = c.node(1);
    let hosts = std::fs::read_to_string(n1.certs_d().join(REGISTRY).join("hosts.toml"))
        .expect("hosts.toml");
    let mirror = format!("[host]\n\"http://[{}]:5000\".capabilities", n1.host.addr6);
    assert!(hosts.contains(&mirror), "{mirror} in:\n{hosts}");

    // Node 1: containerd -> its agent at the IPv6 address -> the registry over IPv6.
    let name = Cluster::image_ref(&image);
    let mark = c.upstream.access_log().len();
    n1.cri.pull(&name, PULL).await.expect("node 1 pulls");
    let log = c.upstream.access_log().split_off(mark);
    let gets: Vec<_> = log.iter().filter(|a| a.is_content_get()).collect();
    assert_eq!(gets.len(), 4, "manifest, config, two layers: {log:#?}");
    // (The tag's owner, maybe another node, asks for the tag.)
    let agents6: Vec<String> = c.nodes.iter().map(|n| n.host.addr6.to_string()).collect();
    assert!(
        log.iter()
            .all(|a| a.user_agent.starts_with("mirrorlet/") && agents6.contains(&a.client)),
        "only agents, over IPv6 ({agents6:?}), went upstream: {log:#?}"
    );

    // Node 2: no blob upstream, so its layers came from other agents, over IPv6 (the nodes
    // have no other addresses).
    let mark = c.upstream.access_log().len();
    c.node(2).cri.pull(&name, PULL).await.expect("node 2 pulls");
    let log = c.upstream.access_log().split_off(mark);
    assert!(
        log.iter().all(|a| !a.path.contains("/blobs/")),
        "no blob upstream for node 2: {log:#?}"
    );
    let served = c
        .node(2)
        .metric(
            "mirrorlet_registry_served_bytes_total",
            &[("requester", "containerd")],
        )
        .await
        .expect("metrics");
    assert!(
        served >= 4_000_000.0,
        "node 2's agent served its layers: {served}"
    );
}

/// Runs `mirrorlet preheat ARGS` in node `i`'s namespace against its containerd, waiting
/// for its agent; returns (success, stdout and stderr).
async fn preheat(c: &Cluster, i: usize, images: &[String]) -> (bool, String) {
    let node = c.node(i);
    let bin = mirrorlet_e2e::deps::mirrorlet_bin().expect("binary");
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", &node.host.netns])
        .arg(bin)
        .args(["preheat", "--containerd-socket"])
        .arg(node.socket())
        .args(["--agent-url", "http://127.0.0.1:5002", "--timeout", "2m"])
        .args(images);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .expect("join")
        .expect("run preheat");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test]
async fn j_preheat_puts_images_on_every_node_for_one_upstream_fetch() {
    let first = TestImage::single("e2e/pt-preheat", "v1", &[3_000_000, 2_000_000]);
    let second = TestImage::single("e2e/pt-preheat-b", "v1", &[1_000_000]);
    let c = cluster(
        3,
        vec![first.clone(), second.clone()],
        PullThrough::default(),
        None,
        vec![],
    )
    .await;
    let names = vec![Cluster::image_ref(&first), Cluster::image_ref(&second)];
    let mark = c.upstream.access_log().len();
    let runs = join_all((1..=3).map(|i| preheat(&c, i, &names))).await;
    for (i, (ok, out)) in runs.iter().enumerate() {
        assert!(ok, "node {} preheats:\n{out}", i + 1);
        for name in &names {
            assert!(
                out.contains(&format!("pulled {name} in ")),
                "{name} in:\n{out}"
            );
        }
        assert!(out.contains("0/2 images"), "progress is shown:\n{out}");
        assert!(out.contains("2 images on this node"), "{out}");
    }
    for node in &c.nodes {
        for name in &names {
            assert!(
                node.cri.has(name).await.expect("status"),
                "{name} on node {}",
                node.index
            );
        }
    }
    // Through the agents: each manifest and blob fetched once for the whole cluster.
    let log = c.upstream.access_log().split_off(mark);
    for image in [&first, &second] {
        let (manifest, blobs) = digests(&c, image).await;
        for d in std::iter::once(&manifest).chain(&blobs) {
            let n = log
                .iter()
                .filter(|a| a.is_content_get() && a.path.ends_with(d.as_str()))
                .count();
            assert_eq!(n, 1, "one GET of {d}: {log:#?}");
        }
    }

    // An image that does not exist is named, and the exit status says so.
    let missing = format!("{REGISTRY}/e2e/nowhere:v1");
    let (ok, out) = preheat(&c, 1, std::slice::from_ref(&missing)).await;
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("FAILED {missing}")), "{out}");
    assert!(out.contains("1 of 1 images not pulled"), "{out}");
    // A malformed reference is refused before anything is pulled.
    let (ok, out) = preheat(&c, 1, &["Nginx:1".to_owned()]).await;
    assert!(
        !ok && out.contains("Nginx:1") && out.contains("not an image reference"),
        "{out}"
    );
}

/// A private repository (`--private`): the agents hold working credentials for the
/// registry, yet a node without the pod's pull secret cannot get the image through them;
/// nodes with it resolve the tag at the registry and take the layers from a peer.
#[tokio::test]
async fn k_private_images_need_the_pods_pull_secret_and_layers_come_from_peers() {
    let login = ("alice".to_owned(), "s3cret".to_owned());
    let image = TestImage::single("e2e/pt-secret", "v1", &[3_000_000, 1_000_000]);
    let pt = PullThrough {
        credentials: Some(login.clone()),
        ..PullThrough::default()
    };
    let private = format!("{REGISTRY}/e2e/pt-secret");
    let c = cluster(
        3,
        vec![image.clone()],
        pt,
        Some(login),
        args(&["--private", &private]),
    )
    .await;
    let name = Cluster::image_ref(&image);
    let secret = Some(("alice", "s3cret"));
    c.node(1)
        .cri
        .pull_with(&name, PULL, secret)
        .await
        .expect("node 1 pulls with the pull secret");
    let tag = format!(
        "{}/v2/{}/manifests/{}?ns={REGISTRY}",
        c.node(2).agent_url(),
        image.repo,
        image.tag
    );
    let head = c.http.head(&tag).send().await.expect("head");
    assert_eq!(head.status(), 404, "a private tag is never answered");
    c.node(2)
        .cri
        .pull_with(&name, PULL, secret)
        .await
        .expect("node 2 pulls with the pull secret");
    let from_peer = c
        .node(2)
        .metric(
            "mirrorlet_registry_served_bytes_total",
            &[("source", "peer")],
        )
        .await
        .expect("metrics");
    assert!(
        from_peer >= 4_000_000.0,
        "node 2 got its layers from node 1: {from_peer}"
    );
    let err = c
        .node(3)
        .cri
        .pull(&name, Duration::from_secs(60))
        .await
        .expect_err("no pull secret, no image, whatever the agents' credentials");
    eprintln!("without a pull secret: {err:#}");
    let refused = c
        .node(3)
        .metric("mirrorlet_registry_private_tags_refused_total", &[])
        .await
        .expect("metrics");
    assert!(refused >= 1.0, "node 3's agent refused the tag: {refused}");
}

//! The cluster-wide pull-through cache: several registries in one process on an in-memory
//! network, with an in-memory upstream that counts requests and injects faults. One
//! upstream request per blob, manifest and tag for the whole cluster; followers stream
//! while the owner downloads; an owner dying mid-blob; wrong bytes from upstream never
//! completed and containerd's partial download aborted; tags revalidated per window and
//! served stale while upstream is down; the per-blob peer cap.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use mirrorlet_oci::manifest::OCI_MANIFEST;
use mirrorlet_oci::memory::{Fault, RequestKind};
use mirrorlet_oci::{
    Descriptor, Digest, MemoryNetwork, MemoryRouter, MemoryStore, MemoryUpstream, Registry,
    Repository, Router, UpstreamError, rendezvous,
};
use mirrorlet_registry::{PeerConfig, PullThroughConfig};
use reqwest::StatusCode;
use support::TestNode as Node;

const REGISTRY: &str = "example.com";
const REPO: &str = "team/app";
const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";

fn registry() -> Registry {
    Registry::parse(REGISTRY).expect("registry")
}

fn repo() -> Repository {
    Repository::parse(REPO).expect("repository")
}

fn noise(len: usize, seed: u8) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| {
                (i as u32)
                    .wrapping_mul(2_654_435_761)
                    .wrapping_add(u32::from(seed)) as u8
            })
            .collect::<Vec<_>>(),
    )
}

/// An image upstream: config, a small and a big layer, a manifest tagged `tag`.
struct Image {
    blobs: Vec<(Descriptor, Bytes)>,
    manifest: (Descriptor, Bytes),
}

fn push(up: &MemoryUpstream, tag: &str, seed: u8) -> Image {
    let (r, p) = (registry(), repo());
    let layer = "application/vnd.oci.image.layer.v1.tar+gzip";
    let mut blobs = Vec::new();
    for (media, data) in [
        ("application/vnd.oci.image.config.v1+json", noise(500, seed)),
        (layer, noise(20_000, seed.wrapping_add(1))),
        (layer, noise(3 << 20, seed.wrapping_add(2))),
    ] {
        blobs.push((up.put(&r, &p, media, data.clone()), data));
    }
    let json = |d: &Descriptor| {
        format!(
            r#"{{"mediaType":"{}","digest":"{}","size":{}}}"#,
            d.media_type, d.digest, d.size
        )
    };
    let manifest = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{},"layers":[{},{}]}}"#,
        json(&blobs[0].0),
        json(&blobs[1].0),
        json(&blobs[2].0)
    ));
    let md = up.put(&r, &p, OCI_MANIFEST, manifest.clone());
    up.tag(&r, &p, tag, &md.digest);
    Image {
        blobs,
        manifest: (md, manifest),
    }
}

fn peers() -> PeerConfig {
    PeerConfig {
        read_timeout: Duration::from_millis(1000),
        lookup_timeout: Duration::from_millis(50),
        verify_buffer: 64 * 1024,
        ..PeerConfig::default()
    }
}

fn pull() -> PullThroughConfig {
    PullThroughConfig {
        owner_timeout: Duration::from_secs(5),
        ..PullThroughConfig::default()
    }
}

/// `n` nodes named n1..nN pulling through from `up`.
async fn cluster(
    n: usize,
    up: &Arc<MemoryUpstream>,
    pull: PullThroughConfig,
) -> (Arc<MemoryNetwork>, Vec<(Node, Arc<MemoryStore>)>) {
    let net = Arc::new(MemoryNetwork::default());
    let mut nodes = Vec::new();
    for i in 1..=n {
        let store = Arc::new(MemoryStore::new());
        let (node, _) = Node::start_with(
            &net,
            &format!("n{i}"),
            store.clone(),
            peers(),
            Some((up.clone(), pull.clone())),
        )
        .await;
        nodes.push((node, store));
    }
    (net, nodes)
}

/// The index (0-based) of the node that owns `key` among `n` nodes.
fn owner_of(key: &str, n: usize) -> usize {
    let ids: Vec<String> = (1..=n).map(|i| format!("n{i}")).collect();
    let first = rendezvous::rank(key, ids, String::clone).remove(0);
    first[1..].parse::<usize>().expect("index") - 1
}

fn url(node: &Node, kind: &str, reference: &str) -> String {
    format!("{}/v2/{REPO}/{kind}/{reference}?ns={REGISTRY}", node.base)
}

async fn get(http: &reqwest::Client, url: &str) -> (StatusCode, Bytes) {
    let r = http
        .get(url)
        .header("accept", ACCEPT)
        .send()
        .await
        .expect("request");
    let status = r.status();
    (status, r.bytes().await.unwrap_or_default())
}

/// Pulls the image at `node` the way containerd does: HEAD the tag, GET the manifest by
/// digest, then every blob.
async fn pull_image(http: reqwest::Client, node: &Node, tag: &str, image: &Image) {
    let head = http
        .head(url(node, "manifests", tag))
        .header("accept", ACCEPT)
        .send()
        .await
        .expect("head");
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()["docker-content-digest"],
        image.manifest.0.digest.as_str()
    );
    let (s, body) = get(
        &http,
        &url(node, "manifests", image.manifest.0.digest.as_str()),
    )
    .await;
    assert_eq!((s, &body), (StatusCode::OK, &image.manifest.1));
    let blobs = image.blobs.iter().map(|(d, data)| {
        let http = http.clone();
        let u = url(node, "blobs", d.digest.as_str());
        async move {
            let (s, body) = get(&http, &u).await;
            assert_eq!(s, StatusCode::OK);
            assert!(body == *data, "blob {} intact", d.digest);
        }
    });
    futures_util::future::join_all(blobs).await;
}

#[tokio::test]
async fn five_nodes_pulling_a_new_image_at_once_cost_one_upstream_request_each() {
    let up = Arc::new(MemoryUpstream::new([registry()]));
    let image = push(&up, "v1", 1);
    let (net, nodes) = cluster(5, &up, pull()).await;
    let http = support::client();
    futures_util::future::join_all(
        nodes
            .iter()
            .map(|(n, _)| pull_image(http.clone(), n, "v1", &image)),
    )
    .await;
    assert_eq!(
        up.count(RequestKind::Head),
        1,
        "one HEAD of the tag: {:?}",
        up.requests()
    );
    assert_eq!(
        up.count(RequestKind::Manifest),
        1,
        "one GET of the manifest"
    );
    assert_eq!(
        up.count(RequestKind::Blob),
        3,
        "one GET per blob: {:?}",
        up.requests()
    );

    // What the nodes fetched is announced (the agent's advertiser does this for the
    // cache under containerd's store), so a node that joins later, and so takes over some
    // keys as their owner, is served by the cluster without asking upstream again.
    for (n, _) in &nodes {
        let held: Vec<String> = n
            .state
            .store
            .list()
            .await
            .expect("list")
            .digests()
            .iter()
            .map(ToString::to_string)
            .collect();
        n.router.advertise(held).await.expect("advertise");
    }
    let (late, _) = Node::start_with(
        &net,
        "n6",
        Arc::new(MemoryStore::new()),
        peers(),
        Some((up.clone(), pull())),
    )
    .await;
    pull_image(http.clone(), &late, "v1", &image).await;
    assert_eq!(
        up.requests().len(),
        5,
        "nothing more upstream: {:?}",
        up.requests()
    );
    let fetched: f64 = nodes
        .iter()
        .map(|(n, _)| {
            n.metric("mirrorlet_pullthrough_fetches_total{kind=\"blob\",role=\"fetched\"}")
        })
        .sum();
    assert_eq!(fetched, 3.0);
    let from_upstream: f64 = nodes
        .iter()
        .map(|(n, _)| n.metric("mirrorlet_registry_served_bytes_total{source=\"upstream\",requester=\"containerd\"}"))
        .sum();
    assert!(from_upstream > 0.0);
}

#[tokio::test]
async fn followers_stream_while_the_owner_downloads() {
    let up = Arc::new(MemoryUpstream::new([registry()]));
    let image = push(&up, "v1", 2);
    let big = image.blobs[2].0.digest.clone();
    up.set_fault(
        &big,
        Some(Fault::Slow {
            chunk: 64 * 1024,
            delay: Duration::from_millis(20),
        }),
    );
    let (_net, nodes) = cluster(3, &up, pull()).await;
    let owner = owner_of(big.as_str(), 3);
    let follower = &nodes[(owner + 1) % 3].0;
    let resp = reqwest::get(url(follower, "blobs", big.as_str()))
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    let first = body.next().await.expect("a first chunk").expect("bytes");
    assert!(!first.is_empty());
    assert!(
        nodes[owner].0.state.transfers.get(&big).is_some(),
        "the first bytes arrived while the owner was still downloading"
    );
    let mut all = first.to_vec();
    while let Some(c) = body.next().await {
        all.extend_from_slice(&c.expect("chunk"));
    }
    assert_eq!(Digest::sha256_of(&all), big);
    assert_eq!(up.count(RequestKind::Blob), 1);
}

#[tokio::test]
async fn wrong_bytes_from_upstream_never_complete_and_the_partial_download_is_aborted() {
    let up = Arc::new(MemoryUpstream::new([registry()]));
    let image = push(&up, "v1", 3);
    let (big, data) = image.blobs[2].clone();
    up.set_fault(&big.digest, Some(Fault::Corrupt));
    let (_net, nodes) = cluster(1, &up, pull()).await;
    let (node, store) = &nodes[0];
    // containerd's ingest of the blob, as a pull leaves it while it downloads.
    store.begin_ingest(&format!("layer-{}", big.digest), &big.digest);
    let resp = reqwest::get(url(node, "blobs", big.digest.as_str()))
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::OK, "it streams as it downloads");
    let mut body = resp.bytes_stream();
    let mut got = 0usize;
    let mut failed = false;
    while let Some(c) = body.next().await {
        match c {
            Ok(c) => got += c.len(),
            Err(_) => failed = true,
        }
    }
    assert!(failed, "the stream was cut");
    assert!(got < data.len(), "the last byte was never sent ({got})");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !store.ingests().is_empty() || node.metric("mirrorlet_ingests_aborted_total") < 1.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the partial download was aborted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(node.metric("mirrorlet_ingests_aborted_total"), 1.0);
    // The transfer ends (a copy that failed before anyone read it is quietly tried once
    // more, so there may have been two wrong copies).
    while !node.state.transfers.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "the transfer ends");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(node.metric("mirrorlet_upstream_digest_mismatches_total") >= 1.0);
    assert!(node.state.cache.is_empty(), "nothing wrong was kept");

    // Upstream mends: the retry starts clean and completes.
    up.set_fault(&big.digest, None);
    let (s, body) = get(&support::client(), &url(node, "blobs", big.digest.as_str())).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body == data, "{} bytes, {} wanted", body.len(), data.len());
}

#[tokio::test]
async fn tags_are_checked_once_per_window_and_served_stale_while_upstream_is_down() {
    let up = Arc::new(MemoryUpstream::new([registry()]));
    let first = push(&up, "v1", 4);
    let config = PullThroughConfig {
        tag_revalidate: Duration::from_millis(400),
        stale_tag_max_age: Duration::from_secs(3),
        ..pull()
    };
    let (_net, nodes) = cluster(3, &up, config).await;
    let http = support::client();
    let digest_at = |i: usize| {
        let (http, u) = (http.clone(), url(&nodes[i].0, "manifests", "v1"));
        async move {
            let r = http
                .get(&u)
                .header("accept", ACCEPT)
                .send()
                .await
                .expect("get");
            let d = r
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (r.status(), d)
        }
    };
    for i in 0..3 {
        let (s, d) = digest_at(i).await;
        assert_eq!(
            (s, d.as_deref()),
            (StatusCode::OK, Some(first.manifest.0.digest.as_str()))
        );
    }
    assert_eq!(
        up.count(RequestKind::Head),
        1,
        "one HEAD for the cluster in the window"
    );

    // The tag moves upstream: after the window every node sees the new digest.
    let second = push(&up, "v1", 5);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        let (s, d) = digest_at(i).await;
        assert_eq!(
            (s, d.as_deref()),
            (StatusCode::OK, Some(second.manifest.0.digest.as_str()))
        );
    }
    assert_eq!(up.count(RequestKind::Head), 2);

    // Upstream goes down: the last digest the cluster knows is served, and counted.
    up.set_outage(Some(UpstreamError::Unavailable("down for the test".into())));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        let (s, d) = digest_at(i).await;
        assert_eq!(
            (s, d.as_deref()),
            (StatusCode::OK, Some(second.manifest.0.digest.as_str()))
        );
    }
    let stale: f64 = nodes
        .iter()
        .map(|(n, _)| n.metric("mirrorlet_stale_tags_served_total"))
        .sum();
    assert!(stale >= 1.0);
    // ...but not once it is older than the limit.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..3 {
        assert_eq!(digest_at(i).await.0, StatusCode::NOT_FOUND);
    }

    // A tag deleted upstream stays gone, even though the cluster knew it.
    up.set_outage(None);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(digest_at(0).await.0, StatusCode::OK);
    up.untag(&registry(), &repo(), "v1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        assert_eq!(digest_at(i).await.0, StatusCode::NOT_FOUND);
    }
}

/// The nodes of a large cluster each know only part of it: a node that does not know the
/// owner of a key asks the closest it knows, which sends it on to the owner. One request
/// upstream for a blob, a manifest and a tag, though most nodes never heard of its owner.
#[tokio::test]
async fn nodes_that_do_not_know_the_owner_are_sent_on_to_it() {
    let names: Vec<String> = (1..=6).map(|i| format!("n{i}")).collect();
    for (kind, what) in [
        (RequestKind::Blob, "blobs"),
        (RequestKind::Manifest, "manifests"),
        (RequestKind::Head, "tag"),
    ] {
        let up = Arc::new(MemoryUpstream::new([registry()]));
        let image = push(&up, "v1", 9);
        let (_net, nodes) = cluster(6, &up, pull()).await;
        let (key, reference) = match what {
            "blobs" => (
                image.blobs[1].0.digest.to_string(),
                image.blobs[1].0.digest.to_string(),
            ),
            "manifests" => (
                image.manifest.0.digest.to_string(),
                image.manifest.0.digest.to_string(),
            ),
            _ => (format!("{REGISTRY}/{REPO}:v1"), "v1".to_owned()),
        };
        // Only the owner's runner-up knows the owner; the others never heard of it.
        let ranked = rendezvous::rank(&key, names.clone(), String::clone);
        for (i, (n, _)) in nodes.iter().enumerate() {
            if names[i] != ranked[1] {
                n.router.forget(&ranked[0]);
            }
        }
        let http = support::client();
        let path = if what == "blobs" {
            "blobs"
        } else {
            "manifests"
        };
        let ask = |n: &Node| {
            let u = url(n, path, &reference);
            let http = http.clone();
            async move {
                let r = if what == "tag" {
                    http.head(u)
                } else {
                    http.get(u)
                };
                r.header("accept", ACCEPT)
                    .send()
                    .await
                    .expect("request")
                    .status()
            }
        };
        // One that does not know the owner first (alone: an agent already fetching it
        // would serve it, sending nobody on), then everyone at once.
        let first = names.iter().position(|x| *x == ranked[2]).expect("third");
        assert_eq!(ask(&nodes[first].0).await, StatusCode::OK, "{what}");
        let redirects = nodes[first]
            .0
            .metric("mirrorlet_pullthrough_owner_redirects_total");
        assert_eq!(redirects, 1.0, "{what}: sent on once");
        for status in futures_util::future::join_all(nodes.iter().map(|(n, _)| ask(n))).await {
            assert_eq!(status, StatusCode::OK, "{what}");
        }
        assert_eq!(up.count(kind), 1, "{what}: {:?}", up.requests());
    }
}

/// A node whose lookup missed the nodes holding a blob asks its owner, which stores the
/// digest's provider records itself: it reads the blob from a holder rather than upstream.
#[tokio::test]
async fn an_owner_asked_for_what_a_peer_holds_takes_it_from_that_peer() {
    let up = Arc::new(MemoryUpstream::new([registry()]));
    let image = push(&up, "v1", 11);
    let (layer, data) = image.blobs[1].clone();
    let (_net, nodes) = cluster(4, &up, pull()).await;
    let names: Vec<String> = (1..=4).map(|i| format!("n{i}")).collect();
    let ranked = rendezvous::rank(layer.digest.as_str(), names.clone(), String::clone);
    let at = |name: &str| names.iter().position(|n| n == name).expect("node");
    let (holder, asker) = (&nodes[at(&ranked[1])], &nodes[at(&ranked[2])]);
    holder.1.put_blob(data.clone());
    holder
        .0
        .router
        .advertise(vec![layer.digest.to_string()])
        .await
        .expect("advertise");
    // The asker's lookup misses the holder (here: it avoids it).
    let holder_peer = mirrorlet_oci::Peer {
        id: ranked[1].clone(),
        addr: holder.0.router.registry_addrs()[0],
    };
    asker.0.state.failed_peers.mark(
        &holder_peer,
        Duration::from_secs(60),
        "a lookup that missed",
    );
    let http = support::client();
    let (s, body) = get(&http, &url(&asker.0, "blobs", layer.digest.as_str())).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body == data);
    assert_eq!(up.count(RequestKind::Blob), 0, "{:?}", up.requests());
}

/// An owner that died is skipped: the agent that sent the asker to it fetches instead, and,
/// told so, checks the dead one and stops sending others there.
#[tokio::test]
async fn a_dead_owner_named_in_a_redirect_is_passed_over() {
    let up = Arc::new(MemoryUpstream::new([registry()]));
    let image = push(&up, "v1", 10);
    let (small, data) = image.blobs[1].clone();
    let net = Arc::new(MemoryNetwork::default());
    let names = ["n1", "n2", "n3", "n4"].map(str::to_owned);
    let key = small.digest.to_string();
    let ranked = rendezvous::rank(&key, names.to_vec(), String::clone);
    let mut nodes = Vec::new();
    for name in &names {
        let (node, _) = Node::start_with(
            &net,
            name,
            Arc::new(MemoryStore::new()),
            peers(),
            Some((up.clone(), pull())),
        )
        .await;
        nodes.push((name.clone(), node));
    }
    // The owner dies where nobody can reach it; only its runner-up knows it at all.
    let owner = nodes
        .iter()
        .position(|(name, _)| *name == ranked[0])
        .expect("owner");
    let (_, dead) = nodes.remove(owner);
    let dead_base = dead.base.clone();
    drop(dead);
    // Dropping the node stops its server: wait until nothing answers there.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while reqwest::get(format!("{dead_base}/v2/")).await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the dropped node still answers"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (name, n) in &nodes {
        if *name != ranked[1] {
            n.router.forget(&ranked[0]);
        }
    }
    let http = support::client();
    let asker = nodes
        .iter()
        .find(|(name, _)| *name == ranked[2] || *name == ranked[3])
        .map(|(_, n)| n)
        .expect("a node that does not know the owner");
    let (s, body) = get(&http, &url(asker, "blobs", small.digest.as_str())).await;
    assert_eq!(s, StatusCode::OK);
    assert!(body == data);
    assert_eq!(up.count(RequestKind::Blob), 1, "{:?}", up.requests());
    assert_eq!(
        asker.metric("mirrorlet_pullthrough_owner_redirects_total"),
        1.0,
        "sent on to the dead owner"
    );
    let dead_addr: std::net::SocketAddr = dead_base
        .trim_start_matches("http://")
        .parse()
        .expect("address");
    assert!(asker.state.failed_peers.last(&dead_addr).is_some());
    // The runner-up, which sent the asker to the dead owner, fetched it for the cluster,
    // and found the dead owner gone when told.
    let runner_up = &nodes
        .iter()
        .find(|(n, _)| *n == ranked[1])
        .expect("runner-up")
        .1;
    let fetched =
        runner_up.metric("mirrorlet_pullthrough_fetches_total{kind=\"blob\",role=\"fetched\"}");
    assert_eq!(fetched, 1.0);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while runner_up.state.failed_peers.last(&dead_addr).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the runner-up checks the dead owner"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An owner streams to a bounded number of peers; the rest are sent to those reading from
/// it, whose copies grow as the owner's does, and so on: a tree of copies, one download,
/// and nobody waits for a slot.
#[tokio::test]
async fn an_owner_streams_to_a_bounded_number_of_peers_and_the_rest_follow_them() {
    let up = Arc::new(MemoryUpstream::new([registry()]));
    let image = push(&up, "v1", 6);
    let (big, data) = image.blobs[2].clone();
    up.set_fault(
        &big.digest,
        Some(Fault::Slow {
            chunk: 64 * 1024,
            delay: Duration::from_millis(15),
        }),
    );
    let config = PullThroughConfig {
        max_peer_streams: 1,
        busy_rounds: 0,
        ..pull()
    };
    let (_net, nodes) = cluster(6, &up, config).await;
    let owner = owner_of(big.digest.as_str(), 6);
    let http = support::client();
    let followers = nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != owner)
        .map(|(_, (n, _))| {
            let (http, u) = (http.clone(), url(n, "blobs", big.digest.as_str()));
            async move { get(&http, &u).await }
        });
    for (s, body) in futures_util::future::join_all(followers).await {
        assert_eq!(s, StatusCode::OK);
        assert!(body == data);
    }
    assert_eq!(
        up.count(RequestKind::Blob),
        1,
        "still one download: {:?}",
        up.requests()
    );
    assert!(nodes[owner].0.metric("mirrorlet_peer_busy_refusals_total") >= 1.0);
    let refused: f64 = nodes
        .iter()
        .map(|(n, _)| n.metric("mirrorlet_peer_busy_refusals_total"))
        .sum();
    assert!(refused >= 3.0, "a chain: {refused} refusals");
}

#[tokio::test]
async fn registries_not_pulled_through_are_never_contacted() {
    let up = Arc::new(MemoryUpstream::new([registry()]));
    let (_net, nodes) = cluster(2, &up, pull()).await;
    let http = support::client();
    let other = format!(
        "{}/v2/team/app/blobs/{}?ns=elsewhere.example",
        nodes[0].0.base,
        Digest::sha256_of(b"x")
    );
    assert_eq!(get(&http, &other).await.0, StatusCode::NOT_FOUND);
    let tag = format!(
        "{}/v2/team/app/manifests/v1?ns=elsewhere.example",
        nodes[0].0.base
    );
    assert_eq!(get(&http, &tag).await.0, StatusCode::NOT_FOUND);
    assert!(up.requests().is_empty());
}

/// A node in a runtime of its own, so that it can be killed outright (every connection
/// and task gone at once, as with a dead process).
struct Killable {
    base: String,
    runtime: Option<tokio::runtime::Runtime>,
    router: Arc<MemoryRouter>,
}

impl Killable {
    fn start(net: &Arc<MemoryNetwork>, id: &str, up: &Arc<MemoryUpstream>) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let (net, id, up) = (net.clone(), id.to_owned(), up.clone());
        let (node, router) = runtime.block_on(async move {
            Node::start_with(
                &net,
                &id,
                Arc::new(MemoryStore::new()),
                peers(),
                Some((up, pull())),
            )
            .await
        });
        let base = node.base.clone();
        std::mem::forget(node); // lives as long as its runtime
        Self {
            base,
            runtime: Some(runtime),
            router,
        }
    }

    fn kill(&mut self) {
        self.router.leave();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_owner_dying_mid_blob_does_not_fail_the_pull() {
    let up = Arc::new(MemoryUpstream::new([registry()]));
    let image = push(&up, "v1", 7);
    let (big, data) = image.blobs[2].clone();
    up.set_fault(
        &big.digest,
        Some(Fault::Slow {
            chunk: 64 * 1024,
            delay: Duration::from_millis(20),
        }),
    );
    let net = Arc::new(MemoryNetwork::default());
    // Two nodes; pick names so that the killable one owns the blob.
    let (owner_id, follower_id) = if owner_of(big.digest.as_str(), 2) == 0 {
        ("n1", "n2")
    } else {
        ("n2", "n1")
    };
    let net2 = net.clone();
    let up2 = up.clone();
    let mut owner = tokio::task::spawn_blocking(move || Killable::start(&net2, owner_id, &up2))
        .await
        .expect("start");
    let (follower, _) = Node::start_with(
        &net,
        follower_id,
        Arc::new(MemoryStore::new()),
        peers(),
        Some((up.clone(), pull())),
    )
    .await;
    let _ = &owner.base;
    let resp = reqwest::get(url(&follower, "blobs", big.digest.as_str()))
        .await
        .expect("get");
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.bytes_stream();
    let mut all = Vec::new();
    while all.len() < 512 * 1024 {
        all.extend_from_slice(&body.next().await.expect("more").expect("bytes"));
    }
    tokio::task::spawn_blocking(move || owner.kill())
        .await
        .expect("kill");
    while let Some(c) = body.next().await {
        all.extend_from_slice(&c.expect("the body goes on"));
    }
    assert!(all == data, "the whole blob, intact");
    assert!(follower.metric("mirrorlet_peer_resumes_total") >= 1.0);
    let from_offset: Vec<u64> = up
        .requests()
        .iter()
        .filter(|r| r.kind == RequestKind::Blob)
        .map(|r| r.offset)
        .collect();
    assert!(
        from_offset.len() == 2 && from_offset[1] > 0,
        "the follower continued from where the owner stopped: {from_offset:?}"
    );
}

#[tokio::test]
async fn the_status_page_shows_peers_recent_requests_and_upstream_state() {
    let up = Arc::new(MemoryUpstream::new([registry()]));
    let image = push(&up, "v1", 7);
    let (_net, nodes) = cluster(2, &up, pull()).await;
    let http = support::client();
    let (n1, n2) = (&nodes[0].0, &nodes[1].0);
    pull_image(http.clone(), n1, "v1", &image).await;
    // A miss, and a peer that failed.
    let (s, _) = get(
        &http,
        &url(n1, "blobs", Digest::sha256_of(b"nowhere").as_str()),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let n2_peer = mirrorlet_oci::Peer {
        id: "n2".into(),
        addr: n2.addr,
    };
    n1.state
        .failed_peers
        .mark(&n2_peer, Duration::from_secs(60), "reset <mid-body>");
    up.set_outage(Some(UpstreamError::Unavailable("registry down".into())));

    let json: serde_json::Value = http
        .get(format!("{}/status?format=json", n1.base))
        .send()
        .await
        .expect("status")
        .json()
        .await
        .expect("json");
    assert_eq!(json["node"]["id"], "n1");
    assert_eq!(json["node"]["ready"], true);
    let peers = json["peers"].as_array().expect("peers");
    assert_eq!(peers.len(), 1, "{json:#}");
    assert_eq!(peers[0]["id"], "n2");
    assert_eq!(peers[0]["registry"], n2.addr.to_string());
    assert_eq!(peers[0]["last_failure"]["reason"], "reset <mid-body>");
    assert!(peers[0]["skipped_for_seconds"].as_f64().expect("skipped") > 50.0);
    // Newest first: the miss, then the image's blobs and manifest, each with its source.
    let recent = json["served"]["recent"].as_array().expect("recent");
    assert_eq!(recent.len(), 2 + image.blobs.len() + 1, "{json:#}");
    assert_eq!(recent[0]["status"], 404);
    assert_eq!(recent[0]["source"], "upstream-fallthrough");
    assert_eq!(recent[0]["registry"], REGISTRY);
    let manifest = recent
        .iter()
        .find(|r| {
            r["method"] == "GET"
                && r["path"]
                    .as_str()
                    .is_some_and(|p| p.contains("/manifests/sha256:"))
        })
        .expect("manifest GET listed");
    assert_eq!(manifest["status"], 200);
    // (Fetched by its owner: this node, or the other one.)
    assert!(
        manifest["source"] == "upstream" || manifest["source"] == "peer",
        "{manifest}"
    );
    assert_eq!(manifest["requester"], "containerd");
    // Four content GETs served, one not: a hit ratio of 0.8.
    let ratio = json["served"]["hit_ratio"].as_f64().expect("ratio");
    assert!((ratio - 0.8).abs() < 1e-9, "{json:#}");
    let upstream = json["upstream"].as_array().expect("upstream");
    assert_eq!(upstream.len(), 1);
    assert_eq!(upstream[0]["registry"], REGISTRY);
    assert_eq!(upstream[0]["credentials"], false);
    assert!(
        upstream[0]["last_problem"]["what"]
            .as_str()
            .is_some_and(|w| w.contains("registry down")),
        "{json:#}"
    );

    let page = http
        .get(format!("{}/status", n1.base))
        .send()
        .await
        .expect("status");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .expect("type")
            .starts_with("text/html")
    );
    let html = page.text().await.expect("html");
    for want in [
        "Recently served",
        "Peers",
        "Upstream registries",
        "80.0%",
        "reset &lt;mid-body&gt;",
        REGISTRY,
    ] {
        assert!(html.contains(want), "{want} in the page:\n{html}");
    }
    assert!(!html.contains("<mid-body>"), "text is escaped");
    assert!(!html.contains("<script"), "no JavaScript");
    let bad = http
        .get(format!("{}/status?format=xml", n1.base))
        .send()
        .await
        .expect("status");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

/// Private repositories: no agent answers their tags (to a client or to another agent),
/// their content is served by digest from the nodes that hold it, and the agents never
/// fetch it upstream with the cluster's credentials unless allowed.
#[tokio::test]
async fn private_tags_are_never_answered_and_content_comes_only_from_nodes() {
    use mirrorlet_oci::private::Private;
    let up = Arc::new(MemoryUpstream::new([registry()]));
    let image = push(&up, "v1", 23);
    let net = Arc::new(MemoryNetwork::default());
    let start = |id: &'static str, pull_through: bool, net: Arc<MemoryNetwork>| {
        let up = up.clone();
        async move {
            let store = Arc::new(MemoryStore::new());
            let private =
                Private::new(&[format!("{REGISTRY}/team/*")], pull_through).expect("valid");
            let (node, _) =
                Node::start_configured(&net, id, store.clone(), peers(), Some((up, pull())), |s| {
                    s.with_private(private)
                })
                .await;
            (node, store)
        }
    };
    let (holder, held) = start("n1", false, net.clone()).await;
    let (asker, _) = start("n2", false, net.clone()).await;
    // The holder got the image with a pull secret, as containerd keeps it.
    let mut keys = Vec::new();
    for (d, data) in image.blobs.iter().chain([&image.manifest]) {
        held.put_blob(data.clone());
        keys.push(d.digest.to_string());
    }
    held.put_image(&format!("{REGISTRY}/{REPO}:v1"), image.manifest.0.clone());
    keys.push(format!("{REGISTRY}/{REPO}:v1"));
    holder.router.advertise(keys).await.expect("advertise");
    let http = support::client();

    for node in [&holder, &asker] {
        let (s, body) = get(&http, &url(node, "manifests", "v1")).await;
        assert_eq!(
            s,
            StatusCode::NOT_FOUND,
            "{}",
            String::from_utf8_lossy(&body)
        );
        assert!(String::from_utf8_lossy(&body).contains("private"));
    }
    // Not even to an agent asking as a peer.
    let as_peer = http
        .get(url(&holder, "manifests", "v1"))
        .header("accept", ACCEPT)
        .header("x-mirrorlet-peer", "127.0.0.1:1")
        .send()
        .await
        .expect("request");
    assert_eq!(as_peer.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        holder.metric("mirrorlet_registry_private_tags_refused"),
        2.0
    );
    assert_eq!(asker.metric("mirrorlet_registry_private_tags_refused"), 1.0);

    // By digest: from the holder.
    let (s, body) = get(
        &http,
        &url(&asker, "manifests", image.manifest.0.digest.as_str()),
    )
    .await;
    assert_eq!((s, &body), (StatusCode::OK, &image.manifest.1));
    for (d, data) in &image.blobs {
        let (s, body) = get(&http, &url(&asker, "blobs", d.digest.as_str())).await;
        assert_eq!(s, StatusCode::OK);
        assert!(body == *data);
    }
    assert!(up.requests().is_empty(), "{:?}", up.requests());

    // Content nobody holds is not fetched with the cluster's credentials...
    let other = push(&up, "v2", 24);
    let (d, _) = &other.blobs[1];
    assert_eq!(
        get(&http, &url(&asker, "blobs", d.digest.as_str())).await.0,
        StatusCode::NOT_FOUND
    );
    assert!(up.requests().is_empty(), "{:?}", up.requests());
    // ...unless that is allowed (in a cluster of its own: every agent has the same
    // settings); the tag is still the registry's alone.
    let (allowed, _) = start("n3", true, Arc::new(MemoryNetwork::default())).await;
    let (s, _) = get(&http, &url(&allowed, "blobs", d.digest.as_str())).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        get(&http, &url(&allowed, "manifests", "v2")).await.0,
        StatusCode::NOT_FOUND
    );
}

//! Two or more registries in one process, joined by an in-memory router, with real HTTP
//! between them; fake peers misbehave on purpose (corrupt, dying, stalling, slow).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::response::IntoResponse;
use axum::response::Response;
use bytes::Bytes;
use mirrorlet_oci::manifest::DOCKER_MANIFEST;
use mirrorlet_oci::{Descriptor, Digest, MemoryNetwork, MemoryRouter, MemoryStore, Peer, Router};
use mirrorlet_registry::range;
use mirrorlet_registry::{PEER_HEADER, PeerConfig, PeerVerify};
use mirrorlet_registry::{content_head, respond};
use reqwest::StatusCode;

mod support;

use support::TestNode as Node;

async fn bind() -> (tokio::net::TcpListener, SocketAddr) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let a = l.local_addr().expect("addr");
    (l, a)
}

/// A registry node named `id` on `net`, serving `store`.
async fn node(
    net: &Arc<MemoryNetwork>,
    id: &str,
    store: Arc<MemoryStore>,
    peers: PeerConfig,
) -> (Node, Arc<MemoryRouter>) {
    Node::start(net, id, store, peers).await
}

/// A fake peer: any request is answered by `handler`; advertises `keys` as `id`.
async fn fake_peer<F, Fut>(
    net: &Arc<MemoryNetwork>,
    id: &str,
    keys: Vec<String>,
    handler: F,
) -> SocketAddr
where
    F: Fn(Request) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response> + Send + 'static,
{
    let (listener, addr) = bind().await;
    let app = axum::Router::new().fallback(move |req: Request| handler.clone()(req));
    tokio::spawn(async move { axum::serve(listener, app).await });
    MemoryRouter::new(
        net.clone(),
        Peer {
            id: id.into(),
            addr,
        },
    )
    .advertise(keys)
    .await
    .expect("advertise");
    addr
}

struct Image {
    layer: Descriptor,
    layer_bytes: Bytes,
    manifest: Descriptor,
    manifest_bytes: Bytes,
}

fn image(store: &MemoryStore, layer_size: usize) -> Image {
    let layer_bytes = Bytes::from(
        (0..layer_size)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<_>>(),
    );
    let layer = store.put_blob(layer_bytes.clone());
    let manifest_bytes = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"x","digest":"{d}","size":{s}}},"layers":[{{"mediaType":"y","digest":"{d}","size":{s}}}]}}"#,
        d = layer.digest,
        s = layer.size
    ));
    let manifest = store.put_blob(manifest_bytes.clone());
    store.put_image("example.com/team/app:v1", manifest.clone());
    store.put_image("example.com/team/app:latest", manifest.clone());
    Image {
        layer,
        layer_bytes,
        manifest,
        manifest_bytes,
    }
}

fn keys(img: &Image) -> Vec<String> {
    vec![
        img.layer.digest.to_string(),
        img.manifest.digest.to_string(),
        "example.com/team/app:v1".into(),
        "example.com/team/app:latest".into(),
    ]
}

fn blob_url(node: &Node, d: &Digest) -> String {
    format!("{}/v2/team/app/blobs/{d}?ns=example.com", node.base)
}

fn test_config() -> PeerConfig {
    PeerConfig {
        read_timeout: Duration::from_millis(500),
        hedge_delay: Duration::from_millis(100),
        verify_buffer: 64 * 1024,
        lookup_timeout: Duration::from_millis(50),
        ..PeerConfig::default()
    }
}

#[tokio::test]
async fn a_node_serves_what_only_its_peer_has() {
    let net = Arc::new(MemoryNetwork::default());
    let store_a = Arc::new(MemoryStore::new());
    let img = image(&store_a, 300_000);
    let (a, router_a) = node(&net, "a", store_a, test_config()).await;
    router_a.advertise(keys(&img)).await.expect("advertise");
    let (b, _) = node(&net, "b", Arc::new(MemoryStore::new()), test_config()).await;
    let http = support::client();

    // By tag (resolved through the peer), by digest, HEAD, blob, range.
    let r = http
        .get(format!(
            "{}/v2/team/app/manifests/v1?ns=example.com",
            b.base
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], DOCKER_MANIFEST);
    assert_eq!(
        r.headers()["docker-content-digest"],
        img.manifest.digest.as_str()
    );
    assert_eq!(r.bytes().await.expect("body"), img.manifest_bytes);
    let r = http
        .head(format!(
            "{}/v2/team/app/manifests/{}?ns=example.com",
            b.base, img.manifest.digest
        ))
        .send()
        .await
        .expect("head");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-length"],
        img.manifest.size.to_string().as_str()
    );
    let r = http
        .get(blob_url(&b, &img.layer.digest))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.expect("body"), img.layer_bytes);
    let r = http
        .get(blob_url(&b, &img.layer.digest))
        .header("range", "bytes=1000-1999")
        .send()
        .await
        .expect("range");
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        r.bytes().await.expect("body"),
        img.layer_bytes.slice(1000..2000)
    );
    let r = http
        .head(blob_url(&b, &img.layer.digest))
        .send()
        .await
        .expect("head");
    assert_eq!(r.headers()["content-length"], "300000");

    assert!(
        b.metric("mirrorlet_registry_served_bytes_total{source=\"peer\",requester=\"containerd\"}")
            >= 300_000.0
    );
    assert!(a.metric("mirrorlet_registry_peer_served_bytes_total") >= 300_000.0);
    assert!(b.metric("mirrorlet_lookup_duration_seconds_count{outcome=\"found\"}") >= 1.0);

    // Excluded tags (`:latest` by default) are never resolved through peers.
    let r = http
        .get(format!(
            "{}/v2/team/app/manifests/latest?ns=example.com",
            b.base
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // A request from another agent is answered from local content only: no loops.
    let r = http
        .get(blob_url(&b, &img.layer.digest))
        .header(PEER_HEADER, "1")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Unknown content is a 404 after a quick, empty lookup.
    let r = http
        .get(blob_url(&b, &Digest::sha256_of(b"nothing")))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(b.metric("mirrorlet_lookup_duration_seconds_count{outcome=\"not-found\"}") >= 1.0);
    let _ = a.addr;
}

fn corrupt(bytes: &Bytes) -> Bytes {
    let mut v = bytes.to_vec();
    let mid = v.len() / 2;
    v[mid] ^= 0xff;
    Bytes::from(v)
}

/// A fake peer that serves `bytes` whole as `digest`.
async fn serving(net: &Arc<MemoryNetwork>, id: &str, digest: &Digest, bytes: Bytes) {
    fake_peer(net, id, vec![digest.to_string()], move |_| {
        let bytes = bytes.clone();
        async move { ok_body(bytes) }
    })
    .await;
}

fn ok_body(bytes: Bytes) -> Response {
    Response::builder()
        .header("content-length", bytes.len())
        .body(Body::from(bytes))
        .expect("response")
}

#[tokio::test]
async fn corrupt_small_blobs_are_never_delivered_and_the_peer_is_avoided() {
    let net = Arc::new(MemoryNetwork::default());
    let source = MemoryStore::new();
    let img = image(&source, 10_000); // under the verify buffer: checked before sending
    serving(
        &net,
        "a-corrupt",
        &img.layer.digest,
        corrupt(&img.layer_bytes),
    )
    .await;
    let (b, _) = node(&net, "b", Arc::new(MemoryStore::new()), test_config()).await;
    let http = support::client();
    let r = http
        .get(blob_url(&b, &img.layer.digest))
        .send()
        .await
        .expect("get");
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "the only peer lied: fall through to upstream"
    );
    assert_eq!(b.metric("mirrorlet_peer_digest_mismatches_total"), 1.0);

    // An honest peer appears: the corrupt one is skipped, the honest one serves.
    let store_c = Arc::new(MemoryStore::new());
    let img_c = image(&store_c, 10_000);
    let (_c, router_c) = node(&net, "c-honest", store_c, test_config()).await;
    router_c.advertise(keys(&img_c)).await.expect("advertise");
    let r = http
        .get(blob_url(&b, &img.layer.digest))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.expect("body"), img.layer_bytes);
    assert!(b.metric("mirrorlet_peers_skipped_total") >= 1.0);
}

/// `--peer-verify whole`: spooled and checked before anything is sent.
#[tokio::test]
async fn a_large_corrupt_blob_is_never_sent_and_another_peer_serves_it() {
    let whole = || PeerConfig {
        verify: PeerVerify::Whole,
        ..test_config()
    };
    let net = Arc::new(MemoryNetwork::default());
    let source = MemoryStore::new();
    let img = image(&source, 1_000_000); // over the verify buffer: spooled, then checked
    serving(
        &net,
        "a-corrupt",
        &img.layer.digest,
        corrupt(&img.layer_bytes),
    )
    .await;
    let (b, _) = node(&net, "b", Arc::new(MemoryStore::new()), whole()).await;
    let r = reqwest::get(blob_url(&b, &img.layer.digest))
        .await
        .expect("get");
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "no verified copy: fall through, not a single byte sent"
    );
    assert_eq!(b.metric("mirrorlet_peer_digest_mismatches_total"), 1.0);

    // With an honest peer too, the same request is served correctly in one go.
    serving(&net, "c-honest", &img.layer.digest, img.layer_bytes.clone()).await;
    let (b2, _) = node(&net, "b2", Arc::new(MemoryStore::new()), whole()).await;
    let r = reqwest::get(blob_url(&b2, &img.layer.digest))
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.expect("body"), img.layer_bytes);
    assert_eq!(
        b2.metric("mirrorlet_peer_digest_mismatches_total"),
        1.0,
        "b2 met the corrupt peer first"
    );
}

/// `--peer-verify stream` (the default): sent as it arrives, the last byte held back; a
/// corrupt copy ends the stream short of it, and the retry comes from another peer.
#[tokio::test]
async fn a_large_corrupt_blob_streamed_is_cut_before_its_last_byte_and_the_retry_is_served() {
    let net = Arc::new(MemoryNetwork::default());
    let source = MemoryStore::new();
    // Several write batches (1 MiB each), the last one late: the client has bytes before
    // the end is checked.
    let img = image(&source, 3_000_000);
    let bad = corrupt(&img.layer_bytes);
    fake_peer(
        &net,
        "a-corrupt",
        vec![img.layer.digest.to_string()],
        move |_| {
            let bad = bad.clone();
            async move {
                let (head, tail) = (bad.slice(..2_500_000), bad.slice(2_500_000..));
                let body = futures_util::stream::once(async move { Ok::<_, std::io::Error>(head) })
                    .chain(futures_util::stream::once(async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok(tail)
                    }));
                Response::builder()
                    .header("content-length", bad.len())
                    .body(Body::from_stream(body))
                    .expect("response")
            }
        },
    )
    .await;
    let (b, _) = node(&net, "b", Arc::new(MemoryStore::new()), test_config()).await;
    let r = reqwest::get(blob_url(&b, &img.layer.digest))
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK, "streamed as it arrives");
    let mut body = r.bytes_stream();
    let mut got = 0_usize;
    let mut cut = false;
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) => got += c.len(),
            Err(_) => cut = true,
        }
    }
    assert!(cut, "the stream ends with an error");
    assert!(
        got < img.layer_bytes.len(),
        "the last byte never went out: {got}"
    );
    assert_eq!(b.metric("mirrorlet_peer_digest_mismatches_total"), 1.0);

    // The corrupt peer is avoided now: with an honest one, the retry is served whole.
    serving(&net, "c-honest", &img.layer.digest, img.layer_bytes.clone()).await;
    let r = reqwest::get(blob_url(&b, &img.layer.digest))
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.expect("body"), img.layer_bytes);
}

/// Serves `bytes` honouring `Range: bytes=N-`, like an agent.
fn ranged(bytes: Bytes, req: &Request) -> Response {
    let digest = Digest::sha256_of(&bytes);
    let header = req.headers().get("range").and_then(|v| v.to_str().ok());
    let size = bytes.len() as u64;
    match range::select(header, size) {
        Ok((r, partial)) => respond(
            content_head("application/octet-stream", &digest, size, r, partial),
            Body::from(bytes.slice(r.start as usize..r.end as usize)),
        )
        .expect("response"),
        Err(e) => e.into_response(),
    }
}

/// A fake peer that serves `bytes` as `keys` honouring ranges, like an agent.
async fn serving_ranges(net: &Arc<MemoryNetwork>, id: &str, keys: Vec<String>, bytes: Bytes) {
    fake_peer(net, id, keys, move |req| {
        let bytes = bytes.clone();
        async move { ranged(bytes, &req) }
    })
    .await;
}

/// [`test_config`] reading blobs of 4 MiB and more from several holders at once.
fn in_parts() -> PeerConfig {
    PeerConfig {
        parts_from: 4 << 20,
        ..test_config()
    }
}

/// A body that sends the first half, then fails (`stall`: then never ends).
fn half_then(bytes: Bytes, stall: bool) -> Response {
    let half = bytes.slice(..bytes.len() / 2);
    let len = bytes.len();
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(half) }).chain(
        futures_util::stream::once(async move {
            if stall {
                futures_util::future::pending::<()>().await;
            }
            Err(std::io::Error::other("peer died"))
        }),
    );
    Response::builder()
        .header("content-length", len)
        .body(Body::from_stream(stream))
        .expect("response")
}

use futures_util::StreamExt;

async fn resume_case(stall: bool) {
    let net = Arc::new(MemoryNetwork::default());
    let source = MemoryStore::new();
    let img = image(&source, 2_000_000);
    let good = img.layer_bytes.clone();
    let key = vec![img.layer.digest.to_string()];
    let half = good.clone();
    fake_peer(&net, "a-dies", key.clone(), move |_| {
        let half = half.clone();
        async move { half_then(half, stall) }
    })
    .await;
    serving_ranges(&net, "b-honest", key, good).await;
    let (n, _) = node(&net, "n", Arc::new(MemoryStore::new()), test_config()).await;
    let r = reqwest::get(blob_url(&n, &img.layer.digest))
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.bytes().await.expect("one uninterrupted body");
    assert_eq!(Digest::sha256_of(&body), img.layer.digest);
    assert_eq!(n.metric("mirrorlet_peer_resumes_total"), 1.0);
}

#[tokio::test]
async fn a_stream_that_breaks_is_continued_at_another_peer() {
    resume_case(false).await;
}

#[tokio::test]
async fn a_stream_that_stalls_is_continued_at_another_peer() {
    resume_case(true).await;
}

#[tokio::test]
async fn a_slow_peer_gets_a_second_one_raced_against_it() {
    let net = Arc::new(MemoryNetwork::default());
    let source = MemoryStore::new();
    let img = image(&source, 100_000);
    let good = img.layer_bytes.clone();
    let key = vec![img.layer.digest.to_string()];
    let slow = good.clone();
    fake_peer(&net, "a-slow", key.clone(), move |_| {
        let slow = slow.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            ok_body(slow)
        }
    })
    .await;
    fake_peer(&net, "b-fast", key, move |_| {
        let good = good.clone();
        async move { ok_body(good) }
    })
    .await;
    let (n, _) = node(&net, "n", Arc::new(MemoryStore::new()), test_config()).await;
    let r = reqwest::get(blob_url(&n, &img.layer.digest))
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.expect("body"), img.layer_bytes);
    assert_eq!(
        n.metric("mirrorlet_peer_hedges_total"),
        1.0,
        "a second peer was raced against the slow one"
    );
}

#[tokio::test]
async fn a_peer_that_accepts_but_never_answers_does_not_hold_the_client() {
    let net = Arc::new(MemoryNetwork::default());
    let img = image(&MemoryStore::new(), 10_000);
    fake_peer(
        &net,
        "a-silent",
        vec![img.layer.digest.to_string()],
        |_| async {
            futures_util::future::pending::<()>().await;
            ok_body(Bytes::new())
        },
    )
    .await;
    let (n, _) = node(&net, "n", Arc::new(MemoryStore::new()), test_config()).await;
    let r = reqwest::get(blob_url(&n, &img.layer.digest))
        .await
        .expect("get");
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "gave up on the silent peer and fell through"
    );
    assert!(n.metric("mirrorlet_peer_failures_total{reason=\"unreachable\"}") >= 1.0);
}

#[tokio::test]
async fn a_peer_lying_about_the_size_does_not_get_honest_peers_blamed() {
    let net = Arc::new(MemoryNetwork::default());
    let img = image(&MemoryStore::new(), 300_000);
    let real = img.layer_bytes.clone();
    let key = vec![img.layer.digest.to_string()];
    // Claims twice the size, sends the real bytes, then stalls.
    let lie = real.clone();
    fake_peer(&net, "a-liar", key.clone(), move |_| {
        let lie = lie.clone();
        async move {
            let len = lie.len() * 2;
            let body = futures_util::stream::once(async move { Ok::<_, std::io::Error>(lie) })
                .chain(futures_util::stream::once(async {
                    futures_util::future::pending::<()>().await;
                    Ok(Bytes::new())
                }));
            Response::builder()
                .header("content-length", len)
                .body(Body::from_stream(body))
                .expect("response")
        }
    })
    .await;
    serving_ranges(&net, "b-honest", key, real.clone()).await;
    // Verified whole before sending: the lie is found out unseen.
    let whole = PeerConfig {
        verify: PeerVerify::Whole,
        ..test_config()
    };
    let (n, _) = node(&net, "n", Arc::new(MemoryStore::new()), whole).await;
    let r = reqwest::get(blob_url(&n, &img.layer.digest))
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.bytes().await.expect("body"),
        real,
        "served from the honest peer"
    );
    // The honest peer was not put on the failed list: it serves the next request directly.
    let r = reqwest::get(blob_url(&n, &img.layer.digest))
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);

    // Streamed: the answer may already carry the liar's size when the honest peer
    // disagrees, so that request is cut; the liar is blamed, and the retry is whole.
    let (m, _) = node(&net, "m", Arc::new(MemoryStore::new()), test_config()).await;
    let r = reqwest::get(blob_url(&m, &img.layer.digest))
        .await
        .expect("get");
    if let Ok(body) = r.bytes().await {
        assert_eq!(body, real, "a complete answer is the real blob");
    }
    let r = reqwest::get(blob_url(&m, &img.layer.digest))
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.expect("body"), real, "the retry is whole");
}

/// Serves `bytes` like [`ranged`], `chunk` bytes at a time with `pause` between them;
/// counts the body bytes it sends in `sent`.
fn paced(
    bytes: Bytes,
    req: &Request,
    chunk: usize,
    pause: Duration,
    sent: Arc<std::sync::atomic::AtomicU64>,
) -> Response {
    let resp = ranged(bytes.clone(), req);
    let (parts, body) = resp.into_parts();
    let stream = futures_util::stream::unfold(
        (body.into_data_stream(), Bytes::new()),
        move |(mut body, mut left)| {
            let sent = sent.clone();
            async move {
                if left.is_empty() {
                    left = body.next().await?.ok()?;
                }
                tokio::time::sleep(pause).await;
                let piece = left.split_to(chunk.min(left.len()));
                sent.fetch_add(piece.len() as u64, std::sync::atomic::Ordering::SeqCst);
                Some((Ok::<_, std::io::Error>(piece), (body, left)))
            }
        },
    );
    Response::from_parts(parts, Body::from_stream(stream))
}

/// A large blob held by two nodes is read from both at once, in parts: the fast one ends
/// up sending most of it, the slow one does not set the pace.
#[tokio::test]
async fn a_large_blob_comes_from_several_holders_and_a_slow_one_sends_less() {
    let net = Arc::new(MemoryNetwork::default());
    let img = image(&MemoryStore::new(), 8 << 20);
    let key = vec![img.layer.digest.to_string()];
    let counters: Vec<Arc<std::sync::atomic::AtomicU64>> = (0..2).map(|_| Arc::default()).collect();
    // 64 KiB per 20 ms (about 3 MB/s), and per 1 ms (about 64 MB/s).
    for (id, pause, sent) in [
        ("a-slow", Duration::from_millis(20), counters[0].clone()),
        ("b-fast", Duration::from_millis(1), counters[1].clone()),
    ] {
        let bytes = img.layer_bytes.clone();
        fake_peer(&net, id, key.clone(), move |req| {
            let (bytes, sent) = (bytes.clone(), sent.clone());
            async move { paced(bytes, &req, 64 << 10, pause, sent) }
        })
        .await;
    }
    let (n, _) = node(&net, "n", Arc::new(MemoryStore::new()), in_parts()).await;
    let r = reqwest::get(blob_url(&n, &img.layer.digest))
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.expect("body"), img.layer_bytes);
    let [slow, fast] = [0, 1].map(|i| counters[i].load(std::sync::atomic::Ordering::SeqCst));
    assert!(
        slow > 0,
        "both holders send parts (slow sent {slow}, fast {fast})"
    );
    assert!(
        fast > 5 << 20,
        "the fast holder takes the slow one's parts (slow sent {slow}, fast {fast})"
    );
    assert_eq!(n.metric("mirrorlet_peer_digest_mismatches_total"), 0.0);
}

/// A holder that dies in the middle of its part leaves it to the other lane.
#[tokio::test]
async fn a_holder_that_dies_in_its_part_leaves_it_to_the_others() {
    let net = Arc::new(MemoryNetwork::default());
    let img = image(&MemoryStore::new(), 8 << 20);
    let key = vec![img.layer.digest.to_string()];
    // Found first (the in-memory router lists providers in order): the copy's own lane.
    serving_ranges(&net, "a-honest", key.clone(), img.layer_bytes.clone()).await;
    // The other lane: its range dies after the first 256 KiB.
    let good = img.layer_bytes.clone();
    let ranges = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let asked = ranges.clone();
    fake_peer(&net, "b-dies", key, move |req: Request| {
        let (good, asked) = (good.clone(), asked.clone());
        async move {
            if !req.headers().contains_key("range") {
                return ok_body(good);
            }
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (parts, body) = ranged(good, &req).into_parts();
            let first = futures_util::stream::once(async move {
                let all = axum::body::to_bytes(body, usize::MAX).await.expect("body");
                Ok::<_, std::io::Error>(all.slice(..256 << 10))
            })
            .chain(futures_util::stream::once(async {
                Err(std::io::Error::other("peer died"))
            }));
            Response::from_parts(parts, Body::from_stream(first))
        }
    })
    .await;
    let (n, _) = node(&net, "n", Arc::new(MemoryStore::new()), in_parts()).await;
    let r = reqwest::get(blob_url(&n, &img.layer.digest))
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.expect("body"), img.layer_bytes);
    assert_eq!(
        ranges.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the second holder was asked for a part (and then left out)"
    );
    assert_eq!(n.metric("mirrorlet_peer_digest_mismatches_total"), 0.0);
}

/// A copy read in parts from two holders, one of them sending wrong bytes in its part:
/// nothing wrong is delivered, and with no telling which holder lied both are avoided.
#[tokio::test]
async fn a_wrong_part_from_one_of_several_holders_is_never_delivered() {
    let net = Arc::new(MemoryNetwork::default());
    let img = image(&MemoryStore::new(), 8 << 20);
    let key = vec![img.layer.digest.to_string()];
    serving_ranges(&net, "a-honest", key.clone(), img.layer_bytes.clone()).await;
    // Serves ranges (the parts) from a copy whose second half is wrong every 64 KiB: its
    // part (which starts in the second half) always holds some.
    let mut bad = img.layer_bytes.to_vec();
    for i in (4 << 20..bad.len()).step_by(64 << 10) {
        bad[i] ^= 0xff;
    }
    serving_ranges(&net, "b-corrupt", key, Bytes::from(bad)).await;
    let config = PeerConfig {
        verify: PeerVerify::Whole,
        ..in_parts()
    };
    let (n, _) = node(&net, "n", Arc::new(MemoryStore::new()), config).await;
    let r = reqwest::get(blob_url(&n, &img.layer.digest))
        .await
        .expect("get");
    // Verified whole before sending: the mismatch is found unseen; both holders are
    // avoided, so no peer is left and containerd would go to the registry.
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(n.metric("mirrorlet_peer_digest_mismatches_total"), 1.0);
}

/// Batches on their way into a spool file count against the spool budget until they are
/// written and hashed: with the budget held elsewhere, a copy hands nothing over (and its
/// client gets nothing) until there is room; then it completes, and gives every share back.
#[tokio::test]
async fn a_copy_hands_batches_to_its_spool_only_when_the_spool_budget_has_room() {
    let net = Arc::new(MemoryNetwork::default());
    let img = image(&MemoryStore::new(), 3 << 20);
    serving_ranges(
        &net,
        "a",
        vec![img.layer.digest.to_string()],
        img.layer_bytes.clone(),
    )
    .await;
    let budget = mirrorlet_oci::Budget::new(2 << 20);
    let config = PeerConfig {
        read_timeout: Duration::from_secs(10),
        ..test_config()
    };
    let (n, _) =
        Node::start_configured(&net, "n", Arc::new(MemoryStore::new()), config, None, |s| {
            s.with_spool_budget(budget.clone())
        })
        .await;
    let held = budget.count(Bytes::from(vec![0u8; 2 << 20])).await;
    let got = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = got.clone();
    let url = blob_url(&n, &img.layer.digest);
    let body = tokio::spawn(async move {
        let r = reqwest::get(url).await.expect("get");
        assert_eq!(r.status(), StatusCode::OK);
        let mut body = Vec::new();
        let mut chunks = r.bytes_stream();
        while let Some(c) = chunks.next().await {
            body.extend_from_slice(&c.expect("chunk"));
            counted.store(body.len(), std::sync::atomic::Ordering::SeqCst);
        }
        body
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        got.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no room in the spool budget, no batch written"
    );
    drop(held);
    let body = tokio::time::timeout(Duration::from_secs(10), body)
        .await
        .expect("the copy goes on once there is room")
        .expect("join");
    assert_eq!(body, img.layer_bytes);
    assert_eq!(budget.in_use(), 0, "every batch gave its share back");
}

//! The registry served on a real port over an in-memory store, exercised over HTTP.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use mirrorlet_oci::manifest::{DOCKER_MANIFEST, OCI_INDEX};
use mirrorlet_oci::{
    BlobStream, ByteRange, Descriptor, Digest, ImageContent, ImageName, Inventory, MemoryNetwork,
    MemoryStore, Store, StoreError, StoreEvent, TagTarget,
};
use mirrorlet_registry::PeerConfig;
use reqwest::StatusCode;
use serde_json::Value;

mod support;

use support::TestNode;

/// A lone node (no peers) serving `store`.
async fn start(store: Arc<dyn Store>) -> TestNode {
    let net = Arc::new(MemoryNetwork::default());
    TestNode::start(&net, "me", store, PeerConfig::default())
        .await
        .0
}

struct Fixture {
    store: Arc<MemoryStore>,
    layer: Descriptor,
    layer_bytes: Bytes,
    manifest: Descriptor,
    manifest_bytes: Bytes,
    index: Descriptor,
}

fn fixture() -> Fixture {
    let store = Arc::new(MemoryStore::new());
    let layer_bytes = Bytes::from((0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    let layer = store.put_blob(layer_bytes.clone());
    let manifest_bytes = Bytes::from(format!(
        r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"x","digest":"{d}","size":{s}}},"layers":[{{"mediaType":"y","digest":"{d}","size":{s}}}]}}"#,
        d = layer.digest,
        s = layer.size
    ));
    let manifest = store.put_blob(manifest_bytes.clone());
    assert_eq!(manifest.media_type, DOCKER_MANIFEST);
    let index = store.put_blob(format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{DOCKER_MANIFEST}","digest":"{}","size":{}}}]}}"#,
        manifest.digest, manifest.size
    ));
    store.put_image("docker.io/library/app:1.0", manifest.clone());
    store.put_image("ghcr.io/org/app:multi", index.clone());
    Fixture {
        store,
        layer,
        layer_bytes,
        manifest,
        manifest_bytes,
        index,
    }
}

async fn error_code(resp: reqwest::Response) -> String {
    let body: Value = resp.json().await.expect("OCI error body is JSON");
    body["errors"][0]["code"]
        .as_str()
        .expect("error code")
        .to_owned()
}

#[tokio::test]
async fn serves_manifests_by_tag_and_digest() {
    let fx = fixture();
    let srv = start(fx.store.clone()).await;
    let http = support::client();

    let r = http
        .get(format!("{}/v2/", srv.base))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );

    // Docker Hub by default, with library/ normalisation, and explicitly with ns.
    for url in [
        "/v2/app/manifests/1.0",
        "/v2/library/app/manifests/1.0?ns=docker.io",
    ] {
        let r = http
            .get(format!("{}{url}", srv.base))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), StatusCode::OK, "{url}");
        assert_eq!(r.headers()["content-type"], DOCKER_MANIFEST);
        assert_eq!(
            r.headers()["docker-content-digest"],
            fx.manifest.digest.as_str()
        );
        assert_eq!(
            r.headers()["content-length"],
            fx.manifest.size.to_string().as_str()
        );
        assert_eq!(r.bytes().await.expect("body"), fx.manifest_bytes);
    }
    let r = http
        .head(format!(
            "{}/v2/org/app/manifests/multi?ns=ghcr.io",
            srv.base
        ))
        .send()
        .await
        .expect("head");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    assert_eq!(
        r.headers()["content-length"],
        fx.index.size.to_string().as_str()
    );
    assert_eq!(
        r.headers()["docker-content-digest"],
        fx.index.digest.as_str()
    );

    let r = http
        .get(format!(
            "{}/v2/org/app/manifests/{}?ns=ghcr.io",
            srv.base, fx.manifest.digest
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-type"], DOCKER_MANIFEST);

    // Unknown tag, other registry, or a layer's digest asked for as a manifest: 404.
    for url in [
        "/v2/app/manifests/2.0".to_owned(),
        "/v2/app/manifests/1.0?ns=quay.io".to_owned(),
        format!("/v2/app/manifests/{}", fx.layer.digest),
    ] {
        let r = http
            .get(format!("{}{url}", srv.base))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "{url}");
        assert_eq!(error_code(r).await, "MANIFEST_UNKNOWN");
    }
    srv.shutdown.cancel();
}

/// A manifest goes only to a client that takes its media type, as Distribution decides;
/// otherwise a 404 sends the client on to the registry itself.
#[tokio::test]
async fn manifests_are_answered_in_a_type_the_client_accepts_or_not_at_all() {
    let fx = fixture();
    let srv = start(fx.store.clone()).await;
    let http = reqwest::Client::new();
    let get = |path: String, accept: Option<&'static str>| {
        let mut req = http.get(format!("{}{path}", srv.base));
        if let Some(a) = accept {
            req = req.header("accept", a);
        }
        async move { req.send().await.expect("get").status() }
    };
    let docker_only = Some(
        "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json",
    );
    let schema1_only = Some("application/vnd.docker.distribution.manifest.v1+prettyjws");
    let index_tag = "/v2/org/app/manifests/multi?ns=ghcr.io".to_owned();
    let index_digest = format!("/v2/org/app/manifests/{}?ns=ghcr.io", fx.index.digest);
    let schema2_tag = "/v2/app/manifests/1.0".to_owned();
    let schema2_digest = format!("/v2/app/manifests/{}", fx.manifest.digest);
    // An OCI index: only to clients that list it, by tag or by digest.
    assert_eq!(
        get(index_tag.clone(), Some(OCI_INDEX)).await,
        StatusCode::OK
    );
    assert_eq!(
        get(index_tag.clone(), docker_only).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(index_digest.clone(), docker_only).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(index_tag, None).await,
        StatusCode::NOT_FOUND,
        "no Accept"
    );
    assert_eq!(
        get(index_digest, Some("*/*")).await,
        StatusCode::NOT_FOUND,
        "*/*"
    );
    // Docker schema 2: by tag to clients that list it; by digest to anyone.
    assert_eq!(get(schema2_tag.clone(), docker_only).await, StatusCode::OK);
    assert_eq!(
        get(schema2_tag.clone(), schema1_only).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(get(schema2_tag, None).await, StatusCode::NOT_FOUND);
    assert_eq!(
        get(schema2_digest.clone(), schema1_only).await,
        StatusCode::OK
    );
    assert_eq!(get(schema2_digest, None).await, StatusCode::OK);
    srv.shutdown.cancel();
}

/// podman, CRI-O and skopeo name the registry in their mirror's location (no `ns`): a
/// host as the first path component is the registry; without one, Docker Hub.
#[tokio::test]
async fn a_registry_named_in_the_path_is_the_one_served() {
    let fx = fixture();
    fx.store.put_image("quay.io/org/app:2", fx.index.clone());
    fx.store
        .put_image("docker.io/org/app:2", fx.manifest.clone());
    let srv = start(fx.store.clone()).await;
    let http = support::client();
    let digest_of = |path: &'static str| {
        let req = http.get(format!("{}{path}", srv.base));
        async move {
            let r = req.send().await.expect("get");
            (
                r.status(),
                r.headers()
                    .get("docker-content-digest")
                    .map(|v| v.to_str().expect("text").to_owned()),
            )
        }
    };
    let (s, d) = digest_of("/v2/quay.io/org/app/manifests/2").await;
    assert_eq!(
        (s, d.as_deref()),
        (StatusCode::OK, Some(fx.index.digest.as_str()))
    );
    let (s, d) = digest_of("/v2/org/app/manifests/2").await;
    assert_eq!(
        (s, d.as_deref()),
        (StatusCode::OK, Some(fx.manifest.digest.as_str())),
        "Docker Hub's"
    );
    let (s, d) = digest_of("/v2/docker.io/org/app/manifests/2").await;
    assert_eq!(
        (s, d.as_deref()),
        (StatusCode::OK, Some(fx.manifest.digest.as_str()))
    );
    // The same name under a registry the node holds nothing of: never another's image.
    let (s, _) = digest_of("/v2/registry.example.com/org/app/manifests/2").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = digest_of("/v2/ghcr.io/app/manifests/1.0").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    srv.shutdown.cancel();
}

/// Requests are counted by the client that sent them, told apart by `User-Agent`.
#[tokio::test]
async fn requests_are_counted_by_client() {
    let fx = fixture();
    let srv = start(fx.store.clone()).await;
    let url = format!("{}/v2/app/manifests/{}", srv.base, fx.manifest.digest);
    for agent in [
        "containerd/1.6.20+unknown",
        "docker/20.10.24+dfsg1 go/go1.19.8 git-commit/5d6db84 kernel/6.1.0 os/linux arch/amd64 UpstreamClient(Docker-Client/20.10.24+dfsg1 \\(linux\\))",
        "containers/5.23.1 (github.com/containers/image)",
        "curl/7.88.1",
    ] {
        let r = reqwest::Client::builder()
            .user_agent(agent)
            .build()
            .expect("client")
            .get(&url)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), StatusCode::OK);
        let _ = r.bytes().await;
    }
    for client in ["containerd", "docker", "containers", "other"] {
        let n = srv.metric(&format!(
            "mirrorlet_registry_requests_total{{route=\"manifest\",method=\"GET\",status=\"200\",source=\"local\",requester=\"{client}\"}}"
        ));
        assert_eq!(n, 1.0, "{client}");
    }
    srv.shutdown.cancel();
}

#[tokio::test]
async fn serves_blobs_and_ranges() {
    let fx = fixture();
    let srv = start(fx.store.clone()).await;
    let http = support::client();
    let url = format!(
        "{}/v2/any/repo/blobs/{}?ns=example.com",
        srv.base, fx.layer.digest
    );

    let r = http.get(&url).send().await.expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["accept-ranges"], "bytes");
    assert_eq!(
        r.headers()["docker-content-digest"],
        fx.layer.digest.as_str()
    );
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    assert_eq!(r.bytes().await.expect("body"), fx.layer_bytes);

    let r = http.head(&url).send().await.expect("head");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["content-length"], "200000");

    let b = &fx.layer_bytes;
    for (range, start, end) in [
        ("bytes=10-19", 10, 20),
        ("bytes=199990-", 199_990, 200_000),
        ("bytes=-5", 199_995, 200_000),
    ] {
        let r = http
            .get(&url)
            .header("range", range)
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            r.headers()["content-range"],
            format!("bytes {start}-{}/200000", end - 1).as_str(),
            "{range}"
        );
        assert_eq!(
            r.bytes().await.expect("body"),
            b.slice(start..end),
            "{range}"
        );
    }
    let r = http
        .get(&url)
        .header("range", "bytes=200000-")
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers()["content-range"], "bytes */200000");

    let missing = Digest::sha256_of(b"missing");
    let r = http
        .get(format!("{}/v2/a/blobs/{missing}", srv.base))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    srv.shutdown.cancel();
}

#[tokio::test]
async fn bad_requests_get_oci_errors() {
    let fx = fixture();
    let srv = start(fx.store.clone()).await;
    let http = support::client();
    let cases = [
        (
            "/v2/Upper/manifests/v1",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "/v2/a/blobs/sha256:1234",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/a/blobs/md5:1234",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/a/manifests/bad:tag:x",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "/v2/a/manifests/-tag",
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        ("/v2/a/tags/list", StatusCode::NOT_FOUND, "UNSUPPORTED"),
        ("/v2/a/blobs/uploads/", StatusCode::NOT_FOUND, "UNSUPPORTED"),
        (
            "/v2/a/manifests/v1?ns=bad/ns",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        ("/v2/a", StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
        ("/other", StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
    ];
    for (path, status, code) in cases {
        let r = http
            .get(format!("{}{path}", srv.base))
            .send()
            .await
            .expect("get");
        assert_eq!(r.status(), status, "{path}");
        assert_eq!(r.headers()["content-type"], "application/json", "{path}");
        assert_eq!(error_code(r).await, code, "{path}");
    }
    for method in [
        reqwest::Method::POST,
        reqwest::Method::PUT,
        reqwest::Method::DELETE,
        reqwest::Method::PATCH,
    ] {
        let r = http
            .request(method.clone(), format!("{}/v2/a/manifests/v1", srv.base))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(r.headers()["allow"], "GET, HEAD");
        assert_eq!(error_code(r).await, "UNSUPPORTED");
    }
    srv.shutdown.cancel();
}

#[tokio::test]
async fn health_and_metrics() {
    let fx = fixture();
    let srv = start(fx.store.clone()).await;
    let http = support::client();
    assert_eq!(
        http.get(format!("{}/livez", srv.base))
            .send()
            .await
            .expect("get")
            .status(),
        StatusCode::OK
    );
    assert_eq!(
        http.get(format!("{}/readyz", srv.base))
            .send()
            .await
            .expect("get")
            .status(),
        StatusCode::OK
    );
    let _ = http
        .get(format!("{}/v2/nothere/manifests/v1", srv.base))
        .send()
        .await
        .expect("get");
    let _ = http
        .get(format!("{}/v2/x/blobs/{}", srv.base, fx.layer.digest))
        .send()
        .await
        .expect("get")
        .bytes()
        .await;
    let text = http
        .get(format!("{}/metrics", srv.base))
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("text");
    assert!(
        text.contains(r#"mirrorlet_registry_requests_total{route="manifest",method="GET",status="404",source="upstream-fallthrough",requester="containerd"} 1"#),
        "{text}"
    );
    assert!(text.contains(r#"mirrorlet_registry_requests_total{route="blob",method="GET",status="200",source="local",requester="containerd"} 1"#), "{text}");
    assert!(
        text.contains(
            r#"mirrorlet_registry_served_bytes_total{source="local",requester="containerd"} 200000"#
        ),
        "{text}"
    );
    assert!(
        text.contains("mirrorlet_registry_request_duration_seconds_bucket"),
        "{text}"
    );
    srv.shutdown.cancel();
}

#[tokio::test]
async fn the_operational_listener_serves_health_and_metrics_but_no_content() {
    let fx = fixture();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let base = format!("http://{addr}");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let router = Arc::new(mirrorlet_oci::MemoryRouter::new(
        Arc::new(MemoryNetwork::default()),
        mirrorlet_oci::Peer {
            id: "me".into(),
            addr,
        },
    ));
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = mirrorlet_registry::Metrics::register(&mut registry);
    let mut state = mirrorlet_registry::AppState::new(
        fx.store.clone(),
        router,
        PeerConfig::default(),
        metrics,
        Arc::new(registry),
        Arc::new(|| Box::pin(async { Ok(()) })),
    )
    .expect("state");
    // The liveness check says no: /livez reports it.
    state.live = Arc::new(|| Box::pin(async { Err("containerd silent".to_owned()) }));
    tokio::spawn(mirrorlet_registry::server::serve(
        listener,
        mirrorlet_registry::ops_app(Arc::new(state)),
        mirrorlet_registry::server::Limits::default(),
        shutdown.clone(),
    ));
    let http = support::client();
    let live = http.get(format!("{base}/livez")).send().await.expect("get");
    assert_eq!(live.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        live.text()
            .await
            .expect("body")
            .contains("containerd silent")
    );
    for (path, want) in [
        ("/readyz", StatusCode::OK),
        ("/metrics", StatusCode::OK),
        ("/v2/", StatusCode::NOT_FOUND),
        ("/v2/a/manifests/v1", StatusCode::NOT_FOUND),
    ] {
        let r = http.get(format!("{base}{path}")).send().await.expect("get");
        assert_eq!(r.status(), want, "{path}");
    }
    shutdown.cancel();
}

/// A store whose backend is down: every call fails.
struct DownStore;

#[async_trait::async_trait]
impl Store for DownStore {
    async fn resolve(&self, _: &ImageName) -> Result<Option<TagTarget>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn descriptor(&self, _: &Digest) -> Result<Option<Descriptor>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn size(&self, _: &Digest) -> Result<Option<u64>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn open(&self, _: &Digest, _: ByteRange) -> Result<BlobStream, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn list(&self) -> Result<Inventory, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn image(&self, _: &str) -> Result<Option<ImageContent>, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    fn watch(&self) -> BoxStream<'static, StoreEvent> {
        Box::pin(futures_util::stream::pending())
    }
    async fn ping(&self) -> Result<(), StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
    async fn abort_ingests(&self, _: &Digest) -> Result<usize, StoreError> {
        Err(StoreError::Unavailable("down".into()))
    }
}

#[tokio::test]
async fn unavailable_store_answers_404_so_containerd_falls_through() {
    let srv = start(Arc::new(DownStore)).await;
    let http = support::client();
    let r = http
        .get(format!("{}/v2/a/manifests/v1", srv.base))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = http
        .get(format!(
            "{}/v2/a/blobs/{}",
            srv.base,
            Digest::sha256_of(b"x")
        ))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "BLOB_UNKNOWN");
    srv.shutdown.cancel();
}

#[test]
fn errors_keep_their_causes_and_a_response_that_cannot_be_built_is_not_the_store() {
    use axum::response::IntoResponse;
    use mirrorlet_registry::{RegistryError, content_head, respond};

    // The store's own words reach the error body, once.
    let e = RegistryError::StoreUnavailable(StoreError::Unavailable("connection refused".into()));
    assert_eq!(e.message(), "content store unavailable: connection refused");
    assert_eq!(e.status_and_code(), (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"));

    // A media type no header can carry (content from a peer or a registry can say
    // anything): the builder's failure is named as such, with its cause, still a 404.
    let digest = Digest::sha256_of(b"x");
    let head = content_head(
        "text/plain\nx: y",
        &digest,
        1,
        ByteRange { start: 0, end: 1 },
        false,
    );
    let e = respond(head, axum::body::Body::empty()).expect_err("an invalid header value");
    assert!(matches!(e, RegistryError::Response(_)), "{e:?}");
    assert!(
        std::error::Error::source(&e).is_some(),
        "the http error is kept"
    );
    assert!(
        e.message().starts_with("building the response: "),
        "{}",
        e.message()
    );
    assert_eq!(e.status_and_code(), (StatusCode::NOT_FOUND, "UNKNOWN"));
    let resp = e.into_response();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn large_blob_streams_whole_and_shutdown_drains() {
    let store = Arc::new(MemoryStore::new());
    let big = Bytes::from(vec![7u8; 64 * 1024 * 1024]);
    let desc = store.put_blob(big.clone());
    let mut srv = start(store).await;
    let http = support::client();
    let r = http
        .get(format!("{}/v2/a/blobs/{}", srv.base, desc.digest))
        .send()
        .await
        .expect("get");
    // Shut down while the body is still streaming: the response must complete.
    srv.shutdown.cancel();
    let body = r
        .bytes()
        .await
        .expect("body completes after shutdown began");
    assert_eq!(body.len(), big.len());
    assert_eq!(Digest::sha256_of(&body), desc.digest);
    let task = srv.task.take().expect("server task");
    tokio::time::timeout(std::time::Duration::from_secs(10), task)
        .await
        .expect("server stops once drained")
        .expect("server task");
    assert!(
        http.get(format!("{}/v2/", srv.base)).send().await.is_err(),
        "listener closed"
    );
}

/// The in-memory store, counting the calls a request makes to it by digest.
struct Counting {
    inner: Arc<MemoryStore>,
    calls: std::sync::atomic::AtomicUsize,
}

impl Counting {
    fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn count(&self) {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl Store for Counting {
    async fn resolve(&self, name: &ImageName) -> Result<Option<TagTarget>, StoreError> {
        self.inner.resolve(name).await
    }
    async fn descriptor(&self, d: &Digest) -> Result<Option<Descriptor>, StoreError> {
        self.count();
        self.inner.descriptor(d).await
    }
    async fn size(&self, d: &Digest) -> Result<Option<u64>, StoreError> {
        self.count();
        self.inner.size(d).await
    }
    async fn open(&self, d: &Digest, r: ByteRange) -> Result<BlobStream, StoreError> {
        self.count();
        self.inner.open(d, r).await
    }
    async fn list(&self) -> Result<Inventory, StoreError> {
        self.inner.list().await
    }
    async fn image(&self, name: &str) -> Result<Option<ImageContent>, StoreError> {
        self.inner.image(name).await
    }
    fn watch(&self) -> BoxStream<'static, StoreEvent> {
        self.inner.watch()
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn abort_ingests(&self, d: &Digest) -> Result<usize, StoreError> {
        self.inner.abort_ingests(d).await
    }
}

#[tokio::test]
async fn a_manifest_asked_for_again_is_served_from_memory_until_the_store_deletes_it() {
    let fx = fixture();
    let store = Arc::new(Counting {
        inner: fx.store.clone(),
        calls: 0.into(),
    });
    let srv = start(store.clone()).await;
    let http = support::client();
    let url = format!(
        "{}/v2/library/app/manifests/{}",
        srv.base, fx.manifest.digest
    );
    let get = || async {
        let r = http
            .get(&url)
            .header("accept", DOCKER_MANIFEST)
            .send()
            .await
            .expect("get");
        (r.status(), r.bytes().await.expect("body"))
    };
    // The first request reads the store (and its feed resyncs the cache once: the
    // manifest may be read a second time)...
    for _ in 0..2 {
        assert_eq!(get().await, (StatusCode::OK, fx.manifest_bytes.clone()));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let before = store.calls();
    assert!(before > 0);
    // ... after which it is answered from memory, GET and HEAD.
    for _ in 0..5 {
        assert_eq!(get().await, (StatusCode::OK, fx.manifest_bytes.clone()));
        let r = http.head(&url).send().await.expect("head");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            r.headers()["docker-content-digest"],
            fx.manifest.digest.as_str()
        );
    }
    assert_eq!(
        store.calls(),
        before,
        "no call to the store for a held manifest"
    );

    // Deleted from the store: the cache hears it and the manifest is gone.
    fx.store.delete_blob(&fx.manifest.digest);
    let mut status = StatusCode::OK;
    for _ in 0..100 {
        status = get().await.0;
        if status == StatusCode::NOT_FOUND {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "a deleted manifest is not served on"
    );
    srv.shutdown.cancel();
}

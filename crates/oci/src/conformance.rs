//! Conformance checks that every [`Store`] implementation must pass (enabled by the
//! `test-util` feature). The in-memory store runs them in unit tests; the containerd store
//! runs them against a real containerd.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use crate::digest::Digest;
use crate::manifest::{DOCKER_MANIFEST, Descriptor, OCI_INDEX, OCI_MANIFEST, OCTET_STREAM};
use crate::name::{Registry, Repository};
use crate::reference::{ImageName, Reference, Tag};
use crate::routing::{LinkState, Owner, Peer, Router};
use crate::store::{ByteRange, Store, StoreError, StoreEvent};
use crate::upstream::{Upstream, UpstreamError};

/// How long to wait for an expected watch event.
const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

/// Puts content into the store under test through the store's own native path.
#[async_trait::async_trait]
pub trait Loader: Send + Sync {
    /// Writes a blob.
    async fn put_blob(&self, media_type: &str, data: Bytes);
    /// Creates or retargets an image.
    async fn put_image(&self, name: &str, target: &Descriptor);
    /// Deletes an image.
    async fn delete_image(&self, name: &str);
    /// Deletes a blob.
    async fn delete_blob(&self, digest: &Digest);
    /// Starts a download of `digest` under `reference` and leaves it unfinished after
    /// writing `partial`, as an interrupted pull would.
    async fn begin_ingest(&self, reference: &str, digest: &Digest, partial: Bytes);
}

/// The test images: an OCI index over an OCI manifest, a Docker manifest and a manifest that
/// is never stored (another platform, as on a real node).
#[derive(Debug, Clone)]
pub struct Fixture {
    /// A 300 kB layer, for ranged reads.
    pub big_layer: (Descriptor, Bytes),
    /// A small layer.
    pub small_layer: (Descriptor, Bytes),
    /// The image config (JSON that is not a manifest).
    pub config: (Descriptor, Bytes),
    /// OCI manifest: config + both layers.
    pub oci_manifest: (Descriptor, Bytes),
    /// Docker schema 2 manifest: config + small layer.
    pub docker_manifest: (Descriptor, Bytes),
    /// Referenced by the index but never stored.
    pub absent_manifest: Descriptor,
    /// OCI index over the three manifests.
    pub index: (Descriptor, Bytes),
}

/// Tagged image whose target is the index.
pub const INDEX_IMAGE: &str = "example.com/conformance/app:v1";
/// Tagged image whose target is the Docker manifest.
pub const DOCKER_IMAGE: &str = "docker.io/library/conformance:v2";
/// Image created and deleted while watching.
pub const LATE_IMAGE: &str = "example.com/conformance/late:v3";

fn pseudo_random(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn desc(media_type: &str, data: &Bytes) -> Descriptor {
    Descriptor {
        media_type: media_type.to_owned(),
        digest: Digest::sha256_of(data),
        size: data.len() as u64,
    }
}

fn json_desc(d: &Descriptor) -> String {
    format!(
        r#"{{"mediaType":"{}","digest":"{}","size":{}}}"#,
        d.media_type, d.digest, d.size
    )
}

impl Fixture {
    /// Builds the fixture (deterministic bytes).
    pub fn new() -> Self {
        let layer_type = "application/vnd.oci.image.layer.v1.tar+gzip";
        let big = pseudo_random(300_000, 1);
        let small = pseudo_random(1_000, 2);
        let config = Bytes::from_static(
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
        );
        let (big_d, small_d) = (desc(layer_type, &big), desc(layer_type, &small));
        let config_d = desc("application/vnd.oci.image.config.v1+json", &config);
        let oci = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{},"layers":[{},{}]}}"#,
            json_desc(&config_d),
            json_desc(&big_d),
            json_desc(&small_d)
        ));
        let docker = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{},"layers":[{}]}}"#,
            json_desc(&config_d),
            json_desc(&small_d)
        ));
        let absent = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{},"layers":[]}}"#,
            json_desc(&small_d)
        ));
        let (oci_d, docker_d, absent_d) = (
            desc(OCI_MANIFEST, &oci),
            desc(DOCKER_MANIFEST, &docker),
            desc(OCI_MANIFEST, &absent),
        );
        let index = Bytes::from(format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{},{},{}]}}"#,
            json_desc(&oci_d),
            json_desc(&docker_d),
            json_desc(&absent_d)
        ));
        Self {
            big_layer: (big_d, big),
            small_layer: (small_d, small),
            config: (config_d, config),
            oci_manifest: (oci_d, oci),
            docker_manifest: (docker_d, docker),
            absent_manifest: absent_d,
            index: (desc(OCI_INDEX, &index), index),
        }
    }

    fn stored(&self) -> [&(Descriptor, Bytes); 6] {
        [
            &self.big_layer,
            &self.small_layer,
            &self.config,
            &self.oci_manifest,
            &self.docker_manifest,
            &self.index,
        ]
    }

    /// What an upstream registry under test holds in its repository
    /// ([`upstream_location`]): every stored blob and manifest with its media type, and
    /// [`UPSTREAM_TAG`] pointing at the index.
    pub fn upstream_content(&self) -> Vec<(String, Bytes)> {
        self.stored()
            .iter()
            .map(|(d, data)| (d.media_type.clone(), data.clone()))
            .collect()
    }

    /// Loads every stored blob and the two tagged images.
    pub async fn load(&self, loader: &dyn Loader) {
        for (d, data) in self.stored() {
            loader.put_blob(&d.media_type, data.clone()).await;
        }
        loader.put_image(INDEX_IMAGE, &self.index.0).await;
        loader
            .put_image(DOCKER_IMAGE, &self.docker_manifest.0)
            .await;
    }
}

impl Default for Fixture {
    fn default() -> Self {
        Self::new()
    }
}

async fn read_all(store: &dyn Store, digest: &Digest, range: ByteRange) -> Vec<u8> {
    let mut stream = store.open(digest, range).await.expect("open blob");
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("read chunk"));
    }
    out
}

async fn expect_event(events: &mut BoxStream<'static, StoreEvent>, want: &StoreEvent) {
    let found = tokio::time::timeout(EVENT_TIMEOUT, async {
        while let Some(e) = events.next().await {
            if &e == want {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "expected store event {want:?}");
}

/// Runs every check against `store`, loading content through `loader`.
///
/// Panics (as a test does) on the first failed check.
pub async fn check_store(store: &dyn Store, loader: &dyn Loader) {
    let fx = Fixture::new();
    let mut events = store.watch();
    expect_event(&mut events, &StoreEvent::Resync).await;
    fx.load(loader).await;
    store.ping().await.expect("ping");

    // Tags resolve to the image's target descriptor, with when the tag was set.
    let by_tag = |s: &str| ImageName::parse(s).expect("fixture name");
    for (name, want) in [
        (INDEX_IMAGE, &fx.index.0),
        (DOCKER_IMAGE, &fx.docker_manifest.0),
    ] {
        let got = store
            .resolve(&by_tag(name))
            .await
            .expect("resolve")
            .expect("tag resolves");
        assert_eq!(&got.descriptor, want);
        let age = got
            .updated
            .and_then(|t| t.elapsed().ok())
            .expect("the tag's update time is known and not in the future");
        assert!(age < Duration::from_secs(600), "set just now: {age:?}");
    }
    assert_eq!(
        store
            .resolve(&by_tag("example.com/conformance/app:nope"))
            .await
            .expect("resolve"),
        None
    );

    // Digests: manifest media types come from the content; other blobs are octet streams.
    for (d, _) in [&fx.index, &fx.oci_manifest, &fx.docker_manifest] {
        assert_eq!(
            store
                .descriptor(&d.digest)
                .await
                .expect("describe")
                .as_ref(),
            Some(d)
        );
    }
    for (d, _) in [&fx.big_layer, &fx.config] {
        let got = store
            .descriptor(&d.digest)
            .await
            .expect("describe")
            .expect("present");
        assert_eq!((got.size, got.media_type.as_str()), (d.size, OCTET_STREAM));
    }
    assert_eq!(
        store
            .descriptor(&fx.absent_manifest.digest)
            .await
            .expect("describe"),
        None
    );

    // Blobs read back whole and by range.
    let (big, bytes) = &fx.big_layer;
    assert_eq!(
        read_all(store, &big.digest, ByteRange::full(big.size)).await,
        bytes.as_ref()
    );
    let mid = ByteRange {
        start: 12_345,
        end: 200_001,
    };
    assert_eq!(
        read_all(store, &big.digest, mid).await,
        &bytes[12_345..200_001]
    );
    let tail = ByteRange {
        start: big.size - 7,
        end: big.size,
    };
    assert_eq!(
        read_all(store, &big.digest, tail).await,
        &bytes[bytes.len() - 7..]
    );
    assert!(matches!(
        store
            .open(&fx.absent_manifest.digest, ByteRange::full(1))
            .await,
        Err(StoreError::NotFound(_))
    ));
    assert!(
        store
            .open(
                &big.digest,
                ByteRange {
                    start: 0,
                    end: big.size + 1
                }
            )
            .await
            .is_err()
    );

    // Listing walks the index and keeps only present content.
    let inv = store.list().await.expect("list");
    let app = inv
        .images
        .iter()
        .find(|i| i.name == INDEX_IMAGE)
        .expect("index image listed");
    assert_eq!(app.digests.first(), Some(&fx.index.0.digest));
    for (d, _) in fx.stored() {
        assert!(
            app.digests.contains(&d.digest),
            "{} missing from listing",
            d.digest
        );
    }
    assert!(!app.digests.contains(&fx.absent_manifest.digest));
    assert_eq!(app.digests.len(), 6);
    assert!(inv.tags().contains(INDEX_IMAGE) && inv.tags().contains(DOCKER_IMAGE));
    let one = store
        .image(DOCKER_IMAGE)
        .await
        .expect("image")
        .expect("present");
    assert_eq!(one.digests.len(), 3);
    assert_eq!(
        store.image("example.com/none:x").await.expect("image"),
        None
    );

    // Changes arrive on the watch feed.
    loader.put_image(LATE_IMAGE, &fx.oci_manifest.0).await;
    expect_event(
        &mut events,
        &StoreEvent::ImageChanged(LATE_IMAGE.to_owned()),
    )
    .await;
    loader.delete_image(LATE_IMAGE).await;
    expect_event(
        &mut events,
        &StoreEvent::ImageDeleted(LATE_IMAGE.to_owned()),
    )
    .await;
    assert_eq!(store.image(LATE_IMAGE).await.expect("image"), None);
    loader.delete_blob(&fx.big_layer.0.digest).await;
    expect_event(
        &mut events,
        &StoreEvent::ContentDeleted(fx.big_layer.0.digest.clone()),
    )
    .await;
    assert_eq!(
        store
            .descriptor(&fx.big_layer.0.digest)
            .await
            .expect("describe"),
        None
    );
    let app = store
        .image(INDEX_IMAGE)
        .await
        .expect("image")
        .expect("present");
    assert!(!app.digests.contains(&fx.big_layer.0.digest));

    // An unfinished download of a digest is aborted, and only that one. (References are
    // named as containerd's pulls name them: the kind, then the digest.)
    let partial = fx.big_layer.1.slice(..1000);
    let big_ref = format!("layer-{}", fx.big_layer.0.digest);
    let other_ref = format!("manifest-{}", fx.absent_manifest.digest);
    loader
        .begin_ingest(&big_ref, &fx.big_layer.0.digest, partial.clone())
        .await;
    loader
        .begin_ingest(&other_ref, &fx.absent_manifest.digest, partial)
        .await;
    assert_eq!(
        store
            .abort_ingests(&fx.big_layer.0.digest)
            .await
            .expect("abort"),
        1
    );
    assert_eq!(
        store
            .abort_ingests(&fx.big_layer.0.digest)
            .await
            .expect("abort again"),
        0,
        "nothing left to abort"
    );
    assert_eq!(
        store
            .abort_ingests(&fx.absent_manifest.digest)
            .await
            .expect("abort the other"),
        1
    );
}

/// Collects what a lookup yields within `limit` (or until the stream ends).
pub async fn collect_lookup(router: &dyn Router, key: &str, limit: Duration) -> Vec<Peer> {
    let mut out = Vec::new();
    let mut stream = router.lookup(key);
    let _ = tokio::time::timeout(limit, async {
        while let Some(p) = stream.next().await {
            out.push(p);
        }
    })
    .await;
    out
}

/// Waits (up to 15 s) until `check` holds for the lookup of `key` from `router`.
async fn eventually(router: &dyn Router, key: &str, what: &str, check: impl Fn(&[Peer]) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let found = collect_lookup(router, key, Duration::from_millis(500)).await;
        if check(&found) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: lookup of {key} gave {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Checks two routers of one network: `a` (whose registry is `a_peer`) advertises, `b`
/// finds it; withdrawn keys stop being found; a node never finds itself.
///
/// Panics (as a test does) on the first failed check.
pub async fn check_router(a: &dyn Router, b: &dyn Router, a_peer: &Peer) {
    assert!(a.ready().await && b.ready().await, "routers are ready");
    let k1 = format!("sha256:{}", "1".repeat(64));
    let k2 = "example.com/conformance/app:v1".to_owned();
    assert!(
        collect_lookup(b, &k1, Duration::from_millis(300))
            .await
            .is_empty(),
        "nothing advertised yet"
    );

    a.advertise(vec![k1.clone(), k2.clone()])
        .await
        .expect("advertise");
    eventually(b, &k1, "advertised digest found", |p| {
        p.iter().any(|x| x.addr == a_peer.addr)
    })
    .await;
    eventually(b, &k2, "advertised tag found", |p| {
        p.iter().any(|x| x.addr == a_peer.addr)
    })
    .await;
    let own = collect_lookup(a, &k1, Duration::from_millis(300)).await;
    assert!(
        own.iter().all(|p| p.addr != a_peer.addr),
        "a node never finds itself: {own:?}"
    );
    // It knows where its peers reach its registry: where they found it.
    assert!(
        a.registry_addrs().contains(&a_peer.addr),
        "a names its registry as its peers find it: {:?}, not {}",
        a.registry_addrs(),
        a_peer.addr
    );
    let status = a.status().await.expect("status");
    assert!(status.advertised_keys >= 2);
    assert!(!status.listen.is_empty(), "a node says where it listens");
    // It lists the other node as a connected peer, with its registry once known.
    let b_id = b.local_id();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let peers = a.status().await.expect("status").peers;
        if peers
            .iter()
            .any(|p| p.id == b_id && p.state == LinkState::Connected && p.registry.is_some())
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{b_id} listed as a connected peer: {peers:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    a.withdraw(vec![k1.clone()]).await.expect("withdraw");
    eventually(b, &k1, "withdrawn digest no longer found", |p| {
        p.iter().all(|x| x.addr != a_peer.addr)
    })
    .await;
    eventually(b, &k2, "other key still found", |p| {
        p.iter().any(|x| x.addr == a_peer.addr)
    })
    .await;

    // Both rank the same owners for a key, each itself included once (as `Me`), the other
    // with the address its registry listens on.
    let key = format!("sha256:{}", "3".repeat(64));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let of_a = a.owners(&key).await.expect("owners");
        let of_b = b.owners(&key).await.expect("owners");
        let ids = |list: &[Owner], me: &dyn Router| -> Vec<String> {
            list.iter()
                .map(|o| match o {
                    Owner::Me => me.local_id(),
                    Owner::Peer(p) => p.id.clone(),
                })
                .collect()
        };
        let mine = |list: &[Owner]| list.iter().filter(|o| **o == Owner::Me).count();
        let b_lists_a = of_b
            .iter()
            .any(|o| matches!(o, Owner::Peer(p) if p.id == a.local_id() && p.addr == a_peer.addr));
        if mine(&of_a) == 1 && mine(&of_b) == 1 && b_lists_a && ids(&of_a, a) == ids(&of_b, b) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "owners of {key}: a ranks {of_a:?}, b ranks {of_b:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The registry of the upstream conformance fixture.
pub const UPSTREAM_REGISTRY: &str = "example.com";
/// The repository of the upstream conformance fixture.
pub const UPSTREAM_REPOSITORY: &str = "conformance/app";
/// The tag that points at the fixture's index upstream.
pub const UPSTREAM_TAG: &str = "v1";

/// Where an upstream under test holds the fixture ([`Fixture::upstream_content`]).
pub fn upstream_location() -> (Registry, Repository) {
    let registry = Registry::parse(UPSTREAM_REGISTRY).expect("valid registry");
    let repository = Repository::parse(UPSTREAM_REPOSITORY).expect("valid repository");
    (registry, repository)
}

const ACCEPT_ALL: &str = "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.docker.distribution.manifest.v2+json";

async fn read_body(mut body: crate::store::BlobStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        out.extend_from_slice(&chunk.expect("body chunk"));
    }
    out
}

/// Checks an upstream that holds the fixture at [`upstream_location`] and allows no other
/// registry: manifests by tag and digest (`HEAD` and `GET`), blobs whole and from an
/// offset, and the errors for what is not there or not allowed.
///
/// Panics (as a test does) on the first failed check.
pub async fn check_upstream(upstream: &dyn Upstream, fx: &Fixture) {
    let (registry, repo) = upstream_location();
    let tag = Reference::Tag(Tag::parse(UPSTREAM_TAG).expect("tag"));
    let by_digest = |d: &Descriptor| Reference::Digest(d.digest.clone());
    assert!(upstream.allows(&registry));
    let other = Registry::parse("elsewhere.example").expect("registry");
    assert!(!upstream.allows(&other));
    // Its states name each registry it pulls through from, once, and no other.
    let states = upstream.states();
    assert_eq!(
        states.iter().filter(|s| s.registry == registry).count(),
        1,
        "{states:?}"
    );
    assert!(
        states.iter().all(|s| upstream.allows(&s.registry)),
        "{states:?}"
    );
    assert!(matches!(
        upstream
            .head_manifest(&other, &repo, &tag, ACCEPT_ALL)
            .await,
        Err(UpstreamError::NotAllowed(_))
    ));

    // HEAD and GET by tag and by digest.
    let head = upstream
        .head_manifest(&registry, &repo, &tag, ACCEPT_ALL)
        .await
        .expect("HEAD by tag");
    assert_eq!(head, fx.index.0);
    for (d, bytes) in [&fx.index, &fx.oci_manifest, &fx.docker_manifest] {
        let head = upstream
            .head_manifest(&registry, &repo, &by_digest(d), ACCEPT_ALL)
            .await
            .expect("HEAD by digest");
        assert_eq!(&head, d);
        let (got, body) = upstream
            .get_manifest(&registry, &repo, &by_digest(d), ACCEPT_ALL)
            .await
            .expect("GET by digest");
        assert_eq!((&got, &body), (d, bytes));
    }
    let (got, body) = upstream
        .get_manifest(&registry, &repo, &tag, ACCEPT_ALL)
        .await
        .expect("GET by tag");
    assert_eq!((&got, &body), (&fx.index.0, &fx.index.1));
    let nope = Reference::Tag(Tag::parse("nope").expect("tag"));
    for result in [
        upstream
            .head_manifest(&registry, &repo, &nope, ACCEPT_ALL)
            .await,
        upstream
            .get_manifest(&registry, &repo, &nope, ACCEPT_ALL)
            .await
            .map(|(d, _)| d),
        upstream
            .head_manifest(
                &registry,
                &repo,
                &by_digest(&fx.absent_manifest),
                ACCEPT_ALL,
            )
            .await,
    ] {
        assert!(
            matches!(result, Err(UpstreamError::NotFound(_))),
            "{result:?}"
        );
    }

    // Blobs, whole and from an offset.
    let (big, bytes) = &fx.big_layer;
    let whole = upstream
        .get_blob(&registry, &repo, &big.digest, 0)
        .await
        .expect("GET blob");
    assert_eq!((whole.size, whole.offset), (big.size, 0));
    assert_eq!(read_body(whole.body).await, bytes.as_ref());
    let tail = upstream
        .get_blob(&registry, &repo, &big.digest, 250_000)
        .await
        .expect("GET blob from an offset");
    assert_eq!((tail.size, tail.offset), (big.size, 250_000));
    assert_eq!(read_body(tail.body).await, &bytes[250_000..]);
    let missing = upstream
        .get_blob(&registry, &repo, &fx.absent_manifest.digest, 0)
        .await;
    assert!(
        matches!(missing, Err(UpstreamError::NotFound(_))),
        "{missing:?}"
    );
    let elsewhere = Repository::parse("conformance/other").expect("repository");
    let missing = upstream
        .get_blob(&registry, &elsewhere, &big.digest, 0)
        .await;
    assert!(
        matches!(missing, Err(UpstreamError::NotFound(_))),
        "{missing:?}"
    );
}

//! Runs the store conformance checks against a real containerd started for the test
//! (needs root and the `containerd` binary), once reading blobs from the content directory
//! and once through containerd's gRPC content service.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use containerd_client::services::v1::content_client::ContentClient;
use containerd_client::services::v1::images_client::ImagesClient;
use containerd_client::services::v1::{
    CreateImageRequest, DeleteContentRequest, DeleteImageRequest, Image, WriteAction,
    WriteContentRequest,
};
use containerd_client::tonic::Request;
use containerd_client::tonic::transport::Channel;
use mirrorlet_containerd::{CONTENT_SUBDIR, Config, ContainerdStore};
use mirrorlet_oci::conformance::{self, Loader};
use mirrorlet_oci::{Descriptor, Digest};

/// A private containerd (no CRI) in a temporary directory, killed on drop.
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let config = format!(
            "version = 2\nroot = \"{r}/root\"\nstate = \"{r}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{r}/containerd.sock\"\n",
            r = root.display()
        );
        std::fs::write(root.join("config.toml"), config).expect("write config");
        let log = std::fs::File::create(root.join("containerd.log")).expect("log file");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(root.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("containerd must be installed (apt-get install containerd) and the tests run as root");
        let me = Self { child, dir };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !me.socket().exists() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start; see {}",
                me.dir.path().display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        me
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn content_dir(&self) -> PathBuf {
        self.dir.path().join("root").join(CONTENT_SUBDIR)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Loads content through containerd's own APIs, as a pull would.
struct GrpcLoader {
    channel: Channel,
    namespace: String,
}

impl GrpcLoader {
    async fn connect(socket: &Path, namespace: &str) -> Self {
        let channel = containerd_client::connect(socket)
            .await
            .expect("connect to containerd");
        Self {
            channel,
            namespace: namespace.to_owned(),
        }
    }

    fn req<T>(&self, msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut().insert(
            "containerd-namespace",
            self.namespace.parse().expect("ascii"),
        );
        r
    }
}

#[async_trait::async_trait]
impl Loader for GrpcLoader {
    async fn put_blob(&self, _media_type: &str, data: Bytes) {
        let digest = Digest::sha256_of(&data);
        // A gc.root label keeps the blob from being collected while the test runs.
        let labels =
            HashMap::from([("containerd.io/gc.root".to_owned(), "conformance".to_owned())]);
        let msg = WriteContentRequest {
            action: WriteAction::Commit as i32,
            r#ref: format!("conformance-{}", digest.hex()),
            total: data.len() as i64,
            expected: digest.to_string(),
            offset: 0,
            data: data.to_vec(),
            labels,
        };
        let mut client = ContentClient::new(self.channel.clone());
        let mut responses = client
            .write(self.req(futures_util::stream::iter([msg])))
            .await
            .expect("content write")
            .into_inner();
        while responses
            .message()
            .await
            .expect("content write response")
            .is_some()
        {}
    }

    async fn begin_ingest(&self, reference: &str, digest: &Digest, partial: Bytes) {
        // Written without a commit: containerd keeps it as an active ingest, as a pull
        // that was interrupted leaves it.
        let msg = WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: reference.to_owned(),
            total: 0,
            expected: digest.to_string(),
            offset: 0,
            data: partial.to_vec(),
            labels: HashMap::new(),
        };
        let mut client = ContentClient::new(self.channel.clone());
        let mut responses = client
            .write(self.req(futures_util::stream::iter([msg])))
            .await
            .expect("content write")
            .into_inner();
        while responses
            .message()
            .await
            .expect("content write response")
            .is_some()
        {}
    }

    async fn put_image(&self, name: &str, target: &Descriptor) {
        let image = Image {
            name: name.to_owned(),
            target: Some(containerd_client::types::Descriptor {
                media_type: target.media_type.clone(),
                digest: target.digest.to_string(),
                size: target.size as i64,
                annotations: HashMap::new(),
            }),
            ..Default::default()
        };
        let mut client = ImagesClient::new(self.channel.clone());
        client
            .create(self.req(CreateImageRequest {
                image: Some(image),
                source_date_epoch: None,
            }))
            .await
            .expect("image create");
    }

    async fn delete_image(&self, name: &str) {
        let mut client = ImagesClient::new(self.channel.clone());
        let req = DeleteImageRequest {
            name: name.to_owned(),
            sync: true,
            target: None,
        };
        client.delete(self.req(req)).await.expect("image delete");
    }

    async fn delete_blob(&self, digest: &Digest) {
        let mut client = ContentClient::new(self.channel.clone());
        let req = DeleteContentRequest {
            digest: digest.to_string(),
        };
        client.delete(self.req(req)).await.expect("content delete");
    }
}

async fn run(use_files: bool) {
    let containerd = Containerd::start();
    let namespace = "conformance";
    let store = ContainerdStore::new(Config {
        socket: containerd.socket(),
        namespace: namespace.to_owned(),
        content_dir: use_files.then(|| containerd.content_dir()),
        media_type_cache: NonZeroUsize::new(128).expect("non-zero"),
        stream_budget: mirrorlet_oci::Budget::default(),
    });
    let loader = GrpcLoader::connect(&containerd.socket(), namespace).await;
    conformance::check_store(&store, &loader).await;
}

#[tokio::test]
async fn containerd_store_conforms_reading_files() {
    run(true).await;
}

#[tokio::test]
async fn containerd_store_conforms_over_grpc() {
    run(false).await;
}

/// With the content directory mounted, a blob is reported the moment containerd commits
/// it (containerd 1.6 sends no content events), and its garbage collection too.
#[tokio::test]
async fn blob_files_are_reported_as_they_land_and_go() {
    use futures_util::StreamExt;
    use mirrorlet_oci::{Store, StoreEvent};

    let containerd = Containerd::start();
    let namespace = "files";
    let store = ContainerdStore::new(Config {
        socket: containerd.socket(),
        namespace: namespace.to_owned(),
        content_dir: Some(containerd.content_dir()),
        media_type_cache: NonZeroUsize::new(16).expect("non-zero"),
        stream_budget: mirrorlet_oci::Budget::default(),
    });
    let loader = GrpcLoader::connect(&containerd.socket(), namespace).await;
    // A first blob makes containerd create the blob directory; then watch.
    loader.put_blob("x", Bytes::from_static(b"first")).await;
    let mut events = store.watch();
    async fn wait_for(
        events: &mut futures_util::stream::BoxStream<'static, StoreEvent>,
        want: StoreEvent,
    ) {
        tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(e) = events.next().await {
                if e == want {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {want:?}"));
    }
    wait_for(&mut events, StoreEvent::Resync).await;
    // The file watch starts alongside the event feed; give it a moment to be in place.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let data = Bytes::from_static(b"a layer that just landed");
    loader.put_blob("x", data.clone()).await;
    wait_for(
        &mut events,
        StoreEvent::ContentAdded(Digest::sha256_of(&data)),
    )
    .await;
    loader.delete_blob(&Digest::sha256_of(&data)).await;
    wait_for(
        &mut events,
        StoreEvent::ContentDeleted(Digest::sha256_of(&data)),
    )
    .await;
}

/// Without the content directory, the chunks of a blob read over gRPC count against the
/// stream budget as chunks read from files do: a client holding chunks holds their share,
/// and the stream waits for room rather than reading more.
#[tokio::test]
async fn chunks_read_over_grpc_count_against_the_stream_budget() {
    use futures_util::{FutureExt, StreamExt};
    use mirrorlet_oci::{ByteRange, Store};

    let containerd = Containerd::start();
    let namespace = "budget";
    let budget = mirrorlet_oci::Budget::new(2 << 20);
    let store = ContainerdStore::new(Config {
        socket: containerd.socket(),
        namespace: namespace.to_owned(),
        content_dir: None,
        media_type_cache: NonZeroUsize::new(16).expect("non-zero"),
        stream_budget: budget.clone(),
    });
    let loader = GrpcLoader::connect(&containerd.socket(), namespace).await;
    let data: Bytes = (0..3u32 << 20).map(|i| (i % 253) as u8).collect();
    loader.put_blob("layer", data.clone()).await;
    let digest = Digest::sha256_of(&data);
    let mut stream = store
        .open(&digest, ByteRange::full(data.len() as u64))
        .await
        .expect("open");
    let first = stream.next().await.expect("a chunk").expect("read");
    let second = stream.next().await.expect("a chunk").expect("read");
    assert_eq!(
        budget.in_use(),
        first.len() + second.len(),
        "held chunks are counted"
    );
    // The budget is spent: the next chunk waits until a held one is dropped.
    let mut third = Box::pin(stream.next());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!((&mut third).now_or_never().is_none(), "no room, no read");
    let mut all = first.to_vec();
    drop(first);
    let third = tokio::time::timeout(Duration::from_secs(10), third)
        .await
        .expect("room again")
        .expect("a chunk")
        .expect("read");
    all.extend_from_slice(&second);
    all.extend_from_slice(&third);
    drop((second, third));
    while let Some(chunk) = stream.next().await {
        all.extend_from_slice(&chunk.expect("read"));
    }
    assert_eq!(Bytes::from(all), data);
    assert_eq!(budget.in_use(), 0);
}

//! Starting a registry on a real port for the integration tests.
// Each test binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use futures_util::FutureExt;
use mirrorlet_oci::{MemoryNetwork, MemoryRouter, Peer, Store, Upstream};
use mirrorlet_registry::server::{self, Limits};
use mirrorlet_registry::{AppState, Metrics, PeerConfig, PullThroughConfig};
use tokio_util::sync::CancellationToken;

/// A registry serving on 127.0.0.1, its router on an in-memory network. Dropping it stops
/// the server.
pub(crate) struct TestNode {
    /// `http://127.0.0.1:<port>`.
    pub base: String,
    /// The listening address.
    pub addr: SocketAddr,
    /// Its metrics registry.
    pub registry: Arc<prometheus_client::registry::Registry>,
    /// Stops the server when cancelled.
    pub shutdown: CancellationToken,
    /// The server task.
    pub task: Option<tokio::task::JoinHandle<()>>,
    /// Its shared state.
    pub state: Arc<AppState>,
    /// Its router.
    pub router: Arc<MemoryRouter>,
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestNode {
    /// Starts a node named `id` on `net`, serving `store`, using peers as `peers` says.
    pub(crate) async fn start(
        net: &Arc<MemoryNetwork>,
        id: &str,
        store: Arc<dyn Store>,
        peers: PeerConfig,
    ) -> (Self, Arc<MemoryRouter>) {
        Self::start_with(net, id, store, peers, None).await
    }

    /// Starts a node that also pulls through from `upstream`, as `pull` says.
    pub(crate) async fn start_with(
        net: &Arc<MemoryNetwork>,
        id: &str,
        store: Arc<dyn Store>,
        peers: PeerConfig,
        upstream: Option<(Arc<dyn Upstream>, PullThroughConfig)>,
    ) -> (Self, Arc<MemoryRouter>) {
        Self::start_configured(net, id, store, peers, upstream, |s| s).await
    }

    /// Starts a node as [`TestNode::start_with`] does, its state changed by `configure`.
    pub(crate) async fn start_configured(
        net: &Arc<MemoryNetwork>,
        id: &str,
        store: Arc<dyn Store>,
        peers: PeerConfig,
        upstream: Option<(Arc<dyn Upstream>, PullThroughConfig)>,
        configure: impl FnOnce(AppState) -> AppState,
    ) -> (Self, Arc<MemoryRouter>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let router = Arc::new(MemoryRouter::new(
            net.clone(),
            Peer {
                id: id.into(),
                addr,
            },
        ));
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        let registry = Arc::new(registry);
        let state = AppState::new(
            store,
            router.clone(),
            peers,
            metrics,
            registry.clone(),
            Arc::new(|| async { Ok(()) }.boxed()),
        )
        .expect("state");
        let state = Arc::new(configure(match upstream {
            Some((u, pull)) => state.with_upstream(u, pull, 1 << 30),
            None => state,
        }));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::serve(
            listener,
            mirrorlet_registry::app(state.clone()),
            Limits::default(),
            shutdown.clone(),
        ));
        let node = Self {
            base: format!("http://{addr}"),
            addr,
            registry,
            shutdown,
            task: Some(task),
            state,
            router: router.clone(),
        };
        (node, router)
    }

    /// Sum of the samples whose line starts with `name` (e.g. `x_total{source="peer"}`).
    pub(crate) fn metric(&self, name: &str) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("encode");
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
            .fold(0.0, |a, b| a + b)
    }
}

/// An HTTP client as containerd is one: it says so in its `User-Agent` and accepts every
/// manifest type.
pub(crate) fn client() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(
        reqwest::header::ACCEPT,
        reqwest::header::HeaderValue::from_static(mirrorlet_registry::ACCEPT_ALL),
    );
    reqwest::Client::builder()
        .user_agent("containerd/1.6.20")
        .default_headers(headers)
        .build()
        .expect("client")
}

//! `mirrorlet run`: assembles the agent. Binds the listeners first (so a bad address fails
//! at once), starts the tasks, waits for a signal or a failed task, then drains: the
//! advertiser withdraws what this node advertised, in-flight responses finish, and the
//! router stops last.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use anyhow::Context as _;
use futures_util::FutureExt;
use mirrorlet_containerd::{Config as ContainerdConfig, ContainerdStore};
use mirrorlet_oci::glob::Glob;
use mirrorlet_oci::{Alone, Budget, Peer, Router, Store};
use mirrorlet_registry::NodeInfo;
use mirrorlet_registry::ratelimit::RateLimiter;
use mirrorlet_registry::server::{self, Limits};
use mirrorlet_registry::{AppState, Metrics, PeerConfig, PullThroughConfig};
use mirrorlet_routing::advertiser::{self, AdvertiserConfig, InventoryMetrics};
use mirrorlet_routing::{P2pConfig, P2pMetrics, P2pRouter, identity};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::{P2pArgs, RunArgs, UpstreamArgs};
use crate::health::ContainerdHealth;

/// Connections the operational listener serves at once.
const OPS_CONNECTIONS: usize = 64;

/// Runs the agent until SIGTERM or SIGINT.
pub(crate) async fn run(args: RunArgs) -> anyhow::Result<()> {
    let listener = bind(args.listen, "--listen").await?;
    let ops_listener = bind(args.metrics_listen, "--metrics-listen").await?;
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    let content_dir = match &args.containerd_content_dir.0 {
        None => None,
        Some(dir) if dir.is_dir() => Some(dir.clone()),
        Some(dir) => {
            tracing::warn!(
                dir = %dir.display(),
                "--containerd-content-dir is not a directory here; serving blobs through containerd's gRPC API (slower)"
            );
            None
        }
    };
    // One bound for content in flight: a quarter for batches on their way into spool
    // files, the rest for chunks being sent.
    let stream_memory = usize::try_from(args.stream_memory).unwrap_or(usize::MAX);
    let spool_budget = Budget::new(stream_memory / 4);
    let stream_budget = Budget::new(stream_memory - stream_memory / 4);
    let store: Arc<dyn Store> = Arc::new(ContainerdStore::new(ContainerdConfig {
        socket: args.containerd_socket.clone(),
        namespace: args.containerd_namespace.clone(),
        content_dir: content_dir.clone(),
        media_type_cache: args.media_type_cache,
        stream_budget: stream_budget.clone(),
    }));

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let inventory_metrics = InventoryMetrics::register(&mut registry);
    let p2p_metrics = P2pMetrics::register(&mut registry);
    let upstream_metrics = mirrorlet_upstream::UpstreamMetrics::register(&mut registry);
    let upstream_config = upstream_config(&args.upstream)?;
    let pulled_through: Vec<String> = upstream_config
        .registries
        .iter()
        .map(ToString::to_string)
        .collect();
    let private = mirrorlet_oci::private::Private::new(
        &args.upstream.private,
        args.upstream.private_pull_through,
    )
    .map_err(|e| anyhow::anyhow!("--private {e}"))?;
    let upstream = mirrorlet_upstream::Client::new(upstream_config, upstream_metrics)
        .context("building the upstream client")?;

    let shutdown = CancellationToken::new();
    let router_shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    // The tasks that must run until shutdown report here if one ends before it.
    let (died, mut deaths) = tokio::sync::mpsc::channel(4);
    let p2p = &args.p2p;
    let router: Arc<dyn Router> = if p2p.enabled {
        let config = p2p_config(p2p, args.listen.port())?;
        let (router, task) = P2pRouter::start(config, p2p_metrics, router_shutdown.clone())
            .with_context(|| format!("--p2p-listen {}", p2p.p2p_listen))?;
        tasks.spawn(guard("p2p router", task, shutdown.clone(), died.clone()));
        Arc::new(router)
    } else {
        // Alone: lookups find nothing, so every miss falls through upstream.
        Arc::new(Alone::new(Peer {
            id: "local".into(),
            addr: args.listen,
        }))
    };

    if p2p.enabled {
        std::fs::create_dir_all(&p2p.spool_dir).with_context(|| {
            format!("--spool-dir {}: cannot create it", p2p.spool_dir.display())
        })?;
    }
    let peers = PeerConfig {
        enabled: p2p.enabled,
        lookup_timeout: p2p.lookup_timeout,
        max_attempts: p2p.peer_max_attempts as usize,
        hedge_delay: p2p.peer_hedge_delay,
        read_timeout: p2p.peer_read_timeout,
        failure_backoff: p2p.peer_failure_backoff,
        verify_buffer: p2p.peer_verify_buffer,
        verify: p2p.peer_verify,
        tag_excludes: tag_excludes(p2p),
        spool_dir: p2p.spool_dir.clone(),
        max_blob_size: p2p.peer_max_blob_size,
        parts_from: p2p.peer_parts_from,
        ..PeerConfig::default()
    };
    let (ready_store, ready_router) = (store.clone(), router.clone());
    let ready = Arc::new(move || {
        let (store, router) = (ready_store.clone(), ready_router.clone());
        async move {
            store.ping().await.map_err(|e| e.to_string())?;
            if !router.ready().await {
                return Err("the p2p router has stopped".to_owned());
            }
            Ok(())
        }
        .boxed()
    });
    let pull = PullThroughConfig {
        tag_revalidate: args.upstream.tag_revalidate,
        stale_tag_max_age: args.upstream.stale_tag_max_age,
        max_peer_streams: args.upstream.max_peer_streams as usize,
        ..PullThroughConfig::default()
    };
    let mut state = AppState::new(
        store.clone(),
        router.clone(),
        peers,
        metrics,
        Arc::new(registry),
        ready,
    )
    .context("building the peer HTTP client")?
    .with_upstream(Arc::new(upstream), pull, args.upstream.cache_size)
    .with_private(private.clone())
    .with_stream_budget(stream_budget)
    .with_spool_budget(spool_budget);
    // The node's store with the pull-through cache under it: advertised as one.
    let store = state.store.clone();
    if p2p.peer_upload_limit > 0 {
        state.peer_upload_limit = Some(RateLimiter::new(p2p.peer_upload_limit));
    }
    let health = ContainerdHealth::watch(
        store.clone(),
        args.liveness_containerd_timeout,
        router_shutdown.clone(),
    );
    state.live = Arc::new(move || {
        let result = health.check();
        async move { result }.boxed()
    });
    state.node = NodeInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        registry_listen: listener
            .local_addr()
            .map_or_else(|_| args.listen.to_string(), |a| a.to_string()),
        operations_listen: ops_listener
            .local_addr()
            .map_or_else(|_| args.metrics_listen.to_string(), |a| a.to_string()),
        containerd_namespace: args.containerd_namespace.clone(),
        p2p: p2p.enabled,
    };
    let state = Arc::new(state);

    // Without p2p the router is a network of one: advertising into it costs nothing, and
    // the advertiser still keeps the inventory gauges.
    let config = AdvertiserConfig {
        private,
        tag_excludes: tag_excludes(p2p),
        revalidated: pulled_through.clone(),
    };
    let advertising = tokio::spawn(guard(
        "advertiser",
        tokio::spawn(advertiser::run(
            store.clone(),
            router.clone(),
            config,
            inventory_metrics,
            shutdown.clone(),
        )),
        shutdown.clone(),
        died.clone(),
    ));
    tasks.spawn(crate::memory::keep_releasing(router_shutdown.clone()));
    let limits = Limits {
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        header_read_timeout: args.header_read_timeout,
        send_stall_timeout: args.send_stall_timeout,
    };
    let server = tokio::spawn(guard(
        "HTTP server",
        tokio::spawn(server::serve(
            listener,
            mirrorlet_registry::app(state.clone()),
            limits,
            shutdown.clone(),
        )),
        shutdown.clone(),
        died.clone(),
    ));
    // Probes and scrapes keep being answered while the registry drains.
    tasks.spawn(guard(
        "health and metrics server",
        tokio::spawn(server::serve(
            ops_listener,
            mirrorlet_registry::ops_app(state),
            Limits {
                max_connections: OPS_CONNECTIONS,
                ..limits
            },
            router_shutdown.clone(),
        )),
        shutdown.clone(),
        died,
    ));
    tracing::info!(
        listen = %args.listen,
        metrics_listen = %args.metrics_listen,
        containerd = %args.containerd_socket.display(),
        namespace = %args.containerd_namespace,
        content_dir = ?content_dir,
        p2p = p2p.enabled,
        pull_through = ?pulled_through,
        version = env!("CARGO_PKG_VERSION"),
        "mirrorlet agent started"
    );

    let failed: Option<String> = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM received; shutting down"); None }
        _ = int.recv() => { tracing::info!("SIGINT received; shutting down"); None }
        Some((task, how)) = deaths.recv() => Some(format!("the {task} task {how}")),
    };
    if let Some(why) = &failed {
        tracing::error!(why = %why, "a task of the agent ended; stopping (Kubernetes restarts the agent)");
    }
    shutdown.cancel();
    tasks.close();
    let drained = tokio::time::timeout(args.shutdown_grace, async {
        let _ = advertising.await;
        let _ = server.await;
        // Last: in-flight responses may still look up and resume at peers.
        router_shutdown.cancel();
        tasks.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?args.shutdown_grace, "shutdown grace period over; closing remaining connections");
    }
    tracing::info!("mirrorlet agent stopped");
    if let Some(why) = failed {
        anyhow::bail!("{why}");
    }
    Ok(())
}

/// Waits for `task`, one of the agent's tasks that must run until `shutdown`; if it ends
/// (returns or panics) before that, tells `died` its name and how it ended.
async fn guard(
    name: &'static str,
    task: tokio::task::JoinHandle<()>,
    shutdown: CancellationToken,
    died: tokio::sync::mpsc::Sender<(&'static str, String)>,
) {
    let how = ended_how(task.await);
    if !shutdown.is_cancelled() {
        let _ = died.send((name, how)).await;
    }
}

/// How a task ended, in words.
fn ended_how(r: Result<(), tokio::task::JoinError>) -> String {
    match r {
        Ok(()) => "returned".to_owned(),
        Err(e) if e.is_panic() => {
            let payload = e.into_panic();
            let what = payload
                .downcast_ref::<&str>()
                .map(ToString::to_string)
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            format!("panicked: {what}")
        }
        Err(e) => format!("was cancelled: {e}"),
    }
}

/// Binds a listener. `[::]` (every address, IPv6 and IPv4 alike on Linux) falls back to
/// `0.0.0.0` on a node without IPv6, so one setting serves every kind of cluster.
async fn bind(addr: SocketAddr, flag: &str) -> anyhow::Result<TcpListener> {
    let result = if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) {
        bind_dual_stack(addr)
    } else {
        TcpListener::bind(addr).await
    };
    match result {
        Ok(l) => Ok(l),
        Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
            tracing::warn!(%addr, error = %e, fallback = %v4, "no IPv6 here; listening on IPv4 only");
            TcpListener::bind(v4)
                .await
                .with_context(|| format!("{flag} {v4}: cannot listen on this address"))
        }
        Err(e) => Err(e).with_context(|| format!("{flag} {addr}: cannot listen on this address")),
    }
}

/// `[::]` taking IPv4 too (as IPv4-mapped addresses), whatever the node's
/// `net.ipv6.bindv6only`.
fn bind_dual_stack(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(false)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// The upstream client's configuration from the flags, checked for consistency.
pub(crate) fn upstream_config(
    args: &UpstreamArgs,
) -> anyhow::Result<mirrorlet_upstream::UpstreamConfig> {
    let registries: Vec<_> = args
        .upstream_registries
        .iter()
        .filter_map(|r| r.0.clone())
        .collect();
    let mut config = mirrorlet_upstream::UpstreamConfig {
        registries: registries.clone(),
        connect_timeout: args.upstream_connect_timeout,
        response_timeout: args.upstream_response_timeout,
        read_timeout: args.upstream_read_timeout,
        ..Default::default()
    };
    for (registry, url) in args.upstream_endpoint.iter().filter_map(|e| e.0.clone()) {
        anyhow::ensure!(
            registries.contains(&registry),
            "--upstream-endpoint {registry}={url}: {registry} is not in --upstream-registries"
        );
        config.endpoints.insert(registry, url);
    }
    if let Some(path) = &args.upstream_credentials.0 {
        let credentials = mirrorlet_upstream::Credentials::load(path)
            .with_context(|| format!("--upstream-credentials {}", path.display()))?;
        for r in credentials.registries() {
            if !registries.contains(r) {
                tracing::warn!(registry = %r, "--upstream-credentials has credentials for a registry not in --upstream-registries; they are not used");
            }
        }
        config.credentials = credentials;
    }
    Ok(config)
}

fn tag_excludes(p2p: &P2pArgs) -> Vec<Glob> {
    p2p.peer_tag_exclude
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| Glob::new(s))
        .collect()
}

fn p2p_config(p2p: &P2pArgs, http_port: u16) -> anyhow::Result<P2pConfig> {
    anyhow::ensure!(
        p2p.republish_interval < p2p.provider_ttl,
        "--republish-interval {:?} must be shorter than --provider-ttl {:?}",
        p2p.republish_interval,
        p2p.provider_ttl
    );
    let keypair = identity::load_or_create(&p2p.data_dir)
        .with_context(|| format!("--data-dir {}", p2p.data_dir.display()))?;
    let psk = match &p2p.psk_file.0 {
        None => None,
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--psk-file {}: cannot read", path.display()))?;
            Some(
                identity::parse_psk(&text)
                    .with_context(|| format!("--psk-file {}", path.display()))?,
            )
        }
    };
    let mut config = P2pConfig::new(p2p.p2p_listen, http_port, keypair);
    config.psk = psk;
    config.bootstrap = p2p.bootstrap.iter().filter_map(|b| b.0.clone()).collect();
    config.bootstrap_dns = p2p.bootstrap_dns.0.as_ref().map(|h| (h.0.clone(), h.1));
    config.provider_ttl = p2p.provider_ttl;
    config.republish = p2p.republish_interval;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_or_returns_before_shutdown_is_reported_by_name() {
        let shutdown = CancellationToken::new();
        let (died, mut deaths) = tokio::sync::mpsc::channel(4);
        let panics = tokio::spawn(async { panic!("store gone") });
        guard("advertiser", panics, shutdown.clone(), died.clone()).await;
        let (name, how) = deaths.recv().await.expect("reported");
        assert_eq!(name, "advertiser");
        assert_eq!(how, "panicked: store gone");

        guard(
            "p2p router",
            tokio::spawn(async {}),
            shutdown.clone(),
            died.clone(),
        )
        .await;
        assert_eq!(
            deaths.recv().await.expect("reported"),
            ("p2p router", "returned".to_owned())
        );

        // Ending at shutdown is what it should do.
        shutdown.cancel();
        guard("p2p router", tokio::spawn(async {}), shutdown, died).await;
        assert!(deaths.recv().await.is_none(), "nothing reported");
    }
}

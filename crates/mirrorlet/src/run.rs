//! `mirrorlet run`: assembles the agent. Binds the listener first (so a bad address fails
//! at once), starts the tasks, waits for a signal or a failed task, then drains.

use std::sync::Arc;

use anyhow::Context as _;
use futures_util::FutureExt;
use mirrorlet_containerd::{Config as ContainerdConfig, ContainerdStore};
use mirrorlet_oci::Store;
use mirrorlet_registry::server::{self, Limits};
use mirrorlet_registry::{AppState, Metrics};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cli::RunArgs;
use crate::inventory::{self, InventoryMetrics};

/// Runs the agent until SIGTERM or SIGINT.
pub(crate) async fn run(args: RunArgs) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("--listen {}: cannot listen on this address", args.listen))?;
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
    let store: Arc<dyn Store> = Arc::new(ContainerdStore::new(ContainerdConfig {
        socket: args.containerd_socket.clone(),
        namespace: args.containerd_namespace.clone(),
        content_dir: content_dir.clone(),
        media_type_cache: args.media_type_cache,
    }));

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Metrics::register(&mut registry);
    let inventory_metrics = InventoryMetrics::register(&mut registry);
    let ready_store = store.clone();
    let state = Arc::new(AppState {
        store: store.clone(),
        metrics,
        metrics_registry: Arc::new(registry),
        ready: Arc::new(move || {
            let store = ready_store.clone();
            async move { store.ping().await.map_err(|e| e.to_string()) }.boxed()
        }),
    });

    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn(inventory::run(
        store.clone(),
        inventory_metrics,
        shutdown.clone(),
    ));
    let limits = Limits {
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        header_read_timeout: args.header_read_timeout,
    };
    let mut server = tokio::spawn(server::serve(
        listener,
        mirrorlet_registry::app(state),
        limits,
        shutdown.clone(),
    ));
    tracing::info!(
        listen = %args.listen,
        containerd = %args.containerd_socket.display(),
        namespace = %args.containerd_namespace,
        content_dir = ?content_dir,
        version = env!("CARGO_PKG_VERSION"),
        "mirrorlet agent started"
    );

    let server_failed = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM received; shutting down"); false }
        _ = int.recv() => { tracing::info!("SIGINT received; shutting down"); false }
        r = &mut server => { tracing::error!(result = ?r, "HTTP server stopped unexpectedly"); true }
    };
    shutdown.cancel();
    tasks.close();
    let drained = tokio::time::timeout(args.shutdown_grace, async {
        if !server_failed {
            let _ = (&mut server).await;
        }
        tasks.wait().await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(grace = ?args.shutdown_grace, "shutdown grace period over; closing remaining connections");
    }
    tracing::info!("mirrorlet agent stopped");
    if server_failed {
        anyhow::bail!("the HTTP server stopped unexpectedly");
    }
    Ok(())
}

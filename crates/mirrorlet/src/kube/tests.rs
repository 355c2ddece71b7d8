//! `wait_daemonset` against a local HTTP server answering as the Kubernetes API does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::get;
use serde_json::json;

use super::*;

/// Serves one DaemonSet whose ready count rises by one per GET up to `nodes` (or stays at
/// `stuck_at`), and its pods. Every request must carry the token.
struct FakeApi {
    gets: AtomicU64,
    nodes: u64,
    stuck_at: Option<u64>,
}

fn authorized(headers: &HeaderMap) -> bool {
    headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer secret-token")
}

async fn daemonset(State(api): State<Arc<FakeApi>>, headers: HeaderMap) -> (StatusCode, String) {
    if !authorized(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            json!({"message": "Unauthorized"}).to_string(),
        );
    }
    let n = api.gets.fetch_add(1, Ordering::SeqCst);
    // The first answer is from before the controller saw the object.
    let observed = if n == 0 { json!(null) } else { json!(1) };
    let ready = n.min(api.stuck_at.unwrap_or(api.nodes));
    (
        StatusCode::OK,
        json!({
            "metadata": {"name": "m-cleanup", "generation": 1},
            "spec": {"selector": {"matchLabels": {"app.kubernetes.io/name": "m-cleanup"}}},
            "status": {
                "observedGeneration": observed,
                "desiredNumberScheduled": api.nodes,
                "numberReady": ready,
                "updatedNumberScheduled": api.nodes,
            }
        })
        .to_string(),
    )
}

async fn pods(
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> (StatusCode, String) {
    if !authorized(&headers)
        || q.get("labelSelector").map(String::as_str) != Some("app.kubernetes.io/name=m-cleanup")
    {
        return (
            StatusCode::BAD_REQUEST,
            json!({"message": "bad request"}).to_string(),
        );
    }
    let ready = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
    let pulling = json!({
        "phase": "Pending",
        "conditions": [{"type": "Ready", "status": "False"}],
        "initContainerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}],
    });
    (
        StatusCode::OK,
        json!({"items": [
            {"spec": {"nodeName": "node-a"}, "status": ready},
            {"spec": {"nodeName": "node-c"}, "status": pulling},
            {"spec": {"nodeName": "node-b"}, "status": {"phase": "Pending"}},
        ]})
        .to_string(),
    )
}

async fn serve(api: Arc<FakeApi>) -> (String, tempfile::TempDir) {
    let app = Router::new()
        .route(
            "/apis/apps/v1/namespaces/kube-system/daemonsets/m-cleanup",
            get(daemonset),
        )
        .route("/api/v1/namespaces/kube-system/pods", get(pods))
        .with_state(api);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("token"), "secret-token\n").expect("token");
    std::fs::write(dir.path().join("namespace"), "kube-system").expect("namespace");
    (format!("http://{addr}"), dir)
}

fn client(server: &str, dir: &tempfile::TempDir) -> (Api, ApiConfig) {
    let config = ApiConfig {
        server: server.to_owned(),
        service_account_dir: dir.path().to_owned(),
    };
    (Api::new(&config).expect("client"), config)
}

#[tokio::test]
async fn waits_until_every_node_is_ready() {
    let fake = Arc::new(FakeApi {
        gets: AtomicU64::new(0),
        nodes: 3,
        stuck_at: None,
    });
    let (server, dir) = serve(fake.clone()).await;
    let (api, config) = client(&server, &dir);
    assert_eq!(config.own_namespace().expect("namespace"), "kube-system");
    wait_daemonset(
        &api,
        "kube-system",
        "m-cleanup",
        Duration::from_secs(10),
        Duration::from_millis(10),
    )
    .await
    .expect("done");
    // Not before the controller had seen it and three nodes were ready.
    assert_eq!(fake.gets.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_timeout_names_the_nodes_not_done() {
    let fake = Arc::new(FakeApi {
        gets: AtomicU64::new(0),
        nodes: 3,
        stuck_at: Some(1),
    });
    let (server, dir) = serve(fake).await;
    let (api, _) = client(&server, &dir);
    let err = wait_daemonset(
        &api,
        "kube-system",
        "m-cleanup",
        Duration::from_millis(200),
        Duration::from_millis(10),
    )
    .await
    .expect_err("times out");
    let text = format!("{err:#}");
    assert!(text.contains("1 of 3 nodes done"), "{text}");
    assert!(
        text.contains(
            "node-b (Pending), node-c (Pending: ImagePullBackOff, Back-off pulling image)"
        ),
        "{text}"
    );
    assert!(!text.contains("node-a"), "{text}");
}

#[tokio::test]
async fn api_refusals_are_reported() {
    let fake = Arc::new(FakeApi {
        gets: AtomicU64::new(0),
        nodes: 1,
        stuck_at: None,
    });
    let (server, dir) = serve(fake).await;
    std::fs::write(dir.path().join("token"), "wrong").expect("token");
    let (api, _) = client(&server, &dir);
    let err = wait_daemonset(
        &api,
        "kube-system",
        "m-cleanup",
        Duration::from_millis(100),
        Duration::from_millis(10),
    )
    .await
    .expect_err("refused");
    let text = format!("{err:#}");
    assert!(text.contains("401 Unauthorized: Unauthorized"), "{text}");
    // A missing DaemonSet is an error that names it.
    let err = wait_daemonset(
        &api,
        "kube-system",
        "other",
        Duration::from_millis(50),
        Duration::from_millis(10),
    )
    .await
    .expect_err("missing");
    assert!(
        format!("{err:#}").contains("daemonset kube-system/other"),
        "{err:#}"
    );
}

#[test]
fn https_needs_the_cluster_ca() {
    let dir = tempfile::tempdir().expect("dir");
    let config = ApiConfig {
        server: "https://10.96.0.1:443".into(),
        service_account_dir: dir.path().to_owned(),
    };
    let err = Api::new(&config).err().expect("no CA");
    assert!(format!("{err:#}").contains("ca.crt"), "{err:#}");
    std::fs::write(dir.path().join("ca.crt"), "not pem").expect("write");
    let err = Api::new(&config).err().expect("bad CA");
    assert!(
        format!("{err:#}").contains("not a PEM certificate"),
        "{err:#}"
    );
}

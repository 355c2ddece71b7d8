//! The scale harness's upstream registry: an OCI pull API on loopback serving generated
//! blobs from memory, counting the requests for each. The agents reach it through the real
//! upstream client (`mirrorlet-upstream`), as they would reach Docker Hub.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use mirrorlet_oci::Digest;
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Inner {
    blobs: HashMap<String, Bytes>,
    gets: HashMap<String, usize>,
}

/// The registry, serving until dropped.
pub struct Origin {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    shutdown: CancellationToken,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Origin {
    /// Serves `blobs` (under any repository) on 127.0.0.1.
    pub async fn start(blobs: impl IntoIterator<Item = Bytes>) -> Result<Self> {
        let mut inner = Inner::default();
        for b in blobs {
            inner.blobs.insert(Digest::sha256_of(&b).to_string(), b);
        }
        let inner = Arc::new(Mutex::new(inner));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the upstream")?;
        let addr = listener.local_addr()?;
        let app = axum::Router::new()
            .fallback(serve)
            .with_state(inner.clone());
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
        });
        Ok(Self {
            addr,
            inner,
            shutdown,
        })
    }

    /// Its base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// GETs of blob `digest` so far.
    pub fn gets(&self, digest: &str) -> usize {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.gets.get(digest).copied().unwrap_or(0)
    }
}

async fn serve(State(inner): State<Arc<Mutex<Inner>>>, req: Request) -> Response {
    let path = req.uri().path();
    if path == "/v2/" || path == "/v2" {
        return ([(header::CONTENT_TYPE, "application/json")], "{}").into_response();
    }
    let digest = path
        .strip_prefix("/v2/")
        .and_then(|rest| rest.rsplit_once("/blobs/"))
        .map(|(_, d)| d.to_owned());
    let head = req.method() == Method::HEAD;
    let found = digest.and_then(|d| {
        let mut inner = inner.lock().unwrap_or_else(PoisonError::into_inner);
        let body = inner.blobs.get(&d).cloned()?;
        if !head {
            *inner.gets.entry(d.clone()).or_default() += 1;
        }
        Some((d, body))
    });
    let Some((digest, body)) = found else {
        let error = r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown"}]}"#;
        return (StatusCode::NOT_FOUND, error).into_response();
    };
    let len = body.len();
    let body = if head {
        Body::empty()
    } else {
        Body::from(body)
    };
    Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .header("docker-content-digest", digest)
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

//! Operational endpoints: `/livez`, `/readyz`, `/metrics`, and the middleware that counts
//! and logs every registry request.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{StatusCode, header};

use crate::metrics::{DurationLabels, RequestLabels, Source};
use crate::mirror::Served;
use crate::state::AppState;

/// `/livez`: 200 while the liveness check passes (the process serves HTTP and, in the
/// agent, has reached containerd recently), else 503 with the reason.
pub async fn livez(State(state): State<Arc<AppState>>) -> Response {
    match (state.live)().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not live: {why}\n"),
        )
            .into_response(),
    }
}

/// `/readyz`: 200 when the readiness check passes, else 503 with the reason.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    match (state.ready)().await {
        Ok(()) => (StatusCode::OK, "ready\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// `/metrics` in the OpenMetrics text format (which Prometheus scrapes natively).
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &state.metrics_registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}\n"),
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// Counts, times and logs each `/v2` request once its response head is ready.
pub async fn track(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = match *req.method() {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        _ => "other",
    };
    let path = req.uri().path().to_owned();
    let requester = if req.headers().contains_key(crate::peers::PEER_HEADER) {
        "peer"
    } else {
        "containerd"
    };
    let ns = req.uri().query().map(ToOwned::to_owned);
    let resp = next.run(req).await;
    let served = resp
        .extensions()
        .get::<Served>()
        .copied()
        .unwrap_or(Served {
            source: Source::None,
            route: "other",
        });
    let status = resp.status().as_u16();
    let elapsed = started.elapsed();
    let source = served.source.as_str();
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            route: served.route,
            method,
            status,
            source,
            requester,
        })
        .inc();
    state
        .metrics
        .durations
        .get_or_create(&DurationLabels {
            route: served.route,
            source,
        })
        .observe(elapsed.as_secs_f64());
    let length = resp
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    if matches!(served.route, "manifest" | "blob") && method != "other" {
        let registry = ns.as_deref().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "ns")
                .map(|(_, v)| v.into_owned())
        });
        state.recent.record(crate::status::Served {
            at: std::time::SystemTime::now(),
            method,
            path: path.clone(),
            registry,
            status,
            source,
            requester,
            bytes: length.parse().ok(),
            elapsed,
        });
    }
    let query = ns.as_deref().unwrap_or("");
    let ms = elapsed.as_secs_f64() * 1000.0;
    if status >= 500 {
        tracing::warn!(method, %path, query, status, source, requester, length, ms, "request failed");
    } else {
        tracing::info!(method, %path, query, status, source, requester, length, ms, "request");
    }
    resp
}

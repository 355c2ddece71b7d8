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
pub(crate) async fn livez(State(state): State<Arc<AppState>>) -> Response {
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
pub(crate) async fn readyz(State(state): State<Arc<AppState>>) -> Response {
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
pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let in_use = state.stream_budget.in_use() + state.spool_budget.in_use();
    let in_use = i64::try_from(in_use).unwrap_or(i64::MAX);
    state.metrics.stream_memory.set(in_use);
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

/// Counts and times each `/v2` request once its response head is ready, and logs it once
/// its body has been sent (or abandoned), with both times.
pub(crate) async fn track(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = match *req.method() {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        _ => "other",
    };
    let path = req.uri().path().to_owned();
    let requester = crate::metrics::requester(req.headers());
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
        .unwrap_or("-")
        .to_owned();
    if matches!(served.route, "manifest" | "blob") && method != "other" {
        let registry = ns.as_deref().and_then(|q| {
            form_urlencoded::parse(q.as_bytes())
                .find(|(k, _)| k == "ns")
                .map(|(_, v)| v.into_owned())
        });
        state.recent.record(crate::recent::Served {
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
    let (parts, body) = resp.into_parts();
    // A HEAD answer's body is never sent, and an empty one has nothing to wait for.
    let nothing = method == "HEAD" || hyper::body::Body::size_hint(&body).exact() == Some(0);
    let declared = length.parse().ok();
    let line = Line {
        method,
        path,
        query: ns.unwrap_or_default(),
        status,
        source,
        requester,
        length,
        started,
        head_ms: elapsed.as_secs_f64() * 1000.0,
        declared,
        sent: 0,
        ended: nothing,
    };
    let body = axum::body::Body::new(Logged { inner: body, line });
    Response::from_parts(parts, body)
}

/// The log line of one request, written when its body has been sent or abandoned.
struct Line {
    method: &'static str,
    path: String,
    query: String,
    status: u16,
    source: &'static str,
    requester: &'static str,
    length: String,
    started: Instant,
    /// Time to the response head.
    head_ms: f64,
    /// The body's Content-Length, if it has one.
    declared: Option<u64>,
    /// Body bytes handed to the connection.
    sent: u64,
    /// Whether the body was sent to its end (not cut: the client went away, or the
    /// stream failed).
    ended: bool,
}

impl Drop for Line {
    fn drop(&mut self) {
        let Self {
            method,
            ref path,
            ref query,
            status,
            source,
            requester,
            ref length,
            head_ms: ms,
            sent,
            ended,
            ..
        } = *self;
        let total_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        if status >= 500 || !ended {
            tracing::warn!(method, %path, %query, status, source, requester, %length, sent, ms, total_ms, ended, "request failed");
        } else {
            tracing::info!(method, %path, %query, status, source, requester, %length, sent, ms, total_ms, "request");
        }
    }
}

/// A response body that counts what it hands out and logs the request when it is done;
/// its size and end are the inner body's, so hyper frames it as it would the original.
struct Logged<B> {
    inner: B,
    line: Line,
}

impl<B> hyper::body::Body for Logged<B>
where
    B: hyper::body::Body<Data = bytes::Bytes> + Unpin,
{
    type Data = bytes::Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let item = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        let line = &mut self.line;
        match &item {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    line.sent += data.len() as u64;
                    // hyper stops polling once it has written the Content-Length.
                    line.ended |= line.declared == Some(line.sent);
                }
            }
            std::task::Poll::Ready(None) => line.ended = true,
            _ => {}
        }
        item
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

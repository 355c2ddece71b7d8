//! A Docker-Hub-like front for the end-to-end tests, in front of the Distribution
//! registry: bearer tokens from its own token endpoint, `ratelimit-*` headers, a budget of
//! manifest GETs after which it answers 429 with `Retry-After` (HEADs are free, as on
//! Docker Hub), and blobs answered with a 307 to a second host (the "CDN", another
//! address) that serves them without auth and records any `Authorization` it is sent.
//! An admin endpoint flips one byte of a blob's next download (a corrupt CDN), and
//! reports counts as JSON.
//!
//! Usage: hub-front <front ip:port> <cdn ip:port> <upstream url> <manifest budget|none>

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

#[derive(Default)]
struct Counts {
    tokens: u64,
    manifest_gets: u64,
    manifest_heads: u64,
    rejected: u64,
    unauthorized: u64,
    blob_redirects: u64,
    cdn_gets: u64,
    cdn_with_auth: u64,
}

struct Front {
    front: SocketAddr,
    cdn: SocketAddr,
    upstream: String,
    budget: Option<u64>,
    http: reqwest::Client,
    counts: Mutex<Counts>,
    tokens: Mutex<HashSet<String>>,
    corrupt: Mutex<HashSet<String>>,
}

type Shared = Arc<Front>;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 5,
        "usage: hub-front <front ip:port> <cdn ip:port> <upstream url> <manifest budget|none>"
    );
    let front: SocketAddr = args[1].parse().context("front address")?;
    let cdn: SocketAddr = args[2].parse().context("cdn address")?;
    let budget = match args[4].as_str() {
        "none" => None,
        n => Some(n.parse().context("budget")?),
    };
    let state = Arc::new(Front {
        front,
        cdn,
        upstream: args[3].trim_end_matches('/').to_owned(),
        budget,
        http: reqwest::Client::builder().no_proxy().build()?,
        counts: Mutex::default(),
        tokens: Mutex::default(),
        corrupt: Mutex::default(),
    });
    let f = tokio::net::TcpListener::bind(front).await?;
    let c = tokio::net::TcpListener::bind(cdn).await?;
    let front_app = axum::Router::new()
        .fallback(serve_front)
        .with_state(state.clone());
    let cdn_app = axum::Router::new().fallback(serve_cdn).with_state(state);
    println!("hub-front: serving on {front}, cdn on {cdn}");
    tokio::select! {
        r = axum::serve(f, front_app) => r?,
        r = axum::serve(c, cdn_app) => r?,
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn budget_headers(h: &mut HeaderMap, st: &Front) {
    if let Some(b) = st.budget {
        let used = lock(&st.counts).manifest_gets;
        let pairs = [
            ("ratelimit-limit", format!("{b};w=21600")),
            (
                "ratelimit-remaining",
                format!("{};w=21600", b.saturating_sub(used)),
            ),
        ];
        for (k, v) in pairs {
            if let Ok(v) = HeaderValue::from_str(&v) {
                h.insert(k, v);
            }
        }
    }
}

async fn serve_front(State(st): State<Shared>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    if path == "/token" {
        let token = format!("t-{}", rand_token());
        lock(&st.tokens).insert(token.clone());
        lock(&st.counts).tokens += 1;
        let body = serde_json::json!({"token": token, "expires_in": 300}).to_string();
        return ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    }
    if path == "/admin/stats" {
        let c = lock(&st.counts);
        let body = serde_json::json!({
            "tokens": c.tokens,
            "manifest_gets": c.manifest_gets,
            "manifest_heads": c.manifest_heads,
            "rejected": c.rejected,
            "unauthorized": c.unauthorized,
            "blob_redirects": c.blob_redirects,
            "cdn_gets": c.cdn_gets,
            "cdn_with_auth": c.cdn_with_auth,
        });
        return (
            [(header::CONTENT_TYPE, "application/json")],
            body.to_string(),
        )
            .into_response();
    }
    if let Some(digest) = path.strip_prefix("/admin/corrupt/") {
        lock(&st.corrupt).insert(digest.to_owned());
        return StatusCode::NO_CONTENT.into_response();
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut parts = rest.rsplitn(3, '/');
    let (reference, kind, repo) = (parts.next(), parts.next(), parts.next());
    let authorized = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| lock(&st.tokens).contains(t));
    if !authorized {
        lock(&st.counts).unauthorized += 1;
        let challenge = format!(
            r#"Bearer realm="http://{}/token",service="hub-front",scope="repository:{}:pull""#,
            st.front,
            repo.unwrap_or_default()
        );
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
            "",
        )
            .into_response();
    }
    match (kind, repo, reference) {
        (Some("manifests"), Some(_), Some(_)) if req.method() == Method::HEAD => {
            lock(&st.counts).manifest_heads += 1;
            let mut resp = proxy(&st, Method::HEAD, &path, req.headers()).await;
            budget_headers(resp.headers_mut(), &st);
            resp
        }
        (Some("manifests"), Some(_), Some(_)) => {
            let over = {
                let mut c = lock(&st.counts);
                if st.budget.is_some_and(|b| c.manifest_gets >= b) {
                    c.rejected += 1;
                    true
                } else {
                    c.manifest_gets += 1;
                    false
                }
            };
            if over {
                let mut resp = (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, "60")],
                    r#"{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit."}]}"#,
                )
                    .into_response();
                budget_headers(resp.headers_mut(), &st);
                return resp;
            }
            let mut resp = proxy(&st, Method::GET, &path, req.headers()).await;
            budget_headers(resp.headers_mut(), &st);
            resp
        }
        (Some("blobs"), Some(repo), Some(digest)) => {
            lock(&st.counts).blob_redirects += 1;
            let to = format!("http://{}/cdn/{repo}/blobs/{digest}?sig=signed", st.cdn);
            (StatusCode::TEMPORARY_REDIRECT, [(header::LOCATION, to)], "").into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn serve_cdn(State(st): State<Shared>, req: Request) -> Response {
    {
        let mut c = lock(&st.counts);
        c.cdn_gets += 1;
        if req.headers().contains_key(header::AUTHORIZATION) {
            c.cdn_with_auth += 1;
        }
    }
    let Some(rest) = req.uri().path().strip_prefix("/cdn/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let digest = rest.rsplit('/').next().unwrap_or_default().to_owned();
    let corrupt = lock(&st.corrupt).remove(&digest);
    let resp = proxy(&st, Method::GET, &format!("/v2/{rest}"), req.headers()).await;
    if !corrupt || !resp.status().is_success() {
        return resp;
    }
    // Flip the byte in the middle of the blob (wherever this answer's range starts).
    let h = resp.headers();
    let len = |name| {
        h.get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
            .map(str::to_owned)
    };
    let (start, total) = match len(header::CONTENT_RANGE) {
        Some(r) => {
            let r = r.trim_start_matches("bytes ");
            let start = r
                .split('-')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
            let total = r
                .rsplit('/')
                .next()
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0);
            (start, total)
        }
        None => (
            0,
            len(header::CONTENT_LENGTH)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        ),
    };
    let target = total / 2;
    let (parts, body) = resp.into_parts();
    let mut pos = start;
    let stream = body.into_data_stream().map(move |chunk| {
        chunk.map(|c| {
            let (from, to) = (pos, pos + c.len() as u64);
            pos = to;
            if (from..to).contains(&target) {
                let mut v = c.to_vec();
                v[usize::try_from(target - from).unwrap_or(0)] ^= 0xff;
                bytes::Bytes::from(v)
            } else {
                c
            }
        })
    });
    eprintln!("hub-front: served {digest} with one byte flipped");
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Forwards to the upstream registry, streaming the answer back.
async fn proxy(st: &Front, method: Method, path: &str, headers: &HeaderMap) -> Response {
    let mut req = st.http.request(method, format!("{}{path}", st.upstream));
    for h in [header::ACCEPT, header::RANGE] {
        if let Some(v) = headers.get(&h) {
            req = req.header(h, v);
        }
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    };
    let mut out = Response::builder().status(resp.status());
    for (k, v) in resp.headers() {
        if [
            header::CONTENT_TYPE,
            header::CONTENT_LENGTH,
            header::CONTENT_RANGE,
            header::ETAG,
        ]
        .contains(k)
            || k.as_str() == "docker-content-digest"
        {
            out = out.header(k, v);
        }
    }
    out.body(Body::from_stream(resp.bytes_stream()))
        .unwrap_or_else(|e| (StatusCode::BAD_GATEWAY, e.to_string()).into_response())
}

fn rand_token() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

//! A scripted upstream registry for the client's tests: an OCI pull API on 127.0.0.1 with
//! switchable auth (none, bearer tokens, Basic), a "CDN" on 127.0.0.2 that blobs can be
//! redirected to, a budget of manifest GETs after which it answers 429, and faults (a
//! stalled body, a lying Content-Length, a huge manifest). Every request is logged.

#![allow(dead_code, unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use mirrorlet_oci::manifest;

/// How the registry wants to be authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// Anyone may pull.
    None,
    /// Bearer tokens from `/token`; with a login, the token service wants it.
    Bearer {
        login: Option<(String, String)>,
        expires_in: u64,
    },
    /// Basic credentials on every request.
    Basic(String, String),
}

/// The switches.
#[derive(Debug, Clone)]
pub struct Script {
    pub auth: AuthMode,
    /// Blob GETs are answered with a 307 to the CDN.
    pub redirect_blobs: bool,
    /// Manifest GETs allowed before every further one gets a 429.
    pub manifest_budget: Option<usize>,
    /// `Retry-After` sent with 429s.
    pub retry_after: Option<String>,
    /// Blob bodies stop (and hang) after this many bytes.
    pub stall_after: Option<usize>,
    /// Blob bodies announce this many bytes more than they send, then end.
    pub short_by: Option<u64>,
    /// Whether HEAD of a manifest is refused with 405.
    pub no_head: bool,
    /// The CDN answers 401 with a challenge naming a token service of its own.
    pub cdn_challenges: bool,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            auth: AuthMode::None,
            redirect_blobs: false,
            manifest_budget: None,
            retry_after: None,
            stall_after: None,
            short_by: None,
            no_head: false,
            cdn_challenges: false,
        }
    }
}

/// A logged request.
#[derive(Debug, Clone)]
pub struct Logged {
    /// `registry`, `cdn` or `token`.
    pub host: &'static str,
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub status: u16,
}

#[derive(Default)]
struct Repo {
    tags: HashMap<String, String>,
    content: HashMap<String, (String, Bytes)>,
}

pub struct Inner {
    pub script: Mutex<Script>,
    pub log: Mutex<Vec<Logged>>,
    repos: Mutex<HashMap<String, Repo>>,
    tokens: Mutex<HashMap<String, Instant>>,
    manifest_gets: Mutex<usize>,
    cdn: Mutex<Option<SocketAddr>>,
    addr: Mutex<Option<SocketAddr>>,
}

/// A running scripted registry.
pub struct Scripted {
    /// The registry's address.
    pub addr: SocketAddr,
    /// The CDN's address (another host).
    pub cdn: SocketAddr,
    pub inner: Arc<Inner>,
}

impl Scripted {
    pub async fn start() -> Self {
        let inner = Arc::new(Inner {
            script: Mutex::new(Script::default()),
            log: Mutex::new(Vec::new()),
            repos: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
            manifest_gets: Mutex::new(0),
            cdn: Mutex::new(None),
            addr: Mutex::new(None),
        });
        let reg = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let cdn = tokio::net::TcpListener::bind("127.0.0.2:0")
            .await
            .expect("bind cdn");
        let (addr, cdn_addr) = (
            reg.local_addr().expect("addr"),
            cdn.local_addr().expect("addr"),
        );
        *inner.cdn.lock().expect("lock") = Some(cdn_addr);
        *inner.addr.lock().expect("lock") = Some(addr);
        let app = axum::Router::new()
            .fallback(registry)
            .with_state(inner.clone());
        tokio::spawn(async move { axum::serve(reg, app).await });
        let app = axum::Router::new()
            .fallback(cdn_serve)
            .with_state(inner.clone());
        tokio::spawn(async move { axum::serve(cdn, app).await });
        Self {
            addr,
            cdn: cdn_addr,
            inner,
        }
    }

    pub fn set(&self, f: impl FnOnce(&mut Script)) {
        f(&mut self.inner.script.lock().expect("lock"));
    }

    /// Stores content in `repo`.
    pub fn put(&self, repo: &str, media_type: &str, data: Bytes) -> String {
        let digest = mirrorlet_oci::Digest::sha256_of(&data).to_string();
        self.inner
            .repos
            .lock()
            .expect("lock")
            .entry(repo.to_owned())
            .or_default()
            .content
            .insert(digest.clone(), (media_type.to_owned(), data));
        digest
    }

    pub fn tag(&self, repo: &str, tag: &str, digest: &str) {
        self.inner
            .repos
            .lock()
            .expect("lock")
            .entry(repo.to_owned())
            .or_default()
            .tags
            .insert(tag.to_owned(), digest.to_owned());
    }

    /// Refuses every token issued so far (as if the registry rotated its keys).
    pub fn revoke_tokens(&self) {
        self.inner.tokens.lock().expect("lock").clear();
    }

    pub fn log(&self) -> Vec<Logged> {
        self.inner.log.lock().expect("lock").clone()
    }

    pub fn count(&self, host: &str, method: &str, path_part: &str) -> usize {
        self.log()
            .iter()
            .filter(|l| l.host == host && l.method == method && l.path.contains(path_part))
            .count()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn record(inner: &Inner, host: &'static str, req: &Request, status: u16) {
    inner.log.lock().expect("lock").push(Logged {
        host,
        method: req.method().to_string(),
        path: req.uri().to_string(),
        authorization: req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        status,
    });
}

fn basic_of(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.strip_prefix("Basic ")?)
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_owned(), p.to_owned()))
}

fn with_budget(mut resp: Response, inner: &Inner, script: &Script) -> Response {
    if let Some(budget) = script.manifest_budget {
        let used = *inner.manifest_gets.lock().expect("lock");
        let h = resp.headers_mut();
        h.insert(
            "ratelimit-limit",
            HeaderValue::from_str(&format!("{budget};w=21600")).expect("value"),
        );
        h.insert(
            "ratelimit-remaining",
            HeaderValue::from_str(&format!("{};w=21600", budget.saturating_sub(used)))
                .expect("value"),
        );
    }
    resp
}

async fn registry(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let script = inner.script.lock().expect("lock").clone();
    let path = req.uri().path().to_owned();
    if path == "/token" {
        return token(&inner, &script, req);
    }
    // Auth.
    let authorized = match &script.auth {
        AuthMode::None => true,
        AuthMode::Basic(u, p) => basic_of(req.headers()) == Some((u.clone(), p.clone())),
        AuthMode::Bearer { .. } => req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| {
                inner
                    .tokens
                    .lock()
                    .expect("lock")
                    .get(t)
                    .is_some_and(|until| Instant::now() < *until)
            }),
    };
    let rest = path.strip_prefix("/v2/").unwrap_or_default();
    let (repo, kind, reference) = {
        let mut it = rest.rsplitn(3, '/');
        let r = it.next().unwrap_or_default().to_owned();
        let k = it.next().unwrap_or_default().to_owned();
        let n = it.next().unwrap_or_default().to_owned();
        (n, k, r)
    };
    if !authorized {
        let challenge = match &script.auth {
            AuthMode::Basic(..) => r#"Basic realm="scripted""#.to_owned(),
            _ => format!(
                r#"Bearer realm="http://{}/token",service="scripted",scope="repository:{repo}:pull""#,
                inner.addr.lock().expect("lock").expect("addr")
            ),
        };
        record(&inner, "registry", &req, 401);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
            "",
        )
            .into_response();
    }
    let found = {
        let repos = inner.repos.lock().expect("lock");
        repos.get(&repo).and_then(|r| {
            let digest = if reference.starts_with("sha256:") {
                reference.clone()
            } else {
                r.tags.get(&reference)?.clone()
            };
            let (media, data) = r.content.get(&digest)?.clone();
            Some((digest, media, data))
        })
    };
    let Some((digest, media, data)) = found else {
        record(&inner, "registry", &req, 404);
        return with_budget(StatusCode::NOT_FOUND.into_response(), &inner, &script);
    };
    let is_head = req.method() == Method::HEAD;
    if kind == "manifests" {
        if is_head && script.no_head {
            record(&inner, "registry", &req, 405);
            return StatusCode::METHOD_NOT_ALLOWED.into_response();
        }
        if !is_head {
            let mut used = inner.manifest_gets.lock().expect("lock");
            if script.manifest_budget.is_some_and(|b| *used >= b) {
                drop(used);
                record(&inner, "registry", &req, 429);
                let mut resp = StatusCode::TOO_MANY_REQUESTS.into_response();
                if let Some(ra) = &script.retry_after {
                    resp.headers_mut().insert(
                        header::RETRY_AFTER,
                        HeaderValue::from_str(ra).expect("value"),
                    );
                }
                return with_budget(resp, &inner, &script);
            }
            *used += 1;
        }
        record(&inner, "registry", &req, 200);
        let resp = Response::builder()
            .header(header::CONTENT_TYPE, media)
            .header("docker-content-digest", &digest)
            .header(header::CONTENT_LENGTH, data.len())
            .body(if is_head {
                Body::empty()
            } else {
                Body::from(data)
            })
            .expect("response");
        return with_budget(resp, &inner, &script);
    }
    if kind != "blobs" {
        record(&inner, "registry", &req, 404);
        return StatusCode::NOT_FOUND.into_response();
    }
    if script.redirect_blobs {
        record(&inner, "registry", &req, 307);
        let cdn = inner.cdn.lock().expect("lock").expect("cdn");
        return (
            StatusCode::TEMPORARY_REDIRECT,
            [(
                header::LOCATION,
                format!("http://{cdn}/cdn/{repo}/{digest}?sig=x"),
            )],
            "",
        )
            .into_response();
    }
    record(&inner, "registry", &req, 200);
    blob_response(&script, req.headers(), data)
}

fn token(inner: &Inner, script: &Script, req: Request) -> Response {
    let AuthMode::Bearer { login, expires_in } = &script.auth else {
        record(inner, "token", &req, 404);
        return StatusCode::NOT_FOUND.into_response();
    };
    if let Some(login) = login
        && basic_of(req.headers()).as_ref() != Some(login)
    {
        record(inner, "token", &req, 401);
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let mut tokens = inner.tokens.lock().expect("lock");
    let t = format!("tok-{}", inner.log.lock().expect("lock").len());
    tokens.insert(t.clone(), Instant::now() + Duration::from_secs(*expires_in));
    record(inner, "token", &req, 200);
    let body = serde_json::json!({"token": t, "expires_in": expires_in}).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn cdn_serve(State(inner): State<Arc<Inner>>, req: Request) -> Response {
    let script = inner.script.lock().expect("lock").clone();
    let mut parts = req.uri().path().rsplitn(2, '/');
    let digest = parts.next().unwrap_or_default().to_owned();
    let data = inner
        .repos
        .lock()
        .expect("lock")
        .values()
        .find_map(|r| r.content.get(&digest).map(|(_, d)| d.clone()));
    let Some(data) = data else {
        record(&inner, "cdn", &req, 404);
        return StatusCode::NOT_FOUND.into_response();
    };
    if script.cdn_challenges {
        record(&inner, "cdn", &req, 401);
        let cdn = inner.cdn.lock().expect("lock").expect("cdn");
        let challenge = format!(r#"Bearer realm="http://{cdn}/steal",service="cdn""#);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, challenge)],
            "",
        )
            .into_response();
    }
    record(&inner, "cdn", &req, 200);
    blob_response(&script, req.headers(), data)
}

/// A blob answer, honouring `Range: bytes=N-` and the faults.
fn blob_response(script: &Script, headers: &HeaderMap, data: Bytes) -> Response {
    let size = data.len();
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<usize>().ok());
    let body = data.slice(start.unwrap_or(0).min(size)..);
    let announced = body.len() as u64 + script.short_by.unwrap_or(0);
    let stall = script.stall_after;
    let stream = futures_util::stream::unfold((body, 0usize), move |(rest, sent)| async move {
        if rest.is_empty() {
            return None;
        }
        if let Some(limit) = stall
            && sent >= limit
        {
            // Hang: never send another byte.
            std::future::pending::<()>().await;
        }
        let n = rest
            .len()
            .min(16 * 1024)
            .min(stall.map_or(usize::MAX, |l| (l - sent).max(1)));
        let chunk = rest.slice(..n);
        Some((Ok::<_, std::io::Error>(chunk), (rest.slice(n..), sent + n)))
    });
    let mut b = Response::builder()
        .header(header::CONTENT_TYPE, manifest::OCTET_STREAM)
        .header(header::CONTENT_LENGTH, announced);
    if let Some(s) = start {
        b = b.status(StatusCode::PARTIAL_CONTENT).header(
            header::CONTENT_RANGE,
            format!("bytes {s}-{}/{size}", size - 1),
        );
    }
    b.body(Body::from_stream(stream)).expect("response")
}

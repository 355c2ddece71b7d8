//! The HTTP client: one request to a registry (auth, redirects, time limits, status
//! mapping), and the three pull calls built on it.

use std::collections::HashSet;
use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use futures_util::stream::{self, BoxStream};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, StatusCode};
use mirrorlet_oci::manifest::{self, Descriptor, Manifest};
use mirrorlet_oci::{
    BlobStream, Digest, Reference, Registry, RegistryState, Repository, Upstream, UpstreamBlob,
    UpstreamError,
};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use reqwest::Url;

use crate::auth::{self, Auth, Challenge, TokenFailure};
use crate::config::UpstreamConfig;
use crate::limits::{self, Limits};
use crate::metrics::{RegistryLabels, UpstreamMetrics};

/// Redirects followed per request at most.
const MAX_REDIRECTS: usize = 5;

/// Why the client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The HTTP client (TLS set-up) could not be built.
    #[error("building the upstream HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

/// What a request is, for metrics and method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Head,
    Manifest,
    Blob,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Self::Head => "head",
            Self::Manifest => "manifest",
            Self::Blob => "blob",
        }
    }

    fn method(self) -> Method {
        match self {
            Self::Head => Method::HEAD,
            Self::Manifest | Self::Blob => Method::GET,
        }
    }
}

/// The upstream client. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    config: UpstreamConfig,
    allowed: HashSet<Registry>,
    auth: Auth,
    limits: Limits,
    metrics: UpstreamMetrics,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("registries", &self.inner.config.registries)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `config`. TLS uses the system's root certificates.
    pub fn new(config: UpstreamConfig, metrics: UpstreamMetrics) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(std::time::Duration::from_secs(90))
            .tcp_nodelay(true)
            .user_agent(concat!("mirrorlet/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError::Build)?;
        for registry in &config.registries {
            metrics.start_at_zero(registry.as_str());
        }
        Ok(Self {
            inner: Arc::new(Inner {
                http,
                allowed: config.registries.iter().cloned().collect(),
                auth: Auth::new(config.credentials.clone()),
                limits: Limits::new(config.default_retry_after),
                config,
                metrics,
            }),
        })
    }

    /// Sends one request to `registry` for `repository`: with the auth it needs (learnt
    /// from a `401`, retried once), following redirects, within the time limits.
    async fn request(
        &self,
        registry: &Registry,
        repository: &Repository,
        kind: Kind,
        path: &str,
        headers: HeaderMap,
    ) -> Result<reqwest::Response, UpstreamError> {
        let me = &self.inner;
        if !me.allowed.contains(registry) {
            return Err(UpstreamError::NotAllowed(registry.clone()));
        }
        me.limits.check(registry)?;
        let base = me.config.endpoint(registry);
        let url = base
            .join(&format!("v2/{repository}/{path}"))
            .map_err(|e| UpstreamError::Invalid(format!("building the URL: {e}")))?;
        let scope = format!("repository:{repository}:pull");
        let mut retried = false;
        loop {
            let authorization = self.authorization(registry, &base, &scope).await?;
            let resp = self
                .send(
                    registry,
                    kind,
                    &base,
                    url.clone(),
                    &headers,
                    authorization.as_ref(),
                )
                .await?;
            let status = resp.status();
            if status.is_success()
                || (kind == Kind::Head && status == StatusCode::METHOD_NOT_ALLOWED)
            {
                return Ok(resp);
            }
            // Only the registry itself says how to authenticate to it: a challenge from a
            // host a redirect led to (a CDN) is never followed with the registry's login.
            let own = resp.url().origin() == base.origin();
            if status == StatusCode::UNAUTHORIZED && !retried && own {
                retried = true;
                let challenge = resp
                    .headers()
                    .get(header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(auth::parse_challenge);
                match challenge {
                    Some(Challenge::Basic) if me.auth.login(registry).is_none() => {
                        return Err(UpstreamError::Denied(format!(
                            "{registry} asks for credentials and none are configured for it"
                        )));
                    }
                    Some(c) => {
                        me.auth.learn(registry, c);
                        me.auth.forget(registry, &scope).await;
                        continue;
                    }
                    None => {}
                }
            }
            return Err(self.status_error(registry, &resp, authorization.is_some()));
        }
    }

    /// The `Authorization` value for a request to `registry`, from what it asked for before.
    async fn authorization(
        &self,
        registry: &Registry,
        base: &Url,
        scope: &str,
    ) -> Result<Option<HeaderValue>, UpstreamError> {
        let me = &self.inner;
        match me.auth.challenge(registry) {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(me
                .auth
                .login(registry)
                .and_then(|l| HeaderValue::from_str(&auth::basic(l)).ok())),
            Some(Challenge::Bearer { realm, service }) => {
                // Credentials go to the token service only over TLS, unless the registry
                // itself is plain HTTP (a test or air-gapped registry).
                let login = me
                    .auth
                    .login(registry)
                    .filter(|_| realm.scheme() == "https" || base.scheme() == "http");
                let value = me
                    .auth
                    .bearer(registry, scope, || async {
                        let got = auth::fetch_token(
                            &me.http,
                            &realm,
                            service.as_deref(),
                            scope,
                            login,
                            me.config.response_timeout,
                        )
                        .await;
                        self.token_result(registry, got, login.is_some())
                    })
                    .await?;
                Ok(Some(value))
            }
        }
    }

    fn token_result(
        &self,
        registry: &Registry,
        got: Result<(String, std::time::Duration), TokenFailure>,
        with_login: bool,
    ) -> Result<(String, std::time::Duration), UpstreamError> {
        let me = &self.inner;
        let name = registry.as_str();
        match got {
            Ok(t) => {
                me.metrics.request(name, "token", Some(200));
                Ok(t)
            }
            Err(TokenFailure::Status(status, retry_after)) => {
                me.metrics.request(name, "token", Some(status.as_u16()));
                Err(match status {
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN if with_login => {
                        UpstreamError::Denied(format!(
                            "the token service of {registry} refused the configured credentials ({status})"
                        ))
                    }
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => UpstreamError::Denied(
                        format!("the token service of {registry} wants credentials ({status})"),
                    ),
                    StatusCode::TOO_MANY_REQUESTS => {
                        me.limits
                            .limited(registry, retry_after.as_deref(), &me.metrics)
                    }
                    s => UpstreamError::Unavailable(format!(
                        "the token service of {registry} answered {s}"
                    )),
                })
            }
            Err(TokenFailure::Other(why)) => {
                me.metrics.request(name, "token", None);
                Err(UpstreamError::Unavailable(why))
            }
        }
    }

    /// Sends the request, following redirects; the `Authorization` header goes only to the
    /// registry's own origin.
    async fn send(
        &self,
        registry: &Registry,
        kind: Kind,
        base: &Url,
        mut url: Url,
        headers: &HeaderMap,
        authorization: Option<&HeaderValue>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let me = &self.inner;
        let limit = me.config.response_timeout;
        for hop in 0..=MAX_REDIRECTS {
            let own_origin = url.origin() == base.origin();
            let mut req = me
                .http
                .request(kind.method(), url.clone())
                .headers(headers.clone());
            if let (true, Some(a)) = (own_origin, authorization) {
                req = req.header(header::AUTHORIZATION, a.clone());
            }
            let resp = match tokio::time::timeout(limit, req.send()).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    me.metrics.request(registry.as_str(), kind.label(), None);
                    let why = format!("{} {}: {}", kind.method(), shown(&url), error_chain(&e));
                    if own_origin && (e.is_connect() || e.is_timeout()) {
                        me.limits.unreachable(registry, &why);
                    }
                    return Err(UpstreamError::Unavailable(why));
                }
                Err(_) => {
                    me.metrics.request(registry.as_str(), kind.label(), None);
                    let why = format!(
                        "{} {}: no response within {limit:?}",
                        kind.method(),
                        shown(&url)
                    );
                    if own_origin {
                        me.limits.unreachable(registry, &why);
                    }
                    return Err(UpstreamError::Unavailable(why));
                }
            };
            me.metrics.request(
                registry.as_str(),
                kind.label(),
                Some(resp.status().as_u16()),
            );
            if own_origin {
                limits::record_budget(registry, resp.headers(), &me.metrics);
            }
            let location = resp
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .filter(|_| resp.status().is_redirection());
            match location {
                Some(loc) if hop < MAX_REDIRECTS => {
                    url = url
                        .join(loc)
                        .map_err(|e| UpstreamError::Invalid(format!("redirect to {loc:?}: {e}")))?;
                    tracing::debug!(%registry, to = %url.origin().ascii_serialization(), "following a redirect");
                }
                _ => return Ok(resp),
            }
        }
        Err(UpstreamError::Invalid(format!(
            "more than {MAX_REDIRECTS} redirects"
        )))
    }

    /// The error for a non-success answer.
    fn status_error(
        &self,
        registry: &Registry,
        resp: &reqwest::Response,
        authenticated: bool,
    ) -> UpstreamError {
        let status = resp.status();
        let what = format!("{} answered {status}", shown(resp.url()));
        match status {
            StatusCode::NOT_FOUND => UpstreamError::NotFound(what),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                let who = if self.inner.auth.login(registry).is_some() && authenticated {
                    format!("{registry} refused the configured credentials")
                } else {
                    format!("{registry} gives no access without credentials")
                };
                UpstreamError::Denied(format!("{what}: {who}"))
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let retry_after = resp
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok());
                self.inner
                    .limits
                    .limited(registry, retry_after, &self.inner.metrics)
            }
            s if s.is_server_error() || s == StatusCode::REQUEST_TIMEOUT => {
                UpstreamError::Unavailable(what)
            }
            _ => UpstreamError::Invalid(what),
        }
    }

    fn accept_headers(accept: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(accept) {
            h.insert(header::ACCEPT, v);
        }
        h
    }

    /// Reads a manifest body (at most [`manifest::MAX_MANIFEST_SIZE`]) and describes it.
    async fn read_manifest(
        &self,
        registry: &Registry,
        resp: reqwest::Response,
    ) -> Result<(Descriptor, Bytes), UpstreamError> {
        let limit = manifest::MAX_MANIFEST_SIZE;
        if content_length(resp.headers()).is_some_and(|n| n > limit) {
            return Err(UpstreamError::Invalid(format!(
                "manifest larger than {limit} bytes"
            )));
        }
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned());
        let counter = self.inner.metrics.bytes_of(registry.as_str());
        let mut body = resp.bytes_stream();
        let mut out = BytesMut::new();
        loop {
            let next = tokio::time::timeout(self.inner.config.read_timeout, body.next()).await;
            match next {
                Ok(Some(Ok(chunk))) => {
                    if (out.len() + chunk.len()) as u64 > limit {
                        return Err(UpstreamError::Invalid(format!(
                            "manifest larger than {limit} bytes"
                        )));
                    }
                    counter.inc_by(chunk.len() as u64);
                    out.extend_from_slice(&chunk);
                }
                Ok(Some(Err(e))) => {
                    return Err(UpstreamError::Unavailable(format!(
                        "reading a manifest: {}",
                        error_chain(&e)
                    )));
                }
                Ok(None) => break,
                Err(_) => {
                    return Err(UpstreamError::Unavailable(
                        "the manifest body stalled".into(),
                    ));
                }
            }
        }
        let bytes = out.freeze();
        let media_type = match content_type {
            Some(t) if manifest::is_manifest_type(&t) => t,
            _ => Manifest::sniff(&bytes)
                .map(|m| m.media_type)
                .ok_or_else(|| UpstreamError::Invalid("the answer is not a manifest".into()))?,
        };
        let desc = Descriptor {
            media_type,
            digest: Digest::sha256_of(&bytes),
            size: bytes.len() as u64,
        };
        Ok((desc, bytes))
    }
}

#[async_trait::async_trait]
impl Upstream for Client {
    fn allows(&self, registry: &Registry) -> bool {
        self.inner.allowed.contains(registry)
    }

    fn states(&self) -> Vec<RegistryState> {
        let me = &self.inner;
        me.config
            .registries
            .iter()
            .map(|registry| {
                let labels = RegistryLabels {
                    registry: registry.to_string(),
                };
                let gauge =
                    |family: &Family<RegistryLabels, Gauge>| family.get(&labels).map(|g| g.get());
                let standing = me.limits.standing(registry);
                RegistryState {
                    registry: registry.clone(),
                    endpoint: me.config.endpoint(registry).to_string(),
                    credentials: me.config.credentials.get(registry).is_some(),
                    remaining: gauge(&me.metrics.ratelimit_remaining),
                    limit: gauge(&me.metrics.ratelimit_limit),
                    rate_limited_for: standing.rate_limited_for,
                    unreachable_for: standing.unreachable_for,
                    last_problem: standing.last_problem,
                }
            })
            .collect()
    }

    async fn head_manifest(
        &self,
        registry: &Registry,
        repository: &Repository,
        reference: &Reference,
        accept: &str,
    ) -> Result<Descriptor, UpstreamError> {
        let path = format!("manifests/{reference}");
        let head = self
            .request(
                registry,
                repository,
                Kind::Head,
                &path,
                Self::accept_headers(accept),
            )
            .await;
        let resp = head?;
        if resp.status() == StatusCode::METHOD_NOT_ALLOWED {
            // A registry that does not implement HEAD for manifests: ask with GET.
            return self
                .get_manifest(registry, repository, reference, accept)
                .await
                .map(|(d, _)| d);
        }
        let h = resp.headers();
        let digest = h
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| Digest::parse(v.trim()).ok());
        let size = content_length(h);
        let media_type = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or(v).trim().to_owned())
            .filter(|t| manifest::is_manifest_type(t));
        let digest = match (digest, reference) {
            (Some(d), Reference::Digest(asked)) if d != *asked => {
                return Err(UpstreamError::Invalid(format!(
                    "asked for {asked}, the registry described {d}"
                )));
            }
            (Some(d), _) => Some(d),
            (None, Reference::Digest(asked)) => Some(asked.clone()),
            (None, Reference::Tag(_)) => None,
        };
        match (digest, size, media_type) {
            (Some(digest), Some(size), Some(media_type)) => Ok(Descriptor {
                media_type,
                digest,
                size,
            }),
            // Not described well enough to trust: read it (this GET counts as a pull).
            _ => self
                .get_manifest(registry, repository, reference, accept)
                .await
                .map(|(d, _)| d),
        }
    }

    async fn get_manifest(
        &self,
        registry: &Registry,
        repository: &Repository,
        reference: &Reference,
        accept: &str,
    ) -> Result<(Descriptor, Bytes), UpstreamError> {
        let path = format!("manifests/{reference}");
        let resp = self
            .request(
                registry,
                repository,
                Kind::Manifest,
                &path,
                Self::accept_headers(accept),
            )
            .await?;
        self.read_manifest(registry, resp).await
    }

    async fn get_blob(
        &self,
        registry: &Registry,
        repository: &Repository,
        digest: &Digest,
        offset: u64,
    ) -> Result<UpstreamBlob, UpstreamError> {
        let mut headers = HeaderMap::new();
        if offset > 0
            && let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-"))
        {
            headers.insert(header::RANGE, v);
        }
        let resp = self
            .request(
                registry,
                repository,
                Kind::Blob,
                &format!("blobs/{digest}"),
                headers,
            )
            .await?;
        let (size, skip) = match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let (start, total) = content_range(resp.headers()).ok_or_else(|| {
                    UpstreamError::Invalid("a partial answer without a usable Content-Range".into())
                })?;
                if start != offset {
                    return Err(UpstreamError::Invalid(format!(
                        "asked for bytes from {offset}, got them from {start}"
                    )));
                }
                (total, 0)
            }
            _ => {
                // The whole blob: the range was ignored, so skip to the offset.
                let total = content_length(resp.headers()).ok_or_else(|| {
                    UpstreamError::Invalid("a blob answer without Content-Length".into())
                })?;
                (total, offset)
            }
        };
        if offset > size || (offset == size && size > 0) {
            return Err(UpstreamError::Invalid(format!(
                "offset {offset} lies outside a blob of {size} bytes"
            )));
        }
        let body = limited_body(
            resp.bytes_stream().boxed(),
            skip,
            size - offset,
            self.inner.config.read_timeout,
            self.inner.metrics.bytes_of(registry.as_str()),
        );
        Ok(UpstreamBlob { size, offset, body })
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `Content-Range: bytes <start>-<end>/<total>` as (start, total).
fn content_range(headers: &HeaderMap) -> Option<(u64, u64)> {
    let v = headers.get(header::CONTENT_RANGE)?.to_str().ok()?;
    let rest = v.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (start, _) = span.split_once('-')?;
    Some((start.trim().parse().ok()?, total.trim().parse().ok()?))
}

/// A URL as logs show it: no query (a CDN's signed URL carries its signature there) and no
/// user information.
fn shown(url: &Url) -> String {
    format!("{}{}", url.origin().ascii_serialization(), url.path())
}

/// An error with its causes, for logs (reqwest's own message says little; its URLs are
/// removed, as they may carry signatures).
fn error_chain(e: &reqwest::Error) -> String {
    let mut out = if e.is_connect() {
        "connecting failed"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() || e.is_decode() {
        "reading the body failed"
    } else if e.is_request() {
        "sending the request failed"
    } else {
        "failed"
    }
    .to_owned();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// A body of exactly `expect` bytes after skipping `skip`: a stall longer than
/// `read_timeout`, an early end or more bytes than announced end it with an error.
fn limited_body(
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    skip: u64,
    expect: u64,
    read_timeout: std::time::Duration,
    counter: prometheus_client::metrics::counter::Counter,
) -> BlobStream {
    struct St {
        body: BoxStream<'static, reqwest::Result<Bytes>>,
        skip: u64,
        left: u64,
        done: bool,
    }
    let st = St {
        body,
        skip,
        left: expect,
        done: false,
    };
    stream::unfold(st, move |mut st| {
        let counter = counter.clone();
        async move {
            loop {
                if st.done || (st.left == 0 && st.skip == 0) {
                    return None;
                }
                match tokio::time::timeout(read_timeout, st.body.next()).await {
                    Err(_) => {
                        let e = io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("the upstream body stalled for {read_timeout:?}"),
                        );
                        st.done = true;
                        return Some((Err(e), st));
                    }
                    Ok(None) => {
                        let e = io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("the upstream body ended {} bytes early", st.left + st.skip),
                        );
                        st.done = true;
                        return Some((Err(e), st));
                    }
                    Ok(Some(Err(e))) => {
                        let e =
                            io::Error::other(format!("reading from upstream: {}", error_chain(&e)));
                        st.done = true;
                        return Some((Err(e), st));
                    }
                    Ok(Some(Ok(mut chunk))) => {
                        counter.inc_by(chunk.len() as u64);
                        if st.skip > 0 {
                            let n = st.skip.min(chunk.len() as u64);
                            st.skip -= n;
                            chunk = chunk.slice(n as usize..);
                        }
                        if chunk.is_empty() {
                            continue;
                        }
                        if chunk.len() as u64 > st.left {
                            let e = io::Error::new(
                                io::ErrorKind::InvalidData,
                                "upstream sent more bytes than the blob has",
                            );
                            st.done = true;
                            return Some((Err(e), st));
                        }
                        st.left -= chunk.len() as u64;
                        return Some((Ok(chunk), st));
                    }
                }
            }
        }
    })
    .boxed()
}

//! Authentication to registries: the challenge in a registry's `401` (`WWW-Authenticate:
//! Bearer realm=..,service=..,scope=..` or `Basic`), bearer tokens from the registry's token
//! service (anonymous, or with the registry's Basic credentials) cached per registry and
//! scope until they expire, and Basic auth for registries that ask for it. A registry's
//! credentials go to that registry and to the token service its own `401` names, never
//! elsewhere.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use base64::Engine as _;
use http::HeaderValue;
use lru::LruCache;
use mirrorlet_oci::{Registry, UpstreamError};
use reqwest::Url;
use serde::Deserialize;

use crate::credentials::{Credentials, Login};

/// Tokens without `expires_in` live this long (the distribution token spec's default).
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A token is renewed this long before it expires, so none expires in flight.
const TOKEN_MARGIN: Duration = Duration::from_secs(5);

/// How a registry asked to be authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    /// Get a token from `realm`.
    Bearer {
        /// The token service.
        realm: Url,
        /// The `service` parameter to pass on.
        service: Option<String>,
    },
    /// Send Basic credentials.
    Basic,
}

/// Reads the first Bearer or Basic challenge from a `WWW-Authenticate` value.
pub(crate) fn parse_challenge(value: &str) -> Option<Challenge> {
    let challenges = http_auth::parse_challenges(value).ok()?;
    challenges.into_iter().find_map(|c| {
        let param = |name: &str| {
            c.params
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_unescaped())
        };
        if c.scheme.eq_ignore_ascii_case("bearer") {
            let realm = Url::parse(&param("realm")?).ok()?;
            matches!(realm.scheme(), "http" | "https").then(|| Challenge::Bearer {
                realm,
                service: param("service"),
            })
        } else if c.scheme.eq_ignore_ascii_case("basic") {
            Some(Challenge::Basic)
        } else {
            None
        }
    })
}

/// The `Authorization` value for Basic credentials.
pub(crate) fn basic(login: &Login) -> String {
    let pair = format!("{}:{}", login.username, login.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

#[derive(Debug, Clone)]
struct Token {
    value: String,
    renew_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
}

/// What the client knows about authenticating to each registry.
#[derive(Debug)]
pub(crate) struct Auth {
    credentials: Credentials,
    /// The challenge each registry answered with last.
    challenges: Mutex<HashMap<Registry, Challenge>>,
    /// Tokens by registry and scope, the most recently used kept (scopes name
    /// repositories, which any client can choose); the inner lock makes concurrent
    /// requests for one scope share one token request.
    tokens: Mutex<LruCache<(Registry, String), TokenSlot>>,
}

/// Scopes whose tokens are kept.
const TOKENS_KEPT: usize = 1024;

impl Default for Auth {
    fn default() -> Self {
        Self {
            credentials: Credentials::default(),
            challenges: Mutex::default(),
            tokens: Mutex::new(LruCache::new(
                std::num::NonZeroUsize::new(TOKENS_KEPT).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
        }
    }
}

/// One scope's token; locked while it is being fetched.
type TokenSlot = Arc<tokio::sync::Mutex<Option<Token>>>;

/// How a token request went, for the caller's metrics and rate-limit bookkeeping.
pub(crate) enum TokenFailure {
    /// The token service answered with this status.
    Status(reqwest::StatusCode, Option<String>),
    /// It could not be reached, or its answer was unusable.
    Other(String),
}

impl Auth {
    pub(crate) fn new(credentials: Credentials) -> Self {
        Self {
            credentials,
            ..Self::default()
        }
    }

    /// The registry's login, if any.
    pub(crate) fn login(&self, registry: &Registry) -> Option<&Login> {
        self.credentials.get(registry)
    }

    /// Remembers how `registry` asks to be authenticated.
    pub(crate) fn learn(&self, registry: &Registry, challenge: Challenge) {
        self.challenges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(registry.clone(), challenge);
    }

    /// The challenge `registry` answered with last, if it ever asked.
    pub(crate) fn challenge(&self, registry: &Registry) -> Option<Challenge> {
        self.challenges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(registry)
            .cloned()
    }

    fn slot(&self, registry: &Registry, scope: &str) -> TokenSlot {
        self.tokens
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert((registry.clone(), scope.to_owned()), TokenSlot::default)
            .clone()
    }

    /// Drops the cached token for `scope` (the registry refused it).
    pub(crate) async fn forget(&self, registry: &Registry, scope: &str) {
        *self.slot(registry, scope).lock().await = None;
    }

    /// The bearer token for `scope` at `registry`: the cached one while it is fresh, else
    /// one fetched now with `fetch` (called once however many ask at the same time).
    pub(crate) async fn bearer<F, Fut>(
        &self,
        registry: &Registry,
        scope: &str,
        fetch: F,
    ) -> Result<HeaderValue, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<(String, Duration), UpstreamError>>,
    {
        let slot = self.slot(registry, scope);
        let mut token = slot.lock().await;
        let fresh = token
            .as_ref()
            .filter(|t| Instant::now() < t.renew_at)
            .map(|t| t.value.clone());
        let value = match fresh {
            Some(v) => v,
            None => {
                let (value, lifetime) = fetch().await?;
                let renew_at = Instant::now() + lifetime.saturating_sub(TOKEN_MARGIN);
                *token = Some(Token {
                    value: value.clone(),
                    renew_at,
                });
                value
            }
        };
        HeaderValue::from_str(&format!("Bearer {value}"))
            .map_err(|_| UpstreamError::Invalid("the token service sent an unusable token".into()))
    }
}

/// Asks `realm` for a pull token for `scope`, with `login` as Basic credentials if given.
pub(crate) async fn fetch_token(
    http: &reqwest::Client,
    realm: &Url,
    service: Option<&str>,
    scope: &str,
    login: Option<&Login>,
    timeout: Duration,
) -> Result<(String, Duration), TokenFailure> {
    let mut url = realm.clone();
    {
        let mut q = url.query_pairs_mut();
        if let Some(s) = service {
            q.append_pair("service", s);
        }
        q.append_pair("scope", scope);
    }
    let mut req = http.get(url);
    if let Some(l) = login {
        req = req.header(http::header::AUTHORIZATION, basic(l));
    }
    let resp = match tokio::time::timeout(timeout, req.send()).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(TokenFailure::Other(format!("token service {realm}: {e}"))),
        Err(_) => {
            return Err(TokenFailure::Other(format!(
                "token service {realm} did not answer within {timeout:?}"
            )));
        }
    };
    let status = resp.status();
    if !status.is_success() {
        let retry_after = resp
            .headers()
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        return Err(TokenFailure::Status(status, retry_after));
    }
    let body = match tokio::time::timeout(timeout, resp.bytes()).await {
        Ok(Ok(b)) if b.len() <= 1 << 20 => b,
        Ok(Ok(_)) => {
            return Err(TokenFailure::Other(
                "token response larger than 1 MiB".into(),
            ));
        }
        Ok(Err(e)) => return Err(TokenFailure::Other(format!("reading the token: {e}"))),
        Err(_) => return Err(TokenFailure::Other("token response stalled".into())),
    };
    let parsed: TokenResponse = serde_json::from_slice(&body)
        .map_err(|e| TokenFailure::Other(format!("token response is not JSON: {e}")))?;
    let value = parsed
        .token
        .or(parsed.access_token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| TokenFailure::Other("token response has no token".into()))?;
    let lifetime = parsed
        .expires_in
        .filter(|s| *s > 0)
        .map_or(DEFAULT_TOKEN_LIFETIME, Duration::from_secs);
    Ok((value, lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let hub = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#;
        assert_eq!(
            parse_challenge(hub),
            Some(Challenge::Bearer {
                realm: Url::parse("https://auth.docker.io/token").expect("url"),
                service: Some("registry.docker.io".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(
            parse_challenge(r#"Negotiate, Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge(r#"Bearer realm="ftp://x""#), None);
        assert_eq!(parse_challenge("garbage ,,, ="), None);
    }

    #[tokio::test]
    async fn tokens_are_cached_per_scope_until_they_expire() {
        tokio::time::pause();
        let auth = Auth::default();
        let hub = Registry::docker_hub();
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let fetch = |life: u64| {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { Ok((format!("t{life}"), Duration::from_secs(life))) }
        };
        let a = auth.bearer(&hub, "repository:a:pull", || fetch(60)).await;
        assert_eq!(a.expect("token"), "Bearer t60");
        auth.bearer(&hub, "repository:a:pull", || fetch(60))
            .await
            .expect("cached");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        auth.bearer(&hub, "repository:b:pull", || fetch(60))
            .await
            .expect("other scope");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
        tokio::time::advance(Duration::from_secs(56)).await;
        auth.bearer(&hub, "repository:a:pull", || fetch(60))
            .await
            .expect("renewed");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
        auth.forget(&hub, "repository:b:pull").await;
        auth.bearer(&hub, "repository:b:pull", || fetch(60))
            .await
            .expect("fetched again");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 4);
    }
}

#[cfg(test)]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn challenge() -> impl Strategy<Value = String> {
        prop_oneof![
            "(Bearer|Basic|bearer|Digest) ?(realm|service|scope|x)=\"[a-z:/.0-9?=&\" ]{0,40}\"(, ?[a-z]{1,6}=\"?[a-z:/.0-9]{0,20}\"?){0,3}",
            any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        /// Any `WWW-Authenticate` value: no panic, and a Bearer realm is always an
        /// http(s) URL (a token is never fetched from anywhere else).
        #[test]
        fn challenges_never_panic_and_realms_are_http(v in challenge()) {
            if let Some(Challenge::Bearer { realm, .. }) = parse_challenge(&v) {
                prop_assert!(matches!(realm.scheme(), "http" | "https"));
            }
        }
    }
}

//! The upstream client against a scripted registry on loopback: the conformance checks,
//! the token flow and its expiry, Basic auth, redirects to another host without
//! credentials, 429 with its headers and Retry-After, a stalled body, a lying
//! Content-Length, a huge manifest, and the time limit on a silent server.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use mirrorlet_oci::conformance::{self, Fixture};
use mirrorlet_oci::manifest::OCI_MANIFEST;
use mirrorlet_oci::{Digest, Reference, Registry, Repository, Tag, Upstream, UpstreamError};
use mirrorlet_upstream::{Client, Credentials, UpstreamConfig, UpstreamMetrics};
use support::{AuthMode, Scripted};

const ACCEPT: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";
const REPO: &str = "conformance/app";

/// The fixture in the scripted registry, and a client for it.
async fn setup(
    config: impl FnOnce(&mut UpstreamConfig),
) -> (Scripted, Client, Fixture, UpstreamMetrics) {
    let server = Scripted::start().await;
    let fx = Fixture::new();
    for (media_type, data) in fx.upstream_content() {
        server.put(REPO, &media_type, data);
    }
    server.tag(REPO, conformance::UPSTREAM_TAG, fx.index.0.digest.as_str());
    let (registry, _) = conformance::upstream_location();
    let mut c = UpstreamConfig {
        registries: vec![registry.clone()],
        read_timeout: Duration::from_secs(5),
        response_timeout: Duration::from_secs(5),
        ..UpstreamConfig::default()
    };
    c.endpoints.insert(
        registry,
        reqwest::Url::parse(&format!("{}/", server.url())).expect("url"),
    );
    config(&mut c);
    let metrics = UpstreamMetrics::default();
    let client = Client::new(c, metrics.clone()).expect("client");
    (server, client, fx, metrics)
}

fn location() -> (Registry, Repository) {
    conformance::upstream_location()
}

fn tag() -> Reference {
    Reference::Tag(Tag::parse(conformance::UPSTREAM_TAG).expect("tag"))
}

fn login(user: &str, pass: &str) -> Credentials {
    let (registry, _) = location();
    Credentials::parse(&format!(
        r#"{{"auths": {{"{registry}": {{"username": "{user}", "password": "{pass}"}}}}}}"#
    ))
    .expect("credentials")
}

async fn read(mut body: mirrorlet_oci::BlobStream) -> Result<Vec<u8>, std::io::Error> {
    let mut out = Vec::new();
    while let Some(c) = body.next().await {
        out.extend_from_slice(&c?);
    }
    Ok(out)
}

#[tokio::test]
async fn the_client_passes_the_upstream_conformance_checks() {
    let (_server, client, fx, _) = setup(|_| {}).await;
    conformance::check_upstream(&client, &fx).await;
}

#[tokio::test]
async fn anonymous_tokens_are_fetched_once_and_renewed_when_refused() {
    let (server, client, fx, _) = setup(|_| {}).await;
    server.set(|s| {
        s.auth = AuthMode::Bearer {
            login: None,
            expires_in: 300,
        }
    });
    let (r, repo) = location();
    for _ in 0..3 {
        let d = client
            .head_manifest(&r, &repo, &tag(), ACCEPT)
            .await
            .expect("HEAD with a token");
        assert_eq!(d, fx.index.0);
    }
    assert_eq!(
        server.count("token", "GET", "/token"),
        1,
        "one token, reused"
    );
    assert_eq!(
        server.count("registry", "HEAD", "/manifests/"),
        4,
        "one 401, then three requests with the token"
    );
    let scope = server
        .log()
        .iter()
        .find(|l| l.host == "token")
        .map(|l| l.path.clone())
        .expect("token request");
    assert!(
        scope.contains("scope=repository%3Aconformance%2Fapp%3Apull")
            && scope.contains("service=scripted"),
        "{scope}"
    );

    // The registry stops accepting the token: one 401, a new token, the request succeeds.
    server.revoke_tokens();
    client
        .head_manifest(&r, &repo, &tag(), ACCEPT)
        .await
        .expect("retried once with a fresh token");
    assert_eq!(server.count("token", "GET", "/token"), 2);
    assert_eq!(server.count("registry", "HEAD", "/manifests/"), 6);
}

#[tokio::test]
async fn tokens_are_renewed_before_they_expire() {
    let (server, client, _, _) = setup(|_| {}).await;
    server.set(|s| {
        s.auth = AuthMode::Bearer {
            login: None,
            expires_in: 6,
        }
    });
    let (r, repo) = location();
    client
        .head_manifest(&r, &repo, &tag(), ACCEPT)
        .await
        .expect("first");
    // A 6 s token is renewed 5 s before it expires: after a second, a new one is fetched
    // before the request, so the registry never sees an expired token.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    client
        .head_manifest(&r, &repo, &tag(), ACCEPT)
        .await
        .expect("second");
    assert_eq!(server.count("token", "GET", "/token"), 2);
    assert_eq!(
        server.count("registry", "HEAD", "/manifests/"),
        3,
        "no 401 for the second"
    );
}

#[tokio::test]
async fn credentials_go_to_the_token_service_and_a_wrong_password_is_named() {
    let (server, client, _, _) = setup(|c| c.credentials = login("alice", "secret")).await;
    server.set(|s| {
        s.auth = AuthMode::Bearer {
            login: Some(("alice".into(), "secret".into())),
            expires_in: 300,
        }
    });
    let (r, repo) = location();
    client
        .get_manifest(&r, &repo, &tag(), ACCEPT)
        .await
        .expect("pulls with the login");
    let token_auth = server
        .log()
        .iter()
        .find(|l| l.host == "token")
        .and_then(|l| l.authorization.clone())
        .expect("the token request carried the login");
    assert!(token_auth.starts_with("Basic "));

    let (server, client, _, _) = setup(|c| c.credentials = login("alice", "wrong")).await;
    server.set(|s| {
        s.auth = AuthMode::Bearer {
            login: Some(("alice".into(), "secret".into())),
            expires_in: 300,
        }
    });
    let err = client
        .get_manifest(&r, &repo, &tag(), ACCEPT)
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, UpstreamError::Denied(why) if why.contains("refused the configured credentials")),
        "{err}"
    );
}

#[tokio::test]
async fn basic_auth_is_sent_once_asked_for() {
    let (server, client, fx, _) = setup(|c| c.credentials = login("bob", "pw")).await;
    server.set(|s| s.auth = AuthMode::Basic("bob".into(), "pw".into()));
    let (r, repo) = location();
    let blob = client
        .get_blob(&r, &repo, &fx.small_layer.0.digest, 0)
        .await
        .expect("blob with Basic auth");
    assert_eq!(
        read(blob.body).await.expect("body"),
        fx.small_layer.1.as_ref()
    );
    client
        .get_blob(&r, &repo, &fx.config.0.digest, 0)
        .await
        .expect("second blob");
    assert_eq!(
        server.count("registry", "GET", "/blobs/"),
        3,
        "one 401, then Basic sent up front"
    );

    // Without credentials: a clear denial.
    let (server, client, fx, _) = setup(|_| {}).await;
    server.set(|s| s.auth = AuthMode::Basic("bob".into(), "pw".into()));
    let err = client
        .get_blob(&r, &repo, &fx.small_layer.0.digest, 0)
        .await
        .expect_err("denied");
    assert!(
        matches!(&err, UpstreamError::Denied(why) if why.contains("none are configured")),
        "{err}"
    );
}

#[tokio::test]
async fn redirects_to_another_host_carry_no_credentials() {
    let (server, client, fx, _) = setup(|_| {}).await;
    server.set(|s| {
        s.auth = AuthMode::Bearer {
            login: None,
            expires_in: 300,
        };
        s.redirect_blobs = true;
    });
    let (r, repo) = location();
    let (big, bytes) = &fx.big_layer;
    let blob = client
        .get_blob(&r, &repo, &big.digest, 0)
        .await
        .expect("blob via the CDN");
    assert_eq!(blob.size, big.size);
    assert_eq!(read(blob.body).await.expect("body"), bytes.as_ref());
    let tail = client
        .get_blob(&r, &repo, &big.digest, 1000)
        .await
        .expect("range via the CDN");
    assert_eq!(read(tail.body).await.expect("body"), &bytes[1000..]);
    let log = server.log();
    let to_registry: Vec<_> = log
        .iter()
        .filter(|l| l.host == "registry" && l.status == 307)
        .collect();
    assert_eq!(to_registry.len(), 2);
    assert!(
        to_registry.iter().all(|l| l.authorization.is_some()),
        "the registry got the token"
    );
    let to_cdn: Vec<_> = log.iter().filter(|l| l.host == "cdn").collect();
    assert_eq!(to_cdn.len(), 2);
    assert!(
        to_cdn.iter().all(|l| l.authorization.is_none()),
        "no credentials went to the CDN: {to_cdn:?}"
    );
}

#[tokio::test]
async fn a_challenge_from_a_redirect_target_is_never_followed_with_the_login() {
    let (server, client, fx, _) = setup(|c| c.credentials = login("bob", "pw")).await;
    server.set(|s| {
        s.auth = AuthMode::Basic("bob".into(), "pw".into());
        s.redirect_blobs = true;
        s.cdn_challenges = true;
    });
    let (r, repo) = location();
    let err = client
        .get_blob(&r, &repo, &fx.small_layer.0.digest, 0)
        .await
        .expect_err("the CDN refuses");
    assert!(matches!(err, UpstreamError::Denied(_)), "{err:?}");
    // The registry still gets its login; the CDN never does, and its "token service" is
    // never asked.
    client
        .head_manifest(&r, &repo, &tag(), ACCEPT)
        .await
        .expect("the registry's own auth still works");
    let log = server.log();
    assert!(
        log.iter()
            .filter(|l| l.host == "cdn")
            .all(|l| l.authorization.is_none() && !l.path.contains("steal")),
        "{log:?}"
    );
    assert!(log.iter().all(|l| !l.path.contains("steal")));
}

#[tokio::test]
async fn a_429_is_reported_and_the_registry_left_alone_until_retry_after() {
    let (server, client, fx, metrics) = setup(|_| {}).await;
    server.set(|s| {
        s.manifest_budget = Some(1);
        s.retry_after = Some("1".into());
    });
    let (r, repo) = location();
    let by_digest = Reference::Digest(fx.oci_manifest.0.digest.clone());
    client
        .get_manifest(&r, &repo, &by_digest, ACCEPT)
        .await
        .expect("within the budget");
    let labels = mirrorlet_upstream::metrics::RegistryLabels {
        registry: r.to_string(),
    };
    assert_eq!(metrics.ratelimit_limit.get_or_create(&labels).get(), 1);
    assert_eq!(metrics.ratelimit_remaining.get_or_create(&labels).get(), 0);
    let err = client
        .get_manifest(&r, &repo, &by_digest, ACCEPT)
        .await
        .expect_err("over the budget");
    assert!(
        matches!(err, UpstreamError::RateLimited { retry_after, .. } if retry_after <= Duration::from_secs(1)),
        "{err:?}"
    );
    let sent = server.log().len();
    // Meanwhile nothing is sent, not even a HEAD.
    let err = client
        .head_manifest(&r, &repo, &tag(), ACCEPT)
        .await
        .expect_err("left alone");
    assert!(matches!(err, UpstreamError::RateLimited { .. }));
    assert_eq!(server.log().len(), sent);
    assert_eq!(metrics.rate_limited.get_or_create(&labels).get(), 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    client
        .head_manifest(&r, &repo, &tag(), ACCEPT)
        .await
        .expect("asked again after Retry-After (HEADs do not count)");
}

#[tokio::test]
async fn a_stalled_body_and_a_lying_length_end_the_stream_with_an_error() {
    let (server, client, fx, _) = setup(|c| c.read_timeout = Duration::from_millis(300)).await;
    let (r, repo) = location();
    let big = &fx.big_layer.0;
    server.set(|s| s.stall_after = Some(100_000));
    let blob = client
        .get_blob(&r, &repo, &big.digest, 0)
        .await
        .expect("head arrives");
    let err = read(blob.body).await.expect_err("stalls");
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "{err}");

    server.set(|s| {
        s.stall_after = None;
        s.short_by = Some(5000);
    });
    let blob = client
        .get_blob(&r, &repo, &big.digest, 0)
        .await
        .expect("head arrives");
    assert_eq!(blob.size, big.size + 5000, "the size is what was announced");
    assert!(read(blob.body).await.is_err(), "the body falls short of it");
}

#[tokio::test]
async fn manifests_are_bounded_and_described_from_their_bytes() {
    let (server, client, _, _) = setup(|_| {}).await;
    let (r, repo) = location();
    // Over containerd's 4 MiB limit.
    let huge = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","layers":[],"config":{{}},"pad":"{}"}}"#,
        "x".repeat(5 << 20)
    );
    let digest = server.put(REPO, OCI_MANIFEST, Bytes::from(huge));
    let err = client
        .get_manifest(
            &r,
            &repo,
            &Reference::Digest(Digest::parse(&digest).expect("digest")),
            ACCEPT,
        )
        .await
        .expect_err("too large");
    assert!(
        matches!(&err, UpstreamError::Invalid(w) if w.contains("larger than")),
        "{err}"
    );

    // A registry that refuses HEAD: the client falls back to GET.
    server.set(|s| s.no_head = true);
    let d = client
        .head_manifest(&r, &repo, &tag(), ACCEPT)
        .await
        .expect("via GET");
    assert_eq!(d.media_type, mirrorlet_oci::manifest::OCI_INDEX);
    assert_eq!(server.count("registry", "GET", "/manifests/v1"), 1);
}

#[tokio::test]
async fn a_server_that_never_answers_is_given_up_on() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = silent.local_addr().expect("addr");
    // Accepts connections and holds them without a word.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let (registry, repo) = location();
    let mut c = UpstreamConfig {
        registries: vec![registry.clone()],
        response_timeout: Duration::from_millis(300),
        ..UpstreamConfig::default()
    };
    c.endpoints.insert(
        registry.clone(),
        reqwest::Url::parse(&format!("http://{addr}/")).expect("url"),
    );
    let client = Client::new(c, UpstreamMetrics::default()).expect("client");
    let err = client
        .head_manifest(&registry, &repo, &tag(), ACCEPT)
        .await
        .expect_err("no answer");
    assert!(
        matches!(&err, UpstreamError::Unavailable(w) if w.contains("no response within")),
        "{err}"
    );
    assert!(err.is_outage());
}

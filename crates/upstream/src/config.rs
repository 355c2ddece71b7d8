//! Which registries the agent pulls through, where each is reached, with which credentials,
//! and the time limits of every request.

use std::collections::HashMap;
use std::time::Duration;

use mirrorlet_oci::Registry;
use reqwest::Url;

use crate::credentials::Credentials;

/// Where Docker Hub's registry API is served (`docker.io` is only its name).
pub const DOCKER_HUB_ENDPOINT: &str = "https://registry-1.docker.io";

/// The upstream client's configuration.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The registries the agent may pull through. Any other registry is never contacted.
    pub registries: Vec<Registry>,
    /// Where registries are reached, when not at `https://<registry>` (Docker Hub: at
    /// [`DOCKER_HUB_ENDPOINT`]).
    pub endpoints: HashMap<Registry, Url>,
    /// Credentials by registry; anonymous where there are none.
    pub credentials: Credentials,
    /// Time to establish a connection.
    pub connect_timeout: Duration,
    /// Time from sending a request to its response head.
    pub response_timeout: Duration,
    /// Time a response body may deliver nothing before the transfer counts as broken.
    pub read_timeout: Duration,
    /// How long a registry that answered 429 without `Retry-After` is left alone.
    pub default_retry_after: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            registries: Vec::new(),
            endpoints: HashMap::new(),
            credentials: Credentials::none(),
            connect_timeout: Duration::from_secs(5),
            response_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(30),
            default_retry_after: Duration::from_secs(60),
        }
    }
}

impl UpstreamConfig {
    /// Where `registry` is reached.
    pub fn endpoint(&self, registry: &Registry) -> Url {
        if let Some(url) = self.endpoints.get(registry) {
            return url.clone();
        }
        let text = if registry.is_docker_hub() {
            DOCKER_HUB_ENDPOINT.to_owned()
        } else {
            format!("https://{registry}")
        };
        Url::parse(&text).unwrap_or_else(|_| {
            // A validated registry name is always a valid host; keep a harmless fallback.
            Url::parse(DOCKER_HUB_ENDPOINT).expect("constant URL parses")
        })
    }
}

/// Parses `REGISTRY=URL` (e.g. `docker.io=https://mirror.example.com`): the URL must be
/// `http://` or `https://` with a host and no query; a path is kept as a prefix.
pub fn parse_endpoint(s: &str) -> Result<(Registry, Url), String> {
    let (registry, url) = s
        .split_once('=')
        .ok_or("expected REGISTRY=URL, e.g. docker.io=https://registry-1.docker.io")?;
    let registry = Registry::parse(registry.trim()).map_err(|e| e.to_string())?;
    let mut url = Url::parse(url.trim()).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!("{url} must be http:// or https:// with a host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!("{url} must have no query or fragment"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err("must not carry credentials; give them in --upstream-credentials".to_owned());
    }
    // A trailing slash makes joining `v2/...` keep any path prefix.
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok((registry, url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_default_and_parse() {
        let mut c = UpstreamConfig::default();
        let hub = Registry::docker_hub();
        assert_eq!(c.endpoint(&hub).as_str(), "https://registry-1.docker.io/");
        let ghcr = Registry::parse("ghcr.io").expect("registry");
        assert_eq!(c.endpoint(&ghcr).as_str(), "https://ghcr.io/");
        let (r, u) = parse_endpoint("registry.e2e.test=http://198.18.0.254:5000").expect("parses");
        assert_eq!(u.as_str(), "http://198.18.0.254:5000/");
        c.endpoints.insert(r.clone(), u);
        assert_eq!(c.endpoint(&r).as_str(), "http://198.18.0.254:5000/");
        let (_, u) = parse_endpoint("docker.io=https://mirror.example.com/hub").expect("parses");
        assert_eq!(
            u.join("v2/x").expect("join").as_str(),
            "https://mirror.example.com/hub/v2/x"
        );
        for bad in [
            "docker.io",
            "docker.io=ftp://x",
            "docker.io=not a url",
            "bad host=https://x",
            "docker.io=https://x/?a=b",
            "docker.io=https://user:pw@x",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }
}

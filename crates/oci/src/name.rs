//! Repository names and registry hosts, validated as the OCI distribution spec defines them,
//! with Docker Hub's normalisation (`nginx` on `docker.io` is `library/nginx`).

use std::fmt;

/// The registry containerd assumes when a request carries no `ns` parameter.
pub const DOCKER_HUB: &str = "docker.io";

/// The longest repository name accepted (the spec's common client limit).
pub const MAX_NAME_LEN: usize = 255;

/// Why a string is not a repository name or registry host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The repository name does not match the distribution spec's grammar.
    #[error("repository name {0:?} is invalid")]
    InvalidRepository(String),
    /// The registry host is not a host name or address with an optional port.
    #[error("registry {0:?} is not a valid host[:port]")]
    InvalidRegistry(String),
}

/// A registry host such as `docker.io`, `ghcr.io` or `10.0.0.1:5000`.
///
/// Docker Hub's aliases (`index.docker.io`, `registry-1.docker.io`) normalise to `docker.io`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Registry(String);

impl Registry {
    /// Validates and normalises a registry host.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        let valid = !s.is_empty()
            && s.len() <= 253
            && s.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'_')
            })
            && !s.starts_with(['.', '-', ':']);
        if !valid {
            return Err(NameError::InvalidRegistry(s.to_owned()));
        }
        let lower = s.to_ascii_lowercase();
        let host = match lower.as_str() {
            "index.docker.io" | "registry-1.docker.io" | "docker.io" => DOCKER_HUB.to_owned(),
            _ => lower,
        };
        Ok(Self(host))
    }

    /// Docker Hub.
    pub fn docker_hub() -> Self {
        Self(DOCKER_HUB.to_owned())
    }

    /// Whether this is Docker Hub.
    pub fn is_docker_hub(&self) -> bool {
        self.0 == DOCKER_HUB
    }

    /// The host as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The host without a `:port` suffix. containerd drops the port in its
    /// `containerd.io/distribution.source.<host>` content labels.
    pub fn without_port(&self) -> &str {
        match self.0.rsplit_once(':') {
            Some((host, port))
                if port.bytes().all(|b| b.is_ascii_digit()) && !host.ends_with(':') =>
            {
                host
            }
            _ => &self.0,
        }
    }
}

impl fmt::Display for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A repository name such as `library/nginx`, checked against the spec's grammar:
/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Repository(String);

impl Repository {
    /// Validates a repository name as given (no normalisation).
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(valid_component) {
            return Err(NameError::InvalidRepository(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// Validates a repository name and applies Docker Hub's `library/` rule when `registry`
    /// is Docker Hub and the name has a single component.
    pub fn parse_for(registry: &Registry, s: &str) -> Result<Self, NameError> {
        let repo = Self::parse(s)?;
        if registry.is_docker_hub() && !repo.0.contains('/') {
            return Self::parse(&format!("library/{}", repo.0));
        }
        Ok(repo)
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One path component: alphanumeric runs joined by `.`, `_`, `__` or one or more `-`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_grammar() {
        for good in [
            "nginx",
            "library/nginx",
            "a/b/c",
            "my-app",
            "my--app",
            "a.b",
            "a_b",
            "a__b",
            "x0/y1",
        ] {
            assert!(Repository::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "", "Nginx", "-a", "a-", "a/", "/a", "a//b", "a___b", "a..b", "a._b", "a b", "../x",
            "a/../b",
        ] {
            assert!(Repository::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Repository::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn docker_hub_normalisation() {
        let hub = Registry::parse("registry-1.docker.io").expect("valid");
        assert!(hub.is_docker_hub());
        assert_eq!(
            Repository::parse_for(&hub, "nginx")
                .expect("valid")
                .as_str(),
            "library/nginx"
        );
        assert_eq!(
            Repository::parse_for(&hub, "bitnami/redis")
                .expect("valid")
                .as_str(),
            "bitnami/redis"
        );
        let ghcr = Registry::parse("ghcr.io").expect("valid");
        assert_eq!(
            Repository::parse_for(&ghcr, "nginx")
                .expect("valid")
                .as_str(),
            "nginx"
        );
    }

    #[test]
    fn registry_hosts() {
        assert_eq!(
            Registry::parse("Quay.IO").expect("valid").as_str(),
            "quay.io"
        );
        assert_eq!(
            Registry::parse("127.0.0.1:5055")
                .expect("valid")
                .without_port(),
            "127.0.0.1"
        );
        assert_eq!(
            Registry::parse("ghcr.io").expect("valid").without_port(),
            "ghcr.io"
        );
        for bad in ["", "a/b", "a b", ":5000", "host?x"] {
            assert!(Registry::parse(bad).is_err(), "{bad:?}");
        }
    }
}

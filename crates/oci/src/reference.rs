//! Tags, manifest references (tag or digest) and full image names as containerd's CRI
//! stores them (`docker.io/library/nginx:1.25`, `ghcr.io/org/app@sha256:...`).

use std::fmt;

use crate::digest::{Digest, DigestError};
use crate::name::{NameError, Registry, Repository};

/// Why a string is not a tag, reference or image name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Not a tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
    #[error("tag {0:?} is invalid")]
    InvalidTag(String),
    /// Looked like a digest but is not one.
    #[error(transparent)]
    Digest(#[from] DigestError),
    /// The registry or repository part is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// An image name without a tag or digest, or otherwise malformed.
    #[error("image name {0:?} is not <registry>/<repository>(:<tag>|@<digest>)")]
    InvalidImageName(String),
}

/// A validated tag such as `1.25` or `latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    /// Validates a tag.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 128
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b.iter()
                .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
        if !ok {
            return Err(ReferenceError::InvalidTag(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }

    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a manifest request names: a tag to resolve, or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    /// A mutable tag.
    Tag(Tag),
    /// An immutable digest.
    Digest(Digest),
}

impl Reference {
    /// Parses the `<reference>` of `/v2/<name>/manifests/<reference>`: a digest if it has
    /// a colon, else a tag.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        if s.contains(':') {
            Ok(Self::Digest(Digest::parse(s)?))
        } else {
            Ok(Self::Tag(Tag::parse(s)?))
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tag(t) => t.fmt(f),
            Self::Digest(d) => d.fmt(f),
        }
    }
}

/// A fully qualified image name: registry, repository and a tag or digest.
///
/// Its text form is the name containerd's CRI gives images, and the key under which
/// mirrorlet advertises tags: `docker.io/library/nginx:1.25`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageName {
    /// The registry host.
    pub registry: Registry,
    /// The repository within it.
    pub repository: Repository,
    /// The tag or digest.
    pub reference: Reference,
}

impl ImageName {
    /// Builds a name from its parts.
    pub fn new(registry: Registry, repository: Repository, reference: Reference) -> Self {
        Self {
            registry,
            repository,
            reference,
        }
    }

    /// Parses a fully qualified name as containerd stores it. Names that are not fully
    /// qualified (CRI's `sha256:<config>` image ids, a missing registry) are rejected.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let bad = || ReferenceError::InvalidImageName(s.to_owned());
        let (registry, rest) = s.split_once('/').ok_or_else(bad)?;
        if !(registry.contains(['.', ':']) || registry == "localhost") {
            return Err(bad());
        }
        let registry = Registry::parse(registry)?;
        let (repo, reference) = if let Some((repo, digest)) = rest.split_once('@') {
            (repo, Reference::Digest(Digest::parse(digest)?))
        } else {
            let (repo, tag) = rest.rsplit_once(':').ok_or_else(bad)?;
            (repo, Reference::Tag(Tag::parse(tag)?))
        };
        let repository = Repository::parse_for(&registry, repo)?;
        Ok(Self::new(registry, repository, reference))
    }

    /// Reads an image reference as `docker pull` and kubelet take one: a name without a
    /// registry is Docker Hub's (`nginx` is `docker.io/library/nginx`), a name without a
    /// tag or digest means `:latest`, and a digest wins over a tag beside it.
    pub fn parse_familiar(s: &str) -> Result<Self, ReferenceError> {
        let bad = || ReferenceError::InvalidImageName(s.to_owned());
        if s.is_empty() || s.contains(char::is_whitespace) || s.contains("://") {
            return Err(bad());
        }
        let (name, digest) = match s.split_once('@') {
            Some((name, digest)) => (name, Some(Digest::parse(digest)?)),
            None => (s, None),
        };
        // A tag is after the last colon that follows the last slash (a colon before it is
        // a registry's port).
        let (name, tag) = match name.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t)),
            _ => (name, None),
        };
        let (registry, path) = match name.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (first, rest)
            }
            _ => ("docker.io", name),
        };
        let registry = match registry {
            "index.docker.io" | "registry-1.docker.io" => Registry::docker_hub(),
            r => Registry::parse(r)?,
        };
        let repository = Repository::parse_for(&registry, path)?;
        let reference = match (digest, tag) {
            (Some(d), _) => Reference::Digest(d),
            (None, Some(t)) => Reference::Tag(Tag::parse(t)?),
            (None, None) => Reference::Tag(Tag::parse("latest")?),
        };
        Ok(Self::new(registry, repository, reference))
    }

    /// The tag, if the name carries one.
    pub fn tag(&self) -> Option<&Tag> {
        match &self.reference {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        }
    }
}

impl fmt::Display for ImageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sep = match self.reference {
            Reference::Tag(_) => ':',
            Reference::Digest(_) => '@',
        };
        write!(
            f,
            "{}/{}{sep}{}",
            self.registry, self.repository, self.reference
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn familiar_references_read_as_docker_and_kubelet_read_them() {
        for (given, want) in [
            ("nginx", "docker.io/library/nginx:latest"),
            ("nginx:1.25", "docker.io/library/nginx:1.25"),
            ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
            (
                "index.docker.io/library/alpine",
                "docker.io/library/alpine:latest",
            ),
            ("ghcr.io/org/app", "ghcr.io/org/app:latest"),
            (
                "registry.e2e.test:5000/team/app:v2",
                "registry.e2e.test:5000/team/app:v2",
            ),
            ("localhost/app", "localhost/app:latest"),
            (
                &format!("nginx:1.25@{D}"),
                &format!("docker.io/library/nginx@{D}"),
            ),
        ] {
            let name = ImageName::parse_familiar(given).unwrap_or_else(|e| panic!("{given}: {e}"));
            assert_eq!(name.to_string(), want, "{given}");
        }
        for bad in [
            "",
            "Nginx",
            "nginx:bad tag",
            "nginx:-x",
            "https://ghcr.io/org/app",
            "ghcr.io/org/app@sha256:short",
            "ghcr.io//app",
        ] {
            assert!(ImageName::parse_familiar(bad).is_err(), "{bad:?} refused");
        }
    }

    #[test]
    fn tags() {
        assert!(Tag::parse("1.25").is_ok());
        assert!(Tag::parse("_x").is_ok());
        assert!(Tag::parse(&"a".repeat(128)).is_ok());
        for bad in ["", ".x", "-x", "a/b", "a:b", &"a".repeat(129)] {
            assert!(Tag::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn references() {
        assert!(matches!(Reference::parse("v1"), Ok(Reference::Tag(_))));
        assert!(matches!(Reference::parse(D), Ok(Reference::Digest(_))));
        assert!(Reference::parse("sha256:zz").is_err());
    }

    #[test]
    fn image_names_round_trip() {
        for s in [
            "docker.io/library/nginx:1.25",
            "ghcr.io/org/app/sub:v1",
            "localhost/x:y",
            "10.0.0.1:5000/team/app:latest",
        ] {
            assert_eq!(ImageName::parse(s).expect(s).to_string(), s);
        }
        let by_digest = format!("quay.io/a/b@{D}");
        assert_eq!(
            ImageName::parse(&by_digest).expect("valid").to_string(),
            by_digest
        );
        let n = ImageName::parse("docker.io/nginx:1").expect("valid");
        assert_eq!(n.to_string(), "docker.io/library/nginx:1");
        assert_eq!(n.tag().map(Tag::as_str), Some("1"));
    }

    #[test]
    fn rejects_unqualified_names() {
        for bad in [
            D,
            "nginx:1",
            "docker.io/library/nginx",
            "docker.io/Nginx:1",
            "a.io/b@sha256:x",
        ] {
            assert!(ImageName::parse(bad).is_err(), "{bad:?}");
        }
    }
}

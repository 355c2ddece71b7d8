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

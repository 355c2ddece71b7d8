//! Parsing of distribution-spec pull paths (`/v2/<name>/manifests/<reference>`,
//! `/v2/<name>/blobs/<digest>`) into validated routes.

use crate::digest::{Digest, DigestError};
use crate::name::{NameError, Registry, Repository};
use crate::reference::{Reference, ReferenceError};

/// A parsed pull request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`: the API version check.
    Base,
    /// `/v2/<name>/manifests/<reference>`.
    Manifest {
        /// The repository, normalised for the registry.
        repository: Repository,
        /// The tag or digest.
        reference: Reference,
    },
    /// `/v2/<name>/blobs/<digest>`.
    Blob {
        /// The repository, normalised for the registry.
        repository: Repository,
        /// The blob digest.
        digest: Digest,
    },
}

/// Why a path is not a pull route this mirror serves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is not under `/v2/` or names no known endpoint.
    #[error("no such endpoint: {0}")]
    NotFound(String),
    /// A known endpoint this pull-only mirror does not implement (pushes, tag lists, referrers).
    #[error("endpoint not supported by a pull-only mirror: {0}")]
    Unsupported(String),
    /// The repository name is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The manifest reference is invalid.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// The blob digest is invalid.
    #[error(transparent)]
    Digest(#[from] DigestError),
}

impl Route {
    /// The registry a request path is for, and its route. `ns` (containerd's `?ns=`
    /// parameter) names the registry when given. Without it, a first path component that
    /// is a host name (it has a dot or a colon, capitals, or is `localhost`: the rule by
    /// which Docker tells a registry from a repository) names it, and the rest is the path
    /// within it (`/v2/quay.io/org/app/manifests/2`: podman, CRI-O and skopeo name the
    /// registry in their mirror's location). Else it is Docker Hub, whose repositories
    /// never start with such a component.
    pub fn locate(path: &str, ns: Option<Registry>) -> Result<(Registry, Self), PathError> {
        if let Some(registry) = ns {
            let route = Self::parse(path, &registry)?;
            return Ok((registry, route));
        }
        let named = path.strip_prefix("/v2/").and_then(|rest| {
            // A host only where a repository follows it: `/v2/Upper/manifests/1` is a
            // (bad) repository name, not a registry with none.
            let (first, tail) = rest.split_once('/')?;
            // (`/v2/quay.io/blobs/app/manifests/1` is quay.io's `blobs/app`).
            let names_repository = tail.rsplitn(3, '/').nth(2).is_some_and(|r| !r.is_empty());
            (is_host(first) && names_repository).then_some((first, tail))
        });
        match named {
            Some((host, tail)) => {
                let registry = Registry::parse(host)?;
                let route = Self::parse(&format!("/v2/{tail}"), &registry)?;
                Ok((registry, route))
            }
            None => {
                let registry = Registry::docker_hub();
                let route = Self::parse(path, &registry)?;
                Ok((registry, route))
            }
        }
    }

    /// Parses a request path (starting with `/v2`) for a request aimed at `registry`.
    pub fn parse(path: &str, registry: &Registry) -> Result<Self, PathError> {
        let rest = path
            .strip_prefix("/v2")
            .ok_or_else(|| PathError::NotFound(path.to_owned()))?;
        if rest.is_empty() || rest == "/" {
            return Ok(Self::Base);
        }
        let rest = rest
            .strip_prefix('/')
            .ok_or_else(|| PathError::NotFound(path.to_owned()))?;
        let mut parts = rest.rsplitn(3, '/');
        let (last, kind, name) = match (parts.next(), parts.next(), parts.next()) {
            (Some(last), Some(kind), Some(name)) => (last, kind, name),
            _ => return Err(PathError::NotFound(path.to_owned())),
        };
        match kind {
            "manifests" => Ok(Self::Manifest {
                repository: Repository::parse_for(registry, name)?,
                reference: Reference::parse(last)?,
            }),
            "blobs" => Ok(Self::Blob {
                repository: Repository::parse_for(registry, name)?,
                digest: Digest::parse(last)?,
            }),
            "tags" | "referrers" | "uploads" => Err(PathError::Unsupported(path.to_owned())),
            _ => Err(PathError::NotFound(path.to_owned())),
        }
    }
}

/// Whether the first component of a name is a registry host, as Docker decides.
pub(crate) fn is_host(component: &str) -> bool {
    component.contains(['.', ':'])
        || component == "localhost"
        || component.bytes().any(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn hub() -> Registry {
        Registry::docker_hub()
    }

    #[test]
    fn parses_pull_routes() {
        assert_eq!(Route::parse("/v2/", &hub()), Ok(Route::Base));
        assert_eq!(Route::parse("/v2", &hub()), Ok(Route::Base));
        let Ok(Route::Manifest {
            repository,
            reference,
        }) = Route::parse("/v2/nginx/manifests/1.25", &hub())
        else {
            panic!("manifest route")
        };
        assert_eq!(repository.as_str(), "library/nginx");
        assert_eq!(reference.to_string(), "1.25");
        let ghcr = Registry::parse("ghcr.io").expect("valid");
        let Ok(Route::Blob { repository, digest }) =
            Route::parse(&format!("/v2/a/manifests/blobs/{D}"), &ghcr)
        else {
            panic!("blob route")
        };
        assert_eq!(repository.as_str(), "a/manifests");
        assert_eq!(digest.as_str(), D);
    }

    #[test]
    fn the_registry_is_the_ns_parameter_else_a_host_in_the_path_else_docker_hub() {
        let repo_of = |r: &Route| match r {
            Route::Manifest { repository, .. } | Route::Blob { repository, .. } => {
                repository.as_str().to_owned()
            }
            Route::Base => String::new(),
        };
        let located = |path: &str, ns: Option<&str>| {
            let ns = ns.map(|n| Registry::parse(n).expect("registry"));
            let (r, route) = Route::locate(path, ns).expect("located");
            (r.as_str().to_owned(), repo_of(&route))
        };
        // podman's mirror location `agent:30020/quay.io`.
        assert_eq!(
            located("/v2/quay.io/someorg/app/manifests/2", None),
            ("quay.io".to_owned(), "someorg/app".to_owned())
        );
        assert_eq!(
            located(&format!("/v2/localhost:5000/app/blobs/{D}"), None),
            ("localhost:5000".to_owned(), "app".to_owned())
        );
        assert_eq!(
            located("/v2/docker.io/nginx/manifests/1", None),
            ("docker.io".to_owned(), "library/nginx".to_owned())
        );
        // Without a host first: Docker Hub (Docker's registry-mirrors), never another.
        assert_eq!(
            located("/v2/someorg/app/manifests/2", None),
            ("docker.io".to_owned(), "someorg/app".to_owned())
        );
        // containerd's `ns` decides; the path is the repository's.
        assert_eq!(
            located("/v2/someorg/app/manifests/2", Some("quay.io")),
            ("quay.io".to_owned(), "someorg/app".to_owned())
        );
        assert_eq!(
            located("/v2/", None),
            ("docker.io".to_owned(), String::new())
        );
        // A repository may start with `blobs` or `manifests`.
        assert_eq!(
            located("/v2/quay.io/blobs/app/manifests/1", None),
            ("quay.io".to_owned(), "blobs/app".to_owned())
        );
        assert_eq!(
            located("/v2/quay.io/manifests/app/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000", None).0,
            "quay.io"
        );
        assert!(matches!(
            Route::locate("/v2/Upper/manifests/v1", None),
            Err(PathError::Name(_))
        ));
        assert!(matches!(
            Route::locate("/v2/bad..host!/app/manifests/2", None),
            Err(PathError::Name(_))
        ));
    }

    #[test]
    fn rejects_bad_paths() {
        assert!(matches!(
            Route::parse("/v1/x", &hub()),
            Err(PathError::NotFound(_))
        ));
        assert!(matches!(
            Route::parse("/v2/x", &hub()),
            Err(PathError::NotFound(_))
        ));
        assert!(matches!(
            Route::parse("/v2/x/other/y", &hub()),
            Err(PathError::NotFound(_))
        ));
        assert!(matches!(
            Route::parse("/v2/x/tags/list", &hub()),
            Err(PathError::Unsupported(_))
        ));
        assert!(matches!(
            Route::parse("/v2/x/blobs/uploads/", &hub()),
            Err(PathError::Unsupported(_))
        ));
        assert!(matches!(
            Route::parse("/v2/X/manifests/v1", &hub()),
            Err(PathError::Name(_))
        ));
        assert!(matches!(
            Route::parse("/v2/x/manifests/v1:2", &hub()),
            Err(PathError::Reference(_))
        ));
        assert!(matches!(
            Route::parse("/v2/x/blobs/sha256:abc", &hub()),
            Err(PathError::Digest(_))
        ));
        assert!(matches!(
            Route::parse("/v2//manifests/v1", &hub()),
            Err(PathError::Name(_))
        ));
    }
}

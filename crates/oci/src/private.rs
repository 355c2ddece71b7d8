//! Private images: repositories whose tags the agents never answer, so that a node learns
//! a private tag only from the registry itself, with the pod's own pull secret (which
//! proves access); their content is then served by digest, from the node and its peers,
//! and pulled through with the cluster's credentials only if explicitly allowed.

use crate::glob::Glob;
use crate::name::Registry;

/// Which repositories are private.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Private {
    /// Over `registry/repository`.
    patterns: Vec<Glob>,
    /// Whether the agents may still pull them through with the cluster's credentials.
    pub pull_through: bool,
}

impl Private {
    /// From patterns: a registry (`registry.corp.example`: all its repositories) or a
    /// registry and repository where `*` matches any run of characters
    /// (`ghcr.io/myorg/*`). The registry is normalised as names are (`Index.Docker.io` is
    /// `docker.io`), and a pattern whose first component is not a host is Docker Hub's, as
    /// Docker reads names (`myorg/*` is `docker.io/myorg/*`). Empty patterns are skipped.
    pub fn new<S: AsRef<str>>(patterns: &[S], pull_through: bool) -> Result<Self, String> {
        let mut globs = Vec::new();
        for p in patterns.iter().map(AsRef::as_ref).filter(|p| !p.is_empty()) {
            let (first, rest) = p.split_once('/').map_or((p, None), |(r, t)| (r, Some(t)));
            let (registry, rest) = if crate::path::is_host(first) {
                (first, rest)
            } else if rest.is_some() {
                ("docker.io", Some(p))
            } else {
                return Err(format!(
                    "{p}: name a registry (a host: with a dot or a port, or localhost) or registry/repository"
                ));
            };
            let registry = Registry::parse(registry).map_err(|e| format!("{p}: {e}"))?;
            match rest {
                None => globs.push(Glob::new(&format!("{}/*", registry.as_str()))),
                Some("") => return Err(format!("{p}: a repository pattern after the '/'")),
                Some(r) if r.bytes().any(|b| b.is_ascii_uppercase()) => {
                    return Err(format!("{p}: repository names are lowercase"));
                }
                Some(r) => globs.push(Glob::new(&format!("{}/{r}", registry.as_str()))),
            }
        }
        Ok(Self {
            patterns: globs,
            pull_through,
        })
    }

    /// Whether `registry/repository` is private.
    pub fn covers(&self, registry: &str, repository: &str) -> bool {
        !self.patterns.is_empty() && self.matches(&format!("{registry}/{repository}"))
    }

    /// Whether the tag key `registry/repository:tag` names a private repository.
    pub fn covers_tag_key(&self, key: &str) -> bool {
        self.matches(key.rsplit_once(':').map_or(key, |(name, _)| name))
    }

    fn matches(&self, name: &str) -> bool {
        self.patterns.iter().any(|g| g.matches(name))
    }

    /// Whether the agents may pull `registry/repository` through themselves: only if it is
    /// not private, or private pull-through is allowed.
    pub fn may_pull_through(&self, registry: &str, repository: &str) -> bool {
        self.pull_through || !self.covers(registry, repository)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_registry_covers_its_repositories_and_a_pattern_only_its_own() {
        let p = Private::new(
            &["registry.corp.example", "ghcr.io/myorg/*", "quay.io/a/app"],
            false,
        )
        .expect("valid");
        assert!(p.covers("registry.corp.example", "team/app"));
        assert!(p.covers("ghcr.io", "myorg/app"));
        assert!(p.covers("quay.io", "a/app"));
        assert!(!p.covers("quay.io", "a/app2"));
        assert!(!p.covers("ghcr.io", "otherorg/app"));
        assert!(!p.covers("docker.io", "library/nginx"));
        assert!(
            !p.covers("registry.corp.example.evil", "x"),
            "the whole registry name"
        );
        assert!(p.covers_tag_key("registry.corp.example/team/app:1.2"));
        assert!(p.covers_tag_key("quay.io/a/app:latest"));
        assert!(!p.covers_tag_key("quay.io/a/app2:latest"));
        assert!(!p.may_pull_through("ghcr.io", "myorg/app"));
        assert!(p.may_pull_through("docker.io", "library/nginx"));
        let allowed = Private::new(&["ghcr.io/myorg/*"], true).expect("valid");
        assert!(allowed.may_pull_through("ghcr.io", "myorg/app"));
    }

    #[test]
    fn bad_patterns_are_refused_and_empty_ones_skipped() {
        assert!(Private::new(&["Not A Registry"], false).is_err());
        assert!(Private::new(&["ghcr.io/"], false).is_err());
        assert!(
            Private::new(&["myorg"], false).is_err(),
            "not a host, no repository"
        );
        assert!(
            Private::new(&["ghcr.io/MyOrg/*"], false).is_err(),
            "uppercase"
        );
        // Written as people write them: normalised as names are.
        let hub = Private::new(
            &[
                "myorg/*",
                "Index.Docker.io/other/app",
                "Registry.Corp.Example",
            ],
            false,
        )
        .expect("valid");
        assert!(hub.covers("docker.io", "myorg/app"));
        assert!(hub.covers("docker.io", "other/app"));
        assert!(hub.covers("registry.corp.example", "team/app"));
        assert!(!hub.covers("docker.io", "library/nginx"));
        assert_eq!(
            Private::new(&[""], false).expect("empty"),
            Private::default()
        );
        assert!(!Private::default().covers("ghcr.io", "x"));
    }
}

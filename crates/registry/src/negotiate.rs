//! Content negotiation for manifests, as Distribution does it: a client is answered with a
//! manifest only when it takes the manifest's media type, else with a 404 that sends it on
//! to the next host (which may convert it, as Distribution does for old clients).
//!
//! The types a client takes are those its `Accept` headers list (parameters ignored); no
//! `Accept`, or `*/*`, lists none. OCI manifests and indexes are served only to clients
//! that list them, asked by tag or by digest. Docker schema 2 manifests and manifest lists
//! asked by digest are served whatever the client lists (a registry cannot serve anything
//! else for a digest); asked by tag, only to clients that list them (Distribution would
//! convert them to schema 1 for the others; a mirror cannot). Anything else (schema 1) is
//! always served.

use http::HeaderMap;
use http::header::ACCEPT;
use mirrorlet_oci::manifest;

/// Whether a client that sent `headers` takes a manifest of `media_type`, asked by digest
/// (`by_digest`) or by tag.
pub(crate) fn accepts(headers: &HeaderMap, media_type: &str, by_digest: bool) -> bool {
    let listed = || {
        headers
            .get_all(ACCEPT)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.split(';').next().unwrap_or_default().trim())
            .any(|t| t.eq_ignore_ascii_case(media_type))
    };
    match media_type {
        manifest::OCI_MANIFEST | manifest::OCI_INDEX => listed(),
        manifest::DOCKER_MANIFEST | manifest::DOCKER_MANIFEST_LIST => by_digest || listed(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;
    use mirrorlet_oci::manifest::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_INDEX, OCI_MANIFEST};

    use super::*;

    fn accept(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(ACCEPT, HeaderValue::from_str(v).expect("value"));
        }
        h
    }

    #[test]
    fn oci_types_only_to_clients_that_list_them() {
        let all = accept(&[
            &format!("{OCI_MANIFEST}, {OCI_INDEX};q=0.9"),
            DOCKER_MANIFEST,
        ]);
        for by_digest in [false, true] {
            assert!(accepts(&all, OCI_MANIFEST, by_digest));
            assert!(accepts(&all, OCI_INDEX, by_digest));
            let docker_only = accept(&[&format!("{DOCKER_MANIFEST}, {DOCKER_MANIFEST_LIST}")]);
            assert!(!accepts(&docker_only, OCI_MANIFEST, by_digest));
            assert!(!accepts(&docker_only, OCI_INDEX, by_digest));
            assert!(!accepts(&accept(&[]), OCI_INDEX, by_digest), "no Accept");
            assert!(!accepts(&accept(&["*/*"]), OCI_MANIFEST, by_digest), "*/*");
        }
    }

    #[test]
    fn docker_types_by_digest_to_anyone_and_by_tag_to_clients_that_list_them() {
        let schema1 = accept(&["application/vnd.docker.distribution.manifest.v1+prettyjws"]);
        for t in [DOCKER_MANIFEST, DOCKER_MANIFEST_LIST] {
            assert!(accepts(&schema1, t, true));
            assert!(!accepts(&schema1, t, false));
            assert!(!accepts(&accept(&[]), t, false));
            assert!(accepts(&accept(&[&t.to_uppercase()]), t, false), "case");
        }
        assert!(accepts(
            &accept(&[DOCKER_MANIFEST_LIST]),
            DOCKER_MANIFEST_LIST,
            false
        ));
        assert!(!accepts(
            &accept(&[DOCKER_MANIFEST_LIST]),
            DOCKER_MANIFEST,
            false
        ));
        // Schema 1 and anything unknown: always.
        let v1 = "application/vnd.docker.distribution.manifest.v1+prettyjws";
        assert!(accepts(&accept(&[]), v1, false));
    }
}
